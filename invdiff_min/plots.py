"""Pictures written into run folders: sample grids, loss curves, loss histograms.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`) and written straight to PNG, so
importing this module never changes the global backend: it works headless and leaves a notebook's inline
plotting alone."""
from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from matplotlib.figure import Figure


def _subplots(figsize, nrows: int = 1, ncols: int = 1, **kwargs):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (H', W', C) grid with `nrow` images per row (padded with white)."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    full = torch.ones(rows * nrow, c, h + 2 * pad, w + 2 * pad)
    full[:n, :, pad:pad + h, pad:pad + w] = images.float().cpu()
    return rearrange(full, "(r k) c h w -> (r h) (k w) c", k=nrow)


def save_grid(path: str | Path, images: torch.Tensor, nrow: int, title: str | None = None,
              row_labels: list[str] | None = None, scale: float = 0.5) -> None:
    """Save a sample grid PNG; one row of the figure per block of `nrow` images when `row_labels` given."""
    grid = image_grid(images, nrow)
    fig, ax = _subplots(figsize=(max(2.0, grid.shape[1] * scale / 10), max(1.5, grid.shape[0] * scale / 10)))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        h = grid.shape[0] / len(row_labels)
        ax.set_yticks([h * (i + 0.5) for i in range(len(row_labels))], row_labels)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def save_loss_curve(path: str | Path, losses: torch.Tensor, title: str, smooth: int = 50) -> None:
    losses = losses.float().cpu()
    fig, ax = _subplots(figsize=(5, 3))
    ax.plot(losses.numpy(), alpha=0.3, lw=0.5, label="per step")
    if len(losses) >= smooth:
        avg = torch.nn.functional.avg_pool1d(losses[None, None], smooth, stride=1)[0, 0]
        ax.plot(range(smooth - 1, len(losses)), avg.numpy(), lw=1.5, label=f"mean of {smooth}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def save_loss_histogram(path: str | Path, losses: torch.Tensor, hidden_group: torch.Tensor | None,
                        group_names: list[str] | None = None, title: str = "per-sample loss") -> None:
    """Histogram of per-sample losses, coloured by the hidden (y, b) group when it is known."""
    fig, ax = _subplots(figsize=(5, 3))
    bins = torch.linspace(float(losses.min()), float(losses.max()), 60).numpy()
    if hidden_group is None:
        ax.hist(losses.numpy(), bins=bins)
    else:
        for g in sorted(hidden_group.unique().tolist()):
            name = group_names[g] if group_names else f"group {g}"
            ax.hist(losses[hidden_group == g].numpy(), bins=bins, alpha=0.6, density=True, label=name)
        ax.legend(fontsize=7)
    ax.set_xlabel("loss")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def save_report(path: str | Path, grids: dict[str, torch.Tensor], nrow: int, results: dict[str, dict],
                sweep: dict[float, dict], class_names: list[str], attribute_names: list[str],
                title: str = "") -> None:
    """One page comparing models (sample.py --evaluate):

    top     sample grids side by side, one per model (`grids[name]`: images in [0, 1], `nrow` per class row);
    bottom  left: share of each attribute per class and model (`results[name]["attribute_share"][c][a]`),
            stacked bars; right: the w-sweep, Bias against quality distance (`sweep[w]` with "bias" and
            "fd"), each point labelled with w and its fidelity.
    """
    tiles = {name: image_grid(images, nrow) for name, images in grids.items()}   # (H', W', C) each
    first = next(iter(tiles.values()))
    top_height = 0.8 + 10 / len(tiles) * first.shape[0] / first.shape[1]       # grids keep their aspect ratio
    fig = Figure(figsize=(11, top_height + 4.2))
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_height, 4.2])
    axes = top.subplots(1, len(tiles), squeeze=False)[0]
    for ax, (name, grid) in zip(axes, tiles.items()):
        ax.imshow(grid.numpy(), interpolation="nearest")
        ax.set_xticks([])
        h = grid.shape[0] / len(class_names)
        ax.set_yticks([h * (i + 0.5) for i in range(len(class_names))], class_names)
        r = results[name]
        ax.set_title(f"{name}: Bias {r['bias']:.3f}, fidelity {r['fidelity']:.3f}", fontsize=9)
    if title:
        top.suptitle(title, fontsize=10)
    ax_bar, ax_sweep = bottom.subplots(1, 2)

    names, width = list(results), 0.8 / len(results)
    colours = [f"C{a}" for a in range(len(attribute_names))]
    for m, name in enumerate(names):
        shares = torch.tensor(results[name]["attribute_share"])          # (classes, attributes)
        x = torch.arange(len(class_names)) + (m - (len(names) - 1) / 2) * width
        bottoms = torch.zeros(len(class_names))
        for a, attribute in enumerate(attribute_names):
            ax_bar.bar(x.numpy(), shares[:, a].nan_to_num(0).numpy(), width * 0.9, bottom=bottoms.numpy(),
                       color=colours[a], edgecolor="black", linewidth=0.4, label=attribute if m == 0 else None)
            bottoms += shares[:, a].nan_to_num(0)
        for xi in x.tolist():
            ax_bar.text(xi, 1.01, name, ha="center", va="bottom", fontsize=7, rotation=90)
    ax_bar.set_xticks(range(len(class_names)), class_names)
    ax_bar.set_ylim(0, 1.35)
    ax_bar.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax_bar.set_ylabel("share of samples")
    ax_bar.set_title("attribute share per class (balanced = equal bands)", fontsize=9)
    ax_bar.legend(fontsize=7, loc="upper right", ncols=len(attribute_names))

    ws = sorted(sweep)
    if len(ws) > 1 and all("fd" in sweep[w] for w in ws):
        fd, bias = [sweep[w]["fd"] for w in ws], [sweep[w]["bias"] for w in ws]
        ax_sweep.plot(fd, bias, "o-")
        for w, f, b in zip(ws, fd, bias):
            ax_sweep.annotate(f"w={w:g}\nfid {sweep[w]['fidelity']:.2f}", (f, b), fontsize=7,
                              textcoords="offset points", xytext=(4, 4))
        ax_sweep.set_xlabel("FD to the balanced real set (judge features; lower = better)")
        ax_sweep.set_ylabel("Bias (0 = balanced)")
        ax_sweep.set_title("strength sweep: Bias against quality", fontsize=9)
    else:
        ax_sweep.axis("off")
        ax_sweep.text(0.5, 0.5, "no strength sweep\n(base model only, or no quality features)",
                      ha="center", va="center", fontsize=9)
    fig.savefig(path, dpi=80)

"""Pictures written into run folders: sample grids, loss curves, loss histograms. Matplotlib, Agg backend."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402


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
    fig, ax = plt.subplots(figsize=(max(2.0, grid.shape[1] * scale / 10), max(1.5, grid.shape[0] * scale / 10)))
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
    plt.close(fig)


def save_loss_curve(path: str | Path, losses: torch.Tensor, title: str, smooth: int = 50) -> None:
    losses = losses.float().cpu()
    fig, ax = plt.subplots(figsize=(5, 3))
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
    plt.close(fig)


def save_loss_histogram(path: str | Path, losses: torch.Tensor, hidden_group: torch.Tensor | None,
                        group_names: list[str] | None = None, title: str = "per-sample loss") -> None:
    """Histogram of per-sample losses, coloured by the hidden (y, b) group when it is known."""
    fig, ax = plt.subplots(figsize=(5, 3))
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
    plt.close(fig)

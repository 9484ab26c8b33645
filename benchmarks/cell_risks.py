"""Per-cell risks: the denoising loss of the base model and of guided models on each hidden (class, value) cell.

    python benchmarks/cell_risks.py --run runs/k4 --heads runs/k4/invdiff runs/k4/oracle --strengths 1 2
    python benchmarks/cell_risks.py --run runs/k4 --heads runs/k4/oracle --per-cell 100 --json risks.json

What the head's objective acts on: R_(y,b) = mean over the cell's training images and a fixed set of draws of
l_i = mean_pixels (eps_hat(x_t, t, y) - eps)^2, for the base (w = 0) and for eps_theta + w G_psi of each head,
overall and per band of t. Every model sees the same images, t and eps, so differences between models are
differences of the models. A cell whose risk falls below its majority's is one the guided model now fits
better; a minority cell whose risk stays high is one the head did not learn. The hidden labels are read for this
measurement only. A benchmark: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from invdiff_min import amp
from invdiff_min.checkpoint import CheckpointError, load_unet
from invdiff_min.config import check_strengths
from invdiff_min.data import load_splits, to_model_range
from invdiff_min.diffusion import denoising_loss
from invdiff_min.errors import exit_on_error
from invdiff_min.guidance import GuidedModel, load_head
from invdiff_min.runs import read_run_config
from invdiff_min.scheduler import DDPMScheduler


def cell_sample(cells: torch.Tensor, per_cell: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of at most `per_cell` images of every cell, drawn without replacement."""
    picked = []
    for c in cells.unique():
        idx = (cells == c).nonzero().squeeze(1)
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:per_cell]])
    return torch.cat(picked)


@torch.no_grad()
def risks(model, scheduler, images, labels, t, eps, batch: int = 256) -> torch.Tensor:
    """l_i for every (image, draw): (N, D) float32. images in [0, 1] (N, C, H, W); t (N, D); eps (N, D, C, H, W)."""
    n, d = t.shape
    out = torch.empty(n, d)
    for j in range(d):
        for s in range(0, n, batch):
            rows = slice(s, s + batch)
            out[rows, j] = denoising_loss(model, scheduler, to_model_range(images[rows]), labels[rows], t[rows, j],
                                          eps[rows, j]).cpu()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder made by train.py")
    p.add_argument("--heads", nargs="*", default=[], help="head folders trained on the run's base")
    p.add_argument("--strengths", nargs="+", type=float, default=[1.0, 2.0])
    p.add_argument("--per-cell", type=int, default=200, help="at most this many training images per cell")
    p.add_argument("--draws", type=int, default=4, help="(t, eps) draws per image")
    p.add_argument("--bands", nargs="+", type=int, default=[0, 250, 500, 750, 1000], help="edges of the t bands")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with exit_on_error():                        # a late ValueError or OSError ends in one line too
        run(args)


def run(args) -> None:
    """Check every flag before anything long, then measure each model's risk on each hidden cell."""
    check_strengths(args.strengths, "--strengths")      # a ValueError: one line through exit_on_error
    if args.json and ((Path(args.json).exists() and not Path(args.json).is_file())   # a folder, or a pipe that
                      or not Path(args.json).parent.is_dir()):                     # would block the write
        raise SystemExit(f"error: --json {args.json}: pass a file path in an existing folder (a new or regular file)")
    if args.per_cell < 1 or args.draws < 1:
        raise SystemExit(f"error: --per-cell and --draws must be at least 1, got {args.per_cell} and {args.draws}")
    if len(args.bands) < 2 or any(lo >= hi for lo, hi in zip(args.bands, args.bands[1:])) or args.bands[0] < 0:
        raise SystemExit(f"error: --bands must be at least two increasing timesteps from 0, got {args.bands}")

    run_dir = Path(args.run)
    cfg = read_run_config(run_dir)[0]
    data = load_splits(cfg.data).train
    base, _, _ = load_unet(run_dir, "cpu")
    scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs())
    g = torch.Generator().manual_seed(args.seed)
    k = data.num_attributes
    idx = cell_sample(data.group, args.per_cell, g)
    images, labels, cells = data.images[idx], data.labels[idx], data.group[idx]
    t = torch.randint(0, scheduler.num_train_timesteps, (len(idx), args.draws), generator=g)
    eps = torch.randn((len(idx), args.draws, *images.shape[1:]), generator=g)

    models = {"base": GuidedModel(base, None, 0.0)}
    for folder in args.heads:
        try:
            head, _ = load_head(folder, base, "cpu")
        except CheckpointError as e:
            raise SystemExit(f"error: --heads {folder}: {e}") from None
        if head.phi_group is not None:
            raise SystemExit(f"error: --heads {folder}: this head is told the sub-group (head.condition=class_group) "
                             f"and has no per-class output to measure; pass class-conditioned heads")
        for w in args.strengths:
            models[f"{Path(folder).name} w={w:g}"] = GuidedModel(base, head, w, cfg.head.mode, cfg.head.mix_ratio)

    bands = list(zip(args.bands[:-1], args.bands[1:]))
    report = {"run": str(run_dir), "per_cell": args.per_cell, "draws": args.draws, "bands": bands,
              "cells": {f"{y},{b}": int((cells == y * k + b).sum()) for y in range(k) for b in range(k)},
              "models": {}}
    header = "| model | class | " + " | ".join(f"value {b}" for b in range(k))
    print(f"R_(y,b) over all t, then per t band {bands}; rows: class y, columns: value b (b = y is the majority)")
    for name, model in models.items():
        with amp.autocast("cpu", cfg.train.precision):
            l = risks(model, scheduler, images, labels, t, eps)                             # (N, D)
        table = {}
        for y in range(k):
            for b in range(k):
                rows = cells == y * k + b
                if not rows.any():
                    continue
                entry = {"all": float(l[rows].mean())}
                for lo, hi in bands:
                    inside = (t[rows] >= lo) & (t[rows] < hi)
                    entry[f"{lo}-{hi}"] = float(l[rows][inside].mean()) if inside.any() else float("nan")
                table[f"{y},{b}"] = entry
        report["models"][name] = table
        print(f"\n{name}\n{header} |\n|---|---|" + "---|" * k)
        for y in range(k):
            row = [table.get(f"{y},{b}", {}).get("all", float("nan")) for b in range(k)]
            print(f"| | {y} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
        for lo, hi in bands:
            per = [[table.get(f"{y},{b}", {}).get(f"{lo}-{hi}", float("nan")) for b in range(k)] for y in range(k)]
            print(f"  t in [{lo}, {hi}): " + "; ".join(" ".join(f"{v:.4f}" for v in r) for r in per))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

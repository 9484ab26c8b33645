"""Where fidelity is lost: the share of samples that read as their class, in each (class, attribute value) cell.

    python benchmarks/cell_fidelity.py --run runs/k3 --heads runs/k3/bench/invdiff_label_topk_cg-s0 --strength 1.5
    python benchmarks/cell_fidelity.py --run runs/k3 --heads H1 H2 --strength 1.5 --json cells.json
    python benchmarks/cell_fidelity.py --run runs/k4 --heads runs/k4/invdiff --strength 0.75 --guidance-scale 2

Samples the base model and eps_theta + w G_psi of every head with the run's evaluation settings (the same noise
as train.py's and debias.py's evaluation), reads the attribute and the class of every sample, and reports per
cell (requested class y, attribute value b read from the image, "?" where it cannot be read) how many samples
land there and what share of them reads as y. Then it asks how much of a head's change in fidelity comes from
moving samples between cells, over the cells the base has samples in (the base's fidelity is unknown elsewhere):
`mix` = sum over those cells of (the head's share of samples in the cell) x (the base's fidelity in that cell), the
fidelity the head would have if it only moved samples and drew every cell as well as the base does, beside the
head's own fidelity over the same cells. Their difference is what the head changed inside the cells; cells the base
reaches with a handful of samples make `mix` rough (the table gives every cell's count). A benchmark: it asserts
nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from invdiff_min import pipeline
from invdiff_min.checkpoint import CheckpointError, load_unet
from invdiff_min.config import add_sampling_flags, with_eval
from invdiff_min.data import load_splits
from invdiff_min.evaluate import make_judge, sample_and_judge
from invdiff_min.guidance import load_head
from invdiff_min.runs import read_run_config


def cell_table(judge, images: torch.Tensor, labels: torch.Tensor, num_classes: int, num_values: int) -> dict:
    """{"count": (C, K + 1), "correct": (C, K + 1)} lists; the last column holds the unreadable samples."""
    b = judge.read_attribute(images).long()
    b = torch.where(b >= 0, b, torch.full_like(b, num_values))           # -1 (unreadable) -> column K
    ok = (judge.read_class(images).long() == labels).long()
    cell = labels.long() * (num_values + 1) + b                          # (N,) flat (y, b) index
    size = num_classes * (num_values + 1)
    count = torch.bincount(cell, minlength=size).view(num_classes, num_values + 1)
    correct = torch.bincount(cell, weights=ok.double(), minlength=size).view(num_classes, num_values + 1)
    return {"count": count.tolist(), "correct": correct.long().tolist()}


def mix_fidelity(base: dict, model: dict) -> dict:
    """How much of the model's fidelity is where its samples went, over the cells the base has samples in (the
    base's fidelity is unknown elsewhere): `mix` = sum over those cells of the model's share x the base's fidelity
    there (the model's fidelity if it drew each cell as the base does), `fidelity_covered` = the model's own
    fidelity over the same cells, `covered` = the share of the model's samples they hold. None where they hold none."""
    n_base, ok_base = (torch.tensor(base[key], dtype=torch.float64) for key in ("count", "correct"))
    n, ok = (torch.tensor(model[key], dtype=torch.float64) for key in ("count", "correct"))
    seen = n_base > 0
    if n[seen].sum() == 0:
        return {"mix": None, "fidelity_covered": None, "covered": 0.0}
    fid_base = torch.where(seen, ok_base / n_base.clamp(min=1), torch.zeros_like(n_base))
    inside = n[seen].sum()
    return {"mix": float((n * fid_base).sum() / inside), "fidelity_covered": float(ok[seen].sum() / inside),
            "covered": float(inside / n.sum())}


def format_cells(name: str, table: dict, values: list[str]) -> list[str]:
    rows = []
    for y, (counts, oks) in enumerate(zip(table["count"], table["correct"])):
        cells = [f"{ok / c:.2f} ({c})" if c else "- (0)" for c, ok in zip(counts, oks)]
        fid = sum(oks) / max(sum(counts), 1)
        rows.append(f"| {name} | {y} | {fid:.3f} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder made by train.py")
    p.add_argument("--heads", nargs="*", default=[], help="head folders trained on the run's base")
    p.add_argument("--strength", type=float, default=None, help="w of every head (default: the run's)")
    p.add_argument("--n-per-class", type=int, default=None, help="default: the run's eval.n_per_class")
    add_sampling_flags(p)                        # --guidance-scale, --guidance-t-max, --head-outside-cfg (every model)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.n_per_class is not None and args.n_per_class < 1:
        raise SystemExit(f"error: --n-per-class must be at least 1, got {args.n_per_class}")
    if args.strength is not None and not 0 <= args.strength <= 20:
        raise SystemExit(f"error: --strength must be in [0, 20], got {args.strength}")
    if args.json and ((Path(args.json).exists() and not Path(args.json).is_file())   # a folder, or a pipe that
                      or not Path(args.json).parent.is_dir()):                     # would block the write
        raise SystemExit(f"error: --json {args.json}: pass a file path in an existing folder (a new or regular file)")
    if len(set(args.heads)) < len(args.heads) or "base" in args.heads:
        raise SystemExit(f"error: --heads {' '.join(args.heads)}: each head folder once, and none named 'base'")

    run_dir, device = Path(args.run), torch.device(args.device)
    try:                                         # the run's settings, sampled as the flags say (every model)
        cfg = with_eval(read_run_config(run_dir)[0], guidance_scale=args.guidance_scale,
                        guidance_t_max=args.guidance_t_max, head_outside_cfg=args.head_outside_cfg)
    except (CheckpointError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    try:
        base, _, _ = load_unet(run_dir, device)
    except (CheckpointError, ValueError, TypeError, KeyError) as e:
        raise SystemExit(f"error: {run_dir}: {e}") from None
    models = {"base": (None, 0.0)}
    w = cfg.eval.strength if args.strength is None else args.strength
    for folder in args.heads:                    # every head checked before the judge and the sampling
        try:
            models[folder] = (load_head(Path(folder), base, device)[0], w)
        except CheckpointError as e:
            raise SystemExit(f"error: --heads {folder}: {e}") from None
    splits = load_splits(cfg.data)
    judge = make_judge(splits, run_dir / "judges", device, cfg.eval.judge_steps)
    scale = cfg.eval.guidance_scale
    how = pipeline.sample_settings(cfg, device, n_per_class=args.n_per_class or cfg.eval.n_per_class)
    c, k = cfg.unet.num_classes, judge.num_attributes
    values = (judge.attribute_names or [str(v) for v in range(k)]) + ["?"]

    report = {"run": str(run_dir), "strength": w, "guidance_scale": scale, "guidance_t_max": cfg.eval.guidance_t_max,
              "head_outside_cfg": cfg.eval.head_outside_cfg, "values": values, "models": {}}
    for name, (head, strength) in models.items():
        images, labels, metrics = sample_and_judge(base, head, strength, judge, how, cfg.head.mode,
                                                   cfg.head.mix_ratio, cfg.eval.head_outside_cfg)
        table = cell_table(judge, images, labels, c, k)
        table["fidelity"] = metrics["fidelity"]
        line = f"{name}: fidelity {metrics['fidelity']:.3f}"
        if name != "base":
            table.update(mix_fidelity(report["models"]["base"], table))
            if table["mix"] is not None:
                line += (f"; in the cells the base reaches ({table['covered']:.0%} of its samples): fidelity "
                         f"{table['fidelity_covered']:.3f}, mix {table['mix']:.3f}")
        report["models"][name] = table
        print(line, flush=True)

    lines = ["| model | class | fidelity | " + " | ".join(f"b = {v}: fidelity (n)" for v in values) + " |",
             "|---|---|---|" + "---|" * len(values)]
    for name, table in report["models"].items():
        lines += format_cells(Path(name).name, table, values)
    report["table"] = "\n".join(lines)
    print(report["table"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

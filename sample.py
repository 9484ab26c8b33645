"""Sample from a trained (or converted) model, optionally with InvDiff's invariant guidance.

    python sample.py --ckpt runs/cpu --n-per-class 16 --out samples/           # base + head, the run's w and sampler
    python sample.py --ckpt runs/cpu --strength 0                              # w = 0: exactly the base model
    python sample.py --ckpt runs/cpu --strength 2 --sampler ddpm --steps 1000
    python sample.py --ckpt runs/cpu/base/ckpt-0002000 --head none             # a base checkpoint alone
    python sample.py --ckpt runs/cpu --strength 3 --n-per-class 200 --evaluate   # + metrics.json, report.png

Writes OUT/grid.png and OUT/samples.safetensors (tensor `images`: N x C x H x W floats in [0, 1]; tensor
`labels`: the class of each, -1 for an unconditional model).

--evaluate (a model inside a train.py run folder) also judges the samples with the run's judge and writes
OUT/metrics.json (Bias, minority and attribute shares per class, fidelity, quality distance FD / KID /
precision / recall to the balanced real set; the same for the base model on the same seeds, and for every
strength of --sweep) and OUT/report.png (one page: base vs guided grids, attribute shares per class, Bias
against quality over the sweep). Use at least 100 images per class for numbers worth reading.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from invdiff_min.checkpoint import CheckpointError, list_checkpoints, load_unet, read_json, save_tensors, write_json
from invdiff_min.config import RunConfig, pick_device
from invdiff_min.data import from_model_range, load_splits
from invdiff_min.diffusion import make_sampler, sample
from invdiff_min.errors import exit_on_error
from invdiff_min.evaluate import SampleSettings, make_judge, sample_and_judge
from invdiff_min.guidance import load_head
from invdiff_min.plots import save_grid, save_report

MAX_IMAGES = 100_000                  # per strength: 100k 32x32 images are 1.2 GB of float32


def find_run_dir(ckpt: Path) -> Path | None:
    """The run folder above a checkpoint (the one holding config.json), if any."""
    for p in [ckpt, *ckpt.parents]:
        if (p / "config.json").is_file():
            return p
    return None


def check_arguments(args) -> None:
    """Refuse out-of-range numbers and an unusable --out before any model is loaded; each message names the flag."""
    for flag, value, hi in (("--n-per-class", args.n_per_class, MAX_IMAGES), ("--batch-size", args.batch_size, 10_000)):
        if not 1 <= value <= hi:
            raise ValueError(f"{flag} must be an integer in [1, {hi:,}], got {value}")
    for flag, value, lo, hi, why in (
            ("--strength", 1.0 if args.strength is None else args.strength, 0.0, 20.0, "0 = base model"),
            ("--guidance-scale", args.guidance_scale, 0.0, 50.0, "1 = plain conditional, 0 = unconditional"),
            ("--eta", args.eta, 0.0, 1.0, "0 = deterministic DDIM, 1 = DDPM-like")):
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{flag} must be a number in [{lo:g}, {hi:g}] ({why}), got {value}")
    bad = [w for w in args.sweep if not (math.isfinite(w) and 0.0 <= w <= 20.0)]
    if bad:
        raise ValueError(f"--sweep strengths must lie in [0, 20] like --strength, got {bad}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder (it is created when missing)")
    parent = out if out.is_dir() else next(p for p in out.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write to {parent} (for --out {out}); pass a folder you can write")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run folder, stage folder or checkpoint folder")
    p.add_argument("--n-per-class", type=int, default=16, help="images per class (total for unconditional)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default=None, choices=("ddim", "ddpm"),
                   help="default: the run's evaluation sampler (ddim outside a run folder)")
    p.add_argument("--steps", type=int, default=None,
                   help="number of sampling steps (any 1..T); default: the run's evaluation steps (50 outside a run)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 DDPM-like)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale: 1 = plain conditional, 0 = unconditional, >1 stronger")
    p.add_argument("--strength", type=float, default=None,
                   help="InvDiff guidance strength w (0 = base model); default: the run's eval.strength, the w its "
                        "summary reports (it goes with the run's sampler and steps)")
    p.add_argument("--head", default="invdiff",
                   help="which head of the run folder: invdiff | oracle | uniform | none")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="base weights to sample with")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--evaluate", action="store_true",
                   help="also judge the samples: metrics.json and report.png (a model inside a run folder)")
    p.add_argument("--sweep", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0],
                   help="with --evaluate: strengths w for the Bias-against-quality curve (default 0 1 2 3)")
    args = p.parse_args(argv)
    with exit_on_error():                      # bad input ends in one line, `error: ...` (exit status 1)
        return sample_run(args)


def sample_run(args) -> int:
    """Load the model (and head) of --ckpt, sample, write the outputs, judge them on --evaluate."""
    check_arguments(args)
    device = pick_device(args.device)
    base, state, ckpt = load_unet(args.ckpt, device, weights=args.weights)
    cfg = state["config"]
    run_dir = find_run_dir(Path(args.ckpt))
    # unset sampler, steps and strength follow the run's evaluation settings (config.json), so that a plain
    # `sample.py --ckpt RUN` samples the way RUN's summary was measured
    run_eval = read_json(run_dir / "config.json").get("config", {}).get("eval", {}) if run_dir else {}
    args.sampler = args.sampler or run_eval.get("sampler", "ddim")
    args.steps = run_eval.get("num_steps", 50) if args.steps is None else args.steps
    if args.strength is None:
        args.strength = float(run_eval.get("strength", 1.0))
    T = cfg["diffusion"]["num_train_timesteps"]
    if not 1 <= args.steps <= T:
        raise ValueError(f"--steps must be in [1, {T}], got {args.steps}")
    head, head_note = None, "base model only"
    if args.head != "none" and run_dir is not None and list_checkpoints(run_dir / args.head):
        head, _ = load_head(run_dir / args.head, base, device)
        head_note = f"head {args.head} at strength w = {args.strength}"
    elif args.head not in ("none", "invdiff"):
        raise CheckpointError(f"no trained head {args.head!r} under {run_dir}; train it with python train.py "
                              f"--compare, or pass --head none")
    strength = args.strength if head is not None else 0.0
    mode, mix_ratio = (cfg["head"]["mode"], cfg["head"]["mix_ratio"]) if "head" in cfg else ("additive", 0.5)
    num_classes = cfg["unet"].get("num_classes") or 0
    side = cfg.get("data", {}).get("resolution", cfg["unet"]["sample_size"])
    settings = SampleSettings(cfg["diffusion"], args.n_per_class, max(1, num_classes),
                              (cfg["unet"]["in_channels"], side, side), args.sampler, args.steps, args.guidance_scale,
                              args.eta, args.seed, device, args.batch_size)
    judge = None
    if args.evaluate:                          # refused before sampling when the run cannot be judged
        if not num_classes or "data" not in cfg or run_dir is None:
            raise ValueError("--evaluate needs a class-conditional model inside a train.py run folder (it judges "
                             "samples by the run's dataset)")
        run_cfg = RunConfig.from_dict(cfg)
        judge = make_judge(load_splits(run_cfg.data), run_dir / "judges", device, run_cfg.eval.judge_steps)
    if num_classes:
        images, labels, metrics = sample_and_judge(base, head, strength, judge or (lambda i, y: {}), settings, mode,
                                                   mix_ratio)
    else:
        images, labels, metrics = generate_unconditional(base, settings), torch.full((args.n_per_class,), -1), {}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "samples.safetensors", {"images": images, "labels": labels},
                 {"checkpoint": str(ckpt), "head": head_note, "sampler": f"{args.sampler}-{args.steps}",
                  "guidance_scale": args.guidance_scale, "seed": args.seed})
    nrow = min(args.n_per_class, 16)
    pick = torch.cat([torch.arange(nrow) + c * args.n_per_class for c in range(max(1, num_classes))])
    save_grid(out / "grid.png", images[pick], nrow=nrow,
              title=f"{head_note}; {args.sampler}-{args.steps}, CFG scale {args.guidance_scale}")
    print(f"{len(images)} images ({head_note}) -> {out / 'samples.safetensors'} and {out / 'grid.png'}")
    if judge is not None:
        metrics = evaluate_samples(judge, base, head, strength, mode, mix_ratio, settings, images, labels, metrics,
                                   args, head_note, out)
        quality = f", FD {metrics['fd']:.4g}" if "fd" in metrics else ""
        print(f"Bias {metrics['bias']:.3f}, minority share per class "
              f"{[round(m, 3) for m in metrics['minority_share']]}, fidelity {metrics['fidelity']:.3f}{quality} "
              f"-> {out / 'metrics.json'}, {out / 'report.png'}")
    return 0


def evaluate_samples(judge, base, head, strength, mode, mix_ratio, settings, images, labels, requested: dict, args,
                     head_note: str, out: Path) -> dict:
    """metrics.json and report.png: the requested model, the base model on the same seeds, and the sweep of w
    (each strength sampled with the same seeds; the requested model's own samples are reused)."""
    guided = head is not None and strength != 0.0
    by_w = {strength: (images, labels, requested)}
    if guided:
        for w in sorted(set(args.sweep) | {0.0}):
            if w not in by_w:
                by_w[w] = sample_and_judge(base, head, w, judge, settings, mode, mix_ratio)
    sweep = {w: by_w[w][2] for w in sorted(by_w)}
    metrics = {**requested, "judged_by": judge.how, "model": head_note, "strength": strength,
               "sampler": f"{args.sampler}-{args.steps}", "guidance_scale": args.guidance_scale, "seed": args.seed,
               "base": sweep[0.0], "sweep": {str(w): r for w, r in sweep.items()}}
    write_json(out / "metrics.json", metrics)
    names = judge.class_names or [str(c) for c in range(judge.num_classes)]
    k = min(args.n_per_class, 8)
    pick = torch.cat([torch.arange(k) + c * args.n_per_class for c in range(judge.num_classes)])
    grids = {"base": by_w[0.0][0][pick]}
    results = {"base": sweep[0.0]}
    if guided:
        grids[f"w = {strength:g}"] = images[pick]
        results[f"w = {strength:g}"] = requested
    save_report(out / "report.png", grids, k, results, sweep if guided else {}, names,
                judge.attribute_names or [str(a) for a in range(judge.num_attributes)],
                title=f"{head_note}; {args.sampler}-{args.steps}, {args.n_per_class} per class, seed {args.seed}")
    return metrics


def generate_unconditional(model, settings: SampleSettings) -> torch.Tensor:
    """Unconditional model (e.g. converted DDPM weights): n images in [0, 1] (their labels are -1)."""
    scheduler = make_sampler(settings.sampler, settings.diffusion_kwargs).to(settings.device)
    shape = (settings.n_per_class, *settings.image_shape)
    x = sample(model, scheduler, shape, None, settings.num_steps, eta=settings.eta,
               generator=torch.Generator().manual_seed(settings.seed), device=settings.device)
    return from_model_range(x).cpu()


if __name__ == "__main__":
    sys.exit(main())

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
import sys
from pathlib import Path

import torch

from invdiff_min.checkpoint import CheckpointError, list_checkpoints, load_unet, read_json, save_tensors, write_json
from invdiff_min.config import pick_device
from invdiff_min.data import DataConfig
from invdiff_min.evaluate import generate, make_judge
from invdiff_min.guidance import GuidedModel, load_head
from invdiff_min.plots import save_grid, save_report


def find_run_dir(ckpt: Path) -> Path | None:
    """The run folder above a checkpoint (the one holding config.json), if any."""
    for p in [ckpt, *ckpt.parents]:
        if (p / "config.json").is_file():
            return p
    return None


def check_arguments(args) -> None:
    """Refuse out-of-range numbers before any model is loaded; each message names the flag and its range."""
    if args.n_per_class < 1:
        raise SystemExit(f"error: --n-per-class must be at least 1, got {args.n_per_class}")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be at least 1, got {args.batch_size}")
    for flag, value, lo, hi, why in (
            ("--strength", 1.0 if args.strength is None else args.strength, 0.0, 20.0, "0 = base model"),
            ("--guidance-scale", args.guidance_scale, 0.0, 50.0, "1 = plain conditional, 0 = unconditional"),
            ("--eta", args.eta, 0.0, 1.0, "0 = deterministic DDIM, 1 = DDPM-like")):
        if not (math.isfinite(value) and lo <= value <= hi):
            raise SystemExit(f"error: {flag} must be a number in [{lo:g}, {hi:g}] ({why}), got {value}")
    bad = [w for w in args.sweep if not (math.isfinite(w) and 0.0 <= w <= 20.0)]
    if bad:
        raise SystemExit(f"error: --sweep strengths must lie in [0, 20] like --strength, got {bad}")


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

    check_arguments(args)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        base, state, ckpt = load_unet(args.ckpt, device, weights=args.weights)
        cfg = state["config"]
        model = GuidedModel(base, None)
        run_dir = find_run_dir(Path(args.ckpt))
        # unset sampler, steps and strength follow the run's evaluation settings (config.json), so that a plain
        # `sample.py --ckpt RUN` samples the way RUN's summary was measured
        run_eval = read_json(run_dir / "config.json").get("config", {}).get("eval", {}) if run_dir else {}
        args.sampler = args.sampler or run_eval.get("sampler", "ddim")
        args.steps = run_eval.get("num_steps", 50) if args.steps is None else args.steps
        if args.strength is None:
            args.strength = float(run_eval.get("strength", 1.0))
        head_note = "base model only"
        if args.head != "none" and run_dir is not None and list_checkpoints(run_dir / args.head):
            head, head_state = load_head(run_dir / args.head, base, device)
            model = GuidedModel(base, head, args.strength, cfg["head"]["mode"], cfg["head"]["mix_ratio"])
            head_note = f"head {args.head} at strength w = {args.strength}"
        elif args.head not in ("none", "invdiff"):
            raise CheckpointError(f"no trained head {args.head!r} under {run_dir}; train it with "
                                  f"python train.py --compare, or pass --head none")
        num_steps = args.steps
        T = cfg["diffusion"]["num_train_timesteps"]
        if not 1 <= num_steps <= T:
            raise SystemExit(f"error: --steps must be in [1, {T}], got {num_steps}")
        unet_cfg = cfg["unet"]
        num_classes = unet_cfg.get("num_classes") or 0
        side = cfg.get("data", {}).get("resolution", unet_cfg["sample_size"])
        def draw(m):
            return generate(m, cfg["diffusion"], args.n_per_class, max(1, num_classes),
                            (unet_cfg["in_channels"], side, side), args.sampler, num_steps, args.guidance_scale,
                            args.eta, args.seed, device, args.batch_size)
        images, labels = draw(model) if num_classes else generate_unconditional(model, cfg, args, side, device)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "samples.safetensors", {"images": images, "labels": labels},
                 {"checkpoint": str(ckpt), "head": head_note, "sampler": f"{args.sampler}-{num_steps}",
                  "guidance_scale": args.guidance_scale, "seed": args.seed})
    nrow = min(args.n_per_class, 16)
    pick = torch.cat([torch.arange(nrow) + c * args.n_per_class for c in range(max(1, num_classes))])
    save_grid(out / "grid.png", images[pick], nrow=nrow,
              title=f"{head_note}; {args.sampler}-{num_steps}, CFG scale {args.guidance_scale}")
    print(f"{len(images)} images ({head_note}) -> {out / 'samples.safetensors'} and {out / 'grid.png'}")
    if args.evaluate:
        if not num_classes or "data" not in cfg or run_dir is None:
            raise SystemExit("error: --evaluate needs a class-conditional model inside a train.py run folder "
                             "(it judges samples by the run's dataset)")
        try:
            judge = make_judge(DataConfig(**cfg["data"]), run_dir / "judges", device,
                               cfg.get("eval", {}).get("judge_steps", 400))
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise SystemExit(f"error: cannot build the judge of dataset {cfg['data'].get('name')!r}: {e}")
        metrics = evaluate_samples(judge, model, draw, images, labels, args, head_note, out)
        quality = f", FD {metrics['fd']:.4g}" if "fd" in metrics else ""
        print(f"Bias {metrics['bias']:.3f}, minority share per class "
              f"{[round(m, 3) for m in metrics['minority_share']]}, fidelity {metrics['fidelity']:.3f}{quality} "
              f"-> {out / 'metrics.json'}, {out / 'report.png'}")
    return 0


def evaluate_samples(judge, model, draw, images, labels, args, head_note: str, out: Path) -> dict:
    """metrics.json and report.png: the requested model, the base model on the same seeds, and the sweep of w
    (each strength sampled with the same seeds; the requested model's own samples are reused)."""
    guided = model.head is not None and model.strength != 0.0
    by_w = {model.strength if guided else 0.0: (images, labels)}
    if guided:
        for w in sorted(set(args.sweep) | {0.0}):
            if w not in by_w:
                by_w[w] = draw(GuidedModel(model.base, model.head if w else None, w, model.mode, model.mix_ratio))
    sweep = {w: judge(*by_w[w]) for w in sorted(by_w)}
    requested = sweep[model.strength if guided else 0.0]
    metrics = {**requested, "judged_by": judge.how, "model": head_note, "strength": model.strength if guided else 0.0,
               "sampler": f"{args.sampler}-{args.steps}", "guidance_scale": args.guidance_scale, "seed": args.seed,
               "base": sweep[0.0], "sweep": {str(w): r for w, r in sweep.items()}}
    write_json(out / "metrics.json", metrics)
    names = judge.class_names or [str(c) for c in range(judge.num_classes)]
    k = min(args.n_per_class, 8)
    pick = torch.cat([torch.arange(k) + c * args.n_per_class for c in range(judge.num_classes)])
    grids = {"base": by_w[0.0][0][pick]}
    results = {"base": sweep[0.0]}
    if guided:
        grids[f"w = {model.strength:g}"] = images[pick]
        results[f"w = {model.strength:g}"] = requested
    save_report(out / "report.png", grids, k, results, sweep if guided else {}, names,
                judge.attribute_names or [str(a) for a in range(judge.num_attributes)],
                title=f"{head_note}; {args.sampler}-{args.steps}, {args.n_per_class} per class, seed {args.seed}")
    return metrics


def generate_unconditional(model, cfg, args, side, device):
    """Unconditional model (e.g. converted DDPM weights): n images, labels -1."""
    from invdiff_min.data import from_model_range
    from invdiff_min.diffusion import make_sampler, sample

    scheduler = make_sampler(args.sampler, cfg["diffusion"]).to(device)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.n_per_class, cfg["unet"]["in_channels"], side, side)
    x = sample(model, scheduler, shape, None, args.steps, eta=args.eta, generator=g, device=device)
    return from_model_range(x).cpu(), torch.full((args.n_per_class,), -1)


if __name__ == "__main__":
    sys.exit(main())

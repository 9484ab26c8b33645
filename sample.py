"""Sample from a trained (or converted) model, optionally with InvDiff's invariant guidance.

    python sample.py --ckpt runs/cpu --n-per-class 16 --out samples/           # base + head, the run's w and sampler
    python sample.py --ckpt runs/cpu --strength 0 --out samples/w0             # w = 0: exactly the base model
    python sample.py --ckpt runs/cpu --strength 2 --sampler ddpm --steps 1000 --out samples/ddpm
    python sample.py --ckpt runs/cpu/base/ckpt-0002000 --head none --out samples/base   # a base checkpoint alone
    python sample.py --ckpt runs/cpu --strength 3 --n-per-class 200 --evaluate --out samples/w3   # + metrics, report

Writes OUT/grid.png and OUT/samples.safetensors (tensor `images`: N x C x H x W floats in [0, 1]; tensor
`labels`: the class of each, -1 for an unconditional model) and OUT/sample.json, the list of files it wrote. An
--out holding an earlier run's outputs is refused unless --overwrite is given; then exactly the files sample.json
lists are replaced, once the new samples are drawn (files of those names that no sample.json lists are refused).

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

from invdiff_min import amp
from invdiff_min.checkpoint import read_json, save_tensors, write_json
from invdiff_min.config import add_sampling_flags, pick_device
from invdiff_min.errors import exit_on_error
from invdiff_min.inference import InvDiffPipeline, png_names, save_png_folder
from invdiff_min.plots import save_grid, save_report

MAX_IMAGES = 100_000                  # per strength: 100k 32x32 images are 1.2 GB of float32
OUTPUTS = ("samples.safetensors", "grid.png", "png", "metrics.json", "report.png")   # what a run writes into --out
RECORD = "sample.json"                # the files a run wrote: all --overwrite may delete


def check_arguments(args) -> None:
    """Refuse out-of-range numbers and an unusable --out before any model is loaded; each message names the flag."""
    for flag, value, hi in (("--n-per-class", args.n_per_class, MAX_IMAGES), ("--batch-size", args.batch_size, 10_000)):
        if not 1 <= value <= hi:
            raise ValueError(f"{flag} must be an integer in [1, {hi:,}], got {value}")
    for flag, value, lo, hi, why in (
            ("--strength", 1.0 if args.strength is None else args.strength, 0.0, 20.0, "0 = base model"),
            ("--guidance-scale", 1.0 if args.guidance_scale is None else args.guidance_scale, 0.0, 50.0,
             "1 = plain conditional, 0 = unconditional"),
            ("--eta", args.eta, 0.0, 1.0, "0 = deterministic DDIM, 1 = DDPM-like")):
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{flag} must be a number in [{lo:g}, {hi:g}] ({why}), got {value}")
    bad = [w for w in args.sweep if not (math.isfinite(w) and 0.0 <= w <= 20.0)]
    if bad:
        raise ValueError(f"--sweep strengths must lie in [0, 20] like --strength, got {bad}")
    if not 0 <= args.seed <= 2**63 - 1:
        raise ValueError(f"--seed must be an integer in [0, 2**63 - 1], got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder (it is created when missing)")
    parent = out if out.is_dir() else next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ValueError(f"--out {out} lies under {parent}, which is a file, not a folder; pass a new folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write to {parent} (for --out {out}); pass a folder you can write")
    earlier = [name for name in (*OUTPUTS, RECORD) if (out / name).exists()]   # no mix of two runs' outputs
    if earlier and not args.overwrite:
        how = ("--overwrite to replace it" if (out / RECORD).exists() else "delete those files yourself (no "
               "sample.json says sample.py wrote them: an older sample.py's output, or not sample.py's)")
        raise ValueError(f"--out {out} already holds {', '.join(earlier)}; pass --out NEW_FOLDER, or {how}")
    if args.overwrite and earlier:
        written = set(earlier_outputs(out))
        present = [name for name in OUTPUTS if (out / name).exists()]
        files = [p for name in present for p in ((out / name).iterdir() if (out / name).is_dir() else [out / name])]
        strays = [str(p.relative_to(out)) for p in files if not p.is_file() or str(p.relative_to(out)) not in written]
        if strays:
            raise ValueError(f"--out {out} holds {', '.join(strays[:3])}{' ...' if len(strays) > 3 else ''}, which "
                             f"no sample.py run recorded in {out / RECORD}, and --overwrite deletes only what it "
                             f"recorded; move them, or pass --out NEW_FOLDER")


def earlier_outputs(out: Path) -> list[str]:
    """The files an earlier run recorded in OUT/sample.json (paths relative to OUT); refused if it is unreadable."""
    try:
        written = read_json(out / RECORD)["written"]          # (a pipe or a damaged file: refused, never hangs)
        if not (isinstance(written, list) and all(isinstance(w, str) for w in written)):
            raise ValueError
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{out / RECORD} is not the record sample.py writes (a JSON object listing 'written' "
                         f"files), so --overwrite cannot tell what it may delete; pass --out NEW_FOLDER") from None
    def ours(name: str) -> bool:                # OUTPUTS files and png/FILE: nothing outside them, whatever it says
        parts = Path(name).parts
        return (name in OUTPUTS and name != "png") or (len(parts) == 2 and parts[0] == "png" and parts[1] != "..")
    return [w for w in written if ours(w)]


def clear_earlier(out: Path) -> None:
    """--overwrite: delete the files an earlier run recorded (checked by check_arguments), once the new samples
    exist; its png/ folder goes too when that leaves it empty."""
    for name in earlier_outputs(out):
        (out / name).unlink(missing_ok=True)
    if (out / "png").is_dir() and not any((out / "png").iterdir()):
        (out / "png").rmdir()
    (out / RECORD).unlink(missing_ok=True)


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
    add_sampling_flags(p)                        # --guidance-scale, --guidance-t-max, --head-outside-cfg
    p.add_argument("--strength", type=float, default=None,
                   help="InvDiff guidance strength w (0 = base model); default: the run's eval.strength, the w its "
                        "summary reports (it goes with the run's sampler and steps)")
    p.add_argument("--head", default="invdiff",
                   help="which head of the run folder: invdiff | oracle | uniform | none")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="base weights to sample with")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="network calls: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), bf16, or fp32 "
                        "(exact)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--evaluate", action="store_true",
                   help="also judge the samples: metrics.json and report.png (a model inside a run folder)")
    p.add_argument("--sweep", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0],
                   help="with --evaluate: strengths w for the Bias-against-quality curve (default 0 1 2 3)")
    p.add_argument("--png", action="store_true", help="also write OUT/png/CLASS_INDEX.png, one file per image")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier sample.py run in --out (refused without it)")
    args = p.parse_args(argv)
    with exit_on_error():                      # bad input ends in one line, `error: ...` (exit status 1)
        return sample_run(args)


def sample_run(args) -> int:
    """Load the model (and head) of --ckpt, sample, write the outputs, judge them on --evaluate."""
    check_arguments(args)
    pipe = InvDiffPipeline.from_pretrained(args.ckpt, None if args.head == "none" else args.head, args.weights,
                                           pick_device(args.device))
    pipe.precision, _ = amp.resolve(args.precision, pipe.device)
    # unset sampler, steps and strength follow the run's evaluation settings: a plain `sample.py --ckpt RUN`
    # samples the way RUN's summary was measured
    args.sampler = args.sampler or pipe.sampler
    args.steps = pipe.num_inference_steps if args.steps is None else args.steps
    args.guidance_scale = pipe.guidance_scale if args.guidance_scale is None else args.guidance_scale
    args.guidance_t_max = pipe.guidance_t_max if args.guidance_t_max is None else args.guidance_t_max
    if args.head_outside_cfg is not None:
        pipe.head_outside_cfg = args.head_outside_cfg
    T = pipe.diffusion["num_train_timesteps"]
    if not 1 <= args.steps <= T:
        raise ValueError(f"--steps must be in [1, {T}], got {args.steps}")
    if args.guidance_t_max is not None and not 0 <= args.guidance_t_max <= T:
        raise ValueError(f"--guidance-t-max must be a timestep in [0, {T}] (class guidance at t below it), got "
                         f"{args.guidance_t_max}")
    if pipe.head_outside_cfg and pipe.mode != "additive":
        raise ValueError(f"--head-outside-cfg needs a head in 'additive' mode; {args.ckpt}'s head is {pipe.mode!r}: "
                         f"pass --no-head-outside-cfg")
    strength = (pipe.strength if args.strength is None else args.strength) if pipe.head is not None else 0.0
    head_note = f"head {args.head} at strength w = {strength}" if pipe.head is not None else "base model only"
    k = pipe.num_classes
    if args.evaluate and (not k or pipe.run_dir is None or "data" not in pipe.config):
        raise ValueError("--evaluate needs a class-conditional model inside a train.py run folder (it judges "
                         "samples by the run's dataset)")
    if args.evaluate and args.n_per_class * k < 4:
        raise ValueError(f"--evaluate measures quality on at least 4 samples in all: pass --n-per-class "
                         f"{-(-4 // k)} or more (100 or more for numbers worth reading)")
    if args.evaluate:
        pipe.judge()                             # the run's data and judges now, not after all the sampling

    def draw(w: float):
        labels = torch.arange(k).repeat_interleave(args.n_per_class) if k else None
        out = pipe(class_labels=labels, num_images=None if k else args.n_per_class, strength=w,
                   guidance_scale=args.guidance_scale, guidance_t_max=args.guidance_t_max, sampler=args.sampler,
                   num_inference_steps=args.steps,
                   eta=args.eta, generator=torch.Generator().manual_seed(args.seed), batch_size=args.batch_size)
        return out.images, out.labels

    images, labels = draw(strength)
    out = Path(args.out)
    if args.overwrite:
        clear_earlier(out)
    out.mkdir(parents=True, exist_ok=True)
    written = ["samples.safetensors", "grid.png"] + [f"png/{name}" for name in png_names(labels, pipe.class_names)
                                                     if args.png] + (["metrics.json", "report.png"] * args.evaluate)
    write_json(out / RECORD, {"written": written})            # first, so a run cut short is still replaceable
    save_tensors(out / "samples.safetensors", {"images": images, "labels": labels},
                 {"checkpoint": str(args.ckpt), "head": head_note, "sampler": f"{args.sampler}-{args.steps}",
                  "guidance_scale": args.guidance_scale, "guidance_t_max": args.guidance_t_max,
                  "head_outside_cfg": pipe.head_outside_cfg, "seed": args.seed})
    nrow = min(args.n_per_class, 16)
    pick = torch.cat([torch.arange(nrow) + c * args.n_per_class for c in range(max(1, k))])
    save_grid(out / "grid.png", images[pick], nrow=nrow,
              title=f"{head_note}; {args.sampler}-{args.steps}, CFG scale {args.guidance_scale}")
    print(f"{len(images)} images ({head_note}) -> {out / 'samples.safetensors'} and {out / 'grid.png'}")
    if args.png:
        save_png_folder(out / "png", images, labels, pipe.class_names)
        print(f"{len(images)} PNG files in {out / 'png'}")
    if args.evaluate:
        metrics = evaluate_samples(pipe, draw, strength, images, labels, args, head_note, out)
        quality = f", FD {metrics['fd']:.4g}" if "fd" in metrics else ""
        print(f"Bias {metrics['bias']:.3f}, minority share per class "
              f"{[round(m, 3) for m in metrics['minority_share']]}, fidelity {metrics['fidelity']:.3f}{quality} "
              f"-> {out / 'metrics.json'}, {out / 'report.png'}")
    return 0


def evaluate_samples(pipe, draw, strength, images, labels, args, head_note: str, out: Path) -> dict:
    """metrics.json and report.png: the requested model, the base model on the same seeds, and the sweep of w
    (each strength sampled with the same seeds; the requested model's own samples are reused)."""
    guided = pipe.head is not None and strength != 0.0
    by_w = {strength: (images, labels)}
    if guided:
        for w in sorted(set(args.sweep) | {0.0}):
            if w not in by_w:
                by_w[w] = draw(w)
    sweep = {w: pipe.evaluate(*by_w[w]) for w in sorted(by_w)}
    judge = pipe.judge()
    metrics = {**sweep[strength], "judged_by": judge.how, "model": head_note, "strength": strength,
               "sampler": f"{args.sampler}-{args.steps}", "guidance_scale": args.guidance_scale,
               "guidance_t_max": args.guidance_t_max, "head_outside_cfg": pipe.head_outside_cfg, "seed": args.seed,
               "base": sweep[0.0], "sweep": {str(w): r for w, r in sweep.items()}}
    write_json(out / "metrics.json", metrics)
    names = judge.class_names or [str(c) for c in range(judge.num_classes)]
    k = min(args.n_per_class, 8)
    pick = torch.cat([torch.arange(k) + c * args.n_per_class for c in range(judge.num_classes)])
    grids, results = {"base": by_w[0.0][0][pick]}, {"base": sweep[0.0]}
    if guided:
        grids[f"w = {strength:g}"], results[f"w = {strength:g}"] = images[pick], sweep[strength]
    save_report(out / "report.png", grids, k, results, sweep if guided else {}, names,
                judge.attribute_names or [str(a) for a in range(judge.num_attributes)],
                title=f"{head_note}; {args.sampler}-{args.steps}, {args.n_per_class} per class, seed {args.seed}")
    return metrics


if __name__ == "__main__":
    sys.exit(main())

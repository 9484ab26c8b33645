"""Train InvDiff end to end on the built-in biased dataset or a real one (or any stage of it).

    A. base     a class-conditional DDPM eps_theta on the biased data (L_simple)         -> RUN/base/
    B. losses   per-sample denoising losses of the frozen base                          -> RUN/losses.safetensors
       groups   bias-annotation inference: groups W from those losses                   -> RUN/groups.safetensors
    C. head     the invariant guidance head G_psi, trained with L_e over the groups     -> RUN/invdiff/
    D. eval     sample base and guided model, measure Bias and fidelity                 -> RUN/summary.json

    python train.py                              # default preset (cpu): the whole pipeline, in runs/cpu
    python train.py --preset tiny --out runs/tiny
    python train.py --stage base                 # one stage; later stages read the earlier outputs
    python train.py --resume                     # continue an interrupted run; finished stages are skipped
    python train.py --compare                    # also the oracle-group and uniform-weight reference heads
    python train.py --set head.lam=2 --set losses.num_draws=16     # any config field (invdiff_min/config.py)
    python train.py --dataset shapes3            # built in, a three-valued bias (shapes4: four)
    python train.py --dataset cmnist             # Colored-MNIST-5k (pip install -e ".[cmnist]")
    python train.py --dataset waterbirds --data-root /data/waterbirds --resolution 32 --preset gpu
    torchrun --standalone --nproc_per_node 4 train.py --preset gpu    # data-parallel on 4 GPUs

The stages live in invdiff_min/pipeline.py; this script reads the command line, checks all of it before any
work starts, and calls them. Under torchrun every process runs this script (invdiff_min/distributed.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from invdiff_min import amp
from invdiff_min import distributed as dist
from invdiff_min import pipeline
from invdiff_min.config import RunConfig, apply_overrides, check_config, fit_to_data, get_preset, pick_device
from invdiff_min.data import get_spec, load_splits
from invdiff_min.errors import exit_on_error
from invdiff_min.evaluate import check_judgeable
from invdiff_min.runs import STAGES, check_run_folder, start_run

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="tiny | cpu (default) | gpu")
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>, runs/<dataset>-<preset>)")
    p.add_argument("--stage", default="all", choices=("all",) + STAGES, help="run one stage only")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true", help="continue the run in --out; finished stages are skipped")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder (the old one is kept aside until the new one has a stage)")
    p.add_argument("--steps", type=int, default=None, help="the base model's training steps")
    p.add_argument("--head-steps", type=int, default=None, help="the guidance head's training steps")
    p.add_argument("--seed", type=int, default=None, help="training seed (all stages)")
    p.add_argument("--lr", type=float, default=None, help="base model learning rate (may change on --resume)")
    p.add_argument("--head-lr", type=float, default=None, help="guidance head learning rate (may change on --resume)")
    p.add_argument("--precision", default=None, choices=tuple(amp.PRECISIONS),
                   help="network calls: auto (default: bf16 on CUDA and on CPUs with native bf16, else fp32), "
                        "bf16, fp16 (CUDA, loss scaling) or fp32 (exact)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory layout (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks being trained")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the dataset (selection, colours)")
    p.add_argument("--dataset", default="shapes", help="shapes (built in, default), shapes3, shapes4 (built in, "
                                                       "K = 3, 4), cmnist, waterbirds, celeba, fairface or folder")
    p.add_argument("--data-root", default=None, help="folder of a real dataset (docs/datasets.md: layouts)")
    p.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option, repeatable: target=Blond_Hair, bias=Male, digits=[0,1], "
                        "group_sizes=3:2:1:1:1:1:2:3, race_classes=invdiff4")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the preset's)")
    p.add_argument("--num-samples", type=int, default=None, help="training set size (default: preset / all)")
    p.add_argument("--aligned-fraction", type=float, default=None,
                   help="re-sample training to this share of bias-aligned samples")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="set any config field, repeatable: head.lam=2, losses.num_draws=16, losses.t_window=[500,800]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--compare", action="store_true",
                   help="also train the oracle-group and uniform-weight heads and the official loss recipe")
    p.add_argument("--init-from", default=None,
                   help="start the base model from a converted checkpoint (python -m invdiff_min.convert SRC OUT)")
    p.add_argument("--base", default=None, help="use this base-model checkpoint folder instead of training one")
    return p.parse_args(argv)


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE of --data-option; VALUE is read as JSON when it parses (numbers, lists, true), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--data-option takes KEY=VALUE (e.g. target=Blond_Hair or digits=[0,1]), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_config(args) -> RunConfig:
    """The preset, then the dataset's defaults, then the flags, then --set; every number checked at the end."""
    cfg = get_preset(args.preset)
    spec = get_spec(args.dataset)
    if args.dataset != "shapes":
        cfg.data.name, cfg.data.data_root = args.dataset, args.data_root
        for key, value in spec.defaults.items():
            setattr(cfg.data, key, value)
        cfg.data.options = dict(parse_option(o) for o in args.data_option)
    elif args.data_root or args.data_option:
        raise ValueError("--data-root and --data-option belong to a real dataset; add --dataset NAME")
    flags = {("train", "steps"): args.steps, ("head", "steps"): args.head_steps, ("train", "precision"):
             args.precision, ("train", "lr"): args.lr, ("head", "lr"): args.head_lr, ("data", "seed"): args.data_seed,
             ("data", "resolution"): args.resolution, ("data", "num_samples"): args.num_samples,
             ("data", "aligned_fraction"): args.aligned_fraction}
    for (section, name), value in flags.items():
        if value is not None:
            setattr(getattr(cfg, section), name, value)
    cfg.train.channels_last = cfg.train.channels_last or args.channels_last
    cfg.train.compile = cfg.train.compile or args.compile
    if args.seed is not None:
        for part in (cfg.train, cfg.losses, cfg.groups, cfg.head):
            part.seed = args.seed
    if args.init_from:
        pipeline.apply_init_from(cfg, args.init_from)
    apply_overrides(cfg, args.set)
    if any(item.partition("=")[0].strip() == "head.block_out_channels" for item in args.set):
        cfg.head.many_classes_width = 1                             # an explicit head width is taken as given
    check_config(cfg)
    return cfg


def main(argv=None) -> int:
    """The command line, inside the error boundary: bad input ends in one line, `error: ...` (exit status 1)."""
    with exit_on_error():
        return train(sys.argv[1:] if argv is None else list(argv))


def train(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    run_dir = Path(args.out or (f"runs/{cfg.preset}" if cfg.data.name == "shapes" else
                                f"runs/{cfg.data.name}-{cfg.preset}")).expanduser()   # checked where written
    heads = ("invdiff", "oracle", "uniform") if args.compare else ("invdiff",)
    base_path = None
    if args.base:
        from invdiff_min.checkpoint import resolve_checkpoint
        base_path = resolve_checkpoint(args.base)                   # refused now if it is not a checkpoint
    check_run_folder(run_dir, resume=args.resume, overwrite=args.overwrite, data_root=cfg.data.data_root,
                     stage=args.stage, has_base=base_path is not None, heads=heads,
                     reads=tuple(p for p in (args.base, cfg.train.init_from) if p))
    device = dist.init(pick_device(args.device))   # under torchrun: join the others; cuda:LOCAL_RANK on CUDA
    cfg.train.precision, why = amp.resolve(cfg.train.precision, device)   # "auto" made concrete, recorded
    try:
        if not dist.is_main():
            dist.barrier()                          # rank 0 first: a real dataset decodes and caches once
        splits = load_splits(cfg.data)              # the data, built once and passed to every stage
        if dist.is_main():
            dist.barrier()
        if args.stage in ("all", "eval"):
            check_judgeable(splits)                 # now, not after every training stage has run
        data = splits.train
        fit_to_data(cfg, data.num_classes, cfg.data.resolution, data.images.shape[1])   # classes, side, head width
        for flag, path in (("--base", args.base), ("--init-from", cfg.train.init_from)):   # or --set train.init_from
            if path:
                pipeline.check_base_fits(path, cfg, flag)           # made for this data, or refused now
        dist.print0(f"[precision] {cfg.train.precision} ({why})")
        dist.print0(f"[data] {cfg.data.name}: {len(data)} training images, {data.num_classes} classes "
                    f"{list(data.class_names)}, {data.num_attributes} attribute values (hidden)")
        replaced = None
        if dist.is_main():                          # rank 0 prepares the run folder, the others wait
            record = pipeline.run_record(["train.py", *argv], device, splits)
            replaced = start_run(run_dir, cfg.to_dict(), record, resume=args.resume, overwrite=args.overwrite)
        dist.barrier()
        summary = pipeline.run(cfg, splits, run_dir, device, args.stage, heads, base_path, args.compare,
                               not args.no_progress, replaced)
        if summary is not None:
            print("\n" + pipeline.summary_table(summary))
            print(f"\nsummary {run_dir / 'summary.json'}, samples {run_dir / 'samples.png'}")
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

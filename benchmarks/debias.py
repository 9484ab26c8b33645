"""The debiasing comparison on the built-in dataset: one trained base model, several guidance heads.

    python benchmarks/debias.py --run runs/cpu                       # every variant below, on the run's base
    python benchmarks/debias.py --run runs/cpu --variants invdiff oracle --seeds 0 1 2 --json out.json
    python benchmarks/debias.py --merge a.json b.json --json all.json   # reports of parallel processes
    python benchmarks/debias.py --run runs/k4 --variants oracle --set head.lam=10 --tag _lam10  # another recipe
    python benchmarks/debias.py --run runs/k4 --variants invdiff_label_topk --set groups.top_fraction=0.1 --tag _tf10

Reads the run folder that `python train.py` made (base model, per-sample losses, groups) and trains one head
per variant and head seed into RUN/bench/<variant>-s<seed>/ (train.py's own invdiff / oracle / uniform heads
are reused for the run's head seed), then samples every model with the same seeds and
reports Bias, minority share per class and fidelity at each strength w:

    invdiff               inferred groups (class top-k), group-balanced batches   (our default)
    invdiff_unsplit       the same without splitting high-loss groups by the label profile (K > 2 classes;
                          with 2 classes it equals invdiff)
    invdiff_margin        the label-margin groups (groups.method="class_margin": the samples another label
                          explains better than their own, split by it; needs the run's label profile)
    invdiff_label_topk    each class split by its best other label, then the top losses of each part
                          (groups.method="class_label_topk"; needs the run's label profile)
    invdiff_uniform       inferred groups, uniform batches                        (the official batching)
    official_groups       the official grouper (G = 8, soft, Adam), balanced batches
    oracle                hidden (y, b) groups, balanced batches                  (upper bound, not label-free)
    oracle_uniform        hidden groups, uniform batches
    uniform               one group: a plain fine-tune of the head                (the control)

Also reports the group-inference quality of the losses (AUC) and groups (NMI, minority share of the
high-loss groups). Heads already trained are reused (the folders are checkpoints). Prints a Markdown table
(mean and spread over head seeds) and writes JSON. A benchmark: it asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from invdiff_min import pipeline
from invdiff_min.checkpoint import CheckpointError, list_checkpoints, load_tensors, load_unet, read_json, read_state
from invdiff_min.config import RunConfig, add_sampling_flags, apply_overrides, check_config, check_strengths, with_eval
from invdiff_min.errors import exit_on_error
from invdiff_min.data import load_splits
from invdiff_min.evaluate import make_judge, sample_and_judge
from invdiff_min.groups import class_label_topk_groups, class_margin_groups, class_topk_groups, group_report
from invdiff_min.groups import official_groups
from invdiff_min.guidance import load_head
from invdiff_min.runs import read_run_config

VARIANTS = {  # name: (group source, batch sampling)
    "invdiff": ("invdiff", "balanced"),
    "invdiff_uniform": ("invdiff", "uniform"),
    "invdiff_unsplit": ("unsplit", "balanced"),
    "invdiff_margin": ("margin", "balanced"),
    "invdiff_label_topk": ("label_topk", "balanced"),
    "official_groups": ("official", "balanced"),
    "oracle": ("oracle", "balanced"),
    "oracle_uniform": ("oracle", "uniform"),
    "uniform": ("uniform", "balanced"),
}
REGROUPED = {"unsplit": {"top_fraction"}, "margin": {"min_subgroup"},  # sources grouped here anew from the run's
             "label_topk": {"top_fraction"}}                           # losses, and the groups.* fields each reads


def variant_assignments(cfg: RunConfig, run_dir: Path, source: str, data) -> torch.Tensor:
    """The group assignment W of a variant: the run's inferred groups, the hidden cells, one group, or the
    official grouper's."""
    if source == "unsplit":
        losses = load_tensors(run_dir / "losses.safetensors")["loss"]
        return class_topk_groups(losses, data.labels, data.num_classes, cfg.groups.top_fraction)
    if source in ("margin", "label_topk"):
        saved = load_tensors(run_dir / "losses.safetensors")
        if "profile" not in saved:
            raise SystemExit(f"error: {run_dir / 'losses.safetensors'} has no label profile, which invdiff_{source} "
                             f"needs: rerun --stage losses with --set losses.profile_draws=4 into a new run")
        if source == "label_topk":
            return class_label_topk_groups(saved["loss"], data.labels, saved["profile"], cfg.groups.top_fraction)
        return class_margin_groups(data.labels, saved["profile"], cfg.groups.min_subgroup)
    if source != "official":
        inferred = pipeline.load_groups(run_dir) if source == "invdiff" else None
        return pipeline.group_assignments(source, data, inferred)
    g = cfg.groups                                    # deterministic and a second's work: not cached
    return official_groups(load_tensors(run_dir / "losses.safetensors")["loss"], g.num_groups, g.steps, g.lr, g.w_nz,
                           g.restarts, g.seed)


def check_json_out(path: str | None) -> None:
    """--json: a new or regular file in an existing folder (a folder, or a pipe that would block the write, is
    refused before any work)."""
    if path and ((Path(path).exists() and not Path(path).is_file()) or not Path(path).parent.is_dir()):
        raise SystemExit(f"error: --json {path}: pass a file path in an existing folder (it is "
                         f"{'not a regular file' if Path(path).exists() else 'in a folder that does not exist'})")


def check_bench_head(folder: Path, own: bool) -> None:
    """A benchmark head written before heads recorded their groups' fingerprint cannot be told apart from one
    trained on other groups (the official grouper changed since): refused, unlike train.py's own heads."""
    ckpts = list_checkpoints(folder)
    if not own and ckpts and "groups_fingerprint" not in read_state(ckpts[-1]):
        raise SystemExit(f"error: {folder} holds a head from before heads recorded their groups, so it may have been "
                         f"trained on other groups; move that folder away to train it again")


def _stat(values: list[float]) -> str:
    """mean ± sample standard deviation over seeds, 3 significant digits."""
    spread = f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3g}{spread}"


def markdown_table(report: dict, num_classes: int) -> str:
    """One row per (model, w): mean ± spread over head seeds of Bias, minority share per class (K > 2
    values: each value's share per class, and the largest |share - 1/K| over classes and values), fidelity and
    the quality distances (FD, precision, recall) to the balanced real set."""
    k = len(next(iter(report["models"]["base"].values()))[0]["attribute_share"][0])
    many = k > 2
    title = "value shares per class | max gap to 1/K" if many else "minority share per class"
    lines = [f"| model | w | seeds | Bias | {title} | fidelity | FD | precision | recall |",
             "|---|---|---|---|---|" + ("---|" if many else "") + "---|---|---|---|"]
    for name, by_w in report["models"].items():
        for w, runs in by_w.items():
            if many:
                shares = ", ".join("/".join(f"{statistics.mean(r['attribute_share'][c][a] for r in runs):.2f}"
                                            for a in range(k)) for c in range(num_classes))
                shares += " | " + _stat([max(abs(v - 1 / k) for row in r["attribute_share"] for v in row)
                                         for r in runs])
            else:
                shares = " / ".join(_stat([r["minority_share"][c] for r in runs]) for c in range(num_classes))
            quality = " | ".join(_stat([r[k] for r in runs]) if k in runs[0] else "" for k in
                                 ("fd", "precision", "recall"))
            lines.append(f"| {name} | {w} | {len(runs)} | {_stat([r['bias'] for r in runs])} | {shares} | "
                         f"{_stat([r['fidelity'] for r in runs])} | {quality} |")
    return "\n".join(lines)


def merge(paths: list[str]) -> dict:
    """Several reports of one run (e.g. variants benchmarked in parallel processes) as one: models of later
    files are added; base and group reports must agree."""
    if len(set(map(str, paths))) < len(paths):
        raise SystemExit(f"error: --merge names a report twice ({paths}); its heads would count twice")
    reports = []
    for path in paths:
        try:
            report = read_json(path)
        except (CheckpointError, OSError) as e:
            raise SystemExit(f"error: --merge: {e}") from None
        if not (isinstance(report, dict) and isinstance(report.get("models"), dict) and "base" in report["models"]
                and isinstance(report.get("groups"), dict) and "run" in report):
            raise SystemExit(f"error: --merge {path} is not a report of this script (no run, groups and models with "
                             f"a base); pass the --json files debias.py wrote")
        reports.append(report)
    merged = copy.deepcopy(reports[0])
    for other in reports[1:]:
        if any(other.get(k) != merged.get(k) for k in ("run", "n_per_class", "sampler", "guidance_scale",
                                                       "guidance_t_max", "head_outside_cfg", "head_steps")):
            raise SystemExit(f"error: cannot merge reports of different runs, sample sizes or samplers: {paths}")
        merged["groups"].update(other["groups"])
        for name, by_w in other["models"].items():        # a variant in both: the head seeds of both
            if name != "base":
                for w, runs in by_w.items():
                    merged["models"].setdefault(name, {}).setdefault(w, []).extend(runs)
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run folder made by train.py (base, losses, groups)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="head training seeds")
    p.add_argument("--strengths", nargs="+", type=float, default=[1.0, 2.0, 3.0])
    p.add_argument("--n-per-class", type=int, default=None, help="default: the run's eval.n_per_class")
    p.add_argument("--head-steps", type=int, default=None,
                   help="train every head to this many steps (default: the run's); shorter heads are continued")
    add_sampling_flags(p)                        # --guidance-scale, --guidance-t-max, --head-outside-cfg (every model)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="train the heads with this head setting instead of the run's, or group with this groups "
                        "setting (the variants grouped here only); repeatable; needs --tag")
    p.add_argument("--tag", default="", help="suffix of the head folders and model names of a --set recipe")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge these reports of one run into --json and print the table")
    args = p.parse_args()
    with exit_on_error():                        # a late ValueError or OSError ends in one line too
        run(args)


def run(args) -> None:
    """Check every flag before anything long, then benchmark (or merge) as the flags say."""
    check_strengths(args.strengths, "--strengths")      # a ValueError: one line through exit_on_error
    for flag, value in (("--n-per-class", args.n_per_class), ("--head-steps", args.head_steps)):
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} must be at least 1, got {value}")
    if any(not 0 <= s <= 2**31 - 1 for s in args.seeds):
        raise SystemExit(f"error: --seeds must lie in [0, 2**31 - 1], got {args.seeds}")
    check_json_out(args.json)
    if args.merge:
        report = merge(args.merge)
        try:
            cfg = read_run_config(Path(report["run"]))[0]
        except (CheckpointError, OSError) as e:
            raise SystemExit(f"error: --merge {args.merge[0]}: its run folder: {e}") from None
        report["table"] = markdown_table(report, cfg.unet.num_classes)
        print(report["table"])
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return

    if not args.run:
        raise SystemExit("error: pass --run RUN (a train.py run folder), or --merge JSON ...")
    run_dir = Path(args.run)
    try:                                         # the run's settings, sampled as the flags say (every model)
        cfg = with_eval(read_run_config(run_dir)[0], guidance_scale=args.guidance_scale,
                        guidance_t_max=args.guidance_t_max, head_outside_cfg=args.head_outside_cfg)
    except (CheckpointError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    recipe = copy.deepcopy(cfg)
    if args.set:
        if not args.tag or any(not item.startswith(("head.", "groups.")) for item in args.set):
            raise SystemExit("error: --set takes head.FIELD=VALUE and groups.FIELD=VALUE settings only, and needs "
                             "--tag NAME so that its heads get folders of their own")
        regrouping = [item.partition("=")[0].strip() for item in args.set if item.startswith("groups.")]
        for field in (path.removeprefix("groups.") for path in regrouping):
            deaf = [v for v in args.variants if field not in REGROUPED.get(VARIANTS[v][0], ())]
            if deaf:
                readers = "; ".join(f"{v} reads {', '.join(sorted(REGROUPED[VARIANTS[v][0]]))}" for v in VARIANTS
                                    if VARIANTS[v][0] in REGROUPED)
                raise SystemExit(f"error: --set groups.{field}: {', '.join(deaf)} would ignore it. --set groups.* "
                                 f"regroups only the variants grouped here from the run's losses ({readers}); run "
                                 f"the others without it")
        try:
            check_config(apply_overrides(recipe, args.set))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    n = args.n_per_class or cfg.eval.n_per_class
    if n * cfg.unet.num_classes < 4:                     # before anything loads
        raise SystemExit(f"error: --n-per-class {n} gives {n * cfg.unet.num_classes} samples per model, and the "
                         f"quality measures need 4: pass --n-per-class {-(-4 // cfg.unet.num_classes)} or more")
    device = torch.device(args.device)
    base, _, base_ckpt = load_unet(run_dir, device)
    splits = load_splits(cfg.data)
    data = splits.train
    scale = cfg.eval.guidance_scale
    head_steps = args.head_steps or cfg.head.steps
    how = pipeline.sample_settings(cfg, device, n_per_class=n)

    judge = make_judge(splits, run_dir / "judges", device, cfg.eval.judge_steps)
    losses = load_tensors(run_dir / "losses.safetensors")["loss"]
    report: dict = {"run": str(run_dir), "preset": cfg.preset, "data_seed": cfg.data.seed, "n_per_class": n,
                    "sampler": f"{cfg.eval.sampler}-{cfg.eval.num_steps}", "guidance_scale": scale,
                    "guidance_t_max": cfg.eval.guidance_t_max, "head_outside_cfg": cfg.eval.head_outside_cfg,
                    "head_steps": head_steps, "head_settings": args.set,
                    "losses": read_json(run_dir / "losses.json"),
                    "groups": {}, "models": {}}
    groups = {name: variant_assignments(recipe, run_dir, VARIANTS[name][0], data) for name in args.variants}
    report["models"]["base"] = {"0.0": [sample_and_judge(base, None, 0.0, judge, how)[2]]}
    for name in args.variants:
        source, batching = VARIANTS[name]
        assignments = groups[name]
        if source in ("invdiff", "official", "unsplit", "margin"):
            report["groups"][source] = group_report(assignments, losses, data.labels, data.conflicting,
                                                    data.group).to_dict()
        results: dict = {}
        for seed in args.seeds:
            variant = copy.deepcopy(recipe)
            variant.head.batch_sampling, variant.head.seed = batching, seed
            variant.head.steps = head_steps
            # train.py's own heads (same groups, batching, seed and steps) are reused rather than trained again;
            # any other recipe trains in bench/, so the run's own head is never trained further
            own = name in pipeline.HEADS and seed == cfg.head.seed and not args.set and head_steps == cfg.head.steps
            folder = run_dir / (name if own else f"bench/{name}{args.tag}-s{seed}")
            check_bench_head(folder, own)
            try:                                           # a head of other groups or another base is refused
                pipeline.train_head(variant, data, base, assignments, device, folder, str(base_ckpt), progress=False)
            except CheckpointError as e:                   # the run's own head: train.py's ways out, as it says
                what = str(e).split("; train this stage")[0]
                raise SystemExit(f"error: {e}" if own else f"error: {what}; move {folder} away to train it "
                                                           f"again") from None
            head, state = load_head(folder, base, device)
            if state["step"] != variant.head.steps:        # a head trained past the request is not cut back
                raise SystemExit(f"error: {folder} holds a head at step {state['step']}, not {variant.head.steps}; "
                                 f"pass --head-steps {state['step']} or move that folder away")
            for w in args.strengths:
                metrics = sample_and_judge(base, head, w, judge, how, recipe.head.mode, recipe.head.mix_ratio,
                                           cfg.eval.head_outside_cfg)[2]
                results.setdefault(str(w), []).append(metrics)
            print(f"{name}{args.tag} seed {seed}: " + ", ".join(f"w={w} Bias {results[str(w)][-1]['bias']:.3f}"
                                                     for w in args.strengths), flush=True)
        report["models"][name + args.tag] = results

    table = markdown_table(report, cfg.unet.num_classes)
    print(table)
    report["table"] = table
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

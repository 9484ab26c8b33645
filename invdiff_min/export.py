"""Trained weights out: a run folder -> diffusers folders (the inverse of `convert.py`).

    python -m invdiff_min.export runs/cpu exports/cpu [--weights ema|model] [--head invdiff|oracle|uniform|none]

writes

    exports/cpu/unet/             the base eps_theta, a diffusers UNet2DModel (config.json + diffusion_pytorch_model
                                  .safetensors)
    exports/cpu/scheduler/        its noise schedule: scheduler_config.json for diffusers' DDPMScheduler
    exports/cpu/guidance_head/    the head G_psi, a second UNet2DModel (not written with --head none)
    exports/cpu/invdiff.json      how the two combine: mode, strength w, null label; how the run samples:
                                  classifier-free guidance scale, interval, head inside or outside it
    exports/cpu/README.md         the same in words, with a diffusers snippet

Our module names are diffusers' (see `unet.py`), so the base's config is `convert.py`'s mapping read backwards
and its weights are written as they are. The head G_psi(x_t, t, Phi(y)) is an unconditional UNet with Phi(y)
added to its time embedding; diffusers' UNet2DModel(num_class_embeds=K + 1) adds nn.Embedding(K + 1, D)(y) at
the same place, so the head is a class-conditional UNet2DModel whose class_embedding is Phi. They combine as
(additive mode, ours)

    eps_hat(x_t, t, y) = eps_theta(x_t, t, y) + w * [y != null] * G_psi(x_t, t, y)

diffusers is never imported here. The export is written into a hidden folder beside OUT, read back with
`convert.py` and compared with the models it came from, and only then renamed into place.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint import (fingerprint, list_checkpoints, load_checkpoint, load_unet, read_json, save_tensors,
                         write_json)
from .convert import (DIFFUSERS_FIXED, DIFFUSERS_TO_OURS, DOWN_BLOCKS, SCHEDULER_FIXED, UP_BLOCKS, check_input,
                      convert, diffusion_from_scheduler_config)
from .config import EvalConfig, RunConfig, check_config, check_strengths
from .errors import exit_on_error
from .guidance import InvariantGuidance, load_head
from .runs import read_run_config
from .unet import UNet, UNetConfig

EXPORT_FORMAT = "invdiff-min diffusers export"     # invdiff.json's "format": marks a folder --overwrite may replace
EXPORT_ENTRIES = {"unet", "scheduler", "guidance_head", "invdiff.json", "README.md"}
HEADS = ("invdiff", "oracle", "uniform", "none")
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


class ExportError(ValueError):
    """A run or output folder the export cannot use; the message says what to do instead."""


# ----- configs: convert.py's tables read backwards -------------------------------------------------------
def diffusers_unet_config(config: UNetConfig) -> dict:
    """The UNet2DModel config.json of our config (inverse of `convert.unet_config_from_diffusers`). Every
    setting is written out, the ones we implement one way only included, so no diffusers default is relied on."""
    down_type = {has_attention: name for name, has_attention in DOWN_BLOCKS.items()}
    up_type = {has_attention: name for name, has_attention in UP_BLOCKS.items()}
    return {"_class_name": "UNet2DModel", "sample_size": config.sample_size,
            **{key: getattr(config, field_) for key, field_, _ in DIFFUSERS_TO_OURS},
            **DIFFUSERS_FIXED,
            "down_block_types": [down_type[a] for a in config.attention_levels],
            "up_block_types": [up_type[a] for a in reversed(config.attention_levels)],   # up mirrors down
            "attn_norm_num_groups": config.norm_num_groups,
            # our class table has num_classes + 1 rows (the last is the null label); diffusers counts every row
            "num_class_embeds": None if config.num_classes is None else config.num_classes + 1}


# Sampling-time choices a run does not record: our schedulers' defaults, written so diffusers' are not relied on.
SAMPLING_DEFAULTS = {"timestep_spacing": "leading", "steps_offset": 0}


def diffusers_scheduler_config(diffusion: dict, where: Path) -> dict:
    """scheduler_config.json for diffusers' DDPMScheduler from a run's config.diffusion, the settings our
    schedulers implement one way only written out; checked by the reader `convert.py` uses on the way in."""
    return {"_class_name": "DDPMScheduler", **diffusion_from_scheduler_config(diffusion, where), **SCHEDULER_FIXED,
            **SAMPLING_DEFAULTS}


def head_as_unet(head: InvariantGuidance) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """G_psi as one class-conditional UNet: net's config with num_classes, net's weights plus Phi as
    class_embedding. net adds cond_emb = Phi(y) to its time embedding exactly where a class-conditional UNet
    adds class_embedding(y), so both compute G_psi(x_t, t, y), the null label's row included."""
    if head.phi_group is None:
        config = dataclasses.replace(head.net.config, num_classes=head.num_classes)
        return config, {**head.net.state_dict(), "class_embedding.weight": head.phi.weight}
    # a head told the sub-group reads Phi(class of g) + Phi'(g): one table over its G sub-groups (+ null)
    config = dataclasses.replace(head.net.config, num_classes=head.num_groups)
    return config, {**head.net.state_dict(),
                    "class_embedding.weight": head.phi.weight[head.label_class] + head.phi_group.weight}


# ----- what a run holds ----------------------------------------------------------------------------------
@dataclasses.dataclass
class RunModels:
    """The models of a run folder and what invdiff.json records about them."""
    base: UNet
    diffusion: dict                       # the run's config.diffusion (the noise schedule)
    head: InvariantGuidance | None
    manifest: dict                        # invdiff.json


def load_run(run: str | Path, weights: str = "ema", head: str = "invdiff", strength: float | None = None) -> RunModels:
    """The base (its `weights`: "ema" or "model") and the head `head` ("none": no head) of a run folder made by
    train.py; `strength` overrides the run's eval.strength as the w recorded for the head."""
    run = Path(run)
    if weights not in ("ema", "model"):
        raise ExportError(f"--weights must be 'ema' or 'model', got {weights!r}")
    if head not in HEADS:
        raise ExportError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    if strength is not None:
        check_strengths([strength], "--strength")       # recorded in invdiff.json as w
    if not run.is_dir():
        raise ExportError(f"run folder {run} does not exist; pass a run folder made by train.py (e.g. runs/cpu)")
    base, base_state, base_ckpt = load_unet(run, weights=weights)
    config = base_state.get("config", {})
    if "diffusion" not in config:
        raise ExportError(f"{base_ckpt / 'state.json'} has no config.diffusion (the noise schedule the scheduler "
                          f"config is made from); export a run made by train.py or python -m invdiff_min.convert")
    kept = weights if f"{weights}.safetensors" in base_state.get("files", []) else "model"   # load_unet's fallback
    run_eval = (read_run_config(run)[0].eval if (run / "config.json").is_file() else
                EvalConfig(strength=1.0))                  # no run config (a converted checkpoint): sampled plain
    manifest = {"format": EXPORT_FORMAT, "source": str(run), "base_checkpoint": str(base_ckpt),
                "base_weights": kept, "unet": "unet", "scheduler": "scheduler", "guidance_head": None,
                "num_classes": base.config.num_classes, "null_label": base.null_label,
                "guidance_scale": 1.0, "guidance_t_max": None, "head_outside_cfg": False}
    if base.config.num_classes is not None:               # how the run samples: classifier-free guidance
        manifest.update(guidance_scale=run_eval.guidance_scale, guidance_t_max=run_eval.guidance_t_max)
    if head == "none":
        return RunModels(base, config["diffusion"], None, manifest)

    if base.config.num_classes is None:
        raise ExportError(f"the base in {base_ckpt} is unconditional, so it has no guidance head; pass --head none")
    if not list_checkpoints(run / head):
        flags = "" if head == "invdiff" else " --compare"
        raise ExportError(f"{run} has no trained head {head!r} (no {run / head}/ckpt-*); train it with python "
                          f"train.py --preset {config.get('preset', 'PRESET')} --out {run} --resume --stage head"
                          f"{flags}, or pass --head none to export the base alone")
    head_ckpt, head_state = load_checkpoint(run / head, stage=head)
    if kept != "ema" and head_state.get("base_fingerprint") != fingerprint(base.state_dict()):
        raise ExportError(f"the head in {head_ckpt} was not trained on the raw base weights --weights {weights} "
                          f"selects (heads train on the EMA weights); pass --weights ema, or --head none to export "
                          f"the base alone")
    guidance, _ = load_head(run / head, base)               # checks the fingerprint against the EMA base too
    trained_with = head_state["config"]["head"]             # the head's mode and mix ratio
    if not (run / "config.json").is_file():                 # the run's settings as the head saved them
        try:
            saved = RunConfig.from_dict(head_state["config"])
            check_config(saved)
        except ValueError as e:
            raise ExportError(f"{head_ckpt / 'state.json'}: {e}; restore the checkpoint, or train the head "
                              f"again") from None
        run_eval = saved.eval
        manifest.update(guidance_scale=run_eval.guidance_scale, guidance_t_max=run_eval.guidance_t_max)
    w = run_eval.strength if strength is None else strength   # as sample.py does
    manifest.update(guidance_head="guidance_head", head=head, head_checkpoint=str(head_ckpt),
                    head_weights="ema", mode=trained_with["mode"], strength=float(w),
                    mix_ratio=trained_with["mix_ratio"], head_outside_cfg=run_eval.head_outside_cfg)
    if guidance.phi_group is not None:                      # a head told the sub-group: each sub-group's class
        manifest["head_groups"] = guidance.group_class.tolist()
    return RunModels(base, config["diffusion"], guidance, manifest)


# ----- writing --------------------------------------------------------------------------------------------
def write_unet_folder(folder: Path, config: UNetConfig, tensors: dict[str, torch.Tensor]) -> None:
    """A diffusers model folder: config.json and diffusion_pytorch_model.safetensors."""
    folder.mkdir()
    write_json(folder / "config.json", diffusers_unet_config(config))
    save_tensors(folder / WEIGHTS_FILE, tensors, metadata={"format": "pt"})   # "pt": what HF loaders expect


def read_back_diff(folder: Path, model: torch.nn.Module) -> float:
    """Max |difference| between `model` and the folder rebuilt by convert.py, on a random batch with labels."""
    reloaded = convert(folder)
    x, t, y = check_input(reloaded.config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (reloaded(x, t, y) - model(x, t, y)).abs().max().item()


README = """\
# {name}: an invdiff-min model for diffusers

Written by `python -m invdiff_min.export` from `{source}` (base: {base_weights} weights{head_note}).

| entry | what | load with |
|---|---|---|
| `unet/` | the base eps_theta(x_t, t, y) | `UNet2DModel.from_pretrained` |
| `scheduler/` | its training noise schedule | `DDPMScheduler.from_pretrained` |
{head_row}| `invdiff.json` | mode, strength w, null label, classifier-free guidance | `json.load` |

{labels}
{combine}
```python
{snippet}
```
"""
LABELS = ("Labels: `class_labels` 0..{last} are the classes and {null} is the null label (the unconditional "
          "branch of classifier-free guidance); both models take them.\n")
HEAD_ROW = ("| `guidance_head/` | the head G_psi(x_t, t, Phi(y)) (Phi is its class_embedding) | "
            "`UNet2DModel.from_pretrained` |\n")
HEAD_ROW_GROUPS = ("| `guidance_head/` | the head G_psi(x_t, t, Phi(y) + Phi'(g)), told the sub-group g (the two "
                   "tables summed into its class_embedding) | `UNet2DModel.from_pretrained` |\n")
LABELS_GROUPS = ("Labels: the base's `class_labels` 0..{last} are the classes and {null} is the null label (the "
                 "unconditional branch of classifier-free guidance). The head was trained told each sample's "
                 "inferred sub-group (head.condition = class_group): its `class_labels` are the sub-groups "
                 "0..{last_group} and {null_group} is its null label; `head_groups` in invdiff.json gives each "
                 "sub-group's class. The images of a class take its sub-groups in equal numbers, in random "
                 "order, as invdiff-min samples (`draw_groups` below).\n")
COMBINE_GROUPS = {
    "additive": "The two combine as InvDiff's guided noise prediction (w = 0 is the base alone; this run's w is "
                "{strength}):\n\n    eps_hat(x_t, t, g) = eps_theta(x_t, t, class(g)) + w * G_psi(x_t, t, g)   for "
                "a sub-group g\n    eps_hat(x_t, t, null) = eps_theta(x_t, t, null)                          the head "
                "is silent on null\n",
    "mix": "The two combine as the official code's mix (w = 0 is the base alone; this run's w is {strength}):\n\n"
           "    eps_hat(x_t, t, g) = r G_psi(x_t, t, g) + (1 - r) eps_theta(x_t, t, class(g)),  r = w * {mix_ratio} "
           "for a sub-group g, r = 0 for null\n",
}
COMBINE = {
    "additive": "The two combine as InvDiff's guided noise prediction (w = 0 is the base alone; this run's w is "
                "{strength}):\n\n    eps_hat(x_t, t, y) = eps_theta(x_t, t, y) + w * G_psi(x_t, t, y)   for a class y\n"
                "    eps_hat(x_t, t, null) = eps_theta(x_t, t, null)                  the head is silent on null\n",
    "mix": "The two combine as the official code's mix (w = 0 is the base alone; this run's w is {strength}):\n\n"
           "    eps_hat(x_t, t, y) = r G_psi(x_t, t, y) + (1 - r) eps_theta(x_t, t, y),  r = w * {mix_ratio} for "
           "a class y, r = 0 for null\n",
}
SNIPPET_LOAD = """\
import json
import torch
from diffusers import DDPMScheduler, UNet2DModel

folder = "{name}"                                    # this folder, from its parent
unet = UNet2DModel.from_pretrained(f"{{folder}}/unet").eval()
scheduler = DDPMScheduler.from_pretrained(f"{{folder}}/scheduler")"""
SNIPPET_HEAD = """
head = UNet2DModel.from_pretrained(f"{{folder}}/guidance_head").eval()
info = json.load(open(f"{{folder}}/invdiff.json"))
w, null = info["strength"], info["null_label"]


@torch.no_grad()
def eps_hat(x, t, y):                                # y (B,): classes 0..{last}, or {null} (null)
    eps = unet(x, t, class_labels=y).sample
    on = (y != null).to(x.dtype).view(-1, 1, 1, 1)   # the head is silent on the null label
    g = head(x, t, class_labels=y).sample
{combine_line}"""
SNIPPET_HEAD_GROUPS = """
head = UNet2DModel.from_pretrained(f"{{folder}}/guidance_head").eval()
info = json.load(open(f"{{folder}}/invdiff.json"))
w, null = info["strength"], info["null_label"]
group_class = torch.tensor(info["head_groups"] + [null])     # the class of each sub-group; the head's null -> null


@torch.no_grad()
def eps_hat(x, t, sub):                              # sub (B,): sub-groups 0..{last_group}, or {null_group} (null)
    y = group_class[sub]                             # the base reads their class
    eps = unet(x, t, class_labels=y).sample
    on = (y != null).to(x.dtype).view(-1, 1, 1, 1)   # the head is silent on the null label
    g = head(x, t, class_labels=sub).sample
{combine_line}


def draw_groups(y, generator=None):                  # class labels (B,), no null -> each class's sub-groups in
    out = torch.empty_like(y)                        # equal numbers (+-1, the extra ones at random), random order
    for c in y.unique().tolist():
        own, rows = (group_class[:-1] == c).nonzero().flatten(), (y == c).nonzero().flatten()
        own = own[torch.randperm(len(own), generator=generator)]
        out[rows] = own[torch.randperm(len(rows), generator=generator) % len(own)]
    return out"""
COMBINE_LINE = {"additive": "    return eps + w * on * g",
                "mix": "    r = w * info[\"mix_ratio\"] * on\n    return r * g + (1 - r) * eps"}
SNIPPET_BASE_ONLY = """

@torch.no_grad()
def eps_hat(x, t, y):                                # y (B,) labels, or None for an unconditional base
    return unet(x, t, class_labels=y).sample"""
SNIPPET_CFG = """


{load_info}s, t_max = info["guidance_scale"], info["guidance_t_max"]    # this run's classifier-free guidance


@torch.no_grad()
def eps_cfg(x, t, y):                                # guided at t < t_max only (t_max None: at every t)
    if t_max is not None and t >= t_max:
        return eps_hat(x, t, y)
    eps_null = unet(x, t, class_labels=torch.full((len(x),), {null})).sample
{cfg_return}"""
CFG_RETURN = {
    False: "    return eps_null + s * (eps_hat(x, t, y) - eps_null)",
    True: "    eps_y = unet(x, t, class_labels={base_labels}).sample    # only the base is guided: the head's push\n"
          "    return eps_null + s * (eps_y - eps_null) + (eps_hat(x, t, y) - eps_y)   # w G_psi is added outside",
}
CFG_TEXT = ("\nThis run samples with classifier-free guidance at scale s = {scale}{interval}, `eps_cfg` below "
            "(`guidance_scale`, `guidance_t_max` and `head_outside_cfg` in invdiff.json):\n\n    {formula}\n")
CFG_FORMULA = {False: "eps_cfg = eps_null + s * (eps_hat - eps_null)",
               True: "eps_cfg = eps_null + s * (eps_theta({y}) - eps_null) + w * G_psi   only the base is guided, "
                     "the head's push is added outside"}
SNIPPET_SAMPLE = """


scheduler.set_timesteps(50)
y = {labels}
x = torch.randn({batch}, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
for t in scheduler.timesteps:
    x = scheduler.step({eps}(x, t, y), t, x).prev_sample   # x in [-1, 1]"""


def readme_text(name: str, manifest: dict) -> str:
    """README.md of an export: what each entry is, and how the two models combine, as a runnable snippet."""
    m, head = manifest, manifest["guidance_head"] is not None
    k = m["num_classes"]
    fields = dict(name=name, last=None if k is None else k - 1, null=m["null_label"])
    groups = head and m.get("head_groups") is not None          # a head told the sub-group
    if groups:
        fields.update(last_group=len(m["head_groups"]) - 1, null_group=len(m["head_groups"]))
    snippet = SNIPPET_LOAD.format(**fields)
    if groups:
        snippet += SNIPPET_HEAD_GROUPS.format(**fields, combine_line=COMBINE_LINE[m["mode"]])
    elif head:
        snippet += SNIPPET_HEAD.format(**fields, combine_line=COMBINE_LINE[m["mode"]])
    else:
        snippet += SNIPPET_BASE_ONLY
    guided = (k is not None and m.get("guidance_scale", 1.0) != 1.0    # classifier-free guidance when sampling
              and m.get("guidance_t_max") != 0)
    outside = head and m.get("head_outside_cfg", False)
    if guided:
        cfg_return = CFG_RETURN[outside].format(base_labels="group_class[y]" if groups else "y")
        snippet += SNIPPET_CFG.format(null=m["null_label"], cfg_return=cfg_return, load_info="" if head else
                                      'info = json.load(open(f"{folder}/invdiff.json"))\n')
    labels = "None" if k is None else f"torch.arange({k})"
    snippet += SNIPPET_SAMPLE.format(labels=f"draw_groups({labels})" if groups else labels,
                                     batch=4 if k is None else "len(y)", eps="eps_cfg" if guided else "eps_hat")
    combine = ((COMBINE_GROUPS if groups else COMBINE)[m["mode"]].format(**m) if head else
               "No guidance head was exported (--head none).\n")
    if guided:
        t_max = m.get("guidance_t_max")
        formula = CFG_FORMULA[outside].format(y="class(g)" if groups else "y")
        combine += CFG_TEXT.format(scale=m["guidance_scale"], formula=formula, interval="" if
                                   t_max is None else f" at t < {t_max} only (eps_hat alone at the other steps)")
    return README.format(
        name=name, source=m["source"], base_weights=m["base_weights"], snippet=snippet,
        head_note=f"; head: {m['head']}, its EMA weights" if head else "; no head",
        head_row="" if not head else HEAD_ROW_GROUPS if groups else HEAD_ROW,
        labels="" if k is None else (LABELS_GROUPS if groups else LABELS).format(**fields), combine=combine)


def is_export(folder: Path) -> bool:
    """Whether `folder` holds an earlier export and nothing else (the only folders --overwrite deletes)."""
    try:
        marked = read_json(folder / "invdiff.json").get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
    return marked and {p.name for p in folder.iterdir()} <= EXPORT_ENTRIES


def check_out(out: Path, overwrite: bool) -> None:
    """OUT must be new or empty; with --overwrite it may hold an earlier export (and nothing else)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; pass a new folder as OUT")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass a new folder as OUT, or --overwrite to replace an "
                          f"earlier export there")
    if not is_export(out):
        extra = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES)
        raise ExportError(f"--overwrite replaces only an earlier export (invdiff.json, unet/, ...), and {out} is "
                          f"not one{f' (it holds {extra[:5]})' if extra else ''}; nothing was deleted: pass a new "
                          f"folder as OUT")


def export_run(run: str | Path, out: str | Path, weights: str = "ema", head: str = "invdiff",
               strength: float | None = None, overwrite: bool = False) -> tuple[dict, dict[str, float]]:
    """Export a run folder to `out` (layout in the module docstring). Returns the manifest written to
    invdiff.json and the read-back check: folder -> max |difference| against the model it came from."""
    out = Path(out)
    check_out(out, overwrite)
    models = load_run(run, weights, head, strength)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write_unet_folder(tmp / "unet", models.base.config, models.base.state_dict())
        schedule = diffusers_scheduler_config(models.diffusion, Path(models.manifest["base_checkpoint"]) / "state.json")
        write_json(tmp / "scheduler" / "scheduler_config.json", schedule)
        written = {"unet": models.base}
        if models.head is not None:
            write_unet_folder(tmp / "guidance_head", *head_as_unet(models.head))
            written["guidance_head"] = models.head
        write_json(tmp / "invdiff.json", models.manifest)
        (tmp / "README.md").write_text(readme_text(out.name, models.manifest))
        diffs = {name: read_back_diff(tmp / name, model) for name, model in written.items()}
        if not max(diffs.values()) <= 1e-6:
            raise ExportError(f"the exported folders do not reproduce the run's models when read back (max abs "
                              f"diff {diffs}); nothing was written to {out}: report the bug")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return models.manifest, diffs


def replace_folder(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` (empty, or an export checked by `check_out`) is moved aside
    first and deleted only once the new one is in place."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / out.name)
    os.replace(new, out)
    shutil.rmtree(old)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a run folder (base model and guidance head) as diffusers "
                                                 "UNet2DModel folders with the scheduler config and a README.")
    parser.add_argument("run", help="run folder made by train.py (holds base/ and the heads), e.g. runs/cpu")
    parser.add_argument("out", help="new folder to write the export into (e.g. exports/cpu)")
    parser.add_argument("--weights", default="ema", choices=("ema", "model"),
                        help="the base's EMA weights (default, what sampling uses) or its raw weights")
    parser.add_argument("--head", default="invdiff", choices=HEADS,
                        help="which trained head to export (default invdiff); none: the base alone")
    parser.add_argument("--strength", type=float, default=None,
                        help="guidance strength w recorded in invdiff.json (default: the run's eval.strength)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier export")
    args = parser.parse_args(argv)
    with exit_on_error():                  # ExportError, CheckpointError, ConversionError, OSError: one line
        manifest, diffs = export_run(args.run, args.out, args.weights, args.head, args.strength, args.overwrite)
    head = (f"head {manifest['head']} in {args.out}/guidance_head ({manifest['mode']}, w = {manifest['strength']})"
            if manifest["guidance_head"] else "no head")
    print(f"wrote {args.out}: base ({manifest['base_weights']} weights) in unet/, scheduler/, {head}; see README.md")
    print(f"check: the folders read back match the run's models (max abs diff "
          f"{', '.join(f'{k} {v:.1g}' for k, v in diffs.items())} on a random batch with labels)")


if __name__ == "__main__":
    main()

"""Run folders: what a run writes where, how a stage resumes from its newest checkpoint and saves the next, and
how a run folder is created, continued or replaced without losing anything.

    RUN/config.json                       every setting, the command, versions (marks a folder as a run)
    RUN/base/ckpt-NNNNNNN/                stage A checkpoints (model, ema, optimizer, history, state.json)
    RUN/losses.json, losses.safetensors   stage B, part 1 (written as a set: the tensor file last)
    RUN/groups.json, groups_hist.png, groups.safetensors     stage B, part 2 (a set, the tensor file last)
    RUN/invdiff/ckpt-NNNNNNN/             stage C checkpoints of each head (and oracle/, uniform/)
    RUN/summary.json, samples.png         stage D

Every check of the command runs before anything is written or moved (`check_run_folder`). `--overwrite`
never deletes first: the old run is moved aside (`RUN/../.RUN.replaced`) and deleted only once the new run
has finished its first stage, so a command that fails leaves the old run recoverable.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, list_checkpoints, load_state_into, load_tensors, optimizer_from_tensors,
                         optimizer_to_tensors, read_json_object, read_state, save_checkpoint)
from .config import RunConfig, check_config

STAGES = ("base", "losses", "groups", "head", "eval")
LOSSES_FILES = ("losses.json", "losses.safetensors")          # written in this order; complete when all exist
GROUPS_FILES = ("groups.json", "groups_hist.png", "groups.safetensors")
# may change on --resume: learning rates (the way out of a diverged run) and how the same maths is computed
RESUMABLE_CHANGES = ("train.lr", "head.lr", "train.precision", "train.channels_last", "train.compile")


class RunFolderError(ValueError):
    """An --out folder that cannot be used as asked; the message says why and what to do."""


def complete(run_dir: Path, files: tuple[str, ...]) -> bool:
    """True when every output of a stage exists (a stage killed half-way is computed again)."""
    return all((run_dir / f).is_file() for f in files)


def read_run_config(run_dir: Path) -> tuple[RunConfig, dict]:
    """A run folder's config.json: its settings, checked (names, types, ranges), and the record saved beside
    them (command, versions, class names). Anything else is a CheckpointError naming the file and the fix."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no config.json; pass a run folder made by train.py")
    fix = "restore it, or run train.py again into a new folder"
    record = read_json_object(path, fix)
    if not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{path} is not a run config (no 'config' object); {fix}")
    try:
        cfg = RunConfig.from_dict(record.get("config"))
        check_config(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}; {fix}") from None
    return cfg, record


def related(a: Path, b: Path) -> str | None:
    """How folder a relates to folder b: 'is', 'holds', 'lies inside' or None."""
    a, b = a.expanduser().resolve(), b.expanduser().resolve()
    if a == b:
        return "is"
    if a in b.parents:
        return "holds"
    if b in a.parents:
        return "lies inside"
    return None


def check_run_folder(run_dir: Path, *, resume: bool, overwrite: bool, data_root: str | None = None,
                     stage: str = "all", has_base: bool = False, heads: tuple[str, ...] = ("invdiff",),
                     reads: tuple[str | Path, ...] = ()) -> None:
    """Everything about --out that can be refused, refused before any work: the folder's kind, its relation to
    the data and to the checkpoints the run `reads` (--base, --init-from), what --resume / --overwrite would do,
    and the inputs the requested stage needs."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--out {run_dir} is a file, not a folder; pass a new folder name")
    if data_root is not None and (how := related(run_dir, Path(data_root))):
        raise RunFolderError(f"--out {run_dir} {how} the data root {data_root}; runs are written (and replaced by "
                             f"--overwrite) there, so keep them apart: pass --out outside the dataset folder")
    is_run = (run_dir / "config.json").is_file()
    if is_run:                                    # a run's config.json, or another program's folder (never touched)
        check_run_marker(run_dir / "config.json")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run:
        raise RunFolderError(f"--out {run_dir} is a non-empty folder that is not a run of invdiff-min (no "
                             f"config.json); nothing there is touched: pass a new or empty folder")
    if is_run and not (resume or overwrite):
        raise RunFolderError(f"run folder {run_dir} already exists; pass --resume to continue it, --overwrite to "
                             f"replace it (the old run is kept aside in {aside_path(run_dir)} until the new one has "
                             f"finished its first stage), or --out NEW_FOLDER")
    if overwrite and resume:
        raise RunFolderError("--overwrite starts the run again and --resume continues it: pass one of them")
    if overwrite and is_run and run_dir.is_symlink():
        raise RunFolderError(f"--out {run_dir} is a symbolic link; --overwrite replaces a folder, not a link: pass "
                             f"the folder it points to ({run_dir.resolve()}) or a new folder")
    inside = [p for p in reads if related(Path(p), run_dir) in ("is", "lies inside")]
    if overwrite and is_run and inside:
        raise RunFolderError(f"{inside[0]} lies inside {run_dir}, which --overwrite moves aside and then deletes; "
                             f"copy it out of the run first, or pass --out NEW_FOLDER")
    if overwrite and aside_path(run_dir).exists():
        raise RunFolderError(f"an earlier --overwrite left the previous run in {aside_path(run_dir)}: restore it "
                             f"(mv {aside_path(run_dir)} {run_dir}) or delete it, then run again")
    parent = run_dir if run_dir.is_dir() else next(p for p in run_dir.absolute().parents if p.exists())
    if not parent.is_dir():
        raise RunFolderError(f"--out {run_dir} lies under {parent}, which is a file, not a folder; pass a new folder")
    if not os.access(parent, os.W_OK):
        raise RunFolderError(f"cannot write to {parent} (for --out {run_dir}); pass a folder you can write")
    kept = is_run and not overwrite                          # what the stage may read from the existing run
    needs = {"losses": ["base"], "groups": ["losses"], "head": ["base"] + (["groups"] if "invdiff" in heads else []),
             "eval": ["base"]}.get(stage, [])
    have = {"base": has_base or (kept and bool(list_checkpoints(run_dir / "base"))),
            "losses": kept and complete(run_dir, LOSSES_FILES), "groups": kept and complete(run_dir, GROUPS_FILES)}
    missing = [n for n in needs if not have[n]]
    if missing:
        where = "the new run --overwrite would start" if is_run and overwrite else str(run_dir)
        raise RunFolderError(f"--stage {stage} needs the {' and '.join(missing)} stage output in {where}, and it is "
                             f"not there; run the earlier stages first (--stage all, or --base CKPT for the base)")


def check_run_marker(cfg_file: Path) -> None:
    """A folder is a run (which --resume continues and --overwrite replaces) only if its config.json is the record
    train.py writes: a JSON object with a 'config' object. Another program's config.json (a diffusers model
    folder's, a project's) is refused, and so is one that is not JSON, before anything is touched."""
    keep = f"nothing in {cfg_file.parent} is touched: restore the file if it is a run's, else pass a new --out"
    if cfg_file.stat().st_size > 16 * 2**20:
        raise RunFolderError(f"{cfg_file} is {cfg_file.stat().st_size:,} bytes, not the small record train.py "
                             f"writes; {keep}")
    try:
        record = read_json_object(cfg_file, keep)
    except CheckpointError as e:
        raise RunFolderError(str(e)) from None
    if not isinstance(record.get("config"), dict):
        raise RunFolderError(f"--out {cfg_file.parent} holds a config.json that is not a run's of invdiff-min (no "
                             f"'config' object: another program's?); nothing there is touched: pass a new or empty "
                             f"folder")


def aside_path(run_dir: Path) -> Path:
    """Where --overwrite keeps the old run until the new one has finished its first stage."""
    return run_dir.absolute().parent / f".{run_dir.name}.replaced"


def config_changes(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def start_run(run_dir: Path, config: dict, record: dict, *, resume: bool, overwrite: bool) -> Path | None:
    """Create, continue or replace the run folder (after `check_run_folder`): on --resume require the same
    config (learning rates and precision excepted); on --overwrite move the old run aside. Writes config.json
    ({"config": ..., **record}). Returns the folder the old run was moved to, or None."""
    from .checkpoint import write_json

    cfg_file, moved = run_dir / "config.json", None
    config = json.loads(json.dumps(config))
    if cfg_file.is_file() and resume:
        changed, _ = check_same_run(run_dir, config, record.get("data"), "resume with the same --preset and options",
                                    "train into --out NEW_FOLDER")
        if changed:
            print(f"[resume] continuing with the new {', '.join(changed)}")
    elif cfg_file.is_file() and overwrite:
        moved = aside_path(run_dir)
        os.replace(run_dir, moved)
        print(f"[run] the old run is kept in {moved} until the new one has finished its first stage")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(cfg_file, {"config": config, **record})
    return moved


def check_same_run(run_dir: Path, config: dict, data: dict | None, same: str,
                   elsewhere: str) -> tuple[list[str], dict]:
    """A run continues only as it was made: `config` (a RunConfig dict) against its config.json, where only
    RESUMABLE_CHANGES may differ, and the data fingerprint `data` against the one recorded there; anything else
    is refused naming what differs and the caller's ways out (`same`: how to pass the same config; `elsewhere`:
    how to start a new run; flags for train.py, arguments from Python). Returns the changed resumable fields and
    the config.json it read."""
    cfg_file = run_dir / "config.json"
    saved = read_json_object(cfg_file, f"restore it, or {elsewhere}")
    if not isinstance(saved.get("config"), dict):
        raise CheckpointError(f"{cfg_file} is not a run config (no 'config' object); restore it, or {elsewhere}")
    changed = config_changes(saved["config"], json.loads(json.dumps(config)))
    fixed = [c for c in changed if c not in RESUMABLE_CHANGES]
    if fixed:
        raise RunFolderError(f"{run_dir} was made with a different config ({', '.join(fixed[:6])} differ from "
                             f"{cfg_file}); {same}, or {elsewhere}")
    check_same_data(run_dir, saved.get("data"), data, config.get("data", {}), elsewhere)
    return changed, saved


def check_same_data(run_dir: Path, saved, now, data: dict, elsewhere: str) -> None:
    """--resume on the data the run was made from (pipeline.data_fingerprint), or refused naming what differs.
    Runs made before the fingerprint was recorded have none; their first resume records it."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return
    differ = [key for key in now if saved.get(key) != now[key]]
    if not differ:
        return
    where = (f"the dataset in {data['data_root']} gives now (an edited label, an image added or removed?)" if
             data.get("data_root") else f"the built-in {data.get('name')} dataset gives with this torch version")
    raise RunFolderError(f"{run_dir} was made from other data: its config.json records other {', '.join(differ)} "
                         f"than {where}; restore the data as it was, or {elsewhere}")


def discard_replaced(moved: Path | None) -> None:
    """Delete the old run that --overwrite moved aside (the new run has finished a stage)."""
    if moved is not None and moved.name.endswith(".replaced") and moved.is_dir():
        shutil.rmtree(moved)
        print(f"[run] deleted the replaced run {moved}")


# ----- a training stage's checkpoints ------------------------------------------------------------------------
def resume_stage(stage_dir: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
                 history: torch.Tensor, expect: dict | None = None, recorded: dict | None = None) -> tuple[int, dict]:
    """Load the newest checkpoint of `stage_dir` into `modules` (each from NAME.safetensors), the optimizer and
    the loss history. `expect`: state.json entries that must match (e.g. the base model's fingerprint);
    `recorded`: entries that must match where the checkpoint has them (one written before they were recorded is
    not checked). Returns (its step, its state), or (0, {}) when the stage has no checkpoint yet."""
    ckpts = list_checkpoints(stage_dir)
    if not ckpts:
        return 0, {}
    ckpt = ckpts[-1]
    state = read_state(ckpt)                             # valid, unedited (checkpoint.read_state)
    checked = {**(expect or {}), **{k: v for k, v in (recorded or {}).items() if k in state}}
    for key, value in checked.items():
        if state.get(key) != value:
            raise CheckpointError(f"{ckpt} was trained with another {key} ({state.get(key)} vs {value}); train "
                                  f"this stage again in a new run (--out NEW_FOLDER) or with --overwrite")
    for name, module in modules.items():
        load_state_into(module, load_tensors(ckpt / f"{name}.safetensors"), f"{ckpt / name}.safetensors")
    optimizer_from_tensors(opt, load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
    step = state["step"]
    history[:step] = load_tensors(ckpt / "history.safetensors")["loss"][:step]
    return step, state


def save_stage(stage_dir: Path, step: int, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
               history: torch.Tensor, state: dict, fault_hook=None) -> Path:
    """Write checkpoint `step` of a stage atomically: NAME.safetensors per module, the optimizer, the loss
    history and state.json (`state` plus the optimizer's param groups)."""
    opt_tensors, opt_meta = optimizer_to_tensors(opt)
    tensors = {**{name: m.state_dict() for name, m in modules.items()}, "optimizer": opt_tensors,
               "history": {"loss": history}}
    return save_checkpoint(stage_dir, step, tensors, {**state, "optimizer": opt_meta}, fault_hook=fault_hook)


class MetricsLog:
    """STAGE/metrics.jsonl: one JSON line per training step ({"step", "loss", "lr", "seconds"}) that any plotting
    tool can read. Lines are written with each checkpoint, so the log always matches the newest checkpoint;
    a resumed stage first drops the lines past the step it resumes from."""

    def __init__(self, stage_dir: Path, start: int):
        self.path, self.pending = stage_dir / "metrics.jsonl", []
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break                                  # a line cut by a crash: it and what follows go
                if not isinstance(entry, dict) or not 0 < entry.get("step", 0) <= start:
                    break
                kept.append(entry)
        self.seconds = kept[-1]["seconds"] if kept else 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))
        self.t0 = time.time()

    def add(self, step: int, when: float | None = None, **values) -> None:
        """Record the values of training step `step` (1-based: the step just done), done at time `when`."""
        when = time.time() if when is None else when
        self.pending.append({"step": step, **values, "seconds": round(self.seconds + when - self.t0, 3)})

    def flush(self) -> None:
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(e) + "\n" for e in self.pending))
        self.pending = []

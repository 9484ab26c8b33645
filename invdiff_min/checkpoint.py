"""Run folders and checkpoints: safetensors for tensors, JSON for everything else, atomic writes, no pickle.

A *stage folder* (e.g. `runs/default/base/`) holds numbered checkpoint folders:

    base/ckpt-0002000/model.safetensors      weights
                      ema.safetensors        EMA weights (the ones sampling uses), when kept
                      optimizer.safetensors  optimizer tensors (Adam moments), when kept
                      state.json             {"step", "config", "optimizer": param groups, ...}

A checkpoint is written into a hidden temporary folder and renamed into place, so a folder named
`ckpt-*` is always complete: a crash mid-write leaves only a `.tmp-*` folder that is ignored and cleaned up.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or does not fit the model; the message says what to do."""


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors file written atomically; tensors are made contiguous and moved to the CPU."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    return load_file(str(path))


# ----- optimizer state <-> flat tensors + JSON -----------------------------------------------------------
def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {f"{pid}.{name}": value for pid, state in sd["state"].items()
               for name, value in state.items() if torch.is_tensor(value)}
    scalars = {str(pid): {name: value for name, value in state.items() if not torch.is_tensor(value)}
               for pid, state in sd["state"].items()}
    return tensors, [sd["param_groups"], scalars]


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: list) -> None:
    param_groups, scalars = meta
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in scalars.items():
        state.setdefault(int(pid), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": param_groups})


# ----- checkpoint folders --------------------------------------------------------------------------------
def save_checkpoint(stage_dir: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int = 2, fault_hook=None) -> Path:
    """Write `stage_dir/ckpt-{step}` atomically: one safetensors file per entry of `tensors` plus state.json.
    Keeps the newest `keep` checkpoints. `fault_hook(name)` is called between files (tests inject crashes)."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir / f"ckpt-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=stage_dir, prefix=".tmp-"))
    try:
        for name, tdict in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tdict.items()}, str(tmp / f"{name}.safetensors"))
            if fault_hook:
                fault_hook(name)
        with open(tmp / "state.json", "w") as f:
            json.dump({"step": step, "files": [f"{n}.safetensors" for n in tensors], **state}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # same step written again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(stage_dir)[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in stage_dir.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(stage_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in stage_dir.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path, stage: str = "base") -> Path:
    """A checkpoint folder from any of: the checkpoint folder itself, a stage folder (its newest checkpoint),
    or a run folder (the newest checkpoint of `run/stage`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; pass a run folder (e.g. runs/default), a "
                              f"stage folder (runs/default/{stage}) or a checkpoint folder (.../ckpt-0002000)")
    if (path / "state.json").is_file():
        return path
    for candidate in (path, path / stage):
        ckpts = list_checkpoints(candidate)
        if ckpts:
            return ckpts[-1]
    raise CheckpointError(f"no complete checkpoint under {path} (looked for ckpt-*/state.json in {path} and "
                          f"{path / stage}); train first (python train.py --out {path}) or check the path")


def load_checkpoint(path: str | Path, stage: str = "base") -> tuple[Path, dict]:
    """(checkpoint folder, its state.json)."""
    ckpt = resolve_checkpoint(path, stage)
    state = read_json(ckpt / "state.json")
    missing = [f for f in state.get("files", []) if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} lacks {', '.join(missing)} (written with it, listed in its "
                              f"state.json): the folder was damaged after writing; restore the file, or delete "
                              f"this checkpoint folder to fall back to the previous one")
    return ckpt, state


def load_state_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with an error that lists missing / unexpected / mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        raise CheckpointError(
            f"{what} does not match the model built from its config: "
            + "; ".join(s for s in [f"missing keys: {few(missing)}" if missing else "",
                                    f"unexpected keys: {few(unexpected)}" if unexpected else "",
                                    f"shape mismatches: {few(shapes)}" if shapes else ""] if s)
            + ". Was the file written by another model or version? Rebuild it with the matching config.")
    module.load_state_dict(tensors, strict=True)


def load_unet(path: str | Path, device: torch.device | str = "cpu", weights: str = "ema", stage: str = "base"):
    """Rebuild the UNet of a checkpoint from its state.json alone and load its weights (EMA by default,
    falling back to the raw weights when no EMA was kept). Returns (model in eval mode, state, ckpt folder)."""
    from .unet import UNet, UNetConfig

    ckpt, state = load_checkpoint(path, stage)
    cfg = state.get("config", {})
    if "unet" not in cfg:
        raise CheckpointError(f"{ckpt / 'state.json'} has no config.unet; it was not written by invdiff-min "
                              f"(convert foreign weights with python -m invdiff_min.convert)")
    try:
        model = UNet(UNetConfig.from_dict(cfg["unet"]))
    except TypeError as e:
        raise CheckpointError(f"config.unet in {ckpt / 'state.json'} does not fit this version's UNetConfig: {e}")
    listed = state.get("files")                # checkpoints record their files; a converted one has no EMA
    kept = (f"{weights}.safetensors" in listed) if listed is not None else (ckpt / f"{weights}.safetensors").is_file()
    name = weights if kept else "model"
    load_state_into(model, load_tensors(ckpt / f"{name}.safetensors"), f"{ckpt / (name + '.safetensors')}")
    return model.to(device).eval(), state, ckpt


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, shapes and bytes of a state dict: identifies a base model, so a head
    trained on one base is never silently used with another."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]

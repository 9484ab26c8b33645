"""Run folders and checkpoints: safetensors for tensors, JSON for everything else, atomic writes, no pickle.

A *stage folder* (e.g. `runs/cpu/base/`) holds numbered checkpoint folders:

    base/ckpt-0002000/model.safetensors      weights
                      ema.safetensors        EMA weights (the ones sampling uses), when kept
                      optimizer.safetensors  optimizer tensors (Adam moments), when kept
                      state.json             {"step", "config", "optimizer": param groups, ...,
                                              "checksums", "state_sha256"}

A checkpoint is written into a hidden temporary folder and renamed into place, so a folder named
`ckpt-*` is always complete: a crash mid-write leaves only a `.tmp-*` folder that is ignored and cleaned up.

Integrity: what is loaded is what was saved, or a one-line `CheckpointError` names the file, the problem and
the fix (for a checkpoint folder: delete it, so that the previous one is used).
  * Files of a checkpoint folder: state.json records `"checksums": {"model.safetensors": sha256 of the file}`
    (the same digest `sha256sum` prints), and `load_tensors` verifies a file against the state.json beside it,
    so every caller gets the check. Files are hashed in 1 MiB chunks when they are loaded, not all at once
    by `load_checkpoint`: sampling never pays for the optimizer file.
  * state.json itself: `"state_sha256"` is the sha256 of the rest of its content as canonical JSON
    (`state_sha256`), so a hand edit (say, of the resolution) is refused rather than sampled at the wrong size.
  * Standalone files (`save_tensors`, e.g. run/losses.safetensors) cannot hold a hash of their own bytes, so
    their safetensors header metadata records `"fingerprint"`: `fingerprint()` of the tensors (names, shapes,
    bytes), recomputed by `load_tensors` after reading. No sidecar file to lose or to forget to copy.
  * Files written before these checks (no checksums, no fingerprint) still load, unverified.
  * Loading refuses NaN / Inf weights (`load_state_into`) and a state.json whose config contradicts itself
    or the UNet (`load_unet`: the image side must be a multiple of the downsampling factor and, for the
    built-in dataset, equal to unet.sample_size). Truncated or corrupt safetensors files and malformed JSON
    are CheckpointErrors that name the file, never tracebacks from the parsers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CKPT_RE = re.compile(r"^ckpt-(\d+)$")
FINGERPRINT_KEY = "fingerprint"          # safetensors header metadata of a standalone file (save_tensors)
CHUNK = 1 << 20                          # bytes read at a time while hashing a file


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or does not fit the model; the message says what to do."""


# ----- hashes ---------------------------------------------------------------------------------------------
def file_sha256(path: str | Path, sync: bool = False) -> str:
    """sha256 of a file's bytes, read in chunks (memory stays flat for big files); `sync` also fsyncs it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def state_sha256(state: dict) -> str:
    """sha256 of a state.json's content without its own "state_sha256" entry, as canonical JSON (keys sorted,
    no spaces, after a JSON round trip so that tuples and int keys hash as they read back)."""
    body = json.loads(json.dumps({k: v for k, v in state.items() if k != "state_sha256"}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, shapes and bytes of a state dict: identifies a base model, so a head
    trained on one base is never silently used with another; also the checksum of a standalone file."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        if v.numel():
            h.update(v.reshape(-1).view(torch.uint8).numpy())   # the tensor's memory, not a copy of it
    return h.hexdigest()[:16]


# ----- what to do about a damaged file --------------------------------------------------------------------
def fallback(ckpt: Path) -> str:
    """The fix for a damaged checkpoint folder: delete it, so that the previous one is used."""
    m = CKPT_RE.match(ckpt.name)
    older = [p for p in list_checkpoints(ckpt.parent) if int(CKPT_RE.match(p.name)[1]) < int(m[1])] if m else []
    if older:
        return f"delete {ckpt} to fall back to {older[-1].name}, the previous checkpoint"
    return f"delete {ckpt} and re-run the training stage or conversion that wrote it (no earlier checkpoint is kept)"


def fix_for(path: Path) -> str:
    """The fix for a damaged file: its checkpoint folder's fallback, or re-creating a standalone file."""
    if (path.parent / "state.json").is_file():
        return fallback(path.parent)
    return "delete it and re-run the command that wrote it"


# ----- JSON and standalone tensor files -------------------------------------------------------------------
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
    """JSON from a file; a file that is not JSON (or not UTF-8) is a CheckpointError naming it."""
    return parse_json(Path(path), "restore it, or delete it and re-run the command that wrote it")


def read_json_object(path: str | Path, fix: str = "restore it, or delete it and re-run the command that wrote it"):
    """A JSON object from a file (a run's config.json, a stage's JSON); anything else is a CheckpointError."""
    value = parse_json(Path(path), fix)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not the object invdiff-min writes there; "
                              f"{fix}")
    return value


def parse_json(path: Path, fix: str):
    if path.exists() and not path.is_file():             # a folder, or a pipe that would block the read
        raise CheckpointError(f"{path} is not a regular file; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): it was "
                              f"damaged or badly edited; {fix}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not JSON text (byte {e.start} is not UTF-8): it was damaged; "
                              f"{fix}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not the JSON invdiff-min writes (nested too deeply to read); {fix}") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors file written atomically; tensors are made contiguous and moved to the CPU. The header
    metadata records the tensors' `fingerprint`, which `load_tensors` verifies (metadata key "fingerprint"
    is reserved for it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {**{k: str(v) for k, v in (metadata or {}).items()}, FINGERPRINT_KEY: fingerprint(tensors)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, verified: against the sha256 in the state.json beside it (a
    checkpoint file), or the fingerprint in its header (a standalone file); unverified if it has neither."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    fix = fix_for(path)
    expected = recorded_sha256(path)
    if expected is not None:
        actual = file_sha256(path)
        if actual != expected:
            raise CheckpointError(f"{path} is damaged: its sha256 {actual[:12]}... differs from {expected[:12]}... "
                                  f"recorded in {path.parent / 'state.json'} when it was written (a bit flip, a "
                                  f"partial copy or download, a full disk); {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is truncated or corrupt, not a readable safetensors file ({why}); "
                              f"{fix}") from None
    if FINGERPRINT_KEY in metadata and fingerprint(tensors) != metadata[FINGERPRINT_KEY]:
        raise CheckpointError(f"{path} is damaged: its tensors no longer match the fingerprint "
                              f"{metadata[FINGERPRINT_KEY]} recorded in its header when it was written; {fix}")
    return tensors


def recorded_sha256(path: Path) -> str | None:
    """The sha256 of `path` listed in the state.json of its checkpoint folder, if any."""
    if not (path.parent / "state.json").is_file():
        return None
    checksums = read_state(path.parent).get("checksums")
    return checksums.get(path.name) if isinstance(checksums, dict) else None


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
    """Write `stage_dir/ckpt-{step}` atomically: one safetensors file per entry of `tensors` plus state.json,
    which records each file's sha256 and its own (module docstring). Keeps the newest `keep` checkpoints.
    `fault_hook(name)` is called between files (tests inject crashes)."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir / f"ckpt-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=stage_dir, prefix=".tmp-"))
    try:
        checksums = {}
        for name, tdict in tensors.items():
            file = tmp / f"{name}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in tdict.items()}, str(file))
            checksums[file.name] = file_sha256(file, sync=True)      # read back from the page cache, on disk
            if fault_hook:
                fault_hook(name)
        record = {"step": step, "files": list(checksums), **state, "checksums": checksums}
        record["state_sha256"] = state_sha256(record)
        with open(tmp / "state.json", "w") as f:
            json.dump(record, f, indent=2)
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
        raise CheckpointError(f"checkpoint path {path} does not exist; pass a run folder (e.g. runs/cpu), a "
                              f"stage folder (runs/cpu/{stage}) or a checkpoint folder (.../ckpt-0002000)")
    if (path / "state.json").is_file():
        return path
    for candidate in (path, path / stage):
        ckpts = list_checkpoints(candidate)
        if ckpts:
            return ckpts[-1]
    raise CheckpointError(f"no complete checkpoint under {path} (looked for ckpt-*/state.json in {path} and "
                          f"{path / stage}); train first (python train.py --out {path}) or check the path")


def read_state(ckpt: Path) -> dict:
    """A checkpoint folder's state.json: valid JSON, an object, and unchanged since it was written (when it
    records its own state_sha256)."""
    where = ckpt / "state.json"
    state = parse_json(where, fallback(ckpt))
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds a JSON {type(state).__name__}, not the object a checkpoint's state is; "
                              f"{fallback(ckpt)}")
    if "state_sha256" in state and state["state_sha256"] != state_sha256(state):
        raise CheckpointError(f"{where} was changed after it was written (its content no longer matches the "
                              f"state_sha256 recorded in it); undo the edit, or {fallback(ckpt)} (to keep a "
                              f"deliberate edit, delete its state_sha256 entry)")
    return state


def load_checkpoint(path: str | Path, stage: str = "base") -> tuple[Path, dict]:
    """(checkpoint folder, its state.json), checked by `read_state`; its tensor files are verified when loaded."""
    ckpt = resolve_checkpoint(path, stage)
    state = read_state(ckpt)
    files = state.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise CheckpointError(f"{ckpt / 'state.json'}: \"files\" is not a list of file names; {fallback(ckpt)}")
    missing = [f for f in files if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} lacks {', '.join(missing)} (written with it, listed in its "
                              f"state.json): the folder was damaged after writing; restore the file, or "
                              f"{fallback(ckpt)}")
    return ckpt, state


def load_state_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with an error that lists missing / unexpected / mis-shaped keys, and a
    refusal of NaN / Inf in floating-point tensors. `what` names the weights (usually their file)."""
    def few(xs):
        return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")

    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{what} does not match the model built from its config: "
            + "; ".join(s for s in [f"missing keys: {few(missing)}" if missing else "",
                                    f"unexpected keys: {few(unexpected)}" if unexpected else "",
                                    f"shape mismatches: {few(shapes)}" if shapes else ""] if s)
            + ". Was the file written by another model or version? Rebuild it with the matching config.")
    bad = non_finite(tensors)
    if bad:
        # `what` is usually a file; inside a checkpoint folder the fix is to fall back to the previous one
        fix = fix_for(Path(what)) if (Path(what).parent / "state.json").is_file() else \
            "re-create the weights (re-run the training stage or conversion that wrote them)"
        raise CheckpointError(f"{what} holds NaN or Inf values in {len(bad)} tensor(s) ({few(bad)}): the run "
                              f"diverged before they were saved, or they were damaged; {fix}")
    module.load_state_dict(tensors, strict=True)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf, sorted."""
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def check_image_side(cfg: dict, factor: int, where: Path, fix: str) -> None:
    """The image side a checkpoint samples at (config.data.resolution, else config.unet.sample_size) must be
    a positive multiple of the UNet's downsampling factor, and for the built-in dataset equal to
    unet.sample_size (train.py sets both from the data); a hand edit that breaks either is refused here."""
    size = cfg["unet"].get("sample_size")
    data = cfg.get("data", {})
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: config.data is a JSON {type(data).__name__}, not an object; {fix}")
    side, name = (data["resolution"], "config.data.resolution") if "resolution" in data else \
        (size, "config.unet.sample_size")
    if not (isinstance(side, int) and not isinstance(side, bool) and side > 0 and side % factor == 0):
        raise CheckpointError(f"{where}: {name}={side!r} is not a positive multiple of the UNet's downsampling "
                              f"factor {factor}, so it cannot be sampled at; undo the edit, or {fix}")
    if "resolution" in data and data.get("name", "shapes") == "shapes" and side != size:
        raise CheckpointError(f"{where}: config.data.resolution={side} differs from config.unet.sample_size={size} "
                              f"(the model was trained at {size}: training sets both); undo the edit, or {fix}")


def load_unet(path: str | Path, device: torch.device | str = "cpu", weights: str = "ema", stage: str = "base"):
    """Rebuild the UNet of a checkpoint from its state.json alone and load its weights (EMA by default,
    falling back to the raw weights when no EMA was kept). Returns (model in eval mode, state, ckpt folder)."""
    from .unet import UNet, UNetConfig

    ckpt, state = load_checkpoint(path, stage)
    where = ckpt / "state.json"
    cfg = state.get("config", {})
    if not isinstance(cfg, dict) or "unet" not in cfg:
        raise CheckpointError(f"{where} has no config.unet; it was not written by invdiff-min "
                              f"(convert foreign weights with python -m invdiff_min.convert)")
    try:
        if not isinstance(cfg["unet"], dict):
            raise TypeError(f"it is a JSON {type(cfg['unet']).__name__}, not an object")
        unet_config = UNetConfig.from_dict(cfg["unet"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.unet in {where} does not fit this version's UNetConfig: {e}") from None
    check_image_side(cfg, unet_config.downsample_factor, where, fallback(ckpt))
    model = UNet(unet_config)
    listed = state.get("files")                # checkpoints record their files; a converted one has no EMA
    kept = (f"{weights}.safetensors" in listed) if listed is not None else (ckpt / f"{weights}.safetensors").is_file()
    name = weights if kept else "model"
    load_state_into(model, load_tensors(ckpt / f"{name}.safetensors"), f"{ckpt / (name + '.safetensors')}")
    return model.to(device).eval(), state, ckpt

"""Decoding images from disk and caching the decoded splits, shared by the loaders that read image files.

Images are decoded with Pillow: converted to RGB, shorter side resized to `resolution` and centre-cropped,
stored as uint8 and returned as floats in [0, 1]. The result is cached next to the data in
`ROOT/.invdiff_cache/` (safetensors + a JSON holding the cache key and the size and mtime of every image it
read), so a second load with the same arguments and unchanged images decodes no image. A root that cannot be
written falls back to no cache, with a warning.

Every image is looked at before it is opened: its resolved path (symlinks followed) must lie inside the
root unless `allow_outside_root`, and it must be a regular file (a FIFO or a device would block or worse).
An image that is not a regular file or cannot be decoded is skipped and replaced by the next sample of its
(y, b) cell, so the requested counts still hold; a warning names the count and the first files.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError

from ..checkpoint import load_tensors, read_json, save_tensors, write_json
from .core import BiasedDataset, DatasetFormatError, DatasetLayoutError, DatasetWarning
from .tables import (OUTSIDE_ROOT_FIX, YES_NO, MetadataTable, Sampling, check_resolution, check_table, file_kind,
                     flag, select_rows)

CACHE_DIRNAME = ".invdiff_cache"
CACHE_VERSION = 2                     # bump when the decoding or the selection changes (2: duplicates dropped)

# ----- decoding ------------------------------------------------------------------------------------------
def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. 16/32-bit integer images are taken as 16-bit (divided by 256), float images as
    [0, 1]; a palette with transparency goes through RGBA; alpha is dropped."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif img.mode == "F":
        img = img.point(lambda v: v * 255).convert("L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _decode_one(path: Path, resolution: int) -> torch.Tensor | str:
    """(3, R, R) uint8: RGB, shorter side resized to R (bicubic, antialiased when shrinking), centre-cropped;
    or the reason the file cannot be read."""
    try:   # non-blocking: a FIFO put in the file's place after `_look` returns at once instead of waiting
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                return f"not a regular file ({file_kind(mode)})"
            with Image.open(f) as img:
                img = _to_rgb(ImageOps.exif_transpose(img))
                img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC)
        return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3) \
            .permute(2, 0, 1).contiguous()
    except FileNotFoundError:
        return "file not found"
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]


def _decode(root: Path, files: list[str], resolution: int) -> list[torch.Tensor | str]:
    """Decode files in threads (Pillow releases the GIL while decoding and resizing) when there are many."""
    workers = min(8, os.cpu_count() or 1, max(1, len(files) // 256))
    paths = [root / f for f in files]
    if workers == 1:
        return [_decode_one(p, resolution) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_decode_one, paths, [resolution] * len(paths)))


def _look(path: str, dirs: dict[str, str]) -> tuple[str, list | str]:
    """(resolved path, signature) of an image file, without opening it. The signature is [size, mtime_ns] of a
    regular file, or why it cannot be an image ("file not found", "not a regular file (FIFO)"). `dirs`
    memoises resolved folders, so a file costs one lstat unless it is a symlink (plain strings: pathlib
    would cost more than the stat)."""
    real = path
    try:
        folder, name = os.path.split(path)
        if folder not in dirs:
            dirs[folder] = os.path.realpath(folder)
        real = os.path.join(dirs[folder], name)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            st = os.stat(path)
    except FileNotFoundError:
        return real, "file not found"
    except (OSError, ValueError) as e:        # ValueError: a NUL byte in the path
        return real, f"{type(e).__name__}: {e}".splitlines()[0]
    if not stat.S_ISREG(st.st_mode):
        return real, f"not a regular file ({file_kind(st.st_mode)})"
    return real, [st.st_size, st.st_mtime_ns]


def _look_rows(root: Path, table: MetadataTable, rows, allow_outside_root: bool, dirs: dict) -> dict[int, list | str]:
    """{row: signature} (see `_look`) of the images of `rows`; refuses one that resolves outside the root."""
    inside = os.path.join(os.path.realpath(root), "")                # the resolved root, with a trailing /
    out = {}
    for r in rows:
        real, out[r] = _look(os.path.join(root, table.files[r]), dirs)
        if not allow_outside_root and not os.path.join(real, "").startswith(inside):
            raise DatasetFormatError(f"{table.where(r)}: the image path {table.files[r]!r} resolves to {real}, "
                                     f"outside the dataset root {root}; {OUTSIDE_ROOT_FIX}")
    return out


def _warn_skipped(skipped: dict[str, str], root: Path, cached: bool = False) -> None:
    first = "; ".join(f"{f} ({why})" for f, why in list(skipped.items())[:3])
    more = f"; +{len(skipped) - 3} more" if len(skipped) > 3 else ""
    when = " when the cache was built" if cached else ""
    warnings.warn(f"skipped {len(skipped)} unreadable image(s) under {root}{when}, each replaced by another "
                  f"sample of its (y, b) cell: {first}{more}", DatasetWarning, stacklevel=4)


# ----- build, with the cache -----------------------------------------------------------------------------
def build_image_splits(name: str, root: Path, table: MetadataTable, resolution: int, sampling: Sampling, *,
                       meta_files: list[Path],
           params: dict, cache, holdout: bool = False,
           allow_outside_root: bool = False) -> tuple[BiasedDataset, BiasedDataset]:
    """Check the table (`check_table`), then select, decode (or read from the cache) and wrap the two splits."""
    check_resolution(resolution)
    table = check_table(table, allow_outside_root)
    dirs: dict[str, str] = {}
    key = json.loads(json.dumps({
        "version": CACHE_VERSION, "dataset": name, "resolution": int(resolution),
        "decode": "RGB, shorter side -> resolution (PIL bicubic), centre crop, uint8",
        "params": params, "sampling": sampling.to_dict(),
        "files_sha256": hashlib.sha256("\n".join(table.files).encode()).hexdigest(),
        "metadata_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in meta_files}}))
    paths = _cache_paths(cache, root, name, key)
    info = {"dataset": name, "root": str(root), **params, "cache": None}

    cached = _read_cache(*paths, key) if paths else None
    if cached is not None and not _images_unchanged(cached[1], root, table, allow_outside_root, dirs):
        cached = None                         # an image was replaced, repaired, added or removed: decode again
    if cached is not None:
        tensors, meta = cached
        if meta["skipped"]:
            _warn_skipped(meta["skipped"], root, cached=True)
        info.update(cache=str(paths[0]), skipped=len(meta["skipped"]))
        return tuple(_wrap(tensors, prefix, table, info) for prefix in ("train", "eval"))

    bad = torch.zeros(len(table.files), dtype=torch.bool)
    decoded: dict[int, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    looked: dict[int, list | str] = {}       # row -> signature of every image looked at, for the cache
    while True:   # decode the selection; replace unreadable rows by the next ones of their cells, repeat
        try:
            train_rows, eval_rows = select_rows(table, sampling, holdout, bad)
        except ValueError as e:
            if skipped:
                raise ValueError(f"{e} (after skipping {len(skipped)} unreadable images)") from None
            raise
        todo = [r for r in torch.cat([train_rows, eval_rows]).tolist() if r not in decoded]
        looked.update(_look_rows(root, table, todo, allow_outside_root, dirs))
        for r in todo:
            if isinstance(looked[r], str):      # missing or not a regular file: never opened
                bad[r] = True
                skipped[table.files[r]] = looked[r]
        readable = [r for r in todo if not bad[r]]
        for r, out in zip(readable, _decode(root, [table.files[r] for r in readable], resolution)):
            if isinstance(out, str):
                bad[r] = True
                skipped[table.files[r]] = out
            else:
                decoded[r] = out
        if not decoded and len(skipped) >= 10:   # not one image readable: a wrong folder, not a few bad files
            first = next(iter(skipped))
            raise DatasetLayoutError(f"none of the first {len(skipped)} images could be read, e.g. {root / first} "
                                     f"({skipped[first]}); check that the images are under {root}")
        if all(r in decoded for r in todo):
            break
    if skipped:
        _warn_skipped(skipped, root)

    tensors = {}
    for prefix, rows in (("train", train_rows), ("eval", eval_rows)):
        tensors[f"{prefix}.images"] = torch.stack([decoded[r] for r in rows.tolist()]) if len(rows) else \
            torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)                       # (N, 3, R, R)
        tensors[f"{prefix}.labels"] = table.labels[rows]
        tensors[f"{prefix}.bias"] = table.bias[rows]
        tensors[f"{prefix}.index"] = rows                          # the row of the metadata file: stable
    if paths and _write_cache(*paths, key, tensors, skipped, looked):
        info["cache"] = str(paths[0])
    info["skipped"] = len(skipped)
    return tuple(_wrap(tensors, prefix, table, info) for prefix in ("train", "eval"))


def _wrap(tensors: dict, prefix: str, table: MetadataTable, info: dict) -> BiasedDataset:
    return BiasedDataset(images=tensors[f"{prefix}.images"].float().div_(255), labels=tensors[f"{prefix}.labels"],
                        bias=tensors[f"{prefix}.bias"], index=tensors[f"{prefix}.index"],
                        num_classes=len(table.class_names), num_attributes=len(table.attribute_names),
                        class_names=tuple(table.class_names), attribute_names=tuple(table.attribute_names),
                        info=dict(info))


def _cache_paths(cache, root: Path, name: str, key: dict) -> tuple[Path, Path] | None:
    """(tensors, JSON) paths for this key: `ROOT/.invdiff_cache/NAME-rRES-HASH.*`, or under the folder
    `cache` when it is a path; None when cache is False/None. On the command line the words true/false (1/0,
    yes/no) are the switch, anything else a path."""
    if isinstance(cache, (bool, int)) or (isinstance(cache, str) and cache.strip().lower() in YES_NO):
        cache = flag(cache, "the data option cache")
    elif cache is not None and not isinstance(cache, (str, os.PathLike)):
        raise ValueError(f"the data option cache must be true, false or a folder, got {cache!r}")
    if cache is None or cache is False:
        return None
    folder = root / CACHE_DIRNAME if cache is True else Path(cache).expanduser()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = f"{name}-r{key['resolution']}-{digest}"
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def _read_cache(tensor_path: Path, json_path: Path, key: dict):
    """(tensors, metadata) when a complete cache with this exact key exists, else None."""
    if not (json_path.is_file() and tensor_path.is_file()):
        return None
    try:
        meta = read_json(json_path)
        if meta.get("key") != key:
            return None
        return load_tensors(tensor_path), meta
    except (OSError, ValueError, KeyError, SafetensorError) as e:   # a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring the unreadable cache {tensor_path} ({type(e).__name__}: {e}); decoding again",
                      DatasetWarning, stacklevel=4)
        return None


def _images_unchanged(meta: dict, root: Path, table: MetadataTable, allow_outside_root: bool, dirs: dict) -> bool:
    """Whether every image the cache read (decoded or skipped) still has the recorded size and mtime_ns: one
    stat each, no hashing. Their paths are checked against the root again."""
    recorded = meta.get("images")
    if not isinstance(recorded, dict) or not all(k.isdigit() and int(k) < len(table.files) for k in recorded):
        return False
    now = _look_rows(root, table, [int(k) for k in recorded], allow_outside_root, dirs)
    return all(recorded[str(r)] == sig for r, sig in now.items())


def _write_cache(tensor_path: Path, json_path: Path, key: dict, tensors: dict, skipped: dict, looked: dict) -> bool:
    """Tensors first, then the JSON that marks the cache complete and holds the signature of every image read
    (checked at the next load); a folder that cannot be written only warns (returns False)."""
    try:
        save_tensors(tensor_path, tensors)
        write_json(json_path, {"key": key, "skipped": skipped, "images": {str(r): s for r, s in looked.items()},
                               "counts": {p: len(tensors[f"{p}.labels"]) for p in ("train", "eval")}})
        return True
    except OSError as e:
        warnings.warn(f"cannot write the cache in {tensor_path.parent} ({e.strerror or e}); loaded without a "
                      f"cache (pass cache=PATH to keep it elsewhere)", DatasetWarning, stacklevel=4)
        return False



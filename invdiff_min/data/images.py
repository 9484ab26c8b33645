"""Decoding images from disk and caching the decoded splits, shared by the loaders that read image files.

Images are decoded with Pillow: converted to RGB, shorter side resized to `resolution` and centre-cropped,
stored as uint8 and returned as floats in [0, 1]. The result is cached next to the data in
`ROOT/.invdiff_cache/` (safetensors + a JSON holding the cache key), so a second load with the same
arguments decodes no image. A root that cannot be written falls back to no cache, with a warning.

An image that cannot be decoded is skipped and replaced by the next sample of its (y, b) cell, so the
requested counts still hold; a warning names the count and the first files.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError

from ..checkpoint import load_tensors, read_json, save_tensors, write_json
from .core import BiasedDataset, DatasetLayoutError, DatasetWarning
from .tables import MetadataTable, Sampling, check_resolution, select_rows

CACHE_DIRNAME = ".invdiff_cache"
CACHE_VERSION = 1                     # bump when the decoding changes, so old caches are not reused

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
    try:
        with Image.open(path) as img:
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


def _warn_skipped(skipped: dict[str, str], root: Path, cached: bool = False) -> None:
    first = "; ".join(f"{f} ({why})" for f, why in list(skipped.items())[:3])
    more = f"; +{len(skipped) - 3} more" if len(skipped) > 3 else ""
    when = " when the cache was built" if cached else ""
    warnings.warn(f"skipped {len(skipped)} unreadable image(s) under {root}{when}, each replaced by another "
                  f"sample of its (y, b) cell: {first}{more}", DatasetWarning, stacklevel=4)


# ----- build, with the cache -----------------------------------------------------------------------------
def build_image_splits(name: str, root: Path, table: MetadataTable, resolution: int, sampling: Sampling, *, meta_files: list[Path],
           params: dict, cache, holdout: bool = False) -> tuple[BiasedDataset, BiasedDataset]:
    """Select, decode (or read from the cache) and wrap the two splits."""
    check_resolution(resolution)
    key = json.loads(json.dumps({
        "version": CACHE_VERSION, "dataset": name, "resolution": int(resolution),
        "decode": "RGB, shorter side -> resolution (PIL bicubic), centre crop, uint8",
        "params": params, "sampling": sampling.to_dict(),
        "files_sha256": hashlib.sha256("\n".join(table.files).encode()).hexdigest(),
        "metadata_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in meta_files}}))
    paths = _cache_paths(cache, root, name, key)
    info = {"dataset": name, "root": str(root), **params, "cache": None}

    cached = _read_cache(*paths, key) if paths else None
    if cached is not None:
        tensors, meta = cached
        if meta["skipped"]:
            _warn_skipped(meta["skipped"], root, cached=True)
        info.update(cache=str(paths[0]), skipped=len(meta["skipped"]))
        return tuple(_wrap(tensors, prefix, table, info) for prefix in ("train", "eval"))

    bad = torch.zeros(len(table.files), dtype=torch.bool)
    decoded: dict[int, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    while True:   # decode the selection; replace unreadable rows by the next ones of their cells, repeat
        try:
            train_rows, eval_rows = select_rows(table, sampling, holdout, bad)
        except ValueError as e:
            if skipped:
                raise ValueError(f"{e} (after skipping {len(skipped)} unreadable images)") from None
            raise
        todo = [r for r in torch.cat([train_rows, eval_rows]).tolist() if r not in decoded]
        for r, out in zip(todo, _decode(root, [table.files[r] for r in todo], resolution)):
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
    if paths and _write_cache(*paths, key, tensors, skipped):
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
    `cache` when it is a path; None when cache is False/None."""
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


def _write_cache(tensor_path: Path, json_path: Path, key: dict, tensors: dict, skipped: dict) -> bool:
    """Tensors first, then the JSON that marks the cache complete; a folder that cannot be written only warns
    (returns False)."""
    try:
        save_tensors(tensor_path, tensors)
        write_json(json_path, {"key": key, "skipped": skipped,
                               "counts": {p: len(tensors[f"{p}.labels"]) for p in ("train", "eval")}})
        return True
    except OSError as e:
        warnings.warn(f"cannot write the cache in {tensor_path.parent} ({e.strerror or e}); loaded without a "
                      f"cache (pass cache=PATH to keep it elsewhere)", DatasetWarning, stacklevel=4)
        return False



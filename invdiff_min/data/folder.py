"""Any dataset as a folder of images with a metadata.csv (file, class, optional split and bias columns)."""
from __future__ import annotations

from pathlib import Path

import torch

from .core import BiasedDataset, DataConfig, DatasetFormatError, DatasetSpec
from .images import build_image_splits
from .tables import (EVAL, TRAIN, UNUSED, MetadataTable, Sampling, choose, index_values, read_csv, read_ints,
                     read_mapped, require_dir, require_file)

FOLDER_LAYOUT = ("folder layout: ROOT/metadata.csv with a file column (paths relative to ROOT), a class column, "
                 "and optional split (train/eval) and bias columns")


def load_folder(root, resolution: int = 32, *, file_column: str = "file", class_column: str = "y",
                bias_column: str | None = "bias", split_column: str = "split",
                aligned_fraction: float | None = None, group_sizes=None, num_samples: int | None = None,
                eval_per_group: int | None = None, seed: int = 0, cache=True) -> tuple[BiasedDataset, BiasedDataset]:
    """Any other dataset: ROOT/metadata.csv with one row per image.

    `file_column`: path relative to ROOT. `class_column`: the class y. `bias_column`: the attribute b, read only
    by evaluation; when the default "bias" is absent (or bias_column=None) every sample has b = 0 and
    num_attributes = 1. Values of both are mapped to indices in sorted order (numerically when all are
    integers, else as strings); `class_names` / `attribute_names` record the mapping.
    `split_column`: "train" or "eval" ("val", "valid", "validation" and "test" count as eval), any case;
    without the column the eval split is held out of all rows: `eval_per_group` per (y, b) cell (default 20%
    of the smallest cell, at least 1), deterministic given `seed`. Images of any size and mode."""
    root = require_dir(root, "dataset root", FOLDER_LAYOUT)
    meta = require_file(root / "metadata.csv", FOLDER_LAYOUT)
    rows = read_csv(meta, [file_column, class_column], FOLDER_LAYOUT)
    found = [c for c in rows[0] if c is not None]
    if bias_column is not None and bias_column not in found and bias_column != "bias":
        raise DatasetFormatError(f"{meta}: no bias column {bias_column!r}; found {', '.join(found)}")
    has_bias = bias_column is not None and bias_column in found
    y, class_names = index_values([r[class_column] for r in rows], class_column, meta)
    if has_bias:
        b, attribute_names = index_values([r[bias_column] for r in rows], bias_column, meta)
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
    table = MetadataTable(files=[r[file_column] for r in rows], labels=y, bias=b, split=split,
                   class_names=class_names, attribute_names=attribute_names)
    params = {"file_column": file_column, "class_column": class_column,
              "bias_column": bias_column if has_bias else None, "split_column": None if holdout else split_column}
    return build_image_splits("folder", root, table, resolution, Sampling(aligned_fraction, group_sizes, num_samples,
                  eval_per_group, seed), meta_files=[meta], params=params, cache=cache, holdout=holdout)


def load(cfg: DataConfig) -> tuple[BiasedDataset, BiasedDataset]:
    """(train, eval) from a run's DataConfig."""
    return load_folder(cfg.data_root, cfg.resolution, **cfg.sampling_options(), **cfg.options)


SPEC = DatasetSpec("folder", load, defaults=dict(num_samples=None, eval_per_group=None, aligned_fraction=None), needs_root=True,
                   about="any folder of images with ROOT/metadata.csv (file, class, optional bias, split)")

"""Any dataset as a folder of images with a metadata.csv (file, class and bias columns, an optional split column)."""
from __future__ import annotations


import torch

from .core import AS_DISTRIBUTED, BiasedDataset, DataConfig, DatasetFormatError, DatasetSpec
from .images import build_image_splits
from .tables import EVAL, TRAIN, MetadataTable, Sampling, flag, index_values, read_csv, require_dir, require_file

FOLDER_LAYOUT = ("folder layout: ROOT/metadata.csv with a file column (paths inside ROOT), a class column, a bias "
                 "column and an optional split (train/eval) column")


def load_folder(root, resolution: int = 32, *, file_column: str = "file", class_column: str = "y",
                bias_column: str = "bias", split_column: str = "split",
                aligned_fraction: float | None = None, group_sizes=None, num_samples: int | None = None,
                eval_per_group: int | None = None, seed: int = 0, cache=True,
                allow_outside_root: bool = False) -> tuple[BiasedDataset, BiasedDataset]:
    """Any other dataset: ROOT/metadata.csv with one row per image.

    `file_column`: path relative to ROOT; a path that leads outside ROOT (`..`, absolute, or a symlink out) is
    refused unless `allow_outside_root`. A row naming an image already listed is dropped with a warning (the
    first row stays); if its labels differ, the load stops. `class_column`: the class y. `bias_column`: the
    attribute b, read only by evaluation but needed to measure anything. Values of both are mapped to indices
    in sorted order: by value when every value is a number (1, 1.0 and 01 are one class, named "1"), else as
    text; a column mixing the two is refused. At least two classes and two attribute values are needed;
    `class_names` / `attribute_names` record the mapping.
    `split_column`: "train" or "eval" ("val", "valid", "validation" and "test" count as eval), any case;
    without the column the eval split is held out of all rows: `eval_per_group` per (y, b) cell (default 20%
    of the smallest cell, at least 1), deterministic given `seed`. Images of any size and mode."""
    root = require_dir(root, "dataset root", FOLDER_LAYOUT)
    allow_outside_root = flag(allow_outside_root, "allow_outside_root")
    meta = require_file(root / "metadata.csv", FOLDER_LAYOUT)
    rows, lines = read_csv(meta, [file_column, class_column], FOLDER_LAYOUT)
    found = list(rows[0])
    if bias_column not in found:
        raise DatasetFormatError(f"{meta}: no bias column {bias_column!r}; found {', '.join(found)}. The bias "
                                 f"column is read only by evaluation, but Bias and fidelity cannot be measured "
                                 f"without it: add a column with each image's attribute (at least two values) or "
                                 f"name yours with bias_column=NAME (--data-option bias_column=NAME)")
    y, class_names = index_values([r[class_column] for r in rows], class_column, meta, lines)
    b, attribute_names = index_values([r[bias_column] for r in rows], bias_column, meta, lines)
    holdout = split_column not in found
    if holdout:
        split = torch.full((len(rows),), TRAIN)
    else:
        names = {"train": TRAIN, "eval": EVAL, "val": EVAL, "valid": EVAL, "validation": EVAL, "test": EVAL}
        bad = [i for i, r in enumerate(rows) if r[split_column].strip().lower() not in names]
        if bad:
            odd = sorted({repr(rows[i][split_column]) for i in bad})[:5]
            raise DatasetFormatError(f"{meta}:{lines[bad[0]]}: column {split_column!r} must hold train or eval (or "
                                     f"val/test); found {', '.join(odd)}")
        split = torch.tensor([names[r[split_column].strip().lower()] for r in rows])
    table = MetadataTable(files=[r[file_column] for r in rows], labels=y, bias=b, split=split,
                          class_names=class_names, attribute_names=attribute_names, lines=lines,
                          sources=((meta, 0),), columns=(class_column, bias_column))
    params = {"file_column": file_column, "class_column": class_column,
              "bias_column": bias_column, "split_column": None if holdout else split_column}
    return build_image_splits("folder", root, table, resolution, Sampling(aligned_fraction, group_sizes, num_samples,
                  eval_per_group, seed), meta_files=[meta], params=params, cache=cache, holdout=holdout,
                  allow_outside_root=allow_outside_root)


def load(cfg: DataConfig) -> tuple[BiasedDataset, BiasedDataset]:
    """(train, eval) from a run's DataConfig."""
    return load_folder(cfg.data_root, cfg.resolution, **cfg.sampling_options(), **cfg.options)


SPEC = DatasetSpec("folder", load, defaults=AS_DISTRIBUTED, needs_root=True,
                   loader=load_folder, about="any folder of images with ROOT/metadata.csv (file, class, bias[, split])")

"""Waterbirds (Sagawa et al. 2020) in its distributed layout: y = bird type, b = place.

    ROOT/metadata.csv (img_filename, y, split, place) + ROOT/<img_filename>
    y = bird (0 landbird, 1 waterbird), b = place (0 land, 1 water); split 0/1/2 = train/val/test
"""
from __future__ import annotations


import torch

from .core import AS_DISTRIBUTED, BiasedDataset, DataConfig, DatasetSpec
from .images import build_image_splits
from .tables import (EVAL, TRAIN, UNUSED, MetadataTable, Sampling, choose, flag, read_csv, read_ints, require_dir,
                     require_file)

WATERBIRDS_LAYOUT = ("Waterbirds layout: ROOT/metadata.csv with columns img_filename, y, split, place and the "
                     "images at ROOT/<img_filename> (the waterbird_complete95_forest2water2 folder)")


def load_waterbirds(root, resolution: int = 32, *, aligned_fraction: float | None = None,
                    group_sizes=None, num_samples: int | None = None, eval_per_group: int | None = None,
                    eval_split: str = "test", seed: int = 0, cache=True,
                    allow_outside_root: bool = False) -> tuple[BiasedDataset, BiasedDataset]:
    """Waterbirds (Sagawa et al. 2020): y = bird type (0 landbird, 1 waterbird), b = place (0 land, 1 water).
    Training rows are split 0; the balanced eval split comes from `eval_split` ("val" = 1 or "test" = 2).
    Sampling arguments as in `load_dataset`; image paths stay inside ROOT unless `allow_outside_root`."""
    root = require_dir(root, "Waterbirds root", WATERBIRDS_LAYOUT)
    meta = require_file(root / "metadata.csv", WATERBIRDS_LAYOUT)
    eval_code = choose(eval_split, {"val": 1, "test": 2}, "eval_split")
    rows, lines = read_csv(meta, ["img_filename", "y", "split", "place"], WATERBIRDS_LAYOUT)
    y = read_ints(rows, "y", meta, {0, 1}, lines)
    b = read_ints(rows, "place", meta, {0, 1}, lines)
    s = read_ints(rows, "split", meta, {0, 1, 2}, lines)
    table = MetadataTable(files=[r["img_filename"] for r in rows], labels=y, bias=b,
                          split=torch.where(s == 0, TRAIN, torch.where(s == eval_code, EVAL, UNUSED)),
                          class_names=("landbird", "waterbird"), attribute_names=("land", "water"), lines=lines,
                          sources=((meta, 0),), columns=("y", "place"))
    sampling = Sampling(aligned_fraction, group_sizes, num_samples, eval_per_group, seed)
    return build_image_splits("waterbirds", root, table, resolution, sampling, meta_files=[meta],
                              params={"eval_split": eval_split}, cache=cache,
                              allow_outside_root=flag(allow_outside_root, "allow_outside_root"))


def load(cfg: DataConfig) -> tuple[BiasedDataset, BiasedDataset]:
    """(train, eval) from a run's DataConfig."""
    return load_waterbirds(cfg.data_root, cfg.resolution, **cfg.sampling_options(), **cfg.options)


SPEC = DatasetSpec("waterbirds", load, defaults=AS_DISTRIBUTED, needs_root=True,
                   loader=load_waterbirds, about="Waterbirds: bird type vs background, from ROOT/metadata.csv")

"""FairFace (Karkkainen & Joo 2021) in its distributed layout: y, b among gender, race and age.

    ROOT/fairface_label_{train,val}.csv (file, age, gender, race, service_test) + ROOT/train, ROOT/val
    y = gender (Female 0, Male 1), b = race (7 classes, or the official InvDiff code's 4)
"""
from __future__ import annotations

from pathlib import Path

import torch

from .core import AS_DISTRIBUTED, BiasedDataset, DataConfig, DatasetSpec
from .images import build_image_splits
from .tables import EVAL, TRAIN, MetadataTable, Sampling, flag, read_csv, read_mapped, require_dir, require_file

FAIRFACE_LAYOUT = ("FairFace layout: ROOT/fairface_label_train.csv and ROOT/fairface_label_val.csv (columns file, "
                   "age, gender, race, service_test) and the folders ROOT/train/ and ROOT/val/")

# FairFace value orders (index = position). Gender follows the official InvDiff code (Male -> 1).
FAIRFACE_GENDERS = ("Female", "Male")
FAIRFACE_RACES = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")
FAIRFACE_AGES = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
# The official InvDiff code's 4 race classes (src/train_classifier.py, `race_label`): Latino_Hispanic and
# Middle Eastern are merged into White, East and Southeast Asian into one class.
INVDIFF_RACE4 = {"White": 0, "Latino_Hispanic": 0, "Middle Eastern": 0, "East Asian": 1, "Southeast Asian": 1,
                 "Indian": 2, "Black": 3}
INVDIFF_RACE4_NAMES = ("White+Latino_Hispanic+Middle Eastern", "East+Southeast Asian", "Indian", "Black")


def load_fairface(root, resolution: int = 32, *, target: str = "gender", bias: str = "race",
                  race_classes: str = "fairface7", aligned_fraction: float | None = None, group_sizes=None,
                  num_samples: int | None = None, eval_per_group: int | None = None, seed: int = 0,
                  cache=True, allow_outside_root: bool = False) -> tuple[BiasedDataset, BiasedDataset]:
    """FairFace (Karkkainen & Joo 2021): y = `target`, b = `bias`, each one of "gender" (Female 0, Male 1),
    "race" and "age" (the nine bins in order). Race: `race_classes="fairface7"` keeps FAIRFACE_RACES in that
    order; "invdiff4" is the official InvDiff code's grouping (INVDIFF_RACE4: White, Latino_Hispanic and
    Middle Eastern -> 0, East and Southeast Asian -> 1, Indian -> 2, Black -> 3; no image is dropped).
    Training rows come from fairface_label_train.csv, the balanced eval split from fairface_label_val.csv.
    The paper's FairFace split is `group_sizes="3:2:1:1:1:1:2:3"` with race_classes="invdiff4" (cells in
    the order y * 4 + b: Female x 4 races, then Male x 4 races; the official cell order is not released).
    Image paths stay inside ROOT unless `allow_outside_root`."""
    root = require_dir(root, "FairFace root", FAIRFACE_LAYOUT)
    csvs = [require_file(root / f"fairface_label_{s}.csv", FAIRFACE_LAYOUT) for s in ("train", "val")]
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
    files, y, b, s, lines, sources = [], [], [], [], [], []
    for code, path in zip((TRAIN, EVAL), csvs):
        rows, row_lines = read_csv(path, ["file", target, bias], FAIRFACE_LAYOUT)
        sources.append((path, len(files)))
        lines += row_lines
        files += [r["file"] for r in rows]
        y += read_mapped(rows, target, columns[target][0], path)
        b += read_mapped(rows, bias, columns[bias][0], path)
        s += [code] * len(rows)
    for folder in {Path(f).parts[0] for f in files if len(Path(f).parts) > 1}:
        require_dir(root / folder, "FairFace image folder", FAIRFACE_LAYOUT)
    table = MetadataTable(files=files, labels=torch.tensor(y), bias=torch.tensor(b), split=torch.tensor(s),
                          class_names=tuple(columns[target][1]), attribute_names=tuple(columns[bias][1]),
                          lines=lines, sources=tuple(sources), columns=(target, bias))
    return build_image_splits("fairface", root, table, resolution, Sampling(aligned_fraction, group_sizes, num_samples,
                  eval_per_group, seed), meta_files=csvs,
                  params={"target": target, "bias": bias, "race_classes": race_classes}, cache=cache,
                  allow_outside_root=flag(allow_outside_root, "allow_outside_root"))


def load(cfg: DataConfig) -> tuple[BiasedDataset, BiasedDataset]:
    """(train, eval) from a run's DataConfig."""
    return load_fairface(cfg.data_root, cfg.resolution, **cfg.sampling_options(), **cfg.options)


SPEC = DatasetSpec("fairface", load, defaults=AS_DISTRIBUTED, needs_root=True,
                   loader=load_fairface, about="FairFace: gender vs race (7 or the official code's 4 classes)")

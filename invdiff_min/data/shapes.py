"""The built-in biased dataset: "Waterbirds-like" shapes on backgrounds, generated on the spot (no downloads).

    class y (the object):            0 = disc,           1 = square       (red-orange, jittered)
    bias attribute b (background):   0 = "land" (green, blotchy),  1 = "water" (blue, wavy stripes)

A sample is *bias-aligned* when b == y (discs on land, squares on water) and *bias-conflicting* otherwise.
`aligned_fraction` (default 0.95) sets the spurious correlation, as Waterbirds' 95%. Every sample carries
its index, y and the hidden b and group = 2 * y + b. Training stages read only `images`, `labels` and
`index`; `bias` and `group` are hidden and read only by the named oracle and by evaluation.

`read_background` and `read_shape` are exact rules for this domain (colour and bounding-box corners), so the bias of
generated images is measured without classifier error.
"""
from __future__ import annotations

import math

import torch

from .core import BiasedDataset, DataConfig, DatasetSpec, check_rgb

CLASS_NAMES = ("disc", "square")
ATTRIBUTE_NAMES = ("land", "water")


def _render(y: torch.Tensor, b: torch.Tensor, res: int, g: torch.Generator) -> torch.Tensor:
    """Draw one image per (y, b) pair: (N, 3, res, res) in [0, 1]."""
    n = len(y)
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / res            # pixel centres in (0, 1)
    yy, xx = coords[:, None].expand(res, res), coords[None, :].expand(res, res)

    # backgrounds: land = green with soft blotches, water = blue with horizontal waves
    def u(*shape):
        return torch.rand(*shape, generator=g)

    land = torch.stack([0.25 + 0.1 * u(n), 0.55 + 0.15 * u(n), 0.15 + 0.1 * u(n)], 1)[:, :, None, None]
    blotch_phase = u(n, 2) * 2 * math.pi
    blotches = (torch.sin(6 * xx + blotch_phase[:, 0, None, None]) * torch.sin(5 * yy + blotch_phase[:, 1, None, None]))
    land = land + 0.08 * blotches[:, None]
    water = torch.stack([0.1 + 0.1 * u(n), 0.3 + 0.15 * u(n), 0.65 + 0.2 * u(n)], 1)[:, :, None, None]
    wave_phase = u(n) * 2 * math.pi
    waves = torch.sin(2 * math.pi * 4 * yy + 0.6 * torch.sin(2 * math.pi * xx) + wave_phase[:, None, None])
    water = water + 0.07 * waves[:, None]
    img = torch.where(b[:, None, None, None].bool(), water, land.expand(n, 3, res, res))

    # the object: disc or axis-aligned square, red-orange, size and position jittered, fully inside
    half = 0.2 + 0.08 * u(n)                                                  # half-size, in image units
    cx = half + (1 - 2 * half) * u(n)
    cy = half + (1 - 2 * half) * u(n)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    h = half[:, None, None]
    disc = dx**2 + dy**2 <= h**2
    square = (dx.abs() <= h * 0.9) & (dy.abs() <= h * 0.9)                  # 0.9: similar area to the disc
    mask = torch.where(y[:, None, None].bool(), square, disc)[:, None]      # (N, 1, H, W)
    colour = torch.stack([0.85 + 0.15 * u(n), 0.1 + 0.35 * u(n), 0.05 + 0.1 * u(n)], 1)[:, :, None, None]
    img = torch.where(mask, colour, img)
    return img.clamp(0, 1)


def _draw_labels(n: int, aligned_fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced classes; within each class exactly round(aligned_fraction * n_class) aligned samples."""
    y = torch.arange(n) % 2
    b = y.clone()
    for c in (0, 1):
        idx = (y == c).nonzero().squeeze(1)
        n_conflict = int(round((1 - aligned_fraction) * len(idx)))
        flip = idx[torch.randperm(len(idx), generator=g)[:n_conflict]]
        b[flip] = 1 - c
    perm = torch.randperm(n, generator=g)
    return y[perm], b[perm]


def make_split(cfg: DataConfig, split: str = "train") -> BiasedDataset:
    """Build the training split (biased, `aligned_fraction`) or the balanced `eval` split, deterministically
    from `cfg.seed` (the two splits use different draws)."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
    if cfg.aligned_fraction is None or cfg.num_samples is None or not cfg.eval_per_group:
        raise ValueError("the built-in dataset needs aligned_fraction, num_samples and eval_per_group set, got "
                         f"{cfg.aligned_fraction}, {cfg.num_samples}, {cfg.eval_per_group}")
    if cfg.resolution < 8 or cfg.resolution % 4:
        raise ValueError(f"resolution must be a multiple of 4 and at least 8, got {cfg.resolution}")
    if not 0.0 <= cfg.aligned_fraction <= 1.0:
        raise ValueError(f"aligned_fraction must be in [0, 1], got {cfg.aligned_fraction}")
    if split == "train":
        if cfg.num_samples < 2:
            raise ValueError(f"num_samples must be at least 2, got {cfg.num_samples}")
        g = torch.Generator().manual_seed(cfg.seed * 2 + 0)
        y, b = _draw_labels(cfg.num_samples, cfg.aligned_fraction, g)
    else:  # "eval" (the split name was checked above)
        g = torch.Generator().manual_seed(cfg.seed * 2 + 1)
        cells = torch.arange(4).repeat_interleave(cfg.eval_per_group)
        cells = cells[torch.randperm(len(cells), generator=g)]
        y, b = cells // 2, cells % 2
    images = _render(y, b, cfg.resolution, g)
    return BiasedDataset(images=images, labels=y.long(), bias=b.long(), index=torch.arange(len(y)),
                         class_names=CLASS_NAMES, attribute_names=ATTRIBUTE_NAMES, info={"dataset": "shapes"})


# ----- exact readers for this domain ---------------------------------------------------------------------
def object_mask(images: torch.Tensor) -> torch.Tensor:
    """Pixels of the red-orange object: R exceeds both G and B by 0.25.  (N, H, W) bool."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    return (r - torch.maximum(g, b)) > 0.25


def read_background(images: torch.Tensor) -> torch.Tensor:
    """The background attribute of images in [0, 1]: 1 (water) where the mean blue of the non-object pixels
    exceeds their mean green, else 0 (land).  (N,) long."""
    check_rgb(images)
    bg = (~object_mask(images)).float()                                      # (N, H, W)
    denom = bg.sum((1, 2)).clamp(min=1)
    green = (images[:, 1] * bg).sum((1, 2)) / denom
    blue = (images[:, 2] * bg).sum((1, 2)) / denom
    return (blue > green).long()


def read_shape(images: torch.Tensor) -> torch.Tensor:
    """The object class of images in [0, 1]: 1 (square) where at least two of the four corner pixels of the
    object's bounding box belong to the object, else 0 (disc): a disc never reaches the corners of its
    bounding box (they lie sqrt(2) r from its centre), a square always fills them. An image without an
    object (fewer than 4 object pixels) reads as -1.  (N,) long."""
    check_rgb(images)
    mask = object_mask(images)                                               # (N, H, W)
    n, h, w = mask.shape
    rows, cols = mask.any(2), mask.any(1)                                    # (N, H), (N, W)
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    top = torch.where(rows, ar_h, h).min(1).values.clamp(max=h - 1)
    bottom = torch.where(rows, ar_h, -1).max(1).values.clamp(min=0)
    left = torch.where(cols, ar_w, w).min(1).values.clamp(max=w - 1)
    right = torch.where(cols, ar_w, -1).max(1).values.clamp(min=0)
    i = torch.arange(n)
    corners = (mask[i, top, left].long() + mask[i, top, right].long() + mask[i, bottom, left].long()
               + mask[i, bottom, right].long())
    out = (corners >= 2).long()
    out[mask.sum((1, 2)) < 4] = -1
    return out


def load(cfg: DataConfig) -> tuple[BiasedDataset, BiasedDataset]:
    """(train, eval) of the built-in dataset."""
    return make_split(cfg, "train"), make_split(cfg, "eval")


SPEC = DatasetSpec("shapes", load, read_class=lambda images, k: read_shape(images),
                   read_attribute=lambda images, k: read_background(images),
                   about="built in: disc / square on land / water, 95% aligned (Waterbirds-like)")

"""The built-in biased datasets: "Waterbirds-like" shapes on backgrounds, generated on the spot (no downloads).

    shapes   (K = 2)  class y: 0 disc, 1 square;                 attribute b: 0 land, 1 water
    shapes3  (K = 3)  ... and 2 triangle (apex up);                ... and 2 sand
    shapes4  (K = 4)  ... and 3 bar (wide, low);                  ... and 3 dusk

Objects are red-orange, their size and position jittered; backgrounds are textured colours (land: green
blotches, water: blue waves, sand: tan ripples, dusk: violet gradient). Background k is aligned with class k.
A sample is *bias-aligned* when b == y and *bias-conflicting* otherwise; `aligned_fraction` sets the spurious
correlation (shapes: 0.95, as Waterbirds; shapes3 and shapes4: 0.9, the conflicting samples of a class spread
evenly over the other K - 1 backgrounds). Every sample carries its index, y and the hidden b and group =
K y + b. Training stages read only `images`, `labels` and `index`; `bias` and `group` are hidden and read only
by the named oracle and by evaluation.

`read_background` and `read_shape` are exact rules for this domain (colour and bounding-box corners), so the bias of
generated images is measured without classifier error. K = 2 draws and reads exactly as it always has.
"""
from __future__ import annotations

import math

import torch

from .core import BiasedDataset, DataConfig, DatasetSpec, check_rgb

ALL_CLASS_NAMES = ("disc", "square", "triangle", "bar")
ALL_ATTRIBUTE_NAMES = ("land", "water", "sand", "dusk")
CLASS_NAMES, ATTRIBUTE_NAMES = ALL_CLASS_NAMES[:2], ALL_ATTRIBUTE_NAMES[:2]
# mean background colour of each attribute value (the centre of its jitter range), for `read_background`, K > 2
BACKGROUND_RGB = torch.tensor([[0.30, 0.625, 0.20], [0.15, 0.375, 0.75], [0.76, 0.66, 0.40], [0.50, 0.35, 0.61]])
# K > 2: a mean background colour farther than this from every value's colour is none of them (read as -1). The
# training and eval images of data seeds 0-5 (16 and 32 px) lie within 0.132 of their own value's colour (the
# water tint's jitter box alone reaches 0.135 from its centre); the closest two colours (water, dusk) are 0.378
# apart, so the balls of radius 0.16 do not overlap. A blend of two backgrounds is thus not counted as a third.
NONE_OF_THE_VALUES = 0.16
BAR_ASPECT = 1.6      # width / height of its bounding box: square ~1, bar ~2.5 (K = 4 tells them apart)


def _render(y: torch.Tensor, b: torch.Tensor, res: int, g: torch.Generator, k: int = 2) -> torch.Tensor:
    """Draw one image per (y, b) pair: (N, 3, res, res) in [0, 1]. K = 2 makes the same draws as it always has."""
    n = len(y)
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / res            # pixel centres in (0, 1)
    yy, xx = coords[:, None].expand(res, res), coords[None, :].expand(res, res)

    def u(*shape):
        return torch.rand(*shape, generator=g)

    def tint(lo, width):                                                      # (N, 3, 1, 1) jittered colours
        return torch.stack([lo[i] + width[i] * u(n) for i in range(3)], 1)[:, :, None, None]

    # backgrounds (N, 3, H, W) each: land = green with soft blotches, water = blue with horizontal waves
    land = tint((0.25, 0.55, 0.15), (0.1, 0.15, 0.1))
    blotch_phase = u(n, 2) * 2 * math.pi
    blotches = (torch.sin(6 * xx + blotch_phase[:, 0, None, None]) * torch.sin(5 * yy + blotch_phase[:, 1, None, None]))
    backgrounds = [land + 0.08 * blotches[:, None]]
    water = tint((0.1, 0.3, 0.65), (0.1, 0.15, 0.2))
    wave_phase = u(n) * 2 * math.pi
    waves = torch.sin(2 * math.pi * 4 * yy + 0.6 * torch.sin(2 * math.pi * xx) + wave_phase[:, None, None])
    backgrounds.append((water + 0.07 * waves[:, None]).expand(n, 3, res, res))
    if k > 2:   # sand = tan with diagonal ripples
        ripples = torch.sin(2 * math.pi * 3 * (xx + yy) + u(n)[:, None, None] * 2 * math.pi)
        backgrounds.append(tint((0.72, 0.62, 0.35), (0.08, 0.08, 0.1)) + 0.06 * ripples[:, None])
    if k > 3:   # dusk = violet, darker towards the top
        backgrounds.append((tint((0.45, 0.3, 0.55), (0.1, 0.1, 0.12)) + 0.1 * (yy - 0.5)).expand(n, 3, res, res))
    img = torch.stack(backgrounds)[b, torch.arange(n)]                       # (K, N, 3, H, W) -> (N, 3, H, W)

    # the object, red-orange, size and position jittered, fully inside
    half = 0.2 + 0.08 * u(n)                                                  # half-size, in image units
    cx = half + (1 - 2 * half) * u(n)
    cy = half + (1 - 2 * half) * u(n)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    h = half[:, None, None]
    masks = [dx**2 + dy**2 <= h**2,                                           # disc
             (dx.abs() <= h * 0.9) & (dy.abs() <= h * 0.9)]                   # square (0.9: about the disc's area)
    if k > 2:                                                                 # triangle, apex up, base at the bottom
        masks.append((dy.abs() <= h) & (dx.abs() <= (dy + h) / 2))
    if k > 3:                                                                 # bar, 2.5 times as wide as high
        masks.append((dx.abs() <= h) & (dy.abs() <= h * 0.4))
    mask = torch.stack(masks)[y, torch.arange(n)][:, None]                  # (N, 1, H, W)
    colour = tint((0.85, 0.1, 0.05), (0.15, 0.35, 0.1))
    img = torch.where(mask, colour, img)
    return img.clamp(0, 1)


def _draw_labels(n: int, k: int, aligned_fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced classes; within each class exactly round((1 - aligned_fraction) * n_class) conflicting samples,
    given the other K - 1 backgrounds in turn."""
    y = torch.arange(n) % k
    b = y.clone()
    for c in range(k):
        idx = (y == c).nonzero().squeeze(1)
        n_conflict = int(round((1 - aligned_fraction) * len(idx)))
        flip = idx[torch.randperm(len(idx), generator=g)[:n_conflict]]
        b[flip] = (c + 1 + torch.arange(n_conflict) % (k - 1)) % k
    perm = torch.randperm(n, generator=g)
    return y[perm], b[perm]


def make_split(cfg: DataConfig, split: str = "train", k: int = 2) -> BiasedDataset:
    """Build the training split (biased, `aligned_fraction`) or the balanced `eval` split of the K-valued
    benchmark, deterministically from `cfg.seed` (the two splits use different draws)."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
    if k not in (2, 3, 4):
        raise ValueError(f"the built-in shapes have 2, 3 or 4 classes and backgrounds, got {k}")
    if cfg.aligned_fraction is None or cfg.num_samples is None or not cfg.eval_per_group:
        raise ValueError("the built-in dataset needs aligned_fraction, num_samples and eval_per_group set, got "
                         f"{cfg.aligned_fraction}, {cfg.num_samples}, {cfg.eval_per_group}")
    if cfg.resolution < 8 or cfg.resolution % 4:
        raise ValueError(f"resolution must be a multiple of 4 and at least 8, got {cfg.resolution}")
    if not 0.0 <= cfg.aligned_fraction <= 1.0:
        raise ValueError(f"aligned_fraction must be in [0, 1], got {cfg.aligned_fraction}")
    if split == "train":
        if cfg.num_samples < k:
            raise ValueError(f"num_samples must be at least {k} (one per class), got {cfg.num_samples}")
        g = torch.Generator().manual_seed(cfg.seed * 2 + 0)
        y, b = _draw_labels(cfg.num_samples, k, cfg.aligned_fraction, g)
    else:  # "eval" (the split name was checked above)
        g = torch.Generator().manual_seed(cfg.seed * 2 + 1)
        cells = torch.arange(k * k).repeat_interleave(cfg.eval_per_group)
        cells = cells[torch.randperm(len(cells), generator=g)]
        y, b = cells // k, cells % k
    images = _render(y, b, cfg.resolution, g, k)
    name = "shapes" if k == 2 else f"shapes{k}"
    return BiasedDataset(images=images, labels=y.long(), bias=b.long(), index=torch.arange(len(y)), num_classes=k,
                         num_attributes=k, class_names=ALL_CLASS_NAMES[:k], attribute_names=ALL_ATTRIBUTE_NAMES[:k],
                         info={"dataset": name})


# ----- exact readers for this domain ---------------------------------------------------------------------
def object_mask(images: torch.Tensor) -> torch.Tensor:
    """Pixels of the red-orange object: R exceeds both G and B by 0.25.  (N, H, W) bool."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    return (r - torch.maximum(g, b)) > 0.25


def read_background(images: torch.Tensor, k: int = 2) -> torch.Tensor:
    """The background attribute of images in [0, 1], from the mean colour of the non-object pixels. K = 2:
    1 (water) where their mean blue exceeds their mean green, else 0 (land). K > 2: the value whose mean colour
    (BACKGROUND_RGB) is nearest, or -1 (unreadable: none of the values) where even that one is farther than
    NONE_OF_THE_VALUES.  (N,) long."""
    check_rgb(images)
    bg = (~object_mask(images)).float()                                      # (N, H, W)
    mean = (images * bg[:, None]).sum((2, 3)) / bg.sum((1, 2)).clamp(min=1)[:, None]   # (N, 3)
    if k == 2:
        return (mean[:, 2] > mean[:, 1]).long()
    distance, nearest = torch.cdist(mean, BACKGROUND_RGB[:k]).min(1)       # (N,) each
    return torch.where(distance <= NONE_OF_THE_VALUES, nearest, -1)


def read_shape(images: torch.Tensor, k: int = 2) -> torch.Tensor:
    """The object class of images in [0, 1], from the four corner pixels of the object's bounding box: a disc
    never reaches them, a square or bar fills all four, a triangle (apex up) the bottom two. K = 2: 1 (square)
    where at least two corners are filled, else 0 (disc). K > 2: square where at least three are (K = 4: bar
    when the box is at least BAR_ASPECT times as wide as high), triangle where both bottom corners and no top
    corner are, else disc. An image without an object (fewer than 4 object pixels) reads as -1.  (N,) long."""
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
    top_corners = mask[i, top, left].long() + mask[i, top, right].long()
    bottom_corners = mask[i, bottom, left].long() + mask[i, bottom, right].long()
    corners = top_corners + bottom_corners
    if k == 2:
        out = (corners >= 2).long()
    else:
        out = torch.zeros(n, dtype=torch.long)                               # disc
        out[(bottom_corners == 2) & (top_corners == 0)] = 2                  # triangle
        out[corners >= 3] = 1                                                # square
        if k > 3:
            wide = (right - left + 1) >= BAR_ASPECT * (bottom - top + 1)
            out[(corners >= 3) & wide] = 3                                   # bar
    out[mask.sum((1, 2)) < 4] = -1
    return out


def loader(k: int):
    """The (train, eval) loader of the K-valued benchmark."""
    return lambda cfg: (make_split(cfg, "train", k), make_split(cfg, "eval", k))


load = loader(2)

SPEC = DatasetSpec("shapes", load, read_class=read_shape, read_attribute=read_background,
                   about="built in: disc / square on land / water, 95% aligned (Waterbirds-like)")
SPEC3 = DatasetSpec("shapes3", loader(3), defaults=dict(aligned_fraction=0.9), read_class=read_shape,
                    read_attribute=read_background,
                    about="built in, K = 3: disc / square / triangle on land / water / sand, 90% aligned")
SPEC4 = DatasetSpec("shapes4", loader(4), defaults=dict(aligned_fraction=0.9), read_class=read_shape,
                    read_attribute=read_background,
                    about="built in, K = 4: disc / square / triangle / bar on land / water / sand / dusk, "
                          "90% aligned")

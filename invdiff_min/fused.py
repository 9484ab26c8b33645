"""Faster ways to compute a layer of the UNet, each the same function as the plain version it replaces.

`nearest_upsample_conv`: conv3x3(nearest_x2(x)) as one stride-2 transposed conv with folded 4x4 taps. Along
each axis a nearest x2 upsample followed by a 3-tap conv reads only two low-res inputs per output, so the pair
is one transposed conv: 16 instead of 36 multiply-adds per output pixel and channel pair, and no upsampled
intermediate in memory. It is what `Upsample2D` runs by default (`fused=True`); the plain two-op version
(`fused=False`) stays beside it in `unet.py`, and the tests check they agree in float64, gradients included.
Measured on the CPU: the UNet's training step 1.14x diffusers' instead of 0.97x (docs/speed.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def transposed_kernel(w: torch.Tensor) -> torch.Tensor:
    """The 3x3 kernel `w` (O, I, 3, 3) of a conv applied after a nearest x2 upsample, as the 4x4 kernel
    (I, O, 4, 4) of the equivalent stride-2 transposed conv on the low-res input. Along one axis, output row
    2m reads low-res rows m-1 (tap w0) and m (w1 + w2), output row 2m+1 reads m (w0 + w1) and m+1 (w2); a
    stride-2, padding-1 transposed conv places input row i at outputs 2i-1+k, so k = 0..3 carries
    [w2, w1 + w2, w0 + w1, w0]."""
    def fold(k: torch.Tensor, dim: int) -> torch.Tensor:
        t0, t1, t2 = k.unbind(dim)
        return torch.stack([t2, t1 + t2, t0 + t1, t0], dim)
    return fold(fold(w, 2), 3).transpose(0, 1)


def nearest_upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest_x2(x)) for a 3x3, padding-1 `conv`: (B, C, H, W) -> (B, C_out, 2H, 2W)."""
    return F.conv_transpose2d(x, transposed_kernel(conv.weight), conv.bias, stride=2, padding=1)

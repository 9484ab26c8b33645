"""Full checks of what enters the library from outside, each error naming the problem and the fix.

The maths in the middle (`UNet.forward`, the scheduler's step, the training loops) keeps only shape asserts
and never synchronises with the device to look at values; the checks that read values (timesteps in range,
labels in range) and explain what to do live here and run where data enters: `diffusion.sample`, the public
API and the tests' fuzzing of these functions.
"""
from __future__ import annotations

import torch


def check_unet_inputs(model, x, t, y=None, cond_emb=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refuse a UNet call that cannot work, with a message that names the fix; returns (t, y) as tensors on
    x's device (t expanded to one per sample)."""
    _check_image(model, x)
    t = _check_timesteps(t, x.shape[0], x.device)
    if y is not None:
        y = _check_labels(model, y, x.shape[0], x.device)
    if cond_emb is not None:
        _check_cond_emb(model, cond_emb, x)
    return t, y


def checked_unet_call(model, x, t, y=None, cond_emb=None) -> torch.Tensor:
    """`model(x, t, y, cond_emb)` after `check_unet_inputs`."""
    t, y = check_unet_inputs(model, x, t, y, cond_emb)
    return model(x, t, y, cond_emb=cond_emb)


def _runs_as(model, dtype: torch.dtype, device: torch.device) -> bool:
    """A tensor of `dtype` can meet the weights: same dtype, or autocast casts both (never float64)."""
    w = model.conv_in.weight.dtype
    return dtype == w or (torch.is_autocast_enabled(device.type) and torch.float64 not in (dtype, w))

def _check_image(model, x) -> None:
    cfg, w = model.config, model.conv_in.weight
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"UNet expects x as a torch.Tensor (B, {cfg.in_channels}, H, W), got {type(x).__name__}; "
                        f"wrap it with torch.as_tensor(x)")
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"UNet expects images (B, {cfg.in_channels}, H, W), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"UNet expects a floating-point image in [-1, 1], got dtype {x.dtype}; pass a float "
                         f"tensor, e.g. x.float() / 127.5 - 1 for 0..255 pixels")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the UNet is on {w.device}; move one: x.to(model_device) or "
                         f"model.to(x.device)")
    if torch.is_autocast_enabled(x.device.type):
        ad = torch.get_autocast_dtype(x.device.type)
        if w.dtype not in (torch.float32, torch.float64, ad):
            raise ValueError(f"under torch.autocast(dtype={ad}) the UNet's weights must be float32 or {ad}, "
                             f"got {w.dtype}; call model.float() or autocast with dtype={w.dtype}")
    if not _runs_as(model, x.dtype, x.device):
        raise ValueError(f"x has dtype {x.dtype} but the UNet's weights are {w.dtype}; cast one to match "
                         f"(x.to({w.dtype}) or model.to({x.dtype})), or run under torch.autocast")
    f = cfg.downsample_factor
    if x.shape[2] % f or x.shape[3] % f or 0 in x.shape[2:]:
        raise ValueError(f"image side {tuple(x.shape[2:])} must be a positive size divisible by {f} "
                         f"(2 ** (levels - 1) for {len(cfg.block_out_channels)} levels): resize or pad the input")

def _check_timesteps(t, b: int, device: torch.device) -> torch.Tensor:
    """t: a number or one per sample, finite and >= 0 (floats are fine: the sinusoid takes any time)."""
    try:
        t = torch.as_tensor(t, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"t must be a number or a ({b},) tensor of timesteps, got {type(t).__name__}") from None
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"timesteps must be real numbers (integers 0..T-1 from the scheduler), got dtype "
                         f"{t.dtype}; pass t.long()")
    if t.numel() and not bool(((t >= 0) & torch.isfinite(t)).all()):
        raise ValueError(f"timesteps must be finite and >= 0 (the scheduler's 0..T-1), got "
                         f"[{t.min().item()}, {t.max().item()}]")
    if t.ndim == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"need one timestep per sample or a scalar: got t of shape {tuple(t.shape)} for a "
                         f"batch of {b}")
    return t

def _check_labels(model, y, b: int, device: torch.device) -> torch.Tensor:
    """y: one integer label per sample in 0..num_classes (num_classes is the null label)."""
    n = model.config.num_classes
    if model.class_embedding is None:
        raise ValueError("this UNet is unconditional (num_classes=None) but class labels were given; "
                         "pass y=None or build it with num_classes")
    try:
        y = torch.as_tensor(y, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"labels must be an integer tensor of shape ({b},), got {type(y).__name__}") from None
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.shape != (b,):
        raise ValueError(f"labels must be an integer tensor of shape ({b},), got {y.dtype} {tuple(y.shape)}; "
                         f"pass y.long()")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > n):
        raise ValueError(f"label out of range: got [{int(y.min())}, {int(y.max())}], valid are "
                         f"0..{n - 1} and {n} (the null label)")
    return y

def _check_cond_emb(model, cond_emb, x: torch.Tensor) -> None:
    """cond_emb: (B, D) or (1, D), D the time-embedding width, a dtype that meets the weights."""
    b, d, w = x.shape[0], model.time_embedding.linear_2.out_features, model.conv_in.weight
    if (not isinstance(cond_emb, torch.Tensor) or cond_emb.ndim != 2 or cond_emb.shape[0] not in (1, b)
            or cond_emb.shape[1] != d):
        got = tuple(cond_emb.shape) if isinstance(cond_emb, torch.Tensor) else type(cond_emb).__name__
        raise ValueError(f"cond_emb must be a ({b}, {d}) tensor (one embedding per sample), got {got}")
    if (cond_emb.device != x.device or not cond_emb.dtype.is_floating_point
            or not _runs_as(model, cond_emb.dtype, x.device)):
        raise ValueError(f"cond_emb must be a {w.dtype} tensor on {x.device} like the UNet, got "
                         f"{cond_emb.dtype} on {cond_emb.device}; pass cond_emb.to(x)")

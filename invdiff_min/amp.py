"""Mixed precision and memory layout for the training loops (CUDA only; CPU runs stay in float32, bit-exact).

    precision "bf16"  autocast to bfloat16 (default on CUDA; same exponent range as float32, no loss scaling)
              "fp16"  autocast to float16 with a GradScaler (dynamic loss scaling against gradient underflow)
              "fp32"  no autocast
Noising (q_sample), the per-sample losses and L_e stay in float32: autocast covers only the network calls.
"""
from __future__ import annotations

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use bf16, fp16 or fp32")


def autocast(device: torch.device, precision: str):
    """torch.autocast for the network call, enabled on CUDA for bf16 / fp16."""
    check_precision(precision)
    dtype = PRECISIONS[precision]
    enabled = device.type == "cuda" and dtype is not None
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=enabled)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on CUDA; a pass-through otherwise (scale, unscale_ and step do nothing extra)."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and precision == "fp16")


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, grad_clip: float,
                   scaler: torch.amp.GradScaler) -> None:
    """backward, unscale, clip the gradient norm to `grad_clip`, step (skipped by the scaler on inf/NaN)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()


def prepare(module: torch.nn.Module, channels_last: bool = False, compile: bool = False):
    """channels_last weights (faster convolutions on recent GPUs) and torch.compile, both on request. Returns the
    module to call (compiled or not); the original keeps the weights, for checkpoints and EMA."""
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return torch.compile(module) if compile else module

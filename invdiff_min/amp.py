"""Mixed precision and memory layout for the network calls: training, per-sample losses and sampling.

    precision "auto"  bf16 where the hardware computes it natively (CUDA; a CPU with avx512_bf16 or AMX, which
                      oneDNN uses), else fp32: the default of train.py, sample.py and InvDiffPipeline
              "bf16"  autocast to bfloat16 (same exponent range as float32, no loss scaling); on a CPU without
                      native bf16 it is emulated and many times slower (measured about 13x on an AVX2 CPU)
              "fp16"  autocast to float16 with a GradScaler (dynamic loss scaling against gradient underflow); CUDA
              "fp32"  no autocast: exact and bit-reproducible on a given machine
Noising (q_sample), the per-sample losses, L_e and the sampler's update stay in float32: autocast covers the
network calls only, and every loss upcasts the network's output first (diffusion.per_sample_mse).
"""
from __future__ import annotations

import functools

import torch

PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use auto, bf16, fp16 or fp32")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """oneDNN computes bf16 natively on this CPU (avx512_bf16 or AMX), so bf16 autocast is faster than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve(precision: str, device: torch.device | str) -> tuple[str, str]:
    """("bf16" | "fp16" | "fp32", why): "auto" made concrete for `device`; an explicit choice kept (fp16 on a
    CPU refused: CPU autocast to float16 has no fast kernels here and no loss scaling)."""
    check_precision(precision)
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ValueError("precision fp16 needs CUDA (loss-scaled float16 training); on a CPU use auto, bf16 or fp32")
    if precision != "auto":
        slow = precision == "bf16" and kind == "cpu" and not cpu_has_native_bf16()
        return precision, ("requested; this CPU has no native bf16 (avx512_bf16 / AMX), so it is emulated and slow"
                           if slow else "requested")
    if kind == "cuda":
        return "bf16", "auto: CUDA"
    if kind == "cpu" and cpu_has_native_bf16():
        return "bf16", "auto: this CPU computes bf16 natively (oneDNN: avx512_bf16 / AMX)"
    return "fp32", "auto: this CPU has no native bf16 (avx512_bf16 / AMX), so float32"


def autocast(device: torch.device | str, precision: str):
    """torch.autocast around network calls in `precision` ("auto" resolved for `device`); fp32: disabled."""
    device = torch.device(device)
    concrete, _ = resolve(precision, device)
    dtype = PRECISIONS[concrete]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


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

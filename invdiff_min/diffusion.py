"""Training loss and sampling loop of a class-conditional DDPM, with classifier-free guidance.

Training (Ho et al., "L_simple"):  E_{x0, y, t, eps} || eps - eps_theta(x_t, t, y') ||^2,
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  t ~ U{0..T-1},
    y' = null label with probability p_uncond (per sample), else y    (classifier-free guidance training).

Sampling with guidance scale s (Ho & Salimans 2022):
    eps_hat = eps(x_t, null) + s * (eps(x_t, y) - eps(x_t, null))
    s = 1: the plain conditional model (one network call per step);  s = 0: the unconditional model;
    s > 1: stronger conditioning.
Guidance interval (`guidance_t_max`, Kynkaenniemi et al. 2024, "Applying guidance in a limited interval"): the
class guidance only at t < t_max, the plain conditional model above it. Guidance at large t, where the image's
layout (here: its background) is settled, pulls every sample toward its class's most common layout; the rest of
the chain still sharpens the class.
The model may be any callable `model(x, t, y) -> eps`, e.g. the InvDiff guided model of `guidance.py`; one with a
`cfg_eps` method combines the two branches itself (the guided model keeping its head outside the class guidance).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .scheduler import DDIMScheduler, DDPMScheduler, _NoiseSchedule
from .unet import UNet
from .validate import check_unet_inputs

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """l_i = mean over (C, H, W) of (prediction - target)^2, in float32.  (B, C, H, W) -> (B,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def drop_labels(y: torch.Tensor, p_uncond: float, null_label: int, generator: torch.Generator | None = None):
    """Replace each label by the null label independently with probability p_uncond."""
    if p_uncond <= 0:
        return y
    # drawn on the generator's device (CPU generators on CUDA runs), then moved: the same draws on any device
    device = generator.device if generator is not None else y.device
    drop = (torch.rand(y.shape, generator=generator, device=device) < p_uncond).to(y.device)
    return torch.where(drop, torch.full_like(y, null_label), y)


def denoising_loss(model: EpsModel, scheduler: _NoiseSchedule, x0: torch.Tensor, y: torch.Tensor | None,
                   t: torch.Tensor, eps: torch.Tensor, target: str = "eps") -> torch.Tensor:
    """The per-sample denoising loss every stage reduces its own way, (B,) float32:
        l_i = mean_pixels || model(x_t, t_i, y_i) - eps_i ||^2,   x_t = q_sample(x0_i, eps_i, t_i)
    (Ho et al. eq. 14 before the mean over samples). The base model averages it over the batch (L_simple),
    group inference averages it over draws per sample, the head combines it into group risks (L_e).
    target="x0" compares the prediction with x0 instead: deviation kept as an option, what the official
    InvDiff grouper computes (src/group/train_group.py), not what the paper writes."""
    x_t = scheduler.q_sample(x0, eps, t)
    return per_sample_mse(model(x_t, t, y), eps if target == "eps" else x0)


def training_loss(model: EpsModel, scheduler: _NoiseSchedule, x0: torch.Tensor, y: torch.Tensor | None,
                  generator: torch.Generator | None = None, p_uncond: float = 0.0,
                  null_label: int | None = None, rows: slice = slice(None)) -> torch.Tensor:
    """L_simple over a batch (a scalar, float32). x0 in [-1, 1], (B, C, H, W); t, noise and label dropout drawn
    from `generator` for the whole batch. `rows` takes the loss over a slice of the batch with exactly the
    draws the whole batch would get: each data-parallel process passes its own rows."""
    b = x0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator)[rows].to(x0.device)
    noise = torch.randn(x0.shape, generator=generator)[rows].to(x0.device)
    if y is not None:
        if p_uncond > 0:
            y = drop_labels(y, p_uncond, null_label, generator=generator)
        y = y[rows]
    return denoising_loss(model, scheduler, x0[rows], y, t, noise).mean()


def make_sampler(name: str, schedule_kwargs: dict | None = None) -> _NoiseSchedule:
    """'ddpm' (ancestral) or 'ddim'; trailing timesteps so the first step is t = T - 1 for any step count."""
    kw = dict(schedule_kwargs or {})
    kw.setdefault("timestep_spacing", "trailing")
    if name == "ddpm":
        return DDPMScheduler(**kw)
    if name == "ddim":
        kw.pop("variance_type", None)
        return DDIMScheduler(**kw)
    raise ValueError(f"unknown sampler {name!r}; use 'ddpm' or 'ddim'")


@torch.no_grad()
def sample(model: EpsModel, scheduler: _NoiseSchedule, shape: tuple[int, ...], labels: torch.Tensor | None,
           num_steps: int, guidance_scale: float = 1.0, null_label: int | None = None, eta: float = 0.0,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           progress: Callable | None = None, guidance_t_max: int | None = None) -> torch.Tensor:
    """Run the reverse process from x_T ~ N(0, I); returns x_0 in [-1, 1], shape `shape`.

    `guidance_scale` is the classifier-free guidance scale s (1 = plain conditional, 0 = unconditional), applied
    at the steps with t < `guidance_t_max` (None: at every step), the plain conditional model at the others.
    Noise is drawn on the CPU from `generator`, so a seed gives the same images on every device.
    """
    if guidance_scale != 1.0 and (labels is None or null_label is None):
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs class labels and a null label")
    if guidance_t_max is not None and not (type(guidance_t_max) is int and guidance_t_max >= 0):
        raise ValueError(f"guidance_t_max must be a timestep >= 0 (class guidance at t < it), got {guidance_t_max!r}")
    scheduler.set_timesteps(num_steps)
    x = torch.randn(shape, generator=generator).to(device)
    if null_label is not None and getattr(model, "null_label", null_label) != null_label:
        raise ValueError(f"null_label {null_label} is not this model's null label {model.null_label} (a head told "
                         f"the sub-group has labels of its own): pass null_label=model.null_label")
    net = getattr(model, "base", model)          # a guided model checks through its base UNet
    if isinstance(net, UNet):                    # once, where images enter: the loop below stays unchecked
        base_labels = labels
        if hasattr(model, "base_labels") and labels is not None:
            base_labels = model.base_labels(torch.as_tensor(labels))     # a head told the sub-group: their class
        check_unet_inputs(net, x, scheduler.timesteps[0], base_labels)
    if labels is not None:
        labels = labels.to(device)
        null = torch.full_like(labels, null_label) if null_label is not None else None
    steps = scheduler.timesteps.tolist()
    for t in (progress(steps) if progress else steps):
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        if guidance_scale == 1.0 or (guidance_t_max is not None and t >= guidance_t_max):
            eps = model(x, tt, labels)
        elif guidance_scale == 0.0 and not getattr(model, "head_outside_cfg", False):
            eps = model(x, tt, null)                 # (the head outside the guidance still pushes at s = 0)
        else:
            eps = cfg_eps(model, x, tt, labels, null, guidance_scale)
        noise = torch.randn(shape, generator=generator).to(device) if t > 0 else None
        if isinstance(scheduler, DDIMScheduler):
            x = scheduler.step(eps.float(), t, x, eta=eta, variance_noise=noise if eta > 0 else None)
        else:
            x = scheduler.step(eps.float(), t, x, variance_noise=noise)
    return x


def cfg_eps(model: EpsModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null: torch.Tensor,
            scale: float) -> torch.Tensor:
    """eps_u + s (eps_c - eps_u), float32: both branches in one batched call, rows [y; null]. A model with its own
    `cfg_eps` (a guided model whose head stays outside the class guidance) combines them itself."""
    if hasattr(model, "cfg_eps"):
        return model.cfg_eps(x, t, y, null, scale)
    eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return eps_u + scale * (eps_c - eps_u)


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, parameter by parameter (buffers copied)."""
    # one fused call over all parameters (a per-parameter loop costs a kernel launch each on CUDA)
    torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
    for ema_b, b in zip(ema_model.buffers(), model.buffers()):
        ema_b.copy_(b)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up for `warmup_steps`, then cosine decay to `final_fraction * base_lr` at `total_steps`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))

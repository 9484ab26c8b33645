"""The DDPM noise schedule and its two samplers (Ho et al. 2020; Song et al. 2021).

Shaped like diffusers' `DDPMScheduler` / `DDIMScheduler` so people coming from diffusers find the same
constructor arguments and methods (`add_noise`, `set_timesteps`, `timesteps`, `alphas_cumprod`, `step`).
Differences from diffusers, on purpose:
  * the schedules are computed in float64 and stored in float32 (diffusers computes in float32);
  * `step` returns the previous sample as a tensor (diffusers wraps it in an output object);
  * the previous timestep of a step is always the next entry of `timesteps`, so every spacing is exact
    for any number of steps (diffusers' DDIM uses t - T // n, which is the same for "leading" spacing).

Notation: T = num_train_timesteps, beta_t the noise added at step t, alpha_t = 1 - beta_t,
abar_t = prod_{s <= t} alpha_s (`alphas_cumprod`).
"""
from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import nn

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _as_int(value, name: str) -> int:
    """An integer argument: a Python or NumPy integer or a one-element integer tensor (never a bool or float)."""
    is_bool = isinstance(value, bool) or type(value).__name__ == "bool_" or (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    try:
        if is_bool:
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}; pass int(...)") from None


def _check_sample(x, name: str) -> None:
    """Samples, noise and model outputs: floating-point tensors of at least one dimension (the batch)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor(...)")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor (images in [-1, 1]), got dtype {x.dtype}; "
                         f"convert with .float()")
    if x.ndim == 0:
        raise ValueError(f"{name} must have a batch dimension, e.g. (B, C, H, W); got a 0-d tensor")


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> torch.Tensor:
    """beta_1..beta_T in float64.

    linear:            beta_t = linspace(beta_start, beta_end)                       (Ho et al.)
    scaled_linear:     beta_t = linspace(sqrt(beta_start), sqrt(beta_end))^2         (Stable Diffusion)
    squaredcos_cap_v2: beta_t = min(1 - abar(t+1)/abar(t), 0.999),
                       abar(t) = cos^2(((t/T) + 0.008) / 1.008 * pi/2)               (Nichol & Dhariwal)
    """
    T = num_train_timesteps
    if beta_schedule in ("linear", "scaled_linear"):
        for name, beta in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not isinstance(beta, numbers.Real) or isinstance(beta, bool) or not 0 < beta < 1:
                raise ValueError(f"{name} must be a number in (0, 1), got {beta!r}; the DDPM default is "
                                 f"beta_start=0.0001, beta_end=0.02")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")


class _NoiseSchedule(nn.Module):
    """The forward process q(x_t | x_0) shared by both samplers; schedules are buffers so `.to()` moves them."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", clip_sample: bool = True, clip_sample_range: float = 1.0,
                 timestep_spacing: str = "leading", steps_offset: int = 0):
        super().__init__()
        num_train_timesteps = _as_int(num_train_timesteps, "num_train_timesteps")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose one of {TIMESTEP_SPACINGS}")
        steps_offset = _as_int(steps_offset, "steps_offset")
        if not 0 <= steps_offset < num_train_timesteps:
            raise ValueError(f"steps_offset must lie in [0, {num_train_timesteps - 1}], got {steps_offset}; "
                             f"diffusers' configs use 0 or 1")
        if not isinstance(clip_sample, bool):               # a string "false" would clip: it is truthy
            raise ValueError(f"clip_sample must be true or false, got {clip_sample!r}")
        if clip_sample and not (isinstance(clip_sample_range, numbers.Real) and clip_sample_range > 0):
            raise ValueError(f"clip_sample_range must be a number > 0 (x0_hat is clipped to [-r, r]), got "
                             f"{clip_sample_range!r}; the default is 1.0, or pass clip_sample=False")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset

        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)  # float64
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)                             # abar_t
        self._check_alphas_cumprod(alphas_cumprod.float(), beta_start, beta_end)
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas", (1.0 - betas).float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float())                 # sqrt(abar_t)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float())  # sqrt(1-abar_t)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    @staticmethod
    def _check_alphas_cumprod(abar: torch.Tensor, beta_start, beta_end) -> None:
        """Sampling divides by sqrt(abar_t) and by 1 - abar_t: both must be nonzero in float32."""
        if bool(((abar > 0) & (abar < 1)).all()):
            return
        i = int((~((abar > 0) & (abar < 1))).nonzero()[0, 0])
        fix = "raise beta_start (>= 1e-7)" if float(abar[i]) >= 1 else "lower beta_end or num_train_timesteps"
        raise ValueError(f"this schedule (beta_start={beta_start}, beta_end={beta_end}, {len(abar)} steps) gives "
                         f"abar_{i} = {float(abar[i])} in float32, but abar_t must lie strictly between 0 and 1 "
                         f"or sampling divides by zero; {fix}")

    def _check_timestep(self, timestep) -> int:
        """The timestep of one reverse step: an integer in [0, T - 1]."""
        t = _as_int(timestep, "timestep")
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep must lie in [0, {self.num_train_timesteps - 1}], got {t}; step through "
                             f"scheduler.timesteps")
        return t

    # ----- forward process -------------------------------------------------------------------------------
    def _check_t(self, t: torch.Tensor) -> torch.Tensor:
        try:
            t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"timesteps must be an integer or an integer tensor, got {type(t).__name__}") from None
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers, got dtype {t.dtype}; pass t.long()")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], "
                             f"got range [{int(t.min())}, {int(t.max())}]")
        return t.long()

    @staticmethod
    def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, 1, 1, 1) so it broadcasts over a (B, C, H, W) batch."""
        return coef.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (Ho et al., eq. 4), in float32; x0, noise (B, ...), t (B,)
        long on the schedule's device. Unchecked, for the training loops whose t comes from [0, T); callers
        from outside use `add_noise`."""
        x0_, eps = x0.float(), noise.float()
        x_t = (self._per_sample(self.sqrt_alphas_cumprod[t], x0_) * x0_
               + self._per_sample(self.sqrt_one_minus_alphas_cumprod[t], x0_) * eps)
        return x_t.to(x0.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`q_sample` after checking every input (diffusers' name and signature)."""
        _check_sample(original_samples, "original_samples")
        _check_sample(noise, "noise")
        if original_samples.shape != noise.shape:
            raise ValueError(f"x0 {tuple(original_samples.shape)} and noise {tuple(noise.shape)} must have the same "
                             f"shape")
        t = self._check_t(timesteps)
        if t.ndim == 0:
            t = t.expand(original_samples.shape[0])
        if t.shape != original_samples.shape[:1]:
            raise ValueError(f"need one timestep per sample: got {tuple(t.shape)} for a batch of "
                             f"{original_samples.shape[0]}")
        if original_samples.device != t.device or noise.device != t.device:
            raise ValueError(f"samples on {original_samples.device} and noise on {noise.device}, but the schedule "
                             f"is on {t.device}; move it with scheduler.to(device)")
        return self.q_sample(original_samples, noise, t)

    def predict_x0(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), clipped when `clip_sample`."""
        abar_t = self.alphas_cumprod[timestep]
        x0 = (sample - (1 - abar_t) ** 0.5 * model_output) / abar_t ** 0.5
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    # ----- sampling timesteps ----------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose the n timesteps of the reverse process, in decreasing order.

        leading  (diffusers' default): k * (T // n) for k = n-1..0, plus steps_offset
        trailing (starts at T - 1):    round(T - k * T / n) - 1 for k = 0..n-1
        linspace:                      round(linspace(0, T - 1, n)), reversed
        Any n in [1, T] works; the previous timestep of each step is the next entry.
        """
        T = self.num_train_timesteps
        msg = f"num_inference_steps must be an integer in [1, {T}], got {num_inference_steps!r}"
        try:
            n = _as_int(num_inference_steps, "num_inference_steps")
        except ValueError:
            raise ValueError(msg) from None
        if not 1 <= n <= T:
            raise ValueError(msg)
        if self.timestep_spacing == "leading":
            ts = torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n) + self.steps_offset
            if ts[0] > T - 1:
                raise ValueError(f"steps_offset={self.steps_offset} pushes the first of {n} timesteps to "
                                 f"{int(ts[0])}, past T - 1 = {T - 1}; lower steps_offset or num_inference_steps")
        elif self.timestep_spacing == "trailing":  # float steps can leave an extra ~0 entry (-1): keep n
            ts = torch.arange(T, 0, -T / n, dtype=torch.float64)[:n].round() - 1
        else:
            ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
        self.num_inference_steps = n
        self.timesteps = ts.long().to(device if device is not None else "cpu")

    @staticmethod
    def _check_step_inputs(model_output, sample, variance_noise) -> None:
        _check_sample(model_output, "model_output")
        _check_sample(sample, "sample")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} must have "
                             f"the same shape (the model predicts the noise in the sample)")
        if variance_noise is not None:
            _check_sample(variance_noise, "variance_noise")
            if variance_noise.shape != sample.shape:
                raise ValueError(f"variance_noise {tuple(variance_noise.shape)} must have the sample's shape "
                                 f"{tuple(sample.shape)}")

    def previous_timestep(self, timestep: int) -> int:
        """The timestep after `timestep` in `timesteps` (-1 after the last one)."""
        t = int(timestep)
        if self.num_inference_steps is None:
            return t - 1
        hits = (self.timesteps == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps; call set_timesteps() and step "
                             f"through scheduler.timesteps")
        i = int(hits[0, 0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def _abar(self, t: int, final: torch.Tensor | float = 1.0) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else torch.as_tensor(final, dtype=self.alphas_cumprod.dtype,
                                                                     device=self.alphas_cumprod.device)


class DDPMScheduler(_NoiseSchedule):
    """Ancestral sampling of Ho et al.: x_{t-1} ~ N(mu_t(x_t, x0_hat), sigma_t^2 I).

    mu_t = sqrt(abar_prev) beta'_t / (1 - abar_t) * x0_hat + sqrt(alpha'_t) (1 - abar_prev) / (1 - abar_t) * x_t
    with alpha'_t = abar_t / abar_prev, beta'_t = 1 - alpha'_t (the step's effective beta when skipping), and
    sigma_t^2 = beta'_t (1 - abar_prev) / (1 - abar_t)  ("fixed_small", the posterior variance) or
    sigma_t^2 = beta'_t                                  ("fixed_large", Ho et al.'s CIFAR-10 choice).
    """

    VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", variance_type: str = "fixed_small", clip_sample: bool = True,
                 clip_sample_range: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 prediction_type: str = "epsilon"):
        if variance_type not in self.VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; choose one of {self.VARIANCE_TYPES}")
        if prediction_type != "epsilon":
            raise ValueError(f"only prediction_type='epsilon' is implemented, got {prediction_type!r}")
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, clip_sample, clip_sample_range,
                         timestep_spacing, steps_offset)
        self.variance_type = variance_type

    def variance(self, timestep: int) -> torch.Tensor:
        """sigma_t^2 of the step from `timestep` to the previous timestep (see the class docstring)."""
        t = self._check_timestep(timestep)
        prev = self.previous_timestep(t)
        abar_t, abar_prev = self.alphas_cumprod[t], self._abar(prev)
        beta_t = 1 - abar_t / abar_prev                                  # beta'_t
        if self.variance_type.startswith("fixed_large"):
            # deviation (diffusers: beta'_t whenever t > 0): no noise on the step that yields x_0 (Ho et al.: z = 0
            # at t = 1), also when a skipped-step schedule (trailing spacing) ends above t = 0
            return beta_t if prev >= 0 else torch.zeros_like(beta_t)
        return ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=1e-20)  # posterior variance beta~_t

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None) -> torch.Tensor:
        """One reverse step x_t -> x_{t-1}; returns x_{t-1}. No noise is added at t = 0."""
        self._check_step_inputs(model_output, sample, variance_noise)
        t = self._check_timestep(timestep)
        prev = self.previous_timestep(t)
        abar_t, abar_prev = self.alphas_cumprod[t], self._abar(prev)
        alpha_t = abar_t / abar_prev                                     # alpha'_t
        beta_t = 1 - alpha_t                                             # beta'_t
        x0 = self.predict_x0(model_output, t, sample)
        coef_x0 = abar_prev ** 0.5 * beta_t / (1 - abar_t)               # sqrt(abar_prev) beta'_t / (1 - abar_t)
        coef_xt = alpha_t ** 0.5 * (1 - abar_prev) / (1 - abar_t)        # sqrt(alpha'_t) (1 - abar_prev) / (1 - abar_t)
        prev_sample = coef_x0 * x0 + coef_xt * sample
        if t > 0:
            if variance_noise is None:
                variance_noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype,
                                             device=model_output.device)
            prev_sample = prev_sample + self.variance(t) ** 0.5 * variance_noise
        return prev_sample


class DDIMScheduler(_NoiseSchedule):
    """DDIM (Song et al. 2021), eq. 12:

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat + sigma_t z,
    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev).
    eta = 0 is deterministic; eta = 1 has the DDPM posterior variance.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", clip_sample: bool = True, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, clip_sample_range: float = 1.0, timestep_spacing: str = "leading",
                 prediction_type: str = "epsilon"):
        if prediction_type != "epsilon":
            raise ValueError(f"only prediction_type='epsilon' is implemented, got {prediction_type!r}")
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, clip_sample, clip_sample_range,
                         timestep_spacing, steps_offset)
        # abar used after the last step: 1 (land exactly on x0_hat) or abar_0
        self.register_buffer("final_alpha_cumprod",
                             torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0].clone())

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None) -> torch.Tensor:
        """One DDIM step x_t -> x_prev; returns x_prev."""
        if not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:  # eta > 1: sqrt(1 - abar_prev - sigma^2) can be NaN
            raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM posterior variance), "
                             f"got {eta!r}")
        self._check_step_inputs(model_output, sample, variance_noise)
        t = self._check_timestep(timestep)
        prev = self.previous_timestep(t)
        abar_t, abar_prev = self.alphas_cumprod[t], self._abar(prev, self.final_alpha_cumprod)
        x0 = self.predict_x0(model_output, t, sample)
        eps = model_output
        if use_clipped_model_output:  # re-derive eps from the clipped x0_hat
            eps = (sample - abar_t ** 0.5 * x0) / (1 - abar_t) ** 0.5
        var = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)  # sigma_t^2 / eta^2
        std = eta * var ** 0.5                                            # sigma_t
        prev_sample = abar_prev ** 0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
        if eta > 0:
            if variance_noise is None:
                variance_noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype,
                                             device=model_output.device)
            prev_sample = prev_sample + std * variance_noise
        return prev_sample

"""The noise schedule and both samplers: closed forms, and parity with diffusers' schedulers to 1e-6."""
import math

import pytest
import torch

from invdiff_min.scheduler import DDIMScheduler, DDPMScheduler, make_betas

diffusers = pytest.importorskip("diffusers")


def same_schedule(ref, ours):
    """Give a diffusers scheduler our float64-computed schedule. diffusers takes the cumulative product in
    float32, which differs from the exact value by up to ~2e-7 (checked separately below); that rounding is
    amplified by 1 / sqrt(abar_t) at large t, so formula parity is checked on identical schedules."""
    ref.betas, ref.alphas, ref.alphas_cumprod = ours.betas.clone(), ours.alphas.clone(), ours.alphas_cumprod.clone()
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = ours.final_alpha_cumprod.clone()
    return ref


def close(a, b, tol=1e-6):
    """|a - b| <= tol * max(1, |b|): 1e-6 absolute, relative for values above 1 (float32 has 24 bits)."""
    return bool(((a - b).abs() <= tol * b.abs().clamp(min=1)).all())

SCHEDULES = [("linear", 1e-4, 0.02), ("squaredcos_cap_v2", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)]


@pytest.mark.parametrize("schedule,b0,b1", SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(schedule, b0, b1):
    ours = DDPMScheduler(beta_start=b0, beta_end=b1, beta_schedule=schedule)
    ref = diffusers.DDPMScheduler(beta_start=b0, beta_end=b1, beta_schedule=schedule)
    assert torch.allclose(ours.betas, ref.betas.float(), atol=1e-6, rtol=0)
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod.float(), atol=1e-6, rtol=0)


def test_linear_schedule_closed_form():
    s = DDPMScheduler(num_train_timesteps=1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.tensor([math.prod((1 - betas[: i + 1]).tolist()) for i in (0, 499, 999)], dtype=torch.float64)
    assert torch.allclose(s.alphas_cumprod[[0, 499, 999]].double(), abar, atol=1e-7)
    assert s.betas.dtype == torch.float32 and s.alphas_cumprod.dtype == torch.float32


def test_schedule_buffers_move_with_the_module():
    names = {n for n, _ in DDPMScheduler().named_buffers()}
    assert {"betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"} <= names


@pytest.mark.parametrize("schedule,b0,b1", SCHEDULES[:2])
def test_add_noise_matches_closed_form_and_diffusers(schedule, b0, b1):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = DDPMScheduler(beta_schedule=schedule, beta_start=b0, beta_end=b1)
    ref = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=b0, beta_end=b1)
    abar = torch.cumprod(1 - make_betas(1000, b0, b1, schedule), 0)[t].view(-1, 1, 1, 1)  # float64
    exact = abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()
    assert close(ours.add_noise(x0, eps, t).double(), exact)
    # diffusers forms 1 - abar_t in float32 (we store sqrt(1 - abar_t) from float64): at small t that costs it
    # up to ~1e-5, so diffusers is held to 2e-5 here while the float64 closed form above holds to 1e-6.
    assert close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), tol=2e-5)


@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 333, 1000])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_set_timesteps_matches_diffusers(n, spacing):
    ours, ref = DDIMScheduler(timestep_spacing=spacing), diffusers.DDIMScheduler(timestep_spacing=spacing)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert len(ours.timesteps) == n
    assert all(a > b for a, b in zip(ours.timesteps.tolist(), ours.timesteps.tolist()[1:])), "strictly decreasing"


def test_set_timesteps_rejects_bad_counts():
    s = DDPMScheduler()
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "fixed_small_log"])
@pytest.mark.parametrize("n", [1000, 50, 7])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_matches_diffusers(variance_type, n, clip):
    ours = DDPMScheduler(variance_type=variance_type, clip_sample=clip)
    ref = same_schedule(diffusers.DDPMScheduler(variance_type=variance_type, clip_sample=clip), ours)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for t in [ours.timesteps[0], ours.timesteps[len(ours.timesteps) // 2], ours.timesteps[-1]]:
        a = ours.step(out, int(t), x, generator=torch.Generator().manual_seed(5))
        b = ref.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        assert close(a, b), f"t={int(t)}: max abs diff {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_adds_no_noise_on_the_step_to_x0_when_trailing_steps_end_above_t0(variance_type):
    s = DDPMScheduler(variance_type=variance_type, clip_sample=False, timestep_spacing="trailing")
    s.set_timesteps(100)
    t = int(s.timesteps[-1])
    assert t == 9                                            # the last step of 100 trailing ones, to x_0
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    eps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    abar = s.alphas_cumprod[t].float()
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    out = s.step(eps, t, x_t, generator=torch.Generator().manual_seed(1))   # a perfect noise prediction
    assert (out - x0).abs().max() < 1e-4                     # fixed_large added sqrt(1 - abar_9) = 0.044 before


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [10, 7, 50])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_step_matches_diffusers(eta, n, set_alpha_to_one):
    ours = DDIMScheduler(set_alpha_to_one=set_alpha_to_one)
    ref = same_schedule(diffusers.DDIMScheduler(set_alpha_to_one=set_alpha_to_one), ours)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(2)
    x, out, z = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    for t in ours.timesteps.tolist():
        a = ours.step(out, t, x, eta=eta, variance_noise=z)
        b = ref.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        assert close(a, b), f"t={t}: max abs diff {(a - b).abs().max():.3g}"


def test_ddim_eta_one_has_the_ddpm_posterior_statistics():
    """DDIM with eta = 1 is the DDPM ancestral step with the posterior (fixed_small) variance: same mean, same
    spread over many noise draws."""
    ddim, ddpm = DDIMScheduler(clip_sample=False), DDPMScheduler(clip_sample=False, variance_type="fixed_small")
    ddim.set_timesteps(20)
    ddpm.set_timesteps(20)
    t = int(ddim.timesteps[5])
    g = torch.Generator().manual_seed(3)
    x, out = torch.randn(1, 1, 4, 4, generator=g), torch.randn(1, 1, 4, 4, generator=g)
    z = torch.randn(20000, 1, 4, 4, generator=g)
    a = ddim.step(out.expand_as(z), t, x.expand_as(z), eta=1.0, variance_noise=z)
    b = ddpm.step(out.expand_as(z), t, x.expand_as(z), variance_noise=z)
    assert torch.allclose(a.mean(0), b.mean(0), atol=2e-3)
    assert torch.allclose(a.std(0), b.std(0), rtol=1e-3)
    assert torch.allclose(a.std(0), ddpm.variance(t).sqrt().expand(1, 4, 4), rtol=3e-2)


def test_bad_timesteps_are_refused_with_a_clear_message():
    s = DDPMScheduler()
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        s.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="integers"):
        s.add_noise(x, x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="one timestep per sample"):
        s.add_noise(x, x, torch.tensor([0, 1, 2]))
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
        s.step(x, 5, x)
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMScheduler(beta_schedule="quadratic")

"""Training loss, label dropout and the sampling loop's classifier-free guidance convention."""
import pytest
import torch

from invdiff_min.diffusion import drop_labels, lr_at, make_sampler, sample, training_loss, update_ema
from invdiff_min.scheduler import DDIMScheduler, DDPMScheduler


class Recorder(torch.nn.Module):
    """eps(x, t, y) = 0.1 * (y + 1): lets the test read which labels each call saw."""
    null_label = 2

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(y.clone())
        return 0.1 * (y.float() + 1).view(-1, 1, 1, 1).expand_as(x)


def run(scale):
    m = Recorder()
    out = sample(m, DDIMScheduler(), (2, 1, 4, 4), torch.tensor([0, 1]), num_steps=1, guidance_scale=scale,
                 null_label=2, generator=torch.Generator().manual_seed(0))
    return m, out


def test_cfg_scale_one_is_the_plain_conditional_model_and_zero_the_unconditional():
    m1, _ = run(1.0)
    assert len(m1.calls) == 1 and m1.calls[0].tolist() == [0, 1]
    m0, _ = run(0.0)
    assert len(m0.calls) == 1 and m0.calls[0].tolist() == [2, 2]


def test_cfg_combines_branches_as_uncond_plus_scale_times_difference():
    """With one DDIM step from t = T-1 to x0, x0_hat is linear in eps, so the guided eps can be read back."""
    outs = {}
    for s in (0.0, 1.0, 3.0):
        outs[s] = sample(Recorder(), DDIMScheduler(clip_sample=False), (2, 1, 4, 4), torch.tensor([0, 1]), 1,
                         guidance_scale=s, null_label=2, generator=torch.Generator().manual_seed(0))
    # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar): affine in eps, so out(3) = out(0) + 3 (out(1) - out(0))
    assert torch.allclose(outs[3.0], outs[0.0] + 3 * (outs[1.0] - outs[0.0]), atol=1e-4)
    m, _ = run(3.0)
    assert m.calls[0].tolist() == [0, 1, 2, 2]        # one batched call: conditional then null


def test_guidance_interval_guides_only_below_t_max():
    """guidance_t_max: the batched [y; null] call at t < t_max only, one plain conditional call at the others."""
    for t_max, expected in ((None, [4, 4, 4, 4]), (1000, [4, 4, 4, 4]), (500, [2, 2, 4, 4]), (0, [2, 2, 2, 2])):
        m = Recorder()
        sample(m, DDIMScheduler(), (2, 1, 4, 4), torch.tensor([0, 1]), 4, guidance_scale=3.0, null_label=2,
               generator=torch.Generator().manual_seed(0), guidance_t_max=t_max)     # t = 999, 749, 499, 249
        assert [len(c) for c in m.calls] == expected, t_max
        assert all(c[:2].tolist() == [0, 1] for c in m.calls)
    plain, limited = (sample(Recorder(), DDIMScheduler(), (2, 1, 4, 4), torch.tensor([0, 1]), 4, guidance_scale=s,
                             null_label=2, generator=torch.Generator().manual_seed(0), guidance_t_max=t)
                      for s, t in ((1.0, None), (3.0, 0)))
    assert torch.equal(plain, limited)                  # no step below t_max: exactly the plain conditional model
    for bad in (-1, 2.5, "250", True):
        with pytest.raises(ValueError, match="guidance_t_max"):
            sample(Recorder(), DDIMScheduler(), (2, 1, 4, 4), torch.tensor([0, 1]), 1, guidance_scale=3.0,
                   null_label=2, guidance_t_max=bad)


def test_cfg_needs_labels_and_a_null_label():
    with pytest.raises(ValueError, match="null label"):
        sample(Recorder(), DDIMScheduler(), (2, 1, 4, 4), None, 1, guidance_scale=2.0)


def test_label_dropout_is_per_sample():
    y = torch.zeros(10000, dtype=torch.long)
    d = drop_labels(y, 0.1, null_label=5, generator=torch.Generator().manual_seed(0))
    assert 0.08 < float((d == 5).float().mean()) < 0.12
    assert set(d.unique().tolist()) == {0, 5}


def test_training_loss_is_mse_to_the_noise():
    class Zero(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.zeros_like(x)
    x0 = torch.zeros(256, 3, 8, 8)
    loss = training_loss(Zero(), DDPMScheduler(), x0, None, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(1.0, abs=0.02)   # E eps^2 = 1


def test_ema_and_lr_schedule():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        a.weight.fill_(0.0)
        b.weight.fill_(1.0)
    update_ema(a, b, decay=0.9)
    assert torch.allclose(a.weight, torch.full((2, 2), 0.1))
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(99999, 1.0, 10, 100) == pytest.approx(0.1)


def test_sampler_factory_uses_trailing_timesteps():
    s = make_sampler("ddpm")
    s.set_timesteps(10)
    assert int(s.timesteps[0]) == 999 and isinstance(s, DDPMScheduler)
    with pytest.raises(ValueError, match="sampler"):
        make_sampler("euler")

"""Mixed precision (amp.py): what "auto" resolves to, and that bf16 autocast on the CPU keeps every loss and
sample in float32 and close to the float32 run, while fp32 stays bit-exact."""
import pytest
import torch

from invdiff_min import amp
from invdiff_min.config import get_preset
from invdiff_min.diffusion import denoising_loss
from invdiff_min.evaluate import generate
from invdiff_min.guidance import GuidedModel, InvariantGuidance
from invdiff_min.scheduler import DDPMScheduler
from invdiff_min.unet import UNet


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_where_the_hardware_computes_it(monkeypatch, native, expected):
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: native)
    precision, why = amp.resolve("auto", "cpu")
    assert precision == expected and why.startswith("auto")
    assert amp.resolve("auto", "cuda")[0] == "bf16"
    assert amp.resolve("fp32", "cpu") == ("fp32", "requested")
    assert ("emulated" in amp.resolve("bf16", "cpu")[1]) is not native
    with amp.autocast("cpu", "auto"):
        assert torch.is_autocast_enabled("cpu") is native


@pytest.mark.parametrize("precision, message", [("fp16", "needs CUDA"), ("half", "unknown precision")])
def test_precisions_that_cannot_run_are_refused(precision, message):
    with pytest.raises(ValueError, match=message):
        amp.resolve(precision, "cpu")


def models():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    base = UNet(cfg.unet).eval()
    head = InvariantGuidance.small(cfg.unet, (8, 16), 1, (False, False), 4)
    torch.nn.init.normal_(head.net.conv_out.weight, std=0.02)   # a head that adds something
    return base, head.eval()


def test_cpu_bf16_keeps_losses_and_guided_outputs_float32_and_close():
    base, head = models()
    scheduler = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, torch.randn(8, 3, 16, 16, generator=g)
    t, y = torch.randint(0, 1000, (8,), generator=g), torch.randint(0, 2, (8,), generator=g)
    guided = GuidedModel(base, head, strength=2.0)
    with torch.no_grad():
        exact = denoising_loss(guided, scheduler, x0, y, t, eps)
        with amp.autocast("cpu", "fp32"):                        # fp32: no autocast, bit-identical
            assert torch.equal(denoising_loss(guided, scheduler, x0, y, t, eps), exact)
        with amp.autocast("cpu", "bf16"):
            x_t = scheduler.q_sample(x0, eps, t)
            assert guided(x_t, t, y).dtype == torch.float32    # eps_theta + w G summed in float32
            low = denoising_loss(guided, scheduler, x0, y, t, eps)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - exact).abs().max() < 0.05 * exact.abs().max()


def test_cpu_bf16_sampling_gives_float32_images_close_to_fp32():
    base, head = models()
    kwargs = dict(diffusion_kwargs={}, n_per_class=2, num_classes=2, image_shape=(3, 16, 16), num_steps=4, seed=3)
    guided = GuidedModel(base, head, strength=2.0)
    exact, labels = generate(guided, **kwargs)
    assert torch.equal(generate(guided, **kwargs, precision="fp32")[0], exact)
    low, same_labels = generate(guided, **kwargs, precision="bf16")
    assert low.dtype == torch.float32 and torch.equal(labels, same_labels)
    assert 0 <= float(low.min()) and float(low.max()) <= 1 and (low - exact).abs().mean() < 0.05


def test_pipeline_api_samples_in_the_precision_asked_for():
    from invdiff_min import InvDiffPipeline

    base, head = models()
    with pytest.raises(ValueError, match="unknown precision"):
        InvDiffPipeline(base, head, {}, precision="half")
    kwargs = dict(class_labels=[0, 1], num_inference_steps=3)
    exact = InvDiffPipeline(base, head, {}, strength=2.0, precision="fp32")(
        generator=torch.Generator().manual_seed(0), **kwargs).images
    low = InvDiffPipeline(base, head, {}, strength=2.0, precision="bf16")(
        generator=torch.Generator().manual_seed(0), **kwargs).images
    assert low.dtype == exact.dtype == torch.float32 and 0 < (low - exact).abs().mean() < 0.05

"""Our UNet against diffusers' UNet2DModel (random weights, identical configuration), and its guard rails."""
import pytest
import torch

from invdiff_min.unet import UNet, UNetConfig, count_parameters, timestep_embedding

diffusers = pytest.importorskip("diffusers")


def pair(ch=(32, 64, 64), attn=(False, True, False), layers=2, num_classes=2, head_dim=None, **kw):
    cfg = UNetConfig(sample_size=16, block_out_channels=ch, attention_levels=attn, layers_per_block=layers,
                     norm_num_groups=8, num_classes=num_classes, attention_head_dim=head_dim, **kw)
    ref = diffusers.UNet2DModel(
        sample_size=16, block_out_channels=ch, layers_per_block=layers, norm_num_groups=8,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]),
        attention_head_dim=head_dim, num_class_embeds=num_classes + 1 if num_classes else None,
        norm_eps=cfg.norm_eps, downsample_padding=cfg.downsample_padding, flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift, add_attention=cfg.mid_attention)
    ours = UNet(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)   # identical names: loads strictly
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("kw", [
    dict(),                                                   # class-conditional, single-head attention
    dict(num_classes=None, head_dim=16),                      # unconditional, multi-head
    dict(norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1),   # original DDPM style
    dict(attn=(True, False, True), layers=1, mid_attention=False),
])
def test_unet_matches_diffusers_unet2dmodel(kw):
    ours, ref = pair(**kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([0, 1, 2]) if ours.config.num_classes else None
    with torch.no_grad():
        a = ours(x, t, y)
        b = ref(x, t, class_labels=y).sample
    assert a.shape == (3, 3, 16, 16)
    assert (a - b).abs().max() < 1e-5
    assert count_parameters(ours) == count_parameters(ref)


def test_null_label_is_the_default_for_a_conditional_model():
    ours, _ = pair()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 6])
    with torch.no_grad():
        assert torch.equal(ours(x, t), ours(x, t, torch.tensor([2, 2])))


def test_timestep_embedding_layout():
    e = timestep_embedding(torch.tensor([0, 1]), 8, flip_sin_to_cos=False, freq_shift=0)
    assert torch.allclose(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))           # [sin, cos] at t = 0
    e = timestep_embedding(torch.tensor([0]), 8, flip_sin_to_cos=True, freq_shift=0)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))           # [cos, sin]


def test_unet_boundary_check_names_the_problem_and_forward_keeps_shape_asserts():
    """validate.checked_unet_call (what the library's entry points run) names each problem; UNet.forward itself
    only asserts shapes, with no host sync."""
    from invdiff_min.validate import checked_unet_call

    ours, _ = pair()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="divisible by 4"):
        checked_unet_call(ours, torch.randn(2, 3, 18, 18), t)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        checked_unet_call(ours, torch.randn(2, 1, 16, 16), t)
    with pytest.raises(ValueError, match="label out of range"):
        checked_unet_call(ours, x, t, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one timestep per sample"):
        checked_unet_call(ours, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="floating-point"):
        checked_unet_call(ours, x.long(), t)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(block_out_channels=(32, 64), attention_levels=(False,))
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetConfig(block_out_channels=(30, 64), attention_levels=(False, False))
    uncond, _ = pair(num_classes=None)
    with pytest.raises(ValueError, match="unconditional"):
        checked_unet_call(uncond, x, t, torch.tensor([0, 1]))
    with pytest.raises(AssertionError, match="one timestep per sample"):
        ours(x, torch.tensor([1, 2, 3]))
    with pytest.raises(AssertionError, match=r"\(B, 3, H, W\)"):
        ours(torch.randn(2, 1, 16, 16), t)


def test_fused_upsampler_is_nearest_x2_then_conv_as_one_transposed_conv():
    """Upsample2D computes conv3x3(nearest_x2(x)) as one stride-2 transposed conv with folded 4x4 taps
    (fused.py; faster, same function): equal in float64 to rounding, values and gradients, odd sizes included,
    and `fused=False` runs the plain two ops."""
    import torch.nn.functional as F

    from invdiff_min.unet import Upsample2D

    torch.manual_seed(0)
    up = Upsample2D(6).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    fast = up(x)
    plain = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    up.fused = False
    assert torch.equal(up(x), plain)
    up.fused = True
    assert fast.shape == plain.shape == (2, 6, 10, 14)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, [x, up.conv.weight, up.conv.bias], g)
    grads_plain = torch.autograd.grad(plain, [x, up.conv.weight, up.conv.bias], g)
    for a, b in zip(grads_fast, grads_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_unet_config_takes_numpy_numbers_as_plain_ones_and_refuses_strings():
    import json

    import numpy as np
    cfg = UNetConfig(sample_size=np.int64(16), block_out_channels=np.array([32, 64]), num_classes=np.int64(2),
                     attention_levels=np.array([False, True]), norm_eps=np.float32(1e-5), mid_attention=np.bool_(True))
    assert json.loads(json.dumps(cfg.to_dict()))["block_out_channels"] == [32, 64]
    assert type(cfg.sample_size) is int and cfg.attention_levels == (False, True)
    with pytest.raises(ValueError, match="layers_per_block must be a whole number, got '1'"):
        UNetConfig(layers_per_block="1")
    with pytest.raises(ValueError, match="flip_sin_to_cos must be true or false, got 'false'"):
        UNetConfig(flip_sin_to_cos="false")

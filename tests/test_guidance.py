"""Stage C/D: the guidance head, L_e, the guided model and group-balanced batches."""
import pytest
import torch

from invdiff_min.config import get_preset
from invdiff_min.guidance import GroupBatchSampler, GuidedModel, InvariantGuidance, head_size, invariant_loss
from invdiff_min.unet import UNet


def base_and_head(preset="tiny"):
    cfg = get_preset(preset)
    base = UNet(cfg.unet).eval()
    h = cfg.head
    head = InvariantGuidance.small(cfg.unet, h.block_out_channels, h.layers_per_block, h.attention_levels,
                                   h.norm_num_groups)
    return base, head


def test_zero_init_head_leaves_the_base_output_unchanged():
    base, head = base_and_head()
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 200, 500, 999]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        assert torch.equal(GuidedModel(base, head, 1.0)(x, t, y), base(x, t, y))
        assert torch.equal(GuidedModel(base, head, 1.0, mode="mix")(x, t, y) * 2, base(x, t, y))  # official: 0.5 eps


def test_no_gradient_reaches_the_frozen_base():
    base, head = base_and_head()
    torch.nn.init.normal_(head.net.conv_out.weight, std=0.1)
    model = GuidedModel(base, head)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([0, 1])
    model(x, t, y).pow(2).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    assert head.net.conv_out.weight.grad is not None and head.phi.weight.grad is not None


def test_strength_scales_the_head_and_zero_reproduces_the_base():
    base, head = base_and_head()
    torch.nn.init.normal_(head.net.conv_out.weight, std=0.1)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([0, 1])
    with torch.no_grad():
        e0, g = base(x, t, y), head(x, t, y)
        assert torch.equal(GuidedModel(base, head, 0.0)(x, t, y), e0)
        assert torch.allclose(GuidedModel(base, head, 2.5)(x, t, y), e0 + 2.5 * g, atol=1e-6)
        null = torch.full((2,), base.null_label)
        assert torch.equal(GuidedModel(base, head, 2.5)(x, t, null), base(x, t, null))   # no guidance on null


def test_invariant_loss_matches_hand_computation_with_an_empty_group():
    losses = torch.tensor([1.0, 3.0, 2.0, 6.0])
    weights = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0], [0, 0, 1.0]])   # group 1 is empty
    # R = (2, 4); mean 3; population variance 1 -> L_e = 3 + lambda * 1
    le, risks = invariant_loss(losses, weights, lam=10.0)
    assert risks.tolist() == [2.0, 4.0]
    assert le.item() == pytest.approx(13.0)
    soft = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    # R_0 = (0.5 + 1.5 + 6) / 2 = 4;  R_1 = (0.5 + 1.5 + 2) / 2 = 2;  L_e = 3 + 2 * 1
    assert invariant_loss(losses, soft, lam=2.0)[0].item() == pytest.approx(5.0)
    assert invariant_loss(losses, torch.ones(4, 1), lam=5.0)[0].item() == pytest.approx(3.0)  # uniform control
    with pytest.raises(ValueError, match="assignments"):
        invariant_loss(losses, torch.ones(3, 2), 1.0)


def test_head_is_at_most_a_quarter_of_the_base_in_every_preset():
    for preset in ("tiny", "cpu", "gpu"):
        base, head = base_and_head(preset)
        assert head_size(head, base).ratio <= 0.25, preset


def test_balanced_batches_represent_every_group_equally():
    weights = torch.nn.functional.one_hot(torch.tensor([0] * 95 + [1] * 5), 2).float()
    sampler = GroupBatchSampler(weights, batch_size=64, mode="balanced")
    idx = torch.cat([sampler.sample(torch.Generator().manual_seed(s))[0] for s in range(20)])
    share = float((idx >= 95).float().mean())
    assert share == pytest.approx(0.5)
    uniform, slots = GroupBatchSampler(weights, 64, "uniform").sample(torch.Generator().manual_seed(0))
    assert uniform.shape == (64,) and torch.equal(slots, torch.arange(64))
    a, _ = sampler.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, sampler.sample(torch.Generator().manual_seed(3))[0])


def test_balanced_slots_pair_the_groups():
    """Slot j of every group's block is the same position, so groups can share the j-th (t, eps) draw."""
    weights = torch.nn.functional.one_hot(torch.arange(30) % 3, 3).float()
    idx, slots = GroupBatchSampler(weights, batch_size=10, mode="balanced").sample(torch.Generator().manual_seed(1))
    groups = idx % 3
    for g in range(3):
        assert torch.equal(slots[groups == g], torch.arange(int((groups == g).sum())))
    assert sorted(int((groups == g).sum()) for g in range(3)) == [3, 3, 4]


def test_official_mix_head_is_a_copy_of_the_base():
    base, _ = base_and_head()
    head = InvariantGuidance.copy_of(base)
    assert sum(p.numel() for p in head.net.parameters()) + head.phi.weight.numel() == \
        sum(p.numel() for p in base.parameters())
    assert torch.equal(head.net.conv_in.weight, base.conv_in.weight)


def test_head_timesteps_share_zero_is_the_uniform_draw_and_one_the_upper_half():
    from invdiff_min.guidance import head_timesteps
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(head_timesteps(500, 1000, 0.0, g0), torch.randint(0, 1000, (500,), generator=g1))
    assert torch.equal(torch.randn(4, generator=g0), torch.randn(4, generator=g1))   # no extra numbers drawn
    upper = head_timesteps(500, 1000, 1.0, torch.Generator().manual_seed(3))
    assert upper.min() >= 500 and upper.max() <= 999
    half = head_timesteps(20_000, 1000, 0.5, torch.Generator().manual_seed(3))
    assert half.min() >= 0 and half.max() <= 999
    assert 0.73 < (half >= 500).float().mean() < 0.77                 # 0.5 + 0.5 * 0.5 of the draws in the upper half
    assert 0.23 < (half < 500).float().mean() < 0.27


def test_large_t_share_outside_zero_one_is_refused():
    from invdiff_min.config import check_config
    cfg = get_preset("tiny")
    cfg.head.large_t_share = 1.5
    with pytest.raises(ValueError, match=r"head.large_t_share must be a number in \[0, 1\]"):
        check_config(cfg)


# ----- a head told the inferred sub-group (head.condition = "class_group") ---------------------------------
def group_head(group_class=(0, 0, 1, 1, 1)):
    cfg = get_preset("tiny")
    h = cfg.head
    return InvariantGuidance.small(cfg.unet, h.block_out_channels, h.layers_per_block, h.attention_levels,
                                   h.norm_num_groups, list(group_class))


def acting_group_head_and_its_class_head():
    """A head told the sub-group with a non-zero output (Phi' still zero), and the class head of the same weights."""
    head = group_head()
    torch.nn.init.normal_(head.net.conv_out.weight, std=0.1)
    class_head = InvariantGuidance(head.net.config, 2)
    class_head.load_state_dict({k: v for k, v in head.state_dict().items()
                                if not k.startswith(("phi_group", "group_class"))})
    return head, class_head


def test_group_head_starts_as_the_class_head_and_its_base_reads_the_class():
    """Phi'(g) starts at zero: the head told sub-group g computes the class head's G_psi(x, t, Phi(class of g));
    in the guided model the base reads the class of each sub-group label, the null label G stays silent."""
    base, _ = base_and_head()
    head, class_head = acting_group_head_and_its_class_head()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 200, 500, 999])
    g, y = torch.tensor([0, 1, 2, 4]), torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        assert torch.equal(head(x, t, g), class_head(x, t, y))
        guided = GuidedModel(base, head, 2.0)
        assert guided.null_label == 5
        assert torch.allclose(guided(x, t, g), base(x, t, y) + 2.0 * class_head(x, t, y), atol=1e-6)
        null = torch.full((4,), 5)
        assert torch.equal(guided(x, t, null), base(x, t, torch.full((4,), base.null_label)))
        head.phi_group.weight.normal_()                       # once trained, sub-groups of a class differ
        assert not torch.allclose(head(x, t, torch.tensor([2, 3, 4, 2])), head(x, t, torch.tensor([3, 4, 2, 2])))


def test_group_head_draws_each_class_sub_groups_in_equal_numbers_and_reproducibly():
    base, _ = base_and_head()
    guided = GuidedModel(base, group_head(), 2.0)
    y = torch.tensor([1, 0, 2] + [0] * 6 + [1] * 7)        # 2: the null label of a two-class base
    g = guided.labels_for(y, torch.Generator().manual_seed(0))
    assert torch.equal(g, guided.labels_for(y, torch.Generator().manual_seed(0)))
    assert set(g[y == 0].tolist()) == {0, 1} and set(g[y == 1].tolist()) == {2, 3, 4} and g[2] == 5
    assert torch.bincount(g[y == 0]).tolist() == [4, 3] and sorted(torch.bincount(g[y == 1] - 2).tolist()) == [2, 3, 3]
    assert not torch.equal(g, guided.labels_for(y, torch.Generator().manual_seed(1)))      # a random order
    lone = [int(guided.labels_for(torch.tensor([1]), torch.Generator().manual_seed(s))) for s in range(40)]
    assert set(lone) == {2, 3, 4}                     # one image at a time still reaches every sub-group
    assert torch.equal(GuidedModel(base, None, 0.0).labels_for(y), y)      # the base alone: class labels
    with pytest.raises(ValueError, match="class 1 has no sub-group"):
        GuidedModel(base, group_head((0, 0)), 2.0).labels_for(torch.tensor([0, 1]))


@pytest.mark.parametrize("group_class", [(), (0, 2), (-1,), ((0, 1),)])
def test_group_head_refuses_a_sub_group_without_a_class_of_the_base(group_class):
    with pytest.raises(ValueError, match="group_class must list the class"):
        group_head(group_class)


def test_a_group_head_at_zero_phi_prime_samples_the_class_head_images_with_and_without_cfg():
    """Through `generate` (the evaluation's sampler), sub-groups drawn apart from the noise: a head told the
    sub-group whose Phi' is still zero gives the class head's images exactly, at CFG scale 1 and 2 (null mapped)."""
    from invdiff_min.config import DiffusionConfig
    from invdiff_min.evaluate import generate

    base, _ = base_and_head()
    head, class_head = acting_group_head_and_its_class_head()
    how = dict(diffusion_kwargs=DiffusionConfig().scheduler_kwargs(), n_per_class=3, num_classes=2,
               image_shape=(3, 16, 16), num_steps=3, seed=5)
    for scale in (1.0, 2.0):
        ours, labels = generate(GuidedModel(base, head, 2.0), guidance_scale=scale, **how)
        ref, _ = generate(GuidedModel(base, class_head, 2.0), guidance_scale=scale, **how)
        assert labels.tolist() == [0, 0, 0, 1, 1, 1] and torch.equal(ours, ref)
    base_only, _ = generate(GuidedModel(base, None, 0.0), **how)
    assert not torch.equal(ours, base_only)


@pytest.mark.parametrize("grouped", [False, True])
def test_head_outside_cfg_adds_the_unscaled_push_to_the_base_s_class_guidance(grouped):
    """cfg_eps with the head outside: eps_theta(null) + s (eps_theta(y) - eps_theta(null)) + w G_psi(y); inside
    (the default): s scales the push. Sub-group labels: the base reads their class, the head the sub-group."""
    from invdiff_min.diffusion import cfg_eps

    base, head = base_and_head()
    if grouped:
        head = acting_group_head_and_its_class_head()[0]
    torch.nn.init.normal_(head.net.conv_out.weight, std=0.1)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([10, 10, 10])
    y = torch.tensor([1, 4, 0]) if grouped else torch.tensor([0, 1, 1])
    y_class = torch.tensor([0, 1, 0]) if grouped else y
    s, w = 2.5, 1.5
    with torch.no_grad():
        e_c, e_u = base(x, t, y_class), base(x, t, torch.full((3,), base.null_label))
        g = head(x, t, y)
        outside = GuidedModel(base, head, w, head_outside_cfg=True)
        null = torch.full((3,), outside.null_label)
        assert torch.allclose(cfg_eps(outside, x, t, y, null, s), e_u + s * (e_c - e_u) + w * g, atol=1e-5)
        inside = GuidedModel(base, head, w)
        assert torch.allclose(cfg_eps(inside, x, t, y, null, s), e_u + s * (e_c + w * g - e_u), atol=1e-5)
        assert torch.equal(outside(x, t, y), inside(x, t, y))      # without class guidance the two are one model
    with pytest.raises(ValueError, match="additive"):
        GuidedModel(base, head, w, mode="mix", head_outside_cfg=True)


def test_at_scale_0_the_sampler_keeps_the_push_of_a_head_outside_the_guidance():
    """s = 0 is the unconditional model; with the head outside the guidance w G_psi(y) is still added (w means the
    same at every s), so the sampler's s = 0 shortcut (one call on the null label) is taken only with it inside."""
    from invdiff_min.config import DiffusionConfig
    from invdiff_min.diffusion import make_sampler, sample

    base, head = base_and_head()
    torch.nn.init.normal_(head.net.conv_out.weight, std=0.1)
    w, labels = 1.5, torch.tensor([0, 1])
    null = torch.full((2,), base.null_label)

    def push_on_unconditional(x, t, y):          # eps_theta(null) + w G_psi(y), the formula at s = 0
        return base(x, t, null) + w * head(x, t, y)

    def draw(model, scale):
        scheduler = make_sampler("ddim", DiffusionConfig().scheduler_kwargs())
        return sample(model, scheduler, (2, 3, 16, 16), labels, 3, guidance_scale=scale, null_label=base.null_label,
                      generator=torch.Generator().manual_seed(0))

    outside = draw(GuidedModel(base, head, w, head_outside_cfg=True), 0.0)
    assert (outside - draw(push_on_unconditional, 1.0)).abs().max() < 1e-4      # batched vs separate calls
    assert torch.equal(draw(GuidedModel(base, head, w), 0.0), draw(base, 0.0))        # inside: the base on null


def test_the_api_draws_new_sub_groups_as_its_generator_is_used_and_leaves_the_noise_alone():
    from invdiff_min.inference import follower

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([1] * 20)
    guided = GuidedModel(base_and_head()[0], group_head(), 2.0)
    first = guided.labels_for(y, follower(g))
    state = g.get_state()
    assert torch.equal(first, guided.labels_for(y, follower(g))) and torch.equal(g.get_state(), state)
    torch.randn(3, generator=g)                                 # the noise of a call
    assert not torch.equal(first, guided.labels_for(y, follower(g)))

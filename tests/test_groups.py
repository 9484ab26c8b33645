"""Stage B: per-sample losses and group inference."""
import pytest
import torch

from invdiff_min.groups import (auto_t_window, class_label_topk_groups, class_margin_groups, class_topk_groups,
                                group_report, group_risks,
                                normalize_by_t, official_groups, oracle_groups, per_sample_losses, uniform_groups)
from invdiff_min.scheduler import DDPMScheduler


def planted_losses(n=2000, minority=0.05, seed=0):
    """Per-sample losses where a hidden 5% minority of each class is denoised worse, and class 1 is harder
    overall (a class effect that must not be mistaken for bias)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    conflicting = torch.rand(n, generator=g) < minority
    losses = 1.0 + 0.1 * torch.randn(n, generator=g) + 0.5 * conflicting + 0.6 * labels
    return losses, labels, conflicting


def test_class_topk_recovers_planted_minority():
    losses, labels, conflicting = planted_losses()
    w = class_topk_groups(losses, labels, 2, top_fraction=0.05)
    assert w.shape == (2000, 4) and torch.equal(w.sum(1), torch.ones(2000))
    high = w[:, 1].bool() | w[:, 3].bool()
    precision = float(conflicting[high].float().mean())
    assert precision > 0.9, precision
    rep = group_report(w, losses, labels, conflicting, labels * 2 + conflicting.long())
    assert rep.loss_auc > 0.7 and min(rep.loss_auc_per_class) > 0.95   # the class effect hides it globally


def test_official_grouper_with_within_class_normalisation_enriches_the_minority():
    losses, labels, conflicting = planted_losses(n=1000)
    w = official_groups(losses, num_groups=4, steps=300, labels=labels, seed=0)
    assert torch.allclose(w.sum(1), torch.ones(1000), atol=1e-5) and (w >= 0).all()
    risks = group_risks(w, losses / torch.stack([losses[labels == c].mean() for c in (0, 1)])[labels])
    top = int(risks.argmax())
    # the highest-risk group holds the minority well above its 5% base rate (soft and large: 0.19 here)
    share = float((w[:, top] * conflicting).sum() / w[:, top].sum())
    assert share > 0.12, share


def test_official_grouper_rows_stay_on_the_simplex_under_a_large_step():
    """A large learning rate can push a whole row below 0; the official code then divides 0 by 0 (NaN rows)."""
    losses = torch.rand(2000, generator=torch.Generator().manual_seed(0)) + 0.5
    w = official_groups(losses, num_groups=16, steps=100, lr=0.3, seed=0)
    assert torch.isfinite(w).all() and (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(2000), atol=1e-5)


def official_loop(l, group_num, w_nz, steps, seed):
    """src/group/train_group.py's optimize_weights, step by step (CPU, a seeded generator for the U(0, 1) start)."""
    l = l.reshape(-1, 1)
    w = torch.rand((l.size(0), group_num), generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_per_group = l * w
        mean_loss_per_group = loss_per_group.sum(0) / w.sum(0)
        loss = -torch.std(mean_loss_per_group) - w_nz * torch.min(loss_per_group)
        loss.backward()
        optimizer.step()
        w.data = torch.max(w.data, torch.tensor(0.0))
        w.data = w.data / torch.sum(w.data, dim=1, keepdim=True)
    return w.detach()


@pytest.mark.parametrize("w_nz", [0.0, 3.0])
def test_official_grouper_is_the_official_projected_ascent(w_nz):
    losses, _, _ = planted_losses(n=300)
    ours = official_groups(losses, num_groups=4, steps=100, w_nz=w_nz, seed=3)
    assert torch.allclose(ours, official_loop(losses, 4, w_nz, 100, seed=3), atol=1e-6)


def test_official_grouper_is_deterministic_and_hard_on_request():
    losses, labels, _ = planted_losses(n=200)
    a = official_groups(losses, num_groups=3, steps=20, seed=1)
    b = official_groups(losses, num_groups=3, steps=20, seed=1)
    assert torch.equal(a, b)
    h = official_groups(losses, num_groups=3, steps=20, seed=1, hard=True)
    assert torch.equal(h.sum(1), torch.ones(200)) and set(h.unique().tolist()) <= {0.0, 1.0}


def test_oracle_and_uniform_groups():
    labels, bias = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    assert oracle_groups(labels, bias, 2).argmax(1).tolist() == [0, 1, 2, 3]
    assert uniform_groups(3).shape == (3, 1)


def test_normalize_by_t_removes_the_t_dependence():
    ts = torch.randint(0, 1000, (500, 4))
    losses = (1 + ts.float() / 100) * torch.ones(500, 4)       # loss grows with t, nothing per-sample
    norm = normalize_by_t(losses, ts, num_bins=1000)
    assert torch.allclose(norm, torch.ones_like(norm), atol=1e-5)


class _Model(torch.nn.Module):
    """A fake eps-predictor: predicts 0, so the loss is ||eps||^2 (x0 target: ||x0||^2)."""
    def forward(self, x, t, y):
        return torch.zeros_like(x)


def test_per_sample_losses_are_deterministic_and_use_the_requested_target():
    sched = DDPMScheduler()
    images, labels = torch.rand(10, 3, 4, 4), torch.zeros(10, dtype=torch.long)
    a = per_sample_losses(_Model(), sched, images, labels, 3, (100, 200), normalize_per_t=False, batch_size=4)
    b = per_sample_losses(_Model(), sched, images, labels, 3, (100, 200), normalize_per_t=False, batch_size=4)
    assert torch.equal(a, b) and a.shape == (10,)
    x0 = per_sample_losses(_Model(), sched, images, labels, 1, (0, 1000), normalize_per_t=False, target="x0")
    assert torch.allclose(x0, (images * 2 - 1).pow(2).flatten(1).mean(1))
    with pytest.raises(ValueError, match="t_window"):
        per_sample_losses(_Model(), sched, images, labels, 1, (500, 1500))


class _LabelHurts(torch.nn.Module):
    """Predicts 0 under the null label; under a real label adds an offset of 0.5 to the samples flagged in
    `mask`, and only for t in [600, 900): the label hurts them there. (Called on [batch, batch].)"""
    null_label = 2

    def forward(self, x, t, y):
        flagged = self.mask.repeat(len(x) // len(self.mask))
        hurt = ((y != 2) & (t >= 600) & (t < 900)).float() * flagged
        return torch.zeros_like(x) + 0.5 * hurt.view(-1, 1, 1, 1)


def test_null_reference_ratio_and_label_free_window():
    sched = DDPMScheduler()
    images, labels = torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)   # 768 pixels: a steady ratio
    model = _LabelHurts()
    model.mask = torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0])
    ratio = per_sample_losses(model, sched, images, labels, 8, (600, 900), normalize_per_t=False, reference="null",
                              batch_size=8)
    assert (ratio[model.mask.bool()] > 1.1).all() and torch.allclose(ratio[~model.mask.bool()], torch.ones(6))
    model.mask = torch.ones(8)
    window, scores = auto_t_window(model, sched, images, labels, width=300, stride=100, num_draws=2, batch_size=8)
    assert window == (600, 900) and scores[(600, 900)] > scores[(500, 800)] > scores[(0, 300)] == 0.0
    short = DDPMScheduler(num_train_timesteps=200)                # fewer timesteps than the window is wide
    window, scores = auto_t_window(model, short, images, labels, width=300, stride=100, num_draws=1, batch_size=8)
    assert window == (0, 200) and list(scores) == [(0, 200)]
    with pytest.raises(ValueError, match="null label"):
        per_sample_losses(_Model(), sched, images, labels, 1, (0, 10), reference="null")


class _ExpectsValue(torch.nn.Module):
    """A 3-class stand-in whose label k "expects" attribute value k: under label k it is off by 0.1 for the
    samples whose hidden value is k and by 0.5 elsewhere; under the null label it is off by
    0.25 everywhere. (Needs the eps of the draw, so it reads it from x_t: x0 is zero, x_t = sqrt(1-abar) eps.)"""
    null_label = 3

    def __init__(self, value, scheduler):
        super().__init__()
        self.value, self.scheduler = value, scheduler

    def forward(self, x, t, y):
        eps = x / (1 - self.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        value = self.value.repeat(len(x) // len(self.value))
        off = torch.where(y == self.null_label, 0.25, torch.where(y == value, 0.1, 0.5))
        return eps + off.view(-1, 1, 1, 1)


def test_label_profile_names_the_label_each_sample_goes_with():
    from invdiff_min.groups import label_profile, loss_draws

    sched = DDPMScheduler()
    value = torch.tensor([0, 1, 2, 2, 1, 0])
    images = torch.full((6, 3, 4, 4), 0.5)                      # x0 = 0 in the model's range
    model = _ExpectsValue(value, sched)
    p = label_profile(model, sched, images, 3, num_draws=2, t_window=(100, 900), batch_size=6, seed=3)
    assert p.shape == (6, 3) and torch.equal(p.argmin(1), value)
    # off by 0.5 against 0.25: log(0.25 / 0.0625) = log 4 for every wrong label
    wrong = torch.ones(6, 3, dtype=torch.bool)
    wrong[torch.arange(6), value] = False
    assert torch.allclose(p[wrong], torch.full((12,), 4.0).log())
    # its column for a sample's own label is the log of loss_draws' null ratio, on the same draws
    labels = torch.tensor([1, 1, 0, 2, 2, 1])
    ratios, _ = loss_draws(model, sched, images, labels, 2, (100, 900), batch_size=6, seed=3, reference="null")
    assert torch.allclose(p[torch.arange(6), labels], ratios.clamp(min=1e-12).log().mean(1), atol=1e-5)


def planted_k3(n=3000, seed=0):
    """3 classes, 3 attribute values, value c aligned with class c 90% of the time and the 10% conflicting
    spread over the other two; the conflicting samples have high loss, and a profile naming their value
    (with noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    value = labels.clone()
    flip = torch.rand(n, generator=g) < 0.1
    value[flip] = (labels[flip] + 1 + (torch.rand(int(flip.sum()), generator=g) < 0.5).long()) % 3
    losses = 1.0 + 0.1 * torch.randn(n, generator=g) + 0.5 * flip
    profile = torch.nn.functional.one_hot(value, 3).float() * -1.0 + 0.2 * torch.randn(n, 3, generator=g)
    return losses, labels, value, profile


def test_class_topk_splits_each_high_loss_group_by_attribute_value():
    losses, labels, value, profile = planted_k3()
    w = class_topk_groups(losses, labels, 3, top_fraction=0.05, profile=profile)
    assert w.shape == (3000, 9) and torch.equal(w.sum(1), torch.ones(3000))
    group = w.argmax(1)
    for c in range(3):
        others = [j for j in range(3) if j != c]
        for j, k in enumerate(others):       # sub-group c K + 1 + j holds the high-loss samples of value k
            members = value[group == 3 * c + 1 + j]
            assert len(members) > 10 and float((members == k).float().mean()) > 0.95
    unsplit = class_topk_groups(losses, labels, 3, top_fraction=0.05)
    assert unsplit.shape == (3000, 6)
    high = unsplit[:, 1::2].sum(1).bool()                       # the same samples are "high loss" either way
    assert torch.equal(high, (group % 3) != 0)


def test_class_topk_profile_changes_nothing_with_two_classes_and_merges_small_subgroups():
    losses, labels, conflicting = planted_losses()
    profile = torch.randn(2000, 2)
    assert torch.equal(class_topk_groups(losses, labels, 2, 0.05, profile), class_topk_groups(losses, labels, 2, 0.05))
    losses, labels, value, profile = planted_k3()
    profile[:, 2] += 5.0 * (labels == 0)                          # class 0: label 2 explains none of them ...
    few = ((labels == 0) & (value == 2)).nonzero().squeeze(1)[:3]
    profile[few, 2], losses[few] = -10.0, 10.0                    # ... but these three: too few for a group
    w = class_topk_groups(losses, labels, 3, 0.05, profile, min_subgroup=0.2)
    assert int(w[:, 2].sum()) == 0 and int(w[:, 1].sum()) == round(0.05 * 1000)   # one sub-group for class 0
    assert int(w[:, 4].sum()) > 10 and int(w[:, 5].sum()) > 10    # the other classes keep both


def test_class_margin_groups_take_the_samples_another_label_explains_better_and_split_them():
    losses, labels, value, profile = planted_k3()
    w = class_margin_groups(labels, profile)
    assert w.shape == (3000, 9) and torch.equal(w.sum(1), torch.ones(3000))
    group = w.argmax(1)
    assert torch.equal(group // 3, labels)                      # groups never mix classes
    high = group % 3 != 0
    assert float((high == (value != labels)).float().mean()) > 0.99   # the margin finds the conflicting samples
    for c in range(3):
        for j, k in enumerate(j for j in range(3) if j != c):
            members = value[group == 3 * c + 1 + j]
            assert len(members) > 30 and float((members == k).float().mean()) > 0.95
    # a class whose profile never prefers another label keeps a single group; a small sub-group is merged
    profile[labels == 0, 0] = -5.0
    few = ((labels == 1) & (value == 2)).nonzero().squeeze(1)
    profile[few[5:], 1] = -5.0             # class 1 on value 2: all but five are explained best by their own label
    group = class_margin_groups(labels, profile, min_subgroup=0.2).argmax(1)
    assert int((group[labels == 0] != 0).sum()) == 0
    assert int((group == 5).sum()) == 0 and int((group == 4).sum()) > 30      # the five joined label 0's group
    assert torch.equal(group[few[:5]], torch.full((5,), 4))


def test_class_label_topk_gives_every_value_its_group_when_one_value_has_lower_losses():
    """The top 5% of a class by loss can hold too few samples of a value whose conflicting samples are denoised
    less badly than another's (class_topk then gives it no group); split by the profile first, each value gets
    top_fraction / (K - 1) of the class's samples."""
    losses, labels, value, profile = planted_k3()
    quieter = (value == (labels + 2) % 3) & (value != labels)        # each class's second minority value
    losses[quieter] -= 0.25                                          # still above the majority, below the other
    default = class_topk_groups(losses, labels, 3, 0.05, profile).argmax(1)
    position = [[j for j in range(3) if j != c].index((c + 2) % 3) for c in range(3)]
    assert all(int((default == 3 * c + 1 + position[c]).sum()) == 0 for c in range(3))   # class_topk: no group
    w = class_label_topk_groups(losses, labels, profile, top_fraction=0.05)
    assert w.shape == (3000, 9) and torch.equal(w.sum(1), torch.ones(3000))
    group = w.argmax(1)
    assert torch.equal(group // 3, labels)                           # groups never mix classes
    for c in range(3):
        for j, k in enumerate(j for j in range(3) if j != c):
            members = value[group == 3 * c + 1 + j]
            assert len(members) == round(0.05 * 1000 / 2) and float((members == k).float().mean()) > 0.8
    two = planted_losses()
    assert torch.equal(class_label_topk_groups(two[0], two[1], torch.randn(2000, 2), 0.05),
                       class_topk_groups(two[0], two[1], 2, 0.05))  # two classes: exactly the default groups


def test_condition_groups_are_the_class_group_pairs_numbered_class_major():
    """The sub-groups a head is told lie within one class: groups spanning classes are split by class, empty
    pairs dropped, numbering class-major; the class top-k groups stay as they are."""
    from invdiff_min.groups import condition_groups

    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    w = torch.tensor([[1, 0, 0], [0, 0, 1], [0.2, 0.7, 0.1], [0.6, 0.4, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]])
    group_of, group_class = condition_groups(w, labels)
    # pairs: (0, 0) (0, 1) (0, 2) | (1, 0) (1, 2)
    assert group_of.tolist() == [0, 2, 1, 3, 3, 4, 4] and group_class.tolist() == [0, 0, 0, 1, 1]
    topk = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 2, 3, 3]), 4).float()
    group_of, group_class = condition_groups(topk, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert group_of.tolist() == [0, 0, 1, 2, 3, 3] and group_class.tolist() == [0, 0, 1, 1]

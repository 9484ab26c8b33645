"""Stage B of InvDiff: per-sample losses of the frozen biased model, and bias-annotation inference.

In the paper (arXiv 2412.08480, Fig. 1) this is "potential bias annotation inference", the "maximize L_e"
half of its max-min game: the groups are chosen so that the group risks R_g differ as much as possible, and
stage C (guidance.py) then minimises L_e over them. Official code: src/group/train_group.py.

1. Per-sample loss (the signal). Under the frozen base eps_theta, for each training sample i,
       l_i = (1/M) sum_m  || eps_theta(x_t, t_m, y_i) - eps_m ||^2 / || eps_theta(x_t, t_m, null) - eps_m ||^2
   with x_t = sqrt(abar_t) x0_i + sqrt(1 - abar_t) eps_m and t_m drawn from a window [lo, hi).
   Bias-conflicting (minority) samples are denoised worse: given its label, the model "expects" the majority
   attribute. Dividing by the loss of the same model under the null label (`reference="null"`, the pipeline's
   default through LossConfig) cancels what makes a sample hard regardless of its label (an unusual size or
   position), which otherwise fills the high-loss tail; the plain loss (`reference="none"`, the default of the
   functions here) is the paper's. The raw loss depends mostly on t, so it can be divided by the mean loss at
   its t (`normalize_per_t`); M draws are averaged. The official code uses M = 1, t ~ U{0..T-1}, no
   normalisation, and compares the prediction with x0 instead of eps (`target="x0"`); all of that is
   available as options.

2. Group inference ("maximise L_e" over the assignment). A soft assignment W (N x G, rows on the simplex)
   is chosen to maximise the spread of the group risks R_g = sum_i W_ig l_i / sum_i W_ig.
   * `official_groups`: the official code's optimiser: W free, U(0, 1) init, Adam (lr 0.01, 500 steps) on
     -std_g(R_g) - w_nz min_{i,g}(W_ig l_i), after every step W projected back (W >= 0, rows sum to 1).
   * `class_topk_groups` (our default): the same objective solved exactly under a size constraint, within
     each class: for a fixed group size k, the split of a class into two groups that maximises
     R_high - R_low is the k highest-loss samples against the rest. Classes are kept apart so that one
     class being harder to denoise does not masquerade as bias. Gives 2 * num_classes hard groups.
   * `class_margin_groups` (an option for K > 2): the samples another label explains better than their own,
     split by that label; no size constraint.
   * `class_label_topk_groups` (an option for K > 2): each class split by the label that explains a sample best
     among the others, then the highest losses of each part (K - 1 high-loss sub-groups of equal size).
   * `oracle_groups`: the hidden (y, b) cells: the upper bound, never label-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import to_model_range
from .diffusion import denoising_loss
from .metrics import auroc, normalized_mutual_info
from .progress import progress_bar
from .scheduler import _NoiseSchedule


# ----- 1. per-sample losses --------------------------------------------------------------------------------
@torch.no_grad()
def loss_draws(model, scheduler: _NoiseSchedule, images: torch.Tensor, labels: torch.Tensor, num_draws: int,
               t_window: tuple[int, int], target: str = "eps", batch_size: int = 500, seed: int = 0,
               device: torch.device | str = "cpu", progress: bool = False,
               reference: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-draw losses. images (N, C, H, W) in [0, 1]. Returns (losses, t), both (N, M).

    reference="none": the loss ||eps_theta(x_t, t, y) - eps||^2 itself.
    reference="null": its ratio to the loss of the same model, same x_t, under the null label,
        ||eps_theta(x_t, t, y) - eps||^2 / ||eps_theta(x_t, t, null) - eps||^2,
    i.e. how much the class condition hurts. A sample that is merely hard (a rare position or size) is hard
    with or without its label and scores about 1; a bias-conflicting sample is hurt by its label, because
    the label pulls the prediction toward the majority attribute, and scores above 1.
    Deterministic given `seed`: t and eps are drawn on the CPU per (draw, batch).
    deviation (paper and official code): they score one plain loss per sample; M draws in a t window, and the
    ratio to the null-label loss, are this project's (measured: AUROC 0.43 for the official recipe, 1.00 here)."""
    lo, hi = t_window
    if not 0 <= lo < hi <= scheduler.num_train_timesteps:
        raise ValueError(f"t_window must satisfy 0 <= lo < hi <= {scheduler.num_train_timesteps}, got {t_window}")
    if target not in ("eps", "x0"):
        raise ValueError(f"target must be 'eps' (the paper) or 'x0' (the official code), got {target!r}")
    if reference not in ("none", "null"):
        raise ValueError(f"reference must be 'none' or 'null', got {reference!r}")
    null_label = getattr(model, "null_label", None)
    if reference == "null" and null_label is None:
        raise ValueError("reference='null' needs a class-conditional model with a null label")
    n = len(images)
    losses = torch.empty(n, num_draws)
    ts = torch.empty(n, num_draws, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    n_batches = (n + batch_size - 1) // batch_size
    for k in progress_bar("B. per-sample losses", 0, num_draws * n_batches, progress):
        m, start = divmod(k, n_batches)                  # draws m, then batches: the order the draws are made in
        start *= batch_size
        sl = slice(start, start + batch_size)
        x0 = to_model_range(images[sl])
        t = torch.randint(lo, hi, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x0, t, eps, y = x0.to(device), t.to(device), eps.to(device), labels[sl].to(device)
        if reference == "null":   # one batched call on [y, null]: l(y) / l(null) on the same x_t
            loss_y, loss_null = denoising_loss(model, scheduler, torch.cat([x0, x0]),
                                               torch.cat([y, torch.full_like(y, null_label)]),
                                               torch.cat([t, t]), torch.cat([eps, eps]), target).chunk(2)
            loss = loss_y / loss_null.clamp(min=1e-12)
        else:
            loss = denoising_loss(model, scheduler, x0, y, t, eps, target)
        losses[sl, m] = loss.cpu()
        ts[sl, m] = t.cpu()
    return losses, ts


def normalize_by_t(losses: torch.Tensor, ts: torch.Tensor, num_bins: int = 50) -> torch.Tensor:
    """Divide each draw's loss by the mean loss of all draws whose t falls in the same bin of the window
    (bins of equal width; `num_bins` keeps each mean estimated from many draws).  (N, M) -> (N, M)."""
    lo, hi = int(ts.min()), int(ts.max()) + 1
    width = max(1, -(-(hi - lo) // num_bins))
    bins = ((ts - lo) // width).flatten()
    sums = torch.zeros(int(bins.max()) + 1).index_add_(0, bins, losses.flatten().float())
    counts = torch.zeros_like(sums).index_add_(0, bins, torch.ones_like(losses.flatten()))
    mean_at_t = sums / counts.clamp(min=1)
    return losses / mean_at_t[bins].view_as(losses).clamp(min=1e-12)


def per_sample_losses(model, scheduler, images, labels, num_draws: int, t_window: tuple[int, int],
                      normalize_per_t: bool = True, target: str = "eps", batch_size: int = 500, seed: int = 0,
                      device="cpu", progress: bool = False, reference: str = "none") -> torch.Tensor:
    """l_i of the module docstring: (N,) float32."""
    losses, ts = loss_draws(model, scheduler, images, labels, num_draws, t_window, target, batch_size, seed,
                            device, progress, reference)
    if normalize_per_t:
        losses = normalize_by_t(losses, ts)
    return losses.mean(1)


def auto_t_window(model, scheduler, images, labels, width: int = 300, stride: int = 100, num_draws: int = 4,
                  max_samples: int = 400, batch_size: int = 500, seed: int = 0, device="cpu",
                  progress: bool = False) -> tuple[tuple[int, int], dict]:
    """Choose the t window without bias labels: the window where the class label changes the model's
    denoising loss the most, E_i,m |log(l(y_i) / l(null))| over a subset of `max_samples` samples.
    That is where the model uses its condition to decide the image's coarse content (layout, background),
    which is where a spurious attribute tied to the class is decided; at small t the image decides and the
    label hardly matters. Returns ((lo, hi), {window: label effect}). With fewer than `width` timesteps the one
    window is all of them."""
    T = scheduler.num_train_timesteps
    width = min(width, T)
    stride = max(1, min(stride, width))
    g = torch.Generator().manual_seed(seed)
    sub = torch.randperm(len(images), generator=g)[:max_samples]
    imgs, labs = images[sub], labels[sub]
    scores = {}
    starts = list(range(0, T - width + 1, stride))
    for i in progress_bar("B. choosing the t window", 0, len(starts), progress):
        lo = starts[i]
        ratios, _ = loss_draws(model, scheduler, imgs, labs, num_draws, (lo, lo + width), "eps", batch_size,
                               seed + 1 + i, device, reference="null")
        scores[(lo, lo + width)] = float(ratios.log().abs().mean())
    best = max(scores, key=scores.get)
    return best, scores


@torch.no_grad()
def label_profile(model, scheduler: _NoiseSchedule, images: torch.Tensor, num_classes: int, num_draws: int,
                  t_window: tuple[int, int], batch_size: int = 500, seed: int = 0, device="cpu",
                  progress: bool = False) -> torch.Tensor:
    """How well each class label explains each sample, relative to no label, in the t window:
        P_ik = (1/M) sum_m log( ||eps_theta(x_t, t_m, k) - eps_m||^2 / ||eps_theta(x_t, t_m, null) - eps_m||^2 )
    with the same x_t for every label k (paired draws).  images (N, C, H, W) in [0, 1] -> P (N, K) float32.
    P_i,y_i is the log of the ratio loss above (one draw of it). A bias-conflicting sample of class c whose
    attribute is the one label k goes with is explained better by k than by the other wrong labels: its
    attribute is what label k "expects". `class_topk_groups` splits a class's high-loss group by that label.
    deviation (paper, official code): not in either; their groups come from one loss per sample."""
    null_label = getattr(model, "null_label", None)
    if null_label is None:
        raise ValueError("label_profile needs a class-conditional model with a null label")
    lo, hi = t_window
    n = len(images)
    profile = torch.zeros(n, num_classes)
    g = torch.Generator().manual_seed(seed)
    n_batches = (n + batch_size - 1) // batch_size
    for step in progress_bar("B. label profile", 0, num_draws * n_batches, progress):
        start = (step % n_batches) * batch_size
        sl = slice(start, start + batch_size)
        x0 = to_model_range(images[sl])
        t = torch.randint(lo, hi, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x0, t, eps = x0.to(device), t.to(device), eps.to(device)
        null = denoising_loss(model, scheduler, x0, torch.full_like(t, null_label), t, eps).clamp(min=1e-12)
        for k in range(num_classes):
            loss_k = denoising_loss(model, scheduler, x0, torch.full_like(t, k), t, eps)
            profile[sl, k] += (loss_k.clamp(min=1e-12) / null).log().cpu() / num_draws
    return profile


# ----- 2. group inference ----------------------------------------------------------------------------------
def group_risks(weights: torch.Tensor, losses: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """R_g = sum_i W_ig l_i / sum_i W_ig for every group.  weights (N, G), losses (N,) -> (G,)."""
    return (weights * losses[:, None]).sum(0) / weights.sum(0).clamp(min=eps)


def within_class_normalize(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """l_i / mean_{j in class(i)} l_j, so that a harder class does not look like a bias."""
    out = losses.clone().float()
    for c in labels.unique():
        sel = labels == c
        out[sel] = losses[sel] / losses[sel].mean().clamp(min=1e-12)
    return out


def official_groups(losses: torch.Tensor, num_groups: int = 8, steps: int = 500, lr: float = 0.01,
                    w_nz: float = 0.0, restarts: int = 1, seed: int = 0, labels: torch.Tensor | None = None,
                    hard: bool = False) -> torch.Tensor:
    """The official code's grouper, projected gradient ascent on a free W (N, G): each step one Adam step on
        -std_g(R_g) - w_nz min_{i,g} W_ig l_i,   R_g = sum_i W_ig l_i / sum_i W_ig   (computed on W itself),
    then W projected back: W <- max(W, 0), rows renormalised to sum to 1. With `labels`, losses are first
    normalised within each class. With `restarts` > 1 the run with the largest final spread is kept. Returns W
    (N, G), rows summing to 1."""
    if labels is not None:
        losses = within_class_normalize(losses, labels)
    losses = losses.float()
    best, best_spread = None, -float("inf")
    for r in range(restarts):
        g = torch.Generator().manual_seed(seed + r)
        w = torch.rand(len(losses), num_groups, generator=g).requires_grad_(True)   # U(0, 1), as official
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            objective = -group_risks(w, losses).std() - w_nz * (w * losses[:, None]).min()
            opt.zero_grad()
            objective.backward()
            opt.step()
            with torch.no_grad():                               # the projection, after every step (official)
                w.clamp_(min=0)
                sums = w.sum(1, keepdim=True)
                # deviation (official: 0 / 0 = NaN): a row a large step pushed wholly below 0 restarts uniform
                w.copy_(torch.where(sums > 0, w / sums.clamp(min=1e-12), 1.0 / num_groups))
        w = w.detach()
        spread = float(group_risks(w, losses).std())
        if spread > best_spread:
            best, best_spread = w, spread
    return to_hard(best) if hard else best


def class_topk_groups(losses: torch.Tensor, labels: torch.Tensor, num_classes: int, top_fraction: float = 0.05,
                      profile: torch.Tensor | None = None, min_subgroup: float = 0.2) -> torch.Tensor:
    """Hard groups: the top `top_fraction` losses of each class c ("high loss") against the rest of c.
    Without `profile`: one-hot W (N, 2 * num_classes), group 2c = the rest, 2c + 1 = the high-loss samples.
    With `profile` (N, K), P of `label_profile`, for K > 2 classes: the high-loss samples of c are split by the
    other label that explains each best (`split_by_label`). With a K-valued attribute, each minority value of a
    class then has its own group, and balancing over the groups asks for each value, not for "anything but the
    majority". W (N, K * num_classes): column c K = the rest of c, c K + j = its high-loss samples best
    explained by the j-th label other than c (2 classes: the same groups as without a profile).
    deviation (official: Adam on a soft W over G = 8 groups mixed across classes, `official_groups`): the same
    objective solved exactly within each class; the official grouper's groups reach NMI 0.09 here (README)."""
    if not 0 < top_fraction < 1:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction}")
    per_class = 2 if profile is None else num_classes
    group = torch.empty(len(losses), dtype=torch.long)
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        k = max(1, int(round(top_fraction * len(idx))))
        high = idx[losses[idx].argsort(descending=True)[:k]]
        group[idx] = per_class * c
        group[high] = per_class * c + 1 + (0 if profile is None else split_by_label(profile[high], c, min_subgroup))
    return torch.nn.functional.one_hot(group, per_class * num_classes).float()


def class_label_topk_groups(losses: torch.Tensor, labels: torch.Tensor, profile: torch.Tensor,
                            top_fraction: float = 0.05) -> torch.Tensor:
    """Hard groups for a K-valued attribute: each class c is first split by the other label that explains each
    sample best (argmin_{k != c} P_ik of `label_profile`), then the top `top_fraction / (K - 1)` of the class's
    samples by loss are taken from each part. K - 1 high-loss sub-groups of equal size per class, so a value whose
    minority samples have lower losses than another's still gets its group (with `class_topk_groups` the top
    `top_fraction` of the class may hold too few of them). profile (N, K) -> W (N, K * K), columns as in
    `class_topk_groups` with a profile; 2 classes: exactly its groups.
    deviation (paper, official code): neither; an option measured for K > 2 (docs/results/kvalued)."""
    if not 0 < top_fraction < 1:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction}")
    num_classes = profile.shape[1]
    group = labels * num_classes                                                # every sample: the rest of c
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        others = [j for j in range(num_classes) if j != c]
        part = profile[idx][:, others].argmin(1)                                # (n_c,) best other label's position
        k = max(1, int(round(top_fraction * len(idx) / len(others))))
        for j in range(len(others)):
            members = idx[part == j]
            high = members[losses[members].argsort(descending=True)[:k]]
            group[high] = num_classes * c + 1 + j
    return torch.nn.functional.one_hot(group, num_classes * num_classes).float()


def class_margin_groups(labels: torch.Tensor, profile: torch.Tensor, min_subgroup: float = 0.2) -> torch.Tensor:
    """Hard groups from the label profile alone (no loss ranking, no `top_fraction`): a sample of class c is
    "high" when another label explains it better than its own, P_ic > min_{k != c} P_ik (the base model, used
    as a diffusion classifier, would give it another class), and the high samples of c are split by that
    label (`split_by_label`). profile (N, K) -> W (N, K * K), columns as in `class_topk_groups` with a profile.
    The number of "high" samples per class comes from the data; a class with none keeps one group.
    deviation (paper, official code): neither; an option measured for K > 2 (docs/results/kvalued)."""
    num_classes = profile.shape[1]
    group = labels * num_classes                                                # every sample: the rest of c
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        others = torch.tensor([j for j in range(num_classes) if j != c])
        high = idx[profile[idx, c] > profile[idx][:, others].min(1).values]     # margin P_ic - min_k P_ik > 0
        if len(high):
            group[high] = num_classes * c + 1 + split_by_label(profile[high], c, min_subgroup)
    return torch.nn.functional.one_hot(group, num_classes * num_classes).float()


def split_by_label(profile: torch.Tensor, c: int, min_subgroup: float) -> torch.Tensor:
    """Split the high samples of class c by the other label that explains each best, argmin_{k != c} P_ik:
    one sub-group per other label that takes at least `min_subgroup` of them (chosen label-free: the number of
    sub-groups comes from the data), the rest going to their best label among those kept.
    profile (n, K) rows of the high samples -> (n,) position j of the sub-group among the K - 1 other labels."""
    others = [j for j in range(profile.shape[1]) if j != c]
    p = profile[:, others]                                                      # (n, K - 1)
    counts = torch.bincount(p.argmin(1), minlength=len(others))
    kept = counts >= min_subgroup * len(p)
    kept[counts.argmax()] = True                                                # at least one sub-group
    return p.masked_fill(~kept, float("inf")).argmin(1)


def oracle_groups(labels: torch.Tensor, bias: torch.Tensor, num_attributes: int) -> torch.Tensor:
    """ORACLE (reads the hidden bias labels): one group per (y, b) cell. The upper bound, never label-free."""
    cell = labels * num_attributes + bias
    return torch.nn.functional.one_hot(cell, int(labels.max() + 1) * num_attributes).float()


def uniform_groups(n: int) -> torch.Tensor:
    """One group holding every sample: L_e reduces to the plain mean loss (the fine-tune control)."""
    return torch.ones(n, 1)


def condition_groups(weights: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sub-groups a head is told (head.condition = "class_group"): the (class, argmax group) pairs that hold
    samples, numbered class-major, so every sub-group lies within one class whatever the grouping (the class
    top-k groups and the hidden cells already do; a group spanning classes is split by class).
    W (N, G) -> (each sample's sub-group (N,), each sub-group's class (G',))."""
    pair = labels * weights.shape[1] + weights.argmax(1)                        # (N,) class-major pair code
    codes, group_of = pair.unique(sorted=True, return_inverse=True)
    return group_of, codes // weights.shape[1]


def to_hard(weights: torch.Tensor) -> torch.Tensor:
    """One-hot argmax of each row."""
    return torch.nn.functional.one_hot(weights.argmax(1), weights.shape[1]).float()


# ----- diagnostics -----------------------------------------------------------------------------------------
@dataclass
class GroupReport:
    sizes: list[float]              # sum_i W_ig
    mean_loss: list[float]          # R_g
    minority_share: list[float] | None = None   # hidden: share of bias-conflicting samples in each group
    loss_auc: float | None = None               # hidden: AUROC of l_i for the bias-conflicting set
    loss_auc_per_class: list[float] | None = None
    nmi: float | None = None                    # hidden: NMI(argmax group, (y, b) cell)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def group_report(weights: torch.Tensor, losses: torch.Tensor, labels: torch.Tensor,
                 conflicting: torch.Tensor | None = None, cell: torch.Tensor | None = None) -> GroupReport:
    """Sizes and risks of the groups; with the hidden labels, how well they recover the minority."""
    rep = GroupReport(sizes=weights.sum(0).tolist(), mean_loss=group_risks(weights, losses).tolist())
    if conflicting is not None:
        c = conflicting.float()
        rep.minority_share = ((weights * c[:, None]).sum(0) / weights.sum(0).clamp(min=1e-12)).tolist()
        rep.loss_auc = auroc(losses, conflicting)
        rep.loss_auc_per_class = [auroc(losses[labels == k], conflicting[labels == k])
                                  for k in range(int(labels.max()) + 1)]
    if cell is not None:
        rep.nmi = normalized_mutual_info(weights.argmax(1), cell)
    return rep


def check_group_index(index: torch.Tensor, dataset_index: torch.Tensor, path: str | Path) -> None:
    """Group weights are keyed by sample index; refuse a file made for another dataset."""
    if index.shape != dataset_index.shape or not torch.equal(index, dataset_index):
        raise ValueError(f"the sample indices in {path} do not match the dataset ({len(index)} vs "
                         f"{len(dataset_index)} samples); the groups were inferred on other data: rerun "
                         f"--stage losses and --stage groups for this run")

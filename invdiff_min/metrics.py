"""Measures of bias and of group-inference quality (hand-checked in tests/test_metrics.py).

Bias (the paper's, per prompt / class p with attribute counts C[p, a], K attributes):
    bias_p = sum_{i<j} |C[p,i] - C[p,j]| / sum_a C[p,a] / (K (K - 1) / 2),   Bias = mean_p bias_p.
0 is balanced. Its maximum is 1 for K = 2 but only 0.5 for K = 4 (all samples on one attribute gives
(K - 1) gaps of N over K(K-1)/2 pairs = 2 / K), so compare Bias only at equal K.
"""
from __future__ import annotations

import math

import torch


def _as_long(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point and not torch.all(t == t.round()):
        raise ValueError(f"{name} must hold integer class/attribute indices, got non-integer values")
    if t.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one entry per sample), got shape {tuple(t.shape)}")
    return t.long()


def attribute_counts(attributes, labels, num_attributes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C[p, a]: how many samples requested as class p show attribute a. Returns (classes present, C)."""
    a, y = _as_long(attributes, "attributes"), _as_long(labels, "labels")
    if a.shape != y.shape:
        raise ValueError(f"attributes {tuple(a.shape)} and labels {tuple(y.shape)} must have one entry per sample")
    if a.numel() == 0:
        raise ValueError("no samples given")
    if int(a.min()) < 0 or int(a.max()) >= num_attributes:
        raise ValueError(f"attributes must lie in [0, {num_attributes - 1}], got [{int(a.min())}, {int(a.max())}]; "
                         f"drop unreadable samples (e.g. -1) first")
    classes = y.unique()
    counts = torch.stack([torch.bincount(a[y == c], minlength=num_attributes) for c in classes])
    return classes, counts.float()


def bias_score(attributes, labels, num_attributes: int) -> float:
    """The paper's Bias (module docstring): mean over classes of the normalised pairwise count gaps."""
    if num_attributes < 2:
        raise ValueError(f"num_attributes must be at least 2, got {num_attributes}")
    _, counts = attribute_counts(attributes, labels, num_attributes)     # (P, K)
    k = num_attributes
    gaps = (counts[:, :, None] - counts[:, None, :]).abs().sum((1, 2)) / 2  # sum_{i<j} |C_i - C_j|
    per_class = gaps / counts.sum(1) / (k * (k - 1) / 2)
    return float(per_class.mean())


def fairness_discrepancy(attributes, labels, num_attributes: int) -> float:
    """Mean over classes of || p(a | class) - uniform ||_2 (Choi et al. 2020)."""
    _, counts = attribute_counts(attributes, labels, num_attributes)
    p = counts / counts.sum(1, keepdim=True)
    return float((p - 1.0 / num_attributes).norm(dim=1).mean())


def minority_share(attributes, labels, num_classes: int) -> list[float]:
    """Per class c: share of its samples whose attribute is not the one aligned with c (a != c).
    For the built-in dataset (attribute b aligned with y when b == y) this is the bias-conflicting share."""
    a, y = _as_long(attributes, "attributes"), _as_long(labels, "labels")
    return [float((a[y == c] != c).float().mean()) if (y == c).any() else float("nan") for c in range(num_classes)]


def fidelity(predicted_class, labels) -> float:
    """Share of samples whose content reads as the requested class (a stand-in for CLIP-T alignment)."""
    p, y = _as_long(predicted_class, "predicted_class"), _as_long(labels, "labels")
    return float((p == y).float().mean())


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for finding `positives` (ties count one half): the probability
    that a random positive scores above a random negative."""
    scores, positives = torch.as_tensor(scores).double(), torch.as_tensor(positives).bool()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for v in scores.unique():                     # average ranks over ties
        tie = scores == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def normalized_mutual_info(a, b) -> float:
    """NMI(a, b) = I(a; b) / sqrt(H(a) H(b)) of two labelings (1 when one determines the other, 0 when
    independent; 0 when either is constant)."""
    a, b = _as_long(a, "a"), _as_long(b, "b")
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    ha = float(-(pa[pa > 0] * pa[pa > 0].log()).sum())
    hb = float(-(pb[pb > 0] * pb[pb > 0].log()).sum())
    return mi / math.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0

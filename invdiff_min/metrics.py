"""Measures of bias and of group-inference quality (hand-checked in tests/test_metrics.py).

Bias (the paper's, per prompt / class p with attribute counts C[p, a], K attributes):
    bias_p = sum_{i<j} |C[p,i] - C[p,j]| / sum_a C[p,a] / (K (K - 1) / 2),   Bias = mean_p bias_p.
0 is balanced. Its maximum is 1 for K = 2 but only 0.5 for K = 4 (all samples on one attribute gives
(K - 1) gaps of N over K(K-1)/2 pairs = 2 / K), so compare Bias only at equal K.
"""
from __future__ import annotations

import math
import numbers

import torch


def _as_long(x, name: str) -> torch.Tensor:
    """A 1-D list, NumPy array or tensor of integer indices (whole-number floats and bools are accepted)."""
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a 1-D list, array or tensor of integers, got {type(x).__name__}") from None
    if t.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one entry per sample), got shape {tuple(t.shape)}")
    if t.dtype.is_complex:
        raise ValueError(f"{name} must hold integer class/attribute indices, got dtype {t.dtype}")
    if t.dtype.is_floating_point and not bool((torch.isfinite(t) & (t == t.round()) & (t.abs() < 2**62)).all()):
        raise ValueError(f"{name} must hold integer class/attribute indices, got non-integer or non-finite "
                         f"values; round them or drop those samples")
    return t.long()


def _as_count(n, name: str, minimum: int) -> int:
    """A count argument such as num_attributes: an integer (not a bool or float) >= minimum."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {n!r}")
    return int(n)


def _paired(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    """Two per-sample sequences: same length, not empty."""
    if a.shape != b.shape:
        raise ValueError(f"{names} must have one entry per sample, got lengths {len(a)} and {len(b)}")
    if a.numel() == 0:
        raise ValueError(f"no samples given: {names} are empty")


def attribute_counts(attributes, labels, num_attributes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C[p, a]: how many samples requested as class p show attribute a. Returns (classes present, C)."""
    num_attributes = _as_count(num_attributes, "num_attributes", 1)
    a, y = _as_long(attributes, "attributes"), _as_long(labels, "labels")
    _paired(a, y, "attributes and labels")
    if int(a.min()) < 0 or int(a.max()) >= num_attributes:
        raise ValueError(f"attributes must lie in [0, {num_attributes - 1}], got [{int(a.min())}, {int(a.max())}]; "
                         f"drop unreadable samples (e.g. -1) first")
    classes = y.unique()
    counts = torch.stack([torch.bincount(a[y == c], minlength=num_attributes) for c in classes])
    return classes, counts.float()


def bias_score(attributes, labels, num_attributes: int) -> float:
    """The paper's Bias (module docstring): mean over classes of the normalised pairwise count gaps."""
    num_attributes = _as_count(num_attributes, "num_attributes", 2)
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
    """Per class c: share of its samples whose attribute is not the one aligned with c (a != c); NaN for a
    class with no samples. For the built-in dataset (attribute b aligned with y when b == y) this is the
    bias-conflicting share."""
    num_classes = _as_count(num_classes, "num_classes", 1)
    a, y = _as_long(attributes, "attributes"), _as_long(labels, "labels")
    _paired(a, y, "attributes and labels")
    if int(a.min()) < 0:
        raise ValueError(f"attributes must be >= 0, got {int(a.min())}; drop unreadable samples (e.g. -1) first")
    return [float((a[y == c] != c).float().mean()) if (y == c).any() else float("nan") for c in range(num_classes)]


def fidelity(predicted_class, labels) -> float:
    """Share of samples whose content reads as the requested class (a stand-in for CLIP-T alignment)."""
    p, y = _as_long(predicted_class, "predicted_class"), _as_long(labels, "labels")
    _paired(p, y, "predicted_class and labels")
    return float((p == y).float().mean())


def _as_real(x, name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a 1-D list, array or tensor of numbers, got {type(x).__name__}") from None
    if t.ndim != 1 or t.dtype.is_complex:
        raise ValueError(f"{name} must be a 1-D tensor of real numbers (one per sample), got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t.double()


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for finding `positives` (ties count one half): the probability
    that a random positive scores above a random negative. NaN when there are no positives or no negatives."""
    scores, positives = _as_real(scores, "scores"), _as_real(positives, "positives")
    if scores.shape != positives.shape:
        raise ValueError(f"scores and positives must have one entry per sample, got lengths {len(scores)} and "
                         f"{len(positives)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf; drop those samples first")
    if not bool(((positives == 0) | (positives == 1)).all()):
        raise ValueError("positives must be a boolean mask (or 0/1 values) marking the samples to find")
    positives = positives.bool()
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
    independent; 0 when either is constant). Labels are names: any integers, relabelled 0..k-1 first."""
    a, b = _as_long(a, "a"), _as_long(b, "b")
    _paired(a, b, "a and b")
    a, b = a.unique(return_inverse=True)[1], b.unique(return_inverse=True)[1]
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    ha = float(-(pa[pa > 0] * pa[pa > 0].log()).sum())
    hb = float(-(pb[pb > 0] * pb[pb > 0].log()).sum())
    return mi / math.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0

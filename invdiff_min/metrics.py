"""Measures of bias and of group-inference quality (hand-checked in tests/test_metrics.py).

Bias (the paper's, per prompt / class p with attribute counts C[p, a], K attributes):
    bias_p = sum_{i<j} |C[p,i] - C[p,j]| / sum_a C[p,a] / (K (K - 1) / 2),   Bias = mean_p bias_p.
0 is balanced. Its maximum is 1 for K = 2 but only 0.5 for K = 4 (all samples on one attribute gives
(K - 1) gaps of N over K(K-1)/2 pairs = 2 / K), so compare Bias only at equal K.

Quality distances between generated and real images compare (N, D) feature sets, here the pooled features of
a SmallCNN judge (`image_features`) rather than Inception's, so their values are comparable only between runs
that use the same judge: Frechet distance (FID's formula), kernel distance (KID) and improved
precision / recall (fidelity and coverage of the real distribution).
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


def attribute_shares(attributes, labels, num_attributes: int, num_classes: int | None = None) -> list[list[float]]:
    """p(a | class) for every class 0..num_classes - 1 (default: up to the largest label): [class][attribute],
    rows summing to 1 (balanced: 1 / K each); NaN for a class with no samples."""
    classes, counts = attribute_counts(attributes, labels, num_attributes)
    rows = int(classes.max()) + 1 if num_classes is None else _as_count(num_classes, "num_classes", 1)
    shares = torch.full((rows, num_attributes), float("nan"))
    shares[classes] = counts / counts.sum(1, keepdim=True)
    return shares.tolist()


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


# ----- quality distances between feature sets ---------------------------------------------------------------

def _as_features(x, name: str, min_samples: int) -> torch.Tensor:
    """An (N, D) set of feature vectors (tensor, array or nested list of real numbers), N >= min_samples, as
    float64 on its own device."""
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be an (N, D) array or tensor of feature vectors (equal-length rows of "
                         f"numbers), got a {type(x).__name__} that is not one") from None
    if t.ndim != 2 or t.dtype.is_complex or t.shape[1] == 0:
        raise ValueError(f"{name} must be an (N, D) tensor of real features, one row per sample, got {t.dtype} "
                         f"{tuple(t.shape)}; flatten per-sample features with .flatten(1)")
    if len(t) < min_samples:
        raise ValueError(f"{name} has {len(t)} samples, this measure needs at least {min_samples}")
    t = t.double()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contain NaN or inf; drop those samples first")
    return t


def _feature_pair(a, b, names: tuple[str, str], min_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature sets of one width D; the second moves to the first's device."""
    a, b = _as_features(a, names[0], min_samples), _as_features(b, names[1], min_samples)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same feature width D, got {a.shape[1]} and "
                         f"{b.shape[1]}; extract both with the same model")
    return a, b.to(a.device)


def _gaussian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of an (N, D) set: S = (X - mu)^T (X - mu) / (N - 1)."""
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (len(x) - 1)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    """S^{1/2} of a symmetric positive semi-definite matrix: V diag(sqrt(max(w, 0))) V^T, S = V diag(w) V^T."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (FID's formula, Heusel et al. 2017):

        FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).

    Tr (S_a S_b)^{1/2} = Tr (S_a^{1/2} S_b S_a^{1/2})^{1/2}: the inner matrix is symmetric PSD, so both roots
    come from `eigh` with tiny negative eigenvalues (rounding) clamped to 0, which stays stable when a
    covariance is singular (N <= D, constant features). Computed in float64; rounding below 0 is returned as 0.
    Like FID, it is biased upwards for small N; compare values only at equal N."""
    a, b = _feature_pair(features_a, features_b, ("features_a", "features_b"), min_samples=2)
    mu_a, s_a = _gaussian(a)
    mu_b, s_b = _gaussian(b)
    root_a = _sqrt_psd(s_a)                                          # S_a^{1/2}
    inner = root_a @ s_b @ root_a                                    # S_a^{1/2} S_b S_a^{1/2}
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()  # Tr (S_a S_b)^{1/2}
    fd = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt
    return max(float(fd), 0.0)


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y / D + 1)^3 for all pairs: (M, D), (M', D) -> (M, M')."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_distance(features_a, features_b, num_subsets: int = 100, subset_size: int | None = None,
                    seed: int = 0) -> tuple[float, float]:
    """Kernel distance (KID, Binkowski et al. 2018): the unbiased MMD^2 between two (N, D) feature sets with
    the polynomial kernel k(x, y) = (x . y / D + 1)^3. On each of `num_subsets` random subsets of m =
    `subset_size` rows drawn without replacement from each set (x from a, y from b):

        MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
                - 2 sum_{i, j} k(x_i, y_j) / m^2.

    Returns (mean, std) over the subsets (std with ddof = 0, as torch-fidelity). Unbiased: it can be slightly
    negative when the sets come from one distribution. `seed` fixes the subsets, so reruns agree. Defaults are
    torch-fidelity's (100 subsets of 1000); `subset_size=None` takes min(1000, N_a, N_b)."""
    num_subsets = _as_count(num_subsets, "num_subsets", 1)
    a, b = _feature_pair(features_a, features_b, ("features_a", "features_b"), min_samples=2)
    subset_size = _as_count(min(1000, len(a), len(b)) if subset_size is None else subset_size, "subset_size", 2)
    if subset_size > min(len(a), len(b)):
        raise ValueError(f"subset_size {subset_size} is larger than the feature sets ({len(a)} and {len(b)} "
                         f"samples); pass subset_size <= {min(len(a), len(b))}")
    g = torch.Generator().manual_seed(_as_count(seed, "seed", 0))
    m = subset_size
    mmds = []
    for _ in range(num_subsets):
        x = a[torch.randperm(len(a), generator=g)[:m].to(a.device)]  # (m, D)
        y = b[torch.randperm(len(b), generator=g)[:m].to(b.device)]  # (m, D)
        k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
        off_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))  # sum_{i != j} k(x_i, x_j) / (m (m-1))
        off_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        mmds.append(off_xx + off_yy - 2 * k_xy.mean())
    mmds = torch.stack(mmds)
    return float(mmds.mean()), float(mmds.std(correction=0))


def _kth_neighbour_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """(N,) distance from each row of x to its k-th nearest other row: the (k+1)-th smallest distance, the
    smallest being the row's 0 to itself (so an exact duplicate counts as a neighbour at distance 0)."""
    return torch.cat([torch.cdist(x[i:i + batch_size], x).topk(k + 1, dim=1, largest=False).values[:, k]
                      for i in range(0, len(x), batch_size)])


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     batch_size: int) -> torch.Tensor:
    """(N,) bool: is each point within radii[j] of some centre j (in the union of the balls)?"""
    return torch.cat([(torch.cdist(points[i:i + batch_size], centres) <= radii).any(1)  # (B, M) -> (B,)
                      for i in range(0, len(points), batch_size)])


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of generated (fake) against real features.

    The manifold of a set X is the union of balls B(x, r_k(x)) over x in X, r_k(x) the distance from x to its
    k-th nearest neighbour in X (itself excluded). Then

        precision = |{f in fake : f in manifold(real)}| / |fake|   (are the samples realistic?)
        recall    = |{r in real : r in manifold(fake)}| / |real|   (is the real distribution covered?)

    Euclidean distances (`torch.cdist`, float64) are computed `batch_size` rows at a time, so memory is
    O(batch_size * N): 10k x 10k sets do not build a 10k x 10k matrix. Both sets need more than k samples."""
    k = _as_count(k, "k", 1)
    batch_size = _as_count(batch_size, "batch_size", 1)
    real, fake = _feature_pair(real_features, fake_features, ("real_features", "fake_features"),
                               min_samples=k + 1)
    real_radii = _kth_neighbour_radii(real, k, batch_size)         # (N_real,)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)         # (N_fake,)
    precision = _inside_manifold(fake, real, real_radii, batch_size).double().mean()
    recall = _inside_manifold(real, fake, fake_radii, batch_size).double().mean()
    return float(precision), float(recall)


@torch.no_grad()
def image_features(model, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] -> (N, 2 * width) float32 features on the CPU: a SmallCNN judge's
    globally pooled features, `model.features(images * 2 - 1).flatten(1)` (what its forward feeds the head),
    in eval mode, in batches on the model's device. The model's train/eval mode is restored afterwards."""
    if not isinstance(model, torch.nn.Module) or not isinstance(getattr(model, "features", None), torch.nn.Module):
        raise ValueError(f"model must be a SmallCNN judge (a module with a .features part), got "
                         f"{type(model).__name__}")
    batch_size = _as_count(batch_size, "batch_size", 1)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.dtype.is_floating_point:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be an (N, C, H, W) float tensor in [0, 1], got {got}")
    in_channels = getattr(model, "in_channels", images.shape[1])
    if images.shape[1] != in_channels:
        raise ValueError(f"the judge reads {in_channels}-channel images, got {images.shape[1]} channels")
    if len(images) == 0:
        raise ValueError("no images given")
    lo, hi = float(images.min()), float(images.max())
    if not (0 <= lo and hi <= 1):                                   # also catches NaN
        raise ValueError(f"images must lie in [0, 1], got values in [{lo}, {hi}]; map [-1, 1] model outputs "
                         f"with (x + 1) / 2 and clamp")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        feats = [model.features(images[i:i + batch_size].to(device) * 2 - 1).flatten(1).float().cpu()
                 for i in range(0, len(images), batch_size)]     # each (B, 2 * width)
    finally:
        model.train(was_training)
    return torch.cat(feats)

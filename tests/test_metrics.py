"""Bias, group-quality and quality-distance measures against hand-counted examples and closed forms."""
import math

import pytest
import torch

from invdiff_min.classifiers import SmallCNN
from invdiff_min.metrics import (auroc, bias_score, fairness_discrepancy, fidelity, frechet_distance,
                                 image_features, kernel_distance, minority_share, normalized_mutual_info,
                                 precision_recall)


def test_bias_score_hand_counted_two_attributes():
    # class 0: attributes 0,0,0,1 -> |3 - 1| / 4 / 1 = 0.5 ; class 1: 1,1 -> |0 - 2| / 2 = 1.0 ; mean 0.75
    attrs = torch.tensor([0, 0, 0, 1, 1, 1])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    assert bias_score(attrs, labels, 2) == pytest.approx(0.75)
    assert bias_score([0, 1, 0, 1], [0, 0, 1, 1], 2) == pytest.approx(0.0)


def test_bias_score_maximum_is_two_over_k():
    # all on one attribute with K = 4: gaps (4-0)*3 over 6 pairs, / N=4 -> 0.5
    assert bias_score([2, 2, 2, 2], [0, 0, 0, 0], 4) == pytest.approx(0.5)
    # K = 3, counts (2, 1, 0): gaps 1 + 2 + 1 = 4, / 3 samples / 3 pairs = 4/9
    assert bias_score([0, 0, 1], [0, 0, 0], 3) == pytest.approx(4 / 9)


def test_fairness_discrepancy_and_minority_share_and_fidelity():
    assert fairness_discrepancy([0, 0], [0, 0], 2) == pytest.approx(math.sqrt(0.5))
    assert minority_share([0, 1, 1, 1, 0], [0, 0, 0, 1, 1], 2) == pytest.approx([2 / 3, 1 / 2])
    assert fidelity([0, 1, 1], [0, 1, 0]) == pytest.approx(2 / 3)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="one entry per sample"):
        bias_score([0, 1], [0], 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bias_score([0, 2], [0, 0], 2)
    with pytest.raises(ValueError, match="integer"):
        bias_score(torch.tensor([0.5, 1.0]), [0, 0], 2)


def test_auroc_hand_examples():
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    # one positive at 0.5 tied with one negative, above another negative: (1 + 0.5) / 2
    assert auroc(torch.tensor([0.5, 0.5, 0.1]), torch.tensor([1, 0, 0])) == pytest.approx(0.75)


def test_nmi_extremes():
    assert normalized_mutual_info([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert normalized_mutual_info([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)


# ----- quality distances --------------------------------------------------------------------------------------

def exact_diagonal_gaussian_set(mu, sigma) -> torch.Tensor:
    """2^D points mu + c (+-sigma_1, ..., +-sigma_D), all sign patterns, c = sqrt((N - 1) / N): their mean is
    exactly mu and their unbiased covariance exactly diag(sigma^2) (the cross terms cancel over the signs)."""
    d = len(mu)
    signs = torch.tensor([[1.0 if (i >> j) & 1 else -1.0 for j in range(d)] for i in range(2**d)],
                         dtype=torch.float64)                                     # (2^D, D)
    c = math.sqrt((2**d - 1) / 2**d)
    return torch.tensor(mu, dtype=torch.float64) + c * signs * torch.tensor(sigma, dtype=torch.float64)


def test_frechet_distance_one_dimensional_by_hand():
    # a = {0, 2}: mean 1, variance 2 ; b = {3, 5, 7}: mean 5, variance 4
    # FD = (5 - 1)^2 + 2 + 4 - 2 sqrt(2 * 4) = 22 - 4 sqrt(2)
    fd = frechet_distance(torch.tensor([[0.0], [2.0]]), [[3.0], [5.0], [7.0]])
    assert fd == pytest.approx(22 - 4 * math.sqrt(2), rel=1e-12)


def test_frechet_distance_diagonal_closed_form_including_singular_covariance():
    # diagonal covariances: FD = ||mu_a - mu_b||^2 + sum_i (sigma_a,i - sigma_b,i)^2 ; b's third feature is
    # constant (sigma = 0), so S_b is singular and the square root must not blow up
    mu_a, sigma_a = [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]
    mu_b, sigma_b = [1.0, -1.0, 2.0], [2.0, 2.0, 0.0]
    a, b = exact_diagonal_gaussian_set(mu_a, sigma_a), exact_diagonal_gaussian_set(mu_b, sigma_b)
    expected = (1 + 1 + 4) + (1 + 0 + 9)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-10)
    # a common rotation makes both covariances full but leaves the distance unchanged. Rotated, S_b's zero
    # eigenvalue comes out of eigh as rounding (~1e-16) and its square root (~1e-8) enters the trace: the
    # tolerance is that, not 1e-10 (torch 2.11's LAPACK on a 16-core machine gave 16 - 8e-8)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_matches_eigenvalues_of_covariance_product():
    # non-commuting full covariances: Tr (S_a S_b)^{1/2} = sum_i sqrt(lambda_i(S_a S_b)), computed here from the
    # (non-symmetric) product directly
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(60, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    tr_sqrt = torch.linalg.eigvals(s_a @ s_b).real.clamp(min=0).sqrt().sum()
    expected = (a.mean(0) - b.mean(0)).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-9)


def test_frechet_distance_of_a_set_to_itself_is_zero_even_when_covariance_is_singular():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 8, generator=g)
    assert frechet_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-9)
    few = torch.randn(5, 16, generator=g)             # N < D: rank-4 covariance, trace ~16
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-5)


def unbiased_mmd2_by_loops(x, y) -> float:
    """The KID estimator written out with explicit loops over pairs, k(u, v) = (u . v / D + 1)^3."""
    m, d = len(x), len(x[0])

    def k(u, v):
        return (sum(ui * vi for ui, vi in zip(u, v)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return xx + yy - 2 * xy


def test_kernel_distance_whole_set_subsets_equal_the_unbiased_estimator():
    # subset_size = N: every subset is the whole set (reordered), so every subset gives the same MMD^2, std 0
    x = [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]
    y = [[1.0, 1.0], [3.0, 0.0], [0.0, -1.0]]
    mean, std = kernel_distance(x, y, num_subsets=4, subset_size=3)
    assert mean == pytest.approx(unbiased_mmd2_by_loops(x, y), rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kernel_distance_near_zero_for_one_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, _ = kernel_distance(a, b, num_subsets=20, subset_size=200)
    small, _ = kernel_distance(a, b + 0.25, num_subsets=20, subset_size=200)
    large, _ = kernel_distance(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 0.02 and 0.1 < small < large
    assert kernel_distance(a, b, 5, 100, seed=7) == kernel_distance(a, b, 5, 100, seed=7)   # seeded subsets


def test_precision_recall_hand_counted_one_dimensional():
    real = [[0.0], [1.0], [2.0], [3.0]]       # k = 1: every radius 1, manifold [-1, 4]
    # fake radii (k = 1): 3, 3, 6.5, 10 -> the ball around 0.5, [-2.5, 3.5], holds all real points
    assert precision_recall(real, [[0.5], [3.5], [10.0], [20.0]], k=1) == (0.5, 1.0)
    # collapsed fake set: all inside the real manifold, but radii 0.1 cover only the real point 0
    assert precision_recall(real, [[0.0], [0.1], [0.2], [0.3]], k=1) == (1.0, 0.25)
    # far away on both sides of the comparison
    assert precision_recall(real, [[100.0], [101.0], [102.0], [103.0]], k=1) == (0.0, 0.0)


def test_precision_recall_k_sets_the_radius_two_dimensional():
    real = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]    # unit square: radius 1 for k = 2, sqrt 2 for k = 3
    fake = [[0.5, 0.5], [1.9, 1.9], [5.0, 5.0], [6.0, 6.0]]    # (1.9, 1.9) is 0.9 sqrt 2 = 1.27 from (1, 1)
    # recall 1: the fake radius at (0.5, 0.5) is 4.5 sqrt 2 (k = 2) or 5.5 sqrt 2 (k = 3), covering the square
    assert precision_recall(real, fake, k=2) == (0.25, 1.0)
    assert precision_recall(real, fake, k=3) == (0.5, 1.0)


def test_precision_recall_identical_sets_symmetry_and_batching():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(300, 5, generator=g), torch.randn(200, 5, generator=g) + 0.5
    assert precision_recall(a, a.clone()) == (1.0, 1.0)
    p, r = precision_recall(a, b)
    assert 0 < p < 1 and 0 < r < 1
    assert precision_recall(b, a) == (r, p)                    # swapping the sets swaps the two numbers
    assert precision_recall(a, b, batch_size=7) == (p, r)      # batching only saves memory


def test_image_features_are_what_the_judge_head_reads():
    torch.manual_seed(0)
    model = SmallCNN(3, 2).train()
    images = torch.rand(7, 3, 8, 8)
    feats = image_features(model, images, batch_size=3)
    assert feats.shape == (7, 64) and feats.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(model.head(feats), model(images), atol=1e-6)
    assert model.training, "the model's mode is restored"


def test_quality_distance_inputs_are_checked():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="same feature width"):
        frechet_distance(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(x.flatten(), x)
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(x, torch.full((10, 4), float("nan")))
    with pytest.raises(ValueError, match="subset_size <= 10"):
        kernel_distance(x, x, subset_size=11)
    with pytest.raises(ValueError, match="subset_size must be an integer >= 2"):
        kernel_distance(x, x, subset_size=1)
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(x[:3], x, k=3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_features(SmallCNN(3, 2), torch.rand(2, 3, 8, 8) * 2 - 1)
    with pytest.raises(ValueError, match="3-channel"):
        image_features(SmallCNN(3, 2), torch.rand(2, 1, 8, 8))


def test_attribute_shares_per_class_with_k_values():
    from invdiff_min.metrics import attribute_shares

    a = torch.tensor([0, 0, 1, 2, 2, 2, 2, 1])
    y = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2])
    shares = attribute_shares(a, y, 3)
    assert shares[0] == [0.5, 0.25, 0.25] and shares[2] == [0.0, 0.25, 0.75]
    assert all(v != v for v in shares[1])                              # class 1 absent: NaN
    assert len(attribute_shares(a, y, 3, num_classes=4)) == 4
    # the paper's Bias for K = 3: class 0 gaps |2-1| + |2-1| + |1-1| = 2 over 4 samples and 3 pairs
    assert bias_score(a, y, 3) == pytest.approx(((2 / 4) / 3 + ((3 + 2 + 1) / 4) / 3) / 2)

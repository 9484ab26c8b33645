"""Bias and group-quality measures against hand-counted examples."""
import math

import pytest
import torch

from invdiff_min.metrics import (auroc, bias_score, fairness_discrepancy, fidelity, minority_share,
                                 normalized_mutual_info)


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

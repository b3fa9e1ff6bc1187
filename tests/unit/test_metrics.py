"""Metrics against hand-computed examples and a brute-force pairwise definition of AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_ray import metrics


def _pairwise_auc(s, y):
    """P(score of a positive > score of a negative), ties 1/2 — the definition, O(P·N)."""
    pos, neg = [a for a, b in zip(s, y) if b], [a for a, b in zip(s, y) if not b]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_examples():
    # scikit-learn's documented example: roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4.
    assert metrics.roc_auc([0.5, 0.5, 0.2, 0.9], [0, 1, 0, 1]) == pytest.approx(0.875)
    # All scores equal: 0.5 (the ROC curve is the diagonal).
    assert metrics.roc_auc([0.3] * 5, [0, 1, 0, 1, 1]) == pytest.approx(0.5)
    assert metrics.roc_auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert metrics.roc_auc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    assert math.isnan(metrics.roc_auc([0.1, 0.2], [1, 1]))


def test_auc_matches_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        s = rng.integers(0, 6, n) / 5.0  # few distinct values: many ties
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        assert metrics.roc_auc(s, y) == pytest.approx(_pairwise_auc(s, y))


def test_midranks():
    assert metrics.midranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_threshold_metrics_hand_example():
    scores = [0.9, 0.6, 0.5, 0.4, 0.2, 0.7]
    labels = [1, 1, 0, 1, 0, 0]
    # >= 0.5 is positive: preds 1,1,1,0,0,1 → TP 2, FP 2, TN 1, FN 1.
    assert metrics.confusion(scores, labels) == {"tp": 2, "fp": 2, "tn": 1, "fn": 1}
    assert metrics.accuracy(scores, labels) == pytest.approx(3 / 6)
    assert metrics.sensitivity(scores, labels) == pytest.approx(2 / 3)
    assert metrics.specificity(scores, labels) == pytest.approx(1 / 3)
    m = metrics.binary_metrics(scores, labels)
    assert m["images"] == 6 and m["positives"] == 3
    assert m["auc"] == pytest.approx(_pairwise_auc(scores, labels))


def test_undefined_rates_are_nan_and_bad_labels_raise():
    assert math.isnan(metrics.sensitivity([0.2, 0.8], [0, 0]))
    assert math.isnan(metrics.specificity([0.2, 0.8], [1, 1]))
    assert math.isnan(metrics.accuracy([], []))
    with pytest.raises(ValueError):
        metrics.accuracy([0.5], [2])
    with pytest.raises(ValueError):
        metrics.accuracy([0.5, 0.1], [1])


def test_bce_with_logits_matches_torch():
    import torch

    z = torch.tensor([-30.0, -1.0, 0.0, 2.5, 40.0])
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    want = torch.nn.functional.binary_cross_entropy_with_logits(z.double(), y.double()).item()
    assert metrics.bce_with_logits(z.numpy(), y.numpy()) == pytest.approx(want, rel=1e-12)

"""Binary classification metrics (docs/study.md §4): accuracy, ROC AUC, sensitivity, specificity.

Pure numpy functions of per-image scores and 0/1 labels, so the training loop, the report
and the tests compute them the same way. Scores are probabilities (``sigmoid(logit)``);
the decision threshold is 0.5, the study's Keras ``binary_accuracy``.

* accuracy     ``(TP + TN) / N``
* sensitivity  ``TP / (TP + FN)`` (recall of positives); NaN without positives
* specificity  ``TN / (TN + FP)``; NaN without negatives
* ROC AUC      rank-based (Mann–Whitney U): the probability that a random positive scores
               above a random negative, ties counting one half. This is exactly the area
               under the step ROC curve with tied scores joined linearly, i.e. scikit-learn's
               ``roc_auc_score``. NaN when only one class is present (sklearn raises).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: The decision threshold on sigmoid outputs (Keras ``binary_accuracy``).
THRESHOLD = 0.5


def _arrays(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return s, y.astype(bool)


def confusion(scores: Any, labels: Any, threshold: float = THRESHOLD) -> dict[str, int]:
    """``{"tp", "fp", "tn", "fn"}`` counts; a score ``>= threshold`` is predicted positive."""
    s, y = _arrays(scores, labels)
    pred = s >= threshold
    return {"tp": int((pred & y).sum()), "fp": int((pred & ~y).sum()),
            "tn": int((~pred & ~y).sum()), "fn": int((~pred & y).sum())}


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def accuracy(scores: Any, labels: Any, threshold: float = THRESHOLD) -> float:
    """Fraction of images whose thresholded score equals the label (NaN for no images)."""
    c = confusion(scores, labels, threshold)
    return _ratio(c["tp"] + c["tn"], sum(c.values()))


def sensitivity(scores: Any, labels: Any, threshold: float = THRESHOLD) -> float:
    """True positive rate ``TP / (TP + FN)``; NaN without positives."""
    c = confusion(scores, labels, threshold)
    return _ratio(c["tp"], c["tp"] + c["fn"])


def specificity(scores: Any, labels: Any, threshold: float = THRESHOLD) -> float:
    """True negative rate ``TN / (TN + FP)``; NaN without negatives."""
    c = confusion(scores, labels, threshold)
    return _ratio(c["tn"], c["tn"] + c["fp"])


def midranks(values: Any) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # Start of every run of equal values, and the average 1-based rank of the run.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve, ties handled (see the module docstring); NaN for one class."""
    s, y = _arrays(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(midranks(s)[y].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def binary_metrics(scores: Any, labels: Any, threshold: float = THRESHOLD) -> dict[str, float]:
    """All of the above at once: ``accuracy, auc, sensitivity, specificity`` (+ counts)."""
    c = confusion(scores, labels, threshold)
    n = sum(c.values())
    return {
        "accuracy": _ratio(c["tp"] + c["tn"], n),
        "auc": roc_auc(scores, labels),
        "sensitivity": _ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "images": n,
        "positives": c["tp"] + c["fn"],
        **c,
    }


def bce_with_logits(logits: Any, labels: Any) -> float:
    """Mean binary cross-entropy of logits (the stable form torch uses); NaN for no images."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if not z.size:
        return math.nan
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


__all__ = ["THRESHOLD", "accuracy", "bce_with_logits", "binary_metrics", "confusion",
           "midranks", "roc_auc", "sensitivity", "specificity"]

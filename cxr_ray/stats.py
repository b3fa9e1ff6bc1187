"""Uncertainty for the sweep report: confidence intervals, paired tests, multiplicity.

Pure numpy/scipy functions of per-image scores, 0/1 labels and patient ids (``groups``).
Images of one patient are correlated (same anatomy, often the same label), so every
resampling method here draws *patients*, never single images.

* Youden threshold   the cut ``t`` (positive when ``score >= t``) maximising
                     ``J = sensitivity + specificity - 1`` (Youden 1950). Cuts are the
                     midpoints between adjacent distinct scores, so a new score equal to
                     a training one falls on the same side; ties in J go to the cut
                     nearest 0.5. Falls back to 0.5 for one class or no informative cut.
* cluster bootstrap  percentile interval (Efron & Tibshirani 1993) of a statistic over
                     resamples that draw ``G`` patients with replacement out of ``G`` and
                     keep all images of each drawn patient (a patient drawn twice counts
                     twice) — the cluster / block bootstrap (Field & Welsh 2007). Resamples
                     where the statistic is NaN (e.g. AUC with one class) are skipped.
* DeLong             AUC variance from placement values (DeLong, DeLong & Clarke-Pearson
                     1988), computed with midranks as in Sun & Xu 2014:
                     ``V10_i = (rank_all(x_i) - rank_pos(x_i)) / N`` for each positive,
                     ``V01_j = 1 - (rank_all(y_j) - rank_neg(y_j)) / P`` for each negative,
                     ``Var(AUC) = s²(V10) / P + s²(V01) / N``. The paired version takes the
                     covariance of the two models' placement values on the same images:
                     ``Var(A - B) = Var A + Var B - 2 Cov(A, B)``, then a two-sided z test.
                     Images are treated as independent here (no patient clustering).
* McNemar exact test two classifiers on the same images differ only through the discordant
                     images (right by one, wrong by the other); under H0 each discordant
                     image goes either way with probability 1/2, so the p-value is a
                     two-sided binomial test on ``a_only`` of ``a_only + b_only``
                     (McNemar 1947, exact form). It treats images as independent; the
                     paired patient-bootstrap CI of the difference is the clustered view.
* minimum detectable the smallest accuracy difference a two-sided McNemar test of ``n``
  difference (MDD)   images detects with the given power, by the simple normal
                     approximation ``δ = (z_{1-α/2} + z_{power}) · sqrt(ψ / n)``, ψ the
                     discordant fraction (Connor 1987 without its ``ψ - δ²`` refinement,
                     i.e. assuming ``δ² ≪ ψ``; slightly conservative). ψ is floored at
                     ``1/n``. A value above 1 means no difference is detectable.
* Holm               step-down Bonferroni (Holm 1979): sort the m p-values, multiply the
                     k-th smallest by ``m - k + 1``, make the sequence non-decreasing, cap
                     at 1. Controls the family-wise error rate without independence.
* sign test          exact two-sided binomial test (p = 1/2) on wins vs losses, ties dropped.
* mean CI            Student-t interval ``mean ± t_{(1+level)/2, n-1} · s / sqrt(n)`` over
                     seeds, assuming roughly normal per-seed results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cxr_ray import metrics


def _sps() -> Any:
    """``scipy.stats``, imported on first use: it takes most of a second, and processes that
    only predict (Ray Data's actors) never need it."""
    from scipy import stats

    return stats

#: Default decision threshold (Keras ``binary_accuracy``), also Youden's fallback.
DEFAULT_THRESHOLD = metrics.THRESHOLD
_NAN2 = (math.nan, math.nan)


def _z(level: float) -> float:
    """Two-sided normal quantile ``z_{(1+level)/2}``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(_sps().norm.ppf(0.5 + level / 2.0))


# ----------------------------------------------------------------------------- threshold


def youden_threshold(scores: Any, labels: Any) -> float:
    """Cut maximising Youden's J (midpoint of adjacent distinct scores); 0.5 if undefined."""
    s, y = metrics._arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return DEFAULT_THRESHOLD
    values, inverse = np.unique(s, return_inverse=True)
    if values.size < 2:
        return DEFAULT_THRESHOLD
    pos_below = np.cumsum(np.bincount(inverse, weights=y.astype(np.float64), minlength=values.size))[:-1]
    neg_below = np.cumsum(np.bincount(inverse, weights=(~y).astype(np.float64), minlength=values.size))[:-1]
    # Cut k sits between values[k] and values[k+1]: everything up to values[k] is negative.
    j = (n_pos - pos_below) / n_pos + neg_below / n_neg - 1.0
    cuts = (values[:-1] + values[1:]) / 2.0
    best = j.max()
    if best <= 1e-12:
        return DEFAULT_THRESHOLD  # no cut beats the trivial classifier
    tied = np.flatnonzero(j >= best - 1e-12)
    return float(cuts[tied[np.argmin(np.abs(cuts[tied] - DEFAULT_THRESHOLD))]])


# ----------------------------------------------------------------------------- bootstrap


def _group_layout(groups: Any, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, sizes)``: image indices sorted by group, each group's slice."""
    if groups is None:
        return np.arange(n), np.arange(n), np.ones(n, dtype=np.int64)
    g = np.asarray(groups).reshape(-1)
    if g.size != n:
        raise ValueError(f"{g.size} groups for {n} images")
    _, inverse, sizes = np.unique(g, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.cumsum(sizes) - sizes
    return order, starts, sizes


def _resample(rng: np.random.Generator, order: np.ndarray, starts: np.ndarray,
              sizes: np.ndarray) -> np.ndarray:
    """Image indices of one cluster resample: ``G`` groups drawn with replacement, whole."""
    drawn = rng.integers(0, sizes.size, sizes.size)
    counts = sizes[drawn]
    ends = counts.cumsum()  # where each drawn group ends in the resample
    positions = (starts[drawn] - ends + counts).repeat(counts) + np.arange(ends[-1])
    idx = order[positions]
    # Input order kept (sorted indices): statistics are order-free, and pre-sorted inputs
    # (auc_ci sorts by score) make the statistic's own sort nearly linear.
    idx.sort()
    return idx


def bootstrap_ci(statistic: Callable[..., float], arrays: Sequence[Any], groups: Any, *,
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of ``statistic(*arrays)`` under a patient (cluster) bootstrap.

    ``groups=None`` treats every image as its own patient. NaN resamples are skipped;
    ``(nan, nan)`` when fewer than half of the ``n_boot`` resamples are finite.
    """
    alpha = 1.0 - level
    _z(level)  # validates level
    cols = [np.asarray(a) for a in arrays]
    n = cols[0].shape[0] if cols else 0
    if any(c.shape[0] != n for c in cols):
        raise ValueError("arrays must have the same length")
    if n == 0 or n_boot < 1:
        return _NAN2
    order, starts, sizes = _group_layout(groups, n)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = _resample(rng, order, starts, sizes)
        values[b] = statistic(*(c[idx] for c in cols))
    finite = values[np.isfinite(values)]
    if finite.size < n_boot / 2.0:
        return _NAN2
    lo, hi = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def accuracy_ci(scores: Any, labels: Any, groups: Any, threshold: float = DEFAULT_THRESHOLD,
                **kw: Any) -> tuple[float, float]:
    """Patient-bootstrap CI of the accuracy at ``threshold`` (``kw`` → :func:`bootstrap_ci`)."""
    s, y = metrics._arrays(scores, labels)
    # Accuracy is the mean of per-image correctness (exactly metrics.accuracy, which the
    # tests check): computed once, each resample is then a cheap mean.
    correct = (s >= threshold) == y
    return bootstrap_ci(lambda c: c.sum() / c.size, (correct,), groups, **kw)


def auc_ci(scores: Any, labels: Any, groups: Any, **kw: Any) -> tuple[float, float]:
    """Patient-bootstrap CI of the ROC AUC (``kw`` → :func:`bootstrap_ci`)."""
    s, y = metrics._arrays(scores, labels)
    by_score = np.argsort(s, kind="stable")  # see _resample: ~10x faster midranks
    g = None if groups is None else np.asarray(groups).reshape(-1)
    if g is not None and g.size != s.size:
        raise ValueError(f"{g.size} groups for {s.size} images")
    return bootstrap_ci(metrics.roc_auc, (s[by_score], y[by_score]),
                        None if g is None else g[by_score], **kw)


# ----------------------------------------------------------------------------- DeLong


def _placements(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong placement values ``(V10 for positives, V01 for negatives)`` via midranks."""
    pos, neg = scores[y], scores[~y]
    ranks = metrics.midranks(scores)
    v10 = (ranks[y] - metrics.midranks(pos)) / neg.size
    v01 = 1.0 - (ranks[~y] - metrics.midranks(neg)) / pos.size
    return v10, v01


def _cov(a: np.ndarray, b: np.ndarray) -> float:
    """Sample covariance (ddof 1); NaN with fewer than two values."""
    if a.size < 2:
        return math.nan
    return float(np.sum((a - a.mean()) * (b - b.mean())) / (a.size - 1))


def delong(scores: Any, labels: Any) -> tuple[float, float]:
    """``(AUC, DeLong variance)``; variance NaN with fewer than two of either class."""
    s, y = metrics._arrays(scores, labels)
    if not y.any() or y.all():
        return _NAN2
    v10, v01 = _placements(s, y)
    var = _cov(v10, v10) / v10.size + _cov(v01, v01) / v01.size
    return float(v10.mean()), var


def delong_ci(scores: Any, labels: Any, level: float = 0.95) -> tuple[float, float]:
    """Normal-approximation CI ``AUC ± z·sqrt(var)`` with DeLong's variance, clipped to [0, 1]."""
    auc, var = delong(scores, labels)
    half = _z(level) * math.sqrt(var) if math.isfinite(var) else math.nan
    if not math.isfinite(half):
        return _NAN2
    return max(0.0, auc - half), min(1.0, auc + half)


def delong_paired(scores_a: Any, scores_b: Any, labels: Any,
                  level: float = 0.95) -> dict[str, Any]:
    """Paired DeLong test of ``AUC_a - AUC_b`` on the same images.

    ``{"diff", "se", "p_value", "ci": (lo, hi)}``; p two-sided normal. All NaN when a class
    has fewer than two images.
    """
    a, y = metrics._arrays(scores_a, labels)
    b, _ = metrics._arrays(scores_b, labels)
    nan = {"diff": math.nan, "se": math.nan, "p_value": math.nan, "ci": _NAN2}
    if y.sum() < 2 or (~y).sum() < 2:
        return nan
    a10, a01 = _placements(a, y)
    b10, b01 = _placements(b, y)
    d10, d01 = a10 - b10, a01 - b01  # Var(X - Y) = Var X + Var Y - 2 Cov, per component
    var = _cov(d10, d10) / d10.size + _cov(d01, d01) / d01.size
    diff, se = float(a10.mean() - b10.mean()), math.sqrt(max(var, 0.0))
    if se > 0.0:
        p = float(2.0 * _sps().norm.sf(abs(diff) / se))
    else:
        p = 1.0 if diff == 0.0 else 0.0
    half = _z(level) * se
    return {"diff": diff, "se": se, "p_value": p,
            "ci": (max(-1.0, diff - half), min(1.0, diff + half))}


# ----------------------------------------------------------------------------- paired accuracy


def minimum_detectable_difference(n: int, discordant_fraction: float, *, alpha: float = 0.05,
                                  power: float = 0.8) -> float:
    """Smallest accuracy difference a two-sided McNemar test of ``n`` images detects.

    ``(z_{1-α/2} + z_{power}) · sqrt(ψ / n)`` with ``ψ = max(discordant_fraction, 1/n)``
    (see the module docstring); NaN for ``n == 0``.
    """
    if n <= 0:
        return math.nan
    psi = max(float(discordant_fraction), 1.0 / n)
    z = _sps().norm.ppf(1.0 - alpha / 2.0) + _sps().norm.ppf(power)
    return float(z * math.sqrt(psi / n))


def _mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value; 1.0 without discordant images."""
    if a_only + b_only == 0:
        return 1.0
    return float(_sps().binomtest(a_only, a_only + b_only, 0.5).pvalue)


def paired_accuracy(correct_a: Any, correct_b: Any, groups: Any, *, level: float = 0.95,
                    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                    power: float = 0.8) -> dict[str, Any]:
    """Compare two classifiers on the same images from per-image correctness.

    ``{"diff", "ci", "p_value", "a_only", "b_only", "n", "mdd"}``: ``diff = acc_a - acc_b``,
    ``ci`` its paired patient-bootstrap percentile CI, ``p_value`` the exact McNemar test,
    ``a_only`` / ``b_only`` the discordant counts, ``mdd`` the minimum detectable difference.
    """
    ca = np.asarray(correct_a, dtype=bool).reshape(-1)
    cb = np.asarray(correct_b, dtype=bool).reshape(-1)
    if ca.shape != cb.shape:
        raise ValueError(f"{ca.size} vs {cb.size} images")
    n = int(ca.size)
    a_only, b_only = int((ca & ~cb).sum()), int((~ca & cb).sum())
    diff = (a_only - b_only) / n if n else math.nan
    ci = bootstrap_ci(lambda a, b: (a.sum() - b.sum()) / a.size, (ca, cb), groups,
                      n_boot=n_boot, level=level, seed=seed)
    return {"diff": diff, "ci": ci, "p_value": _mcnemar_exact(a_only, b_only),
            "a_only": a_only, "b_only": b_only, "n": n,
            "mdd": minimum_detectable_difference(n, (a_only + b_only) / n if n else 0.0,
                                                 alpha=alpha, power=power)}


# ----------------------------------------------------------------------------- multiplicity, seeds


def holm(p_values: Any) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (input order); NaN stays NaN and is not counted in m."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(stepped, 1.0)
    return out


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of wins vs losses (ties excluded); 1.0 when there are none."""
    return _mcnemar_exact(int(wins), int(losses))


def mean_ci(values: Any, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: Student-t CI over the finite values (e.g. seeds); see module doc."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size == 1:
        return mean, math.nan, math.nan
    _z(level)  # validates level
    half = float(_sps().t.ppf(0.5 + level / 2.0, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


__all__ = ["DEFAULT_THRESHOLD", "accuracy_ci", "auc_ci", "bootstrap_ci", "delong", "delong_ci",
           "delong_paired", "holm", "mean_ci", "minimum_detectable_difference",
           "paired_accuracy", "sign_test", "youden_threshold"]

"""cxr_ray.stats against hand-computed values, brute-force definitions and seeded simulations
with a known truth (CI coverage, test size and power)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from cxr_ray import metrics, stats

# ----------------------------------------------------------------------------- Youden


def _j(scores, labels, t):
    return metrics.sensitivity(scores, labels, t) + metrics.specificity(scores, labels, t) - 1


def test_youden_hand_examples():
    # Cuts: .075 → J .25, .125 → .5, .175 → .75, .25 → .42, .325 → .67, .625 → .33.
    s = [0.05, 0.1, 0.15, 0.2, 0.3, 0.35, 0.9]
    y = [0, 0, 0, 1, 0, 1, 1]
    assert stats.youden_threshold(s, y) == pytest.approx(0.175)
    # Separable: the midpoint of the gap.
    assert stats.youden_threshold([0.1, 0.2, 0.3, 0.7, 0.8], [0, 0, 0, 1, 1]) == pytest.approx(0.5)
    assert stats.youden_threshold([0.8, 0.85, 0.9, 0.95], [0, 0, 1, 1]) == pytest.approx(0.875)
    # J ties at .15 and .75 (both 0.5): the one nearer 0.5 wins.
    assert stats.youden_threshold([0.1, 0.2, 0.6, 0.9], [0, 1, 0, 1]) == pytest.approx(0.75)


def test_youden_fallbacks():
    assert stats.youden_threshold([], []) == 0.5
    assert stats.youden_threshold([0.1, 0.9], [1, 1]) == 0.5
    assert stats.youden_threshold([0.3, 0.3, 0.3], [0, 1, 0]) == 0.5
    # Inverted scores: no cut beats the trivial classifier.
    assert stats.youden_threshold([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.5


def test_youden_reaches_the_brute_force_maximum():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(4, 80))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 2)  # ties included
        best = max(_j(s, y, t) for t in np.unique(s))
        t = stats.youden_threshold(s, y)
        assert _j(s, y, t) == pytest.approx(max(best, 0.0))
        assert not np.isin(t, s) or best <= 0  # a midpoint, never an observed score


# ----------------------------------------------------------------------------- bootstrap


def _clustered_test_set(rng, patients=60, acc=0.8, concentration=2.0):
    """Patients with their own accuracy ~ Beta(mean acc): images of a patient correlated."""
    sizes = rng.integers(1, 5, patients)  # 1-4 images, ~150 in all
    groups = np.repeat(np.arange(patients), sizes)
    p = rng.beta(acc * concentration, (1 - acc) * concentration, patients)[groups]
    correct = rng.random(groups.size) < p
    labels = rng.integers(0, 2, groups.size)
    scores = np.where(correct == labels.astype(bool), 0.8, 0.2)  # right iff correct
    return scores, labels, groups, correct


def test_accuracy_ci_covers_the_truth_at_the_nominal_rate():
    # 200 test sets of ~150 images in 60 patients, true accuracy 0.8. The patient bootstrap
    # covers 0.8 in 94% of them; resampling images instead (groups=None) only in 85.5%.
    rng = np.random.default_rng(2)
    covered = 0
    for i in range(200):
        s, y, g, correct = _clustered_test_set(rng)
        assert metrics.accuracy(s, y) == pytest.approx(correct.mean())
        lo, hi = stats.accuracy_ci(s, y, g, n_boot=200, seed=i)
        assert lo <= correct.mean() <= hi
        covered += lo <= 0.8 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_accuracy_ci_is_the_bootstrap_of_metrics_accuracy():
    rng = np.random.default_rng(15)
    s, y, g, _ = _clustered_test_set(rng)
    s = rng.random(s.size)  # continuous scores, so the threshold matters
    for t in (0.5, 0.3):
        want = stats.bootstrap_ci(lambda a, b: metrics.accuracy(a, b, t), (s, y), g,
                                  n_boot=200, seed=7)
        assert stats.accuracy_ci(s, y, g, threshold=t, n_boot=200, seed=7) == want
    assert stats.accuracy_ci(s, y, g, n_boot=200) != stats.accuracy_ci(s, y, g, 0.3, n_boot=200)


def test_groups_matter():
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(50), 5)  # every patient: 5 identical images
    y_patient = rng.integers(0, 2, 50)
    s = np.clip(rng.normal(0.35 + 0.3 * y_patient, 0.25), 0, 1)[g]
    y = y_patient[g]
    lo_c, hi_c = stats.accuracy_ci(s, y, g, n_boot=500)
    lo_i, hi_i = stats.accuracy_ci(s, y, None, n_boot=500)  # as if 250 independent images
    assert (hi_c - lo_c) > 1.6 * (hi_i - lo_i)  # ≈ sqrt(5) in theory
    lo_c, hi_c = stats.auc_ci(s, y, g, n_boot=500)
    lo_i, hi_i = stats.auc_ci(s, y, None, n_boot=500)
    assert (hi_c - lo_c) > 1.6 * (hi_i - lo_i)


def test_resamples_draw_whole_patients_with_replacement():
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 6, 40)
    g = np.repeat(rng.permutation(1000)[:40], sizes)  # arbitrary, non-contiguous ids
    g = g[rng.permutation(g.size)]  # a patient's images scattered through the set
    size_of = dict(zip(*np.unique(g, return_counts=True)))
    seen_twice = []

    def distinct_fraction(drawn):
        ids, counts = np.unique(drawn, return_counts=True)
        assert all(c % size_of[i] == 0 for i, c in zip(ids, counts))  # whole patients only
        seen_twice.append(any(c > size_of[i] for i, c in zip(ids, counts)))
        return ids.size / 40

    lo, hi = stats.bootstrap_ci(distinct_fraction, (g,), g, n_boot=300)
    assert any(seen_twice)
    assert lo < 1 - (1 - 1 / 40) ** 40 < hi  # expected share of distinct patients ≈ 0.64
    assert stats.bootstrap_ci(distinct_fraction, (g,), g, n_boot=300) == (lo, hi)  # seeded


def test_nan_resamples_are_skipped_or_give_nan():
    g = np.arange(10)

    def needs_patient_zero(times):
        return lambda drawn: 1.0 if (drawn == 0).sum() >= times else math.nan

    # Patient 0 drawn at least once in ~65% of resamples, twice in ~26%.
    assert stats.bootstrap_ci(needs_patient_zero(1), (g,), g, n_boot=400) == (1.0, 1.0)
    assert all(map(math.isnan, stats.bootstrap_ci(needs_patient_zero(2), (g,), g, n_boot=400)))
    assert all(map(math.isnan, stats.auc_ci([0.2, 0.4, 0.6], [0, 0, 0], [1, 2, 3], n_boot=50)))
    assert all(map(math.isnan, stats.accuracy_ci([], [], [], n_boot=50)))
    with pytest.raises(ValueError):
        stats.accuracy_ci([0.2, 0.4], [0, 1], [1, 2, 3], n_boot=10)


# ----------------------------------------------------------------------------- DeLong


def _structural_components_variance(s, y):
    """DeLong's variance by brute force: the P×N kernel matrix, row and column means."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return psi.mean(), v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size


def test_delong_hand_example():
    # Positives .9, .6; negatives .7, .2, .1. V10 = (1, 2/3), V01 = (1/2, 1, 1):
    # AUC 5/6, Var = (1/18)/2 + (1/12)/3 = 1/18.
    auc, var = stats.delong([0.9, 0.6, 0.7, 0.2, 0.1], [1, 1, 0, 0, 0])
    assert auc == pytest.approx(5 / 6)
    assert var == pytest.approx(1 / 18)


def test_delong_matches_roc_auc_and_brute_force_variance():
    rng = np.random.default_rng(5)
    for _ in range(30):
        n = int(rng.integers(6, 70))
        y = rng.integers(0, 2, n)
        if min(y.sum(), n - y.sum()) < 2:
            continue
        s = rng.integers(0, 8, n) / 7.0  # many ties
        auc, var = stats.delong(s, y)
        want_auc, want_var = _structural_components_variance(s, y)
        assert auc == pytest.approx(metrics.roc_auc(s, y))
        assert auc == pytest.approx(want_auc)
        assert var == pytest.approx(want_var)


def test_delong_variance_matches_the_sampling_variance():
    rng = np.random.default_rng(6)
    y = np.r_[np.ones(40, int), np.zeros(60, int)]
    aucs, variances = [], []
    for _ in range(2000):
        s = rng.normal(1.0 * y, 1.0)
        auc, var = stats.delong(s, y)
        aucs.append(auc)
        variances.append(var)
    assert np.mean(variances) == pytest.approx(np.var(aucs), rel=0.15)


def test_delong_ci_and_degenerate_cases():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    s = rng.normal(y, 1.0)
    auc, var = stats.delong(s, y)
    lo, hi = stats.delong_ci(s, y)
    assert (lo + hi) / 2 == pytest.approx(auc)
    assert hi - lo == pytest.approx(2 * 1.959963984540054 * math.sqrt(var))
    assert stats.delong_ci(s, y, level=0.5)[1] - stats.delong_ci(s, y, level=0.5)[0] < hi - lo
    # Near-perfect separation on few images: clipped at 1.
    assert stats.delong_ci([0.1, 0.2, 0.3, 0.6, 0.9, 0.95], [0, 0, 1, 0, 1, 1])[1] == 1.0
    assert all(map(math.isnan, stats.delong([0.1, 0.2], [1, 1])))
    assert all(map(math.isnan, stats.delong_ci([0.1, 0.2], [0, 0])))


def test_delong_paired_finds_a_real_difference():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 300)
    strong, weak = rng.normal(2.0 * y, 1.0), rng.normal(0.5 * y, 1.0)
    r = stats.delong_paired(strong, weak, y)
    assert r["diff"] == pytest.approx(metrics.roc_auc(strong, y) - metrics.roc_auc(weak, y))
    assert r["p_value"] < 0.01 and r["ci"][0] > 0
    assert r["se"] > 0
    back = stats.delong_paired(weak, strong, y)
    assert back["diff"] == pytest.approx(-r["diff"]) and back["p_value"] == pytest.approx(r["p_value"])
    same = stats.delong_paired(strong, strong, y)
    assert same["diff"] == 0 and same["se"] == 0 and same["p_value"] == 1.0


def test_delong_paired_se_uses_the_correlation():
    # Two nearly identical models: the paired SE is far below the unpaired sqrt(va + vb).
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 300)
    a = rng.normal(y, 1.0)
    b = a + rng.normal(0, 0.1, 300)
    r = stats.delong_paired(a, b, y)
    unpaired = math.sqrt(stats.delong(a, y)[1] + stats.delong(b, y)[1])
    assert r["se"] < 0.3 * unpaired


def test_delong_paired_null_rejection_rate():
    rng = np.random.default_rng(10)
    rejections = 0
    sims = 400
    for _ in range(sims):
        y = rng.integers(0, 2, 200)
        latent = rng.normal(y, 1.0)  # two models of equal true AUC, correlated errors
        a, b = latent + rng.normal(0, 0.7, 200), latent + rng.normal(0, 0.7, 200)
        rejections += stats.delong_paired(a, b, y)["p_value"] < 0.05
    assert 0.01 <= rejections / sims <= 0.1


# ----------------------------------------------------------------------------- paired accuracy


def test_paired_accuracy_finds_a_real_difference():
    rng = np.random.default_rng(11)
    g = np.repeat(np.arange(200), 2)
    a, b = rng.random(400) < 0.85, rng.random(400) < 0.65
    r = stats.paired_accuracy(a, b, g, n_boot=500)
    assert r["diff"] == pytest.approx(a.mean() - b.mean())
    assert r["n"] == 400
    assert r["a_only"] == int((a & ~b).sum()) and r["b_only"] == int((~a & b).sum())
    assert r["p_value"] == pytest.approx(
        sps.binomtest(r["a_only"], r["a_only"] + r["b_only"]).pvalue)
    assert r["p_value"] < 0.01 and r["ci"][0] > 0
    assert 0 < r["mdd"] < r["diff"]


def test_paired_accuracy_null_rejection_rate():
    rng = np.random.default_rng(12)
    sims, p_rejections, ci_rejections = 200, 0, 0
    for i in range(sims):
        sizes = rng.integers(1, 4, 150)
        g = np.repeat(np.arange(150), sizes)
        a, b = rng.random(g.size) < 0.75, rng.random(g.size) < 0.75
        r = stats.paired_accuracy(a, b, g, n_boot=200, seed=i)
        p_rejections += r["p_value"] < 0.05
        ci_rejections += not r["ci"][0] <= 0 <= r["ci"][1]
    assert p_rejections / sims <= 0.1
    assert ci_rejections / sims <= 0.1


def test_paired_accuracy_without_discordant_images():
    c = np.array([True, False, True, True])
    r = stats.paired_accuracy(c, c, [1, 1, 2, 3], n_boot=50)
    assert r["diff"] == 0 and r["ci"] == (0.0, 0.0) and r["p_value"] == 1.0
    assert r["a_only"] == r["b_only"] == 0
    assert r["mdd"] == pytest.approx(stats.minimum_detectable_difference(4, 0.25))


def test_minimum_detectable_difference():
    z = 1.959963984540054 + 0.8416212335729143
    assert stats.minimum_detectable_difference(1000, 0.1) == pytest.approx(z * math.sqrt(1e-4))
    mdds = [stats.minimum_detectable_difference(n, 0.2) for n in (100, 400, 1600, 6400)]
    assert all(x > y for x, y in zip(mdds, mdds[1:]))
    assert mdds[0] / mdds[1] == pytest.approx(2.0)  # ∝ 1/sqrt(n)
    assert stats.minimum_detectable_difference(500, 0.0) == pytest.approx(z / 500)  # ψ ≥ 1/n
    assert stats.minimum_detectable_difference(500, 0.0) > 0
    assert (stats.minimum_detectable_difference(500, 0.2, power=0.9)
            > stats.minimum_detectable_difference(500, 0.2))
    assert math.isnan(stats.minimum_detectable_difference(0, 0.1))


def test_minimum_detectable_difference_has_the_stated_power():
    # Simulate McNemar tests at a true difference of exactly the MDD: power ≈ 0.8.
    rng = np.random.default_rng(13)
    n, psi = 500, 0.2
    delta = stats.minimum_detectable_difference(n, psi)
    hits, sims = 0, 400
    for _ in range(sims):
        discordant = rng.binomial(n, psi)
        a_only = rng.binomial(discordant, (1 + delta / psi) / 2)
        hits += sps.binomtest(a_only, discordant).pvalue < 0.05
    assert 0.72 <= hits / sims <= 0.92


# ----------------------------------------------------------------------------- Holm, sign, mean


def test_holm_hand_example():
    # Finite p sorted: .005×4 = .02, .01×3 = .03, .03×2 = .06, .04×1 → max(.06, .04) = .06.
    got = stats.holm([0.01, math.nan, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(got, [0.03, math.nan, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])  # capped
    np.testing.assert_allclose(stats.holm([0.2]), [0.2])
    assert stats.holm([]).size == 0
    assert np.isnan(stats.holm([math.nan, math.nan])).all()


def test_holm_is_monotone_and_between_raw_and_bonferroni():
    p = np.random.default_rng(14).random(25) ** 3
    adj = stats.holm(p)
    order = np.argsort(p)
    assert (np.diff(adj[order]) >= 0).all()
    assert (adj >= p).all() and (adj <= np.minimum(p * p.size, 1)).all()


def test_sign_test_known_values():
    assert stats.sign_test(9, 1) == pytest.approx(0.021484375)  # 2·(1 + 10)/1024
    assert stats.sign_test(1, 9) == pytest.approx(0.021484375)
    assert stats.sign_test(10, 0) == pytest.approx(2 / 1024)
    assert stats.sign_test(5, 5) == 1.0
    assert stats.sign_test(0, 0) == 1.0


def test_mean_ci():
    assert stats.mean_ci([0.7, math.nan])[0] == 0.7
    assert all(map(math.isnan, stats.mean_ci([0.7])[1:]))
    assert all(map(math.isnan, stats.mean_ci([])))
    assert all(map(math.isnan, stats.mean_ci([math.nan])))
    mean, lo, hi = stats.mean_ci([1.0, 2.0, 3.0, math.nan])
    # s = 1, n = 3, t_{0.975, 2} = 4.303 (t table).
    assert mean == 2.0
    assert hi - mean == pytest.approx(mean - lo)
    assert hi - mean == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert stats.mean_ci([0.8, 0.8, 0.8]) == pytest.approx((0.8, 0.8, 0.8))

"""The report's uncertainty and the study's question, on constructed experiments whose truth
is known: validation selects, test reports; paired comparisons find a real difference and
not a null one; seeds pool; the closing sentence counts the cohorts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxr_ray import paths
from cxr_ray.sweep import compare, report, results

N_TEST, N_VAL = 400, 60


def _scores(rng, labels, accuracy):
    """Scores whose 0.5-threshold decisions are right with probability ``accuracy``."""
    right = rng.random(len(labels)) < accuracy
    confident = rng.uniform(0.55, 0.95, len(labels))
    positive = np.where(right, labels == 1, labels == 0)
    return np.where(positive, confident, 1 - confident)


def _run(root, stage, cohort, policy, seed, val_accs, test_acc, *, rng, seeds=1,
         selected=None):
    """A finished trial: history with validation accuracies ``val_accs`` (test numbers that
    disagree), and the per-image scores of its selected epoch, right at ``test_acc``."""
    name = f"{cohort}__{policy}" + (f"__seed{seed}" if seeds > 1 else "")
    run = root / stage / name
    run.mkdir(parents=True)
    best = selected or int(np.argmax(val_accs)) + 1
    history = [{"epoch": i + 1, "val_accuracy": a, "val_auc": a, "val_threshold": 0.5,
                "test_accuracy": 1 - a, "test_accuracy_at_threshold": 1 - a,
                "test_auc": 0.5, "test_images": N_TEST, "val_images": N_VAL,
                "epoch_seconds": 10.0, "elapsed_seconds": 10.0 * (i + 1), "train_images": 100}
               for i, a in enumerate(val_accs)]
    labels = np.tile([0, 1], N_TEST // 2)
    scores = _scores(rng, labels, test_acc)
    history[best - 1]["test_accuracy_at_threshold"] = float(np.mean((scores >= 0.5) == labels))
    (run / paths.HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))
    (run / paths.TRIAL_FILE).write_text(json.dumps(
        {"stage": stage, "cohort": cohort, "policy": policy, "seed": seed, "axes": {},
         "selected_epoch": best}))
    (run / paths.CONFIG_FILE).write_text(json.dumps(
        {"epochs": len(val_accs), "model": {"name": "m"}, "optimizer": {"name": "sgd"},
         "policy": {"name": policy}}))
    ids = np.arange(N_TEST) + 1000
    pred = paths.predictions_file(run, best)
    pred.parent.mkdir()
    np.savez(pred, test_image_id=ids, test_patient_id=ids // 2, test_score=scores,
             test_label=labels, val_image_id=np.arange(N_VAL), val_patient_id=np.arange(N_VAL),
             val_score=np.full(N_VAL, 0.5), val_label=np.tile([0, 1], N_VAL // 2))
    return run


def test_the_validation_best_epoch_gives_the_headline_not_the_test_best(tmp_path):
    rng = np.random.default_rng(0)
    # validation peaks at epoch 2; the test curve (1 - val) would pick epoch 1
    _run(tmp_path, "stage2", "Mass", "constant", 0, [0.6, 0.8, 0.7], 0.75, rng=rng)
    res = results.results_table(results.find_runs(tmp_path))
    row = res.iloc[0]
    assert row["selected_epoch"] == 2 and row["best_val_accuracy"] == 0.8
    assert row["test_accuracy"] != pytest.approx(0.4)  # not the test-best epoch's number
    pred = compare.load_predictions(tmp_path / "stage2" / "Mass__constant", 2)
    assert row["test_accuracy"] == pytest.approx(np.mean((pred["test_score"] >= 0.5)
                                                         == pred["test_label"]))
    assert row["test_accuracy_ci_low"] < row["test_accuracy"] < row["test_accuracy_ci_high"]
    assert 0.05 < row["test_accuracy_ci_high"] - row["test_accuracy_ci_low"] < 0.15


def _experiment(root, seeds=1):
    """Two cohorts. Mass: triangular truly better than constant (0.90 vs 0.70), triangular2
    the same as constant. Nodule: everything the same; triangular reaches constant's best
    validation accuracy later."""
    rng = np.random.default_rng(1)
    for seed in range(seeds):
        kw = {"rng": rng, "seeds": seeds}
        _run(root, "stage2", "Mass", "constant", seed, [0.6, 0.7, 0.75, 0.8], 0.70, **kw)
        _run(root, "stage2", "Mass", "triangular", seed, [0.8, 0.85, 0.9, 0.9], 0.90, **kw)
        _run(root, "stage2", "Mass", "triangular2", seed, [0.6, 0.7, 0.8, 0.8], 0.70, **kw)
        _run(root, "stage2", "Nodule", "constant", seed, [0.7, 0.75, 0.75, 0.7], 0.75, **kw)
        _run(root, "stage2", "Nodule", "triangular", seed, [0.6, 0.7, 0.7, 0.76], 0.75, **kw)


def test_paired_comparison_finds_the_real_difference_and_not_the_null(tmp_path):
    _experiment(tmp_path)
    res = results.results_table(results.find_runs(tmp_path))
    paired = compare.paired_against_constant(res).set_index(["cohort", "policy"])
    real = paired.loc[("Mass", "triangular")]
    assert real["diff"] == pytest.approx(0.2, abs=0.06) and real["ci_low"] > 0.1
    assert real["p_holm"] < 1e-4 and real["verdict"] == "policy more accurate"
    null = paired.loc[("Mass", "triangular2")]
    assert null["p_holm"] > 0.05 and null["verdict"] != "policy more accurate"
    assert null["ci_low"] < 0 < null["ci_high"] or abs(null["diff"]) < 0.05
    assert 0 < real["mdd"] < 0.2
    assert (paired["p_holm"] >= paired["p_value"]).all()  # Holm never lowers a p
    assert set(paired["test"]) == {"McNemar exact"}


def test_verdicts_tell_no_difference_from_too_few_images():
    row = dict(p_holm=0.5, diff=0.0)
    assert compare._verdict(pd.Series({**row, "ci_low": -0.03, "ci_high": 0.04})) == \
        "no difference found"
    assert compare._verdict(pd.Series({**row, "ci_low": -0.2, "ci_high": 0.2})) == \
        "too few images to tell"
    assert compare._verdict(pd.Series({"p_holm": 0.001, "diff": -0.1, "ci_low": -0.15,
                                       "ci_high": -0.05})) == "constant more accurate"


def test_the_study_question_is_answered_in_one_sentence(tmp_path):
    _experiment(tmp_path)
    table, sentence = compare.study_question(results.results_table(results.find_runs(tmp_path)))
    table = table.set_index("cohort")
    # Mass: triangular (best val 0.9) reaches constant's 0.8 at epoch 1, constant at 4
    assert table.loc["Mass", "chosen_policy"] == "triangular"
    assert table.loc["Mass", "outcome"] == "sooner"
    assert (table.loc["Mass", "chosen_epochs"], table.loc["Mass", "constant_epochs"]) == (1, 4)
    # Nodule: triangular reaches 0.75 at epoch 4, constant at epoch 2
    assert table.loc["Nodule", "outcome"] == "later"
    assert "sooner in 1 of 2 cohorts (later or never in 1, tied in 0)" in sentence
    assert "p = 1" in sentence


def test_seeds_pool_into_means_with_intervals_over_seeds(tmp_path):
    _experiment(tmp_path, seeds=3)
    res = results.results_table(results.find_runs(tmp_path))
    assert len(res) == 15 and sorted(set(res["seed"])) == [0, 1, 2]
    agg = results.over_seeds(res).set_index(["cohort", "policy"])
    assert len(agg) == 5 and (agg["seeds"] == 3).all()
    mass = agg.loc[("Mass", "triangular")]
    own = res[(res["cohort"] == "Mass") & (res["policy"] == "triangular")]["test_accuracy"]
    assert mass["test_accuracy"] == pytest.approx(own.mean())
    assert mass["test_accuracy_ci_low"] < own.mean() < mass["test_accuracy_ci_high"]
    paired = compare.paired_against_constant(res).set_index(["cohort", "policy"])
    assert paired.loc[("Mass", "triangular"), "seeds"] == 3
    assert paired.loc[("Mass", "triangular"), "p_value"] < 0.01
    assert paired.loc[("Mass", "triangular2"), "p_value"] > 0.05
    md = report.write_report(tmp_path).read_text()
    for text in ("The study's question", "paired on the same test images", "sign test",
                 "Which split each number comes from", "Student-t over seeds"):
        assert text in md, text
    assert (tmp_path / "report" / "paired.csv").is_file()

"""The report's arithmetic: epochs and compute to a target, best epoch, policy ranking."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cxr_ray.sweep import report, results


def _history(accs, seconds=10.0):
    """Validation accuracies ``accs``; test numbers that never agree with them (so a test
    that read test where it should read validation fails)."""
    return [{"epoch": i + 1, "val_accuracy": a, "val_threshold": 0.5, "epoch_seconds": seconds,
             "elapsed_seconds": seconds * (i + 1) + 5, "train_images": 100, "val_loss": 1 - a,
             "test_accuracy": 1 - a, "test_accuracy_at_threshold": 1 - a, "test_auc": a / 2,
             "test_sensitivity_at_threshold": a, "test_specificity_at_threshold": a}
            for i, a in enumerate(accs)]


def test_crossing_counts_epochs_and_compute_to_the_first_epoch_at_target():
    h = _history([0.6, 0.7, 0.79, 0.81, 0.78])
    assert results.crossing(h, 0.79) == {"epochs": 3, "compute_seconds": 30.0, "wall_seconds": 35.0}
    assert results.crossing(h, 0.81)["epochs"] == 4
    assert results.crossing(h, 0.9) == {"epochs": None, "compute_seconds": None, "wall_seconds": None}
    assert results.best(h) == (0.81, 4)
    assert results.best([]) == (None, None)


def _write_run(root, stage, cohort, policy, accs):
    folder = root / stage / f"{cohort}__{policy}"
    folder.mkdir(parents=True)
    (folder / "trial.json").write_text(json.dumps(
        {"stage": stage, "cohort": cohort, "policy": policy, "axes": {}, "lr_source": "lr_find"}))
    (folder / "config.json").write_text(json.dumps(
        {"epochs": len(accs), "model": {"name": "mobilenet_v1"}, "optimizer": {"name": "sgd"},
         "policy": {"name": policy, "base_lr": 0.01, "max_lr": 0.04, "step_size": 4},
         "batch_size": 16, "image_size": 48}))
    (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _history(accs)))


def test_targets_from_the_constant_policy_and_the_ranking(tmp_path):
    _write_run(tmp_path, "stage1", "Fibrosis", "time_decay", [0.6, 0.66])
    _write_run(tmp_path, "stage2", "Fibrosis", "constant", [0.7, 0.75, 0.8, 0.85])
    _write_run(tmp_path, "stage2", "Fibrosis", "triangular", [0.72, 0.86, 0.87, 0.88])
    _write_run(tmp_path, "stage2", "Fibrosis", "modified_triangular2", [0.7, 0.8, 0.85, 0.9])
    _write_run(tmp_path, "stage2", "Mass", "constant", [0.6, 0.7])
    _write_run(tmp_path, "stage2", "Mass", "triangular", [0.6, 0.65])
    runs = results.find_runs(tmp_path)
    res = results.results_table(runs, "constant").set_index(["stage", "cohort", "policy"])
    fib = res.loc["stage2", "Fibrosis"]
    assert (fib["target_val_accuracy"] == 0.85).all()
    # the headline test number is the validation-best epoch's (epoch 4 of constant)
    assert fib.loc["constant", "test_accuracy"] == pytest.approx(0.15)
    assert fib.loc["triangular", "epochs_to_target"] == 2
    assert fib.loc["modified_triangular2", "epochs_to_target"] == 3
    assert fib.loc["constant", "epochs_to_target"] == 4
    assert fib.loc["triangular", "compute_seconds_to_target"] == 20.0
    assert pd.isna(res.loc[("stage2", "Mass", "triangular"), "epochs_to_target"])
    ranking = results.rank_policies(results.results_table(runs, "constant"))
    assert ranking["policy"].tolist()[0] == "triangular"
    top = ranking.set_index("policy")
    assert top.loc["triangular", "best_in_cohorts"] == 1  # Fibrosis
    assert top.loc["constant", "best_in_cohorts"] == 1    # Mass: only constant reached 0.7
    # A fixed target works too.
    fixed = results.results_table(runs, 0.8).set_index(["stage", "cohort", "policy"])
    assert fixed.loc[("stage2", "Fibrosis", "constant"), "epochs_to_target"] == 3


def test_write_report_has_every_table_and_refuses_an_empty_dir(tmp_path):
    from cxr_ray.errors import UserError

    with pytest.raises(UserError, match="no trials found"):
        report.write_report(tmp_path)
    _write_run(tmp_path, "stage1", "Fibrosis", "time_decay", [0.6, 0.66])
    _write_run(tmp_path, "stage2", "Fibrosis", "constant", [0.7, 0.75])
    _write_run(tmp_path, "stage2", "Fibrosis", "triangular", [0.72, 0.86])
    md = report.write_report(tmp_path).read_text()
    for heading in ("Policy ranking", "Best policy per cohort", "Epochs (compute seconds)",
                    "Table 5", "Table 7", "Table 8", "curves_Fibrosis.png"):
        assert heading in md, heading
    results = pd.read_csv(tmp_path / "report" / "results.csv")
    assert len(results) == 3 and (tmp_path / "report" / "curves_Fibrosis.png").stat().st_size > 0

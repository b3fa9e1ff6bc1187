"""cxr-ray status on a synthetic experiment directory (files only, no Ray): every state a
trial can be in, per stage, and the best result per cohort so far.

(tests/test_autoscale.py also runs it on a real sweep, while it runs and after.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_ray import cli, paths
from cxr_ray.sweep import recipe as config, status

RECIPE = {
    "experiment": {"name": "synthetic", "shards": "/nonexistent/shards",
                   "cohorts": ["Cardiomegaly", "Effusion"]},
    "train": {"width": 0.25, "image_size": 32},
    "stage1": {"epochs": 2},
    "lr_find": {"num_steps": 10},
    "stage2": {"epochs": 3},
    "grid": {"policy": ["constant", "triangular"]},
}


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def _run(exp: Path, stage: str, name: str, accuracies: list[float], epochs: int,
         policy: str, finished: bool = False, summary: bool = False) -> None:
    run = exp / stage / name
    _write(run / "config.json", {"epochs": epochs, "policy": {"name": policy}})
    _write(run / "history.jsonl", "".join(
        json.dumps({"epoch": i + 1, "val_accuracy": a, "test_accuracy": a - 0.1,
                    "test_accuracy_at_threshold": a - 0.05, "test_auc": 0.5}) + "\n"
        for i, a in enumerate(accuracies)))
    if summary or finished:
        _write(run / "summary.json", {})
    if finished:
        _write(run / "trial.json", {"stage": stage, "status": "finished", "metrics": {}})


def _tune_state(exp: Path, stage: str, statuses: dict[str, str]) -> None:
    entries = [[json.dumps({"status": s, "config": {"spec": {"run_name": name}}}),
                json.dumps({"error_filename": "error.txt" if s == "ERROR" else None})]
               for name, s in statuses.items()]
    _write(exp / "tune" / stage / "experiment_state-2026-01-01_00-00-00.json",
           {"trial_data": entries, "runner_data": {}})


@pytest.fixture
def experiment(tmp_path) -> Path:
    """Stage 1: Cardiomegaly finished, Effusion in its LR range test after 2 epochs.
    Stage 2: Cardiomegaly constant finished, triangular failed (Tune: ERROR), Effusion's two
    trials pending; plus a trial Tune retried after an error that then finished."""
    exp = tmp_path / "synthetic"
    recipe = config.parse_recipe(json.loads(json.dumps(RECIPE)), "synthetic.toml")
    _write(exp / paths.RECIPE_FILE, json.dumps(recipe.to_dict(), default=str))
    _run(exp, "stage1", "Cardiomegaly", [0.60, 0.70], 2, "time_decay", finished=True)
    _run(exp, "stage1", "Effusion", [0.55, 0.65], 2, "time_decay", summary=True)
    _run(exp, "stage2", "Cardiomegaly__constant", [0.72, 0.74, 0.71], 3, "constant",
         finished=True)
    _run(exp, "stage2", "Cardiomegaly__triangular", [0.69], 3, "triangular")
    _tune_state(exp, "stage1", {"Cardiomegaly": "TERMINATED", "Effusion": "RUNNING"})
    _tune_state(exp, "stage2", {"Cardiomegaly__constant": "ERROR",  # retried, then finished
                                "Cardiomegaly__triangular": "ERROR",
                                "Effusion__constant": "PENDING"})
    _write(exp / "tune" / "stage2" / "Cardiomegaly__triangular" / "error.txt",
           "Traceback (most recent call last):\n  ...\nRuntimeError: the node died\n")
    return exp


def _states(result: dict, stage: str) -> dict[str, tuple]:
    return {t["run"]: (t["state"], t["epoch"], t["epochs"], t["note"])
            for t in result["stages"][stage]["trials"]}


def test_every_planned_trial_gets_its_state(experiment):
    result = status.experiment_status(experiment)
    assert _states(result, "stage1") == {
        "Cardiomegaly": ("finished", 2, 2, None),
        "Effusion": ("running", 2, 2, "LR range test")}
    assert _states(result, "stage2") == {
        "Cardiomegaly__constant": ("finished", 3, 3, None),
        "Cardiomegaly__triangular": ("failed", 1, 3, "RuntimeError: the node died"),
        "Effusion__constant": ("pending", 0, 3, None),
        "Effusion__triangular": ("pending", 0, 3, None)}
    assert "comparison" not in result["stages"]  # none planned
    assert result["stages"]["stage2"]["counts"] == {
        "finished": 1, "running": 0, "pending": 2, "failed": 1}
    assert result["counts"] == {"finished": 2, "running": 1, "pending": 2, "failed": 1}


def test_best_so_far_is_stage2_per_cohort_else_stage1(experiment):
    best = status.experiment_status(experiment)["best"]
    assert best["Cardiomegaly"] == {"stage": "stage2", "policy": "constant",
                                    "run": "Cardiomegaly__constant", "val_accuracy": 0.74,
                                    "test_accuracy": pytest.approx(0.69),
                                    "epoch": 2, "state": "finished"}
    assert best["Effusion"]["stage"] == "stage1" and best["Effusion"]["val_accuracy"] == 0.65
    # a running stage-2 trial that beats the finished one takes over
    _run(experiment, "stage2", "Effusion__triangular", [0.80], 3, "triangular")
    best = status.experiment_status(experiment)["best"]
    assert (best["Effusion"]["policy"], best["Effusion"]["state"]) == ("triangular", "running")


def test_status_command_text_and_json(experiment, capsys):
    assert cli.main(["status", "--experiment", str(experiment)]) == 0
    out = capsys.readouterr().out
    assert "2 finished, 1 running, 2 pending, 1 failed" in out
    assert "stage2: 1/4 finished, 0 running, 2 pending, 1 failed" in out
    line = next(ln for ln in out.splitlines() if "Cardiomegaly__triangular" in ln)
    assert "failed" in line and "epoch 1/3" in line and "the node died" in line
    assert "Cardiomegaly: constant val 74.0%, test 69.0% at epoch 2 (finished)" in out
    assert cli.main(["status", "--experiment", str(experiment), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"experiment", "stages", "best", "counts"}


def test_a_partly_written_history_line_is_not_an_error(experiment):
    path = experiment / "stage2" / "Cardiomegaly__triangular" / "history.jsonl"
    path.write_text(path.read_text() + '{"epoch": 2, "test_acc')
    row = next(t for t in status.experiment_status(experiment)["stages"]["stage2"]["trials"]
               if t["run"] == "Cardiomegaly__triangular")
    assert row["state"] == "failed"


def test_not_an_experiment_is_one_line(tmp_path, capsys):
    assert cli.main(["status", "--experiment", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "recipe.json" in err and len(err.strip().splitlines()) == 1

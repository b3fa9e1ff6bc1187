"""Where a sweep stands, from its experiment directory alone (``cxr-ray status``).

Reads only files, so it works while the sweep runs (from any machine that mounts the
experiment), after it finished, and after its driver died::

    EXP/recipe.json                    the planned trials (cxr_ray.sweep.plan.plan_trials)
    EXP/<stage>/<run>/trial.json       a finished trial
    EXP/<stage>/<run>/config.json, history.jsonl   a started trial and its finished epochs
    EXP/<stage>/<run>/summary.json     its training is done (a stage-1 trial may still run
                                       its LR range test: EXP/lr_find/<run>/lr_find.json)
    EXP/tune/<stage>/experiment_state-*.json      Tune's trial states (ERROR: failed)

A trial is **finished** (its ``trial.json``), **failed** (Tune recorded an error and it has not
finished since), **running** (started: a run directory or Tune says so; shown with its
finished epochs; a sweep whose driver was killed leaves its trials "running" until it is
resumed) or **pending**. The best result so far per cohort is the stage-2 policy with the
highest test accuracy of any finished epoch (stage 1's model while no stage-2 epoch exists).
No Ray, no torch training: safe to run next to a sweep.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxr_ray import paths
from cxr_ray.sweep import results
from cxr_ray.errors import UserError

STAGES = paths.STAGES
STATES = ("finished", "running", "pending", "failed")
LR_FIND_DIR = paths.LR_FIND_DIR
_read_json = paths.read_json


def _history(run_dir: Path) -> list[dict[str, Any]]:
    """history.jsonl's epochs (a line being written is skipped)."""
    return paths.read_jsonl(run_dir / paths.HISTORY_FILE)


def tune_states(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """``{run name: {"status": ..., "error": ...}}`` from Tune's newest experiment state in
    ``stage_dir`` (``EXP/tune/<stage>``); empty when there is none (not started)."""
    files = sorted(stage_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    data = _read_json(files[-1]) if files else None
    out: dict[str, dict[str, Any]] = {}
    for entry in (data or {}).get("trial_data", []):
        try:
            trial = json.loads(entry[0])
            meta = json.loads(entry[1]) if len(entry) > 1 else {}
            name = trial["config"]["spec"]["run_name"]
        except (ValueError, KeyError, TypeError, IndexError):
            continue
        error = None
        if trial.get("status") == "ERROR":
            error_file = stage_dir / name / "error.txt"
            text = error_file.read_text().strip() if error_file.is_file() else ""
            error = text.splitlines()[-1] if text else (meta.get("error_filename") or "error")
        out[name] = {"status": trial.get("status"), "error": error}
    return out


def trial_status(spec: Any, experiment: Path, tune: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One planned trial (a :class:`cxr_ray.sweep.plan.TrialSpec`): state, epochs, last metrics."""
    run_dir = experiment / spec.stage / spec.run_name
    plan = _read_json(run_dir / paths.CONFIG_FILE) or {}
    history = _history(run_dir)
    last = history[-1] if history else {}
    accuracy, best_epoch = results.best(history)  # validation: what selects
    at_best = next((r for r in history if r["epoch"] == best_epoch), {})
    row: dict[str, Any] = {
        "stage": spec.stage, "run": spec.run_name, "cohort": spec.cohort,
        "policy": spec.policy or (plan.get("policy") or {}).get("name"), "axes": spec.axes,
        "epoch": int(last.get("epoch", 0)), "epochs": plan.get("epochs") or
        spec.train.get("epochs"), "val_accuracy": last.get("val_accuracy"),
        "test_accuracy": last.get("test_accuracy"), "test_auc": last.get("test_auc"),
        "best_accuracy": accuracy, "best_epoch": best_epoch,
        "best_test_accuracy": at_best.get("test_accuracy_at_threshold"), "note": None}
    tuned = tune.get(spec.run_name, {})
    if (run_dir / paths.TRIAL_FILE).is_file():
        row["state"] = "finished"
    elif tuned.get("status") == "ERROR":
        row["state"], row["note"] = "failed", tuned.get("error")
    elif plan or history or tuned.get("status") == "RUNNING":
        row["state"] = "running"
        if (run_dir / "summary.json").is_file() and spec.lr_find is not None:
            row["note"] = "LR range test"
    else:
        row["state"] = "pending"
    return row


def experiment_status(experiment: str | Path) -> dict[str, Any]:
    """Every planned trial's state per stage, counts, and the best result per cohort."""
    from cxr_ray.sweep import plan as sweep, recipe as config

    experiment = Path(experiment).expanduser().resolve()
    stored = _read_json(experiment / paths.RECIPE_FILE)
    if stored is None:
        raise UserError(f"{experiment}: no readable {paths.RECIPE_FILE}; pass the directory "
                        "a cxr-ray sweep writes (storage_path/name of its recipe)")
    source = stored.pop("source", "") or str(experiment / paths.RECIPE_FILE)
    planned = sweep.plan_trials(config.parse_recipe(stored, source))
    stages: dict[str, Any] = {}
    for stage, specs in zip(STAGES, planned):
        if not specs:
            continue
        tune = tune_states(experiment / "tune" / stage)
        trials = [trial_status(s, experiment, tune) for s in specs]
        counts = {state: sum(t["state"] == state for t in trials) for state in STATES}
        stages[stage] = {"trials": trials, "counts": counts}
    return {"experiment": str(experiment), "stages": stages, "best": best_so_far(stages),
            "counts": {s: sum(v["counts"][s] for v in stages.values()) for s in STATES}}


def best_so_far(stages: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per cohort: the stage-2 trial with the best validation accuracy of any finished epoch
    (or the stage-1 one while stage 2 has none), with that epoch's test accuracy."""
    best: dict[str, dict[str, Any]] = {}
    for stage in ("stage1", "stage2"):
        for t in stages.get(stage, {}).get("trials", []):
            if t["best_accuracy"] is None:
                continue
            current = best.get(t["cohort"])
            if (current is None or current["stage"] != stage or
                    t["best_accuracy"] > current["val_accuracy"]):
                best[t["cohort"]] = {"stage": stage, "policy": t["policy"], "run": t["run"],
                                     "val_accuracy": t["best_accuracy"],
                                     "test_accuracy": t["best_test_accuracy"],
                                     "epoch": t["best_epoch"], "state": t["state"]}
    return best


def format_status(status: dict[str, Any]) -> str:
    """The status as text: a line per stage, a line per trial, the best results."""
    def pct(x: Any) -> str:
        return "   –  " if x is None else f"{100 * x:5.1f}%"

    c = status["counts"]
    lines = [f"{status['experiment']}: " + ", ".join(f"{c[s]} {s}" for s in STATES)]
    for stage, info in status["stages"].items():
        k = info["counts"]
        lines.append(f"{stage}: {k['finished']}/{len(info['trials'])} finished, "
                     f"{k['running']} running, {k['pending']} pending, {k['failed']} failed")
        width = max(len(t["run"]) for t in info["trials"])
        for t in info["trials"]:
            epochs = f"epoch {t['epoch']}/{t['epochs'] or '?'}" if t["state"] != "pending" else ""
            acc = (f"val acc {pct(t['val_accuracy'])}  test acc {pct(t['test_accuracy'])}"
                   if t["val_accuracy"] is not None else "")
            note = f"({t['note']})" if t["note"] else ""
            lines.append("  " + "  ".join(x for x in (
                t["run"].ljust(width), t["state"].ljust(8), epochs.ljust(12), acc, note) if x
            ).rstrip())
    if status["best"]:
        lines.append("best so far (selected on validation accuracy; test accuracy of that "
                     "epoch at the validation-chosen threshold):")
        for cohort, b in status["best"].items():
            label = b["policy"] if b["stage"] == "stage2" else f"{b['policy']} (stage 1)"
            lines.append(f"  {cohort}: {label} val {pct(b['val_accuracy']).strip()}, test "
                         f"{pct(b['test_accuracy']).strip()} at epoch {b['epoch']} "
                         f"({b['state']})")
    return "\n".join(lines)

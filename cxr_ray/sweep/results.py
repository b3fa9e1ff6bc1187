"""What the report computes from an experiment's runs: one row per trial, read from its run
directory, with the validation-selected epoch, the validation target and the epochs /
compute to reach it; seeds pooled; policies ranked. :mod:`cxr_ray.sweep.report` writes it.

Validation selects, test reports: :data:`METRIC` selects, targets and ranks; :func:`selected`
is the epoch whose test numbers are the headline.

A run is a directory with ``trial.json`` (written by the sweep: stage, cohort, policy, axes,
lr bounds and their source), ``config.json`` (the resolved plan) and ``history.jsonl`` (one
line per epoch). pandas only: no Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_ray import paths

#: What selects, targets and ranks: validation accuracy (test is reported, never chosen on).
METRIC = "val_accuracy"


# ----------------------------------------------------------------------------- maths
def crossing(history: list[dict[str, Any]], target: float, metric: str = METRIC
             ) -> dict[str, float | int | None]:
    """First epoch whose ``metric`` reaches ``target``, with the compute and wall time to it.

    ``compute_seconds`` sums the epochs' train + eval seconds up to and including that
    epoch; ``wall_seconds`` is the run's elapsed time at its end.  All ``None`` when the run
    never reaches the target.
    """
    compute = 0.0
    for record in history:
        compute += float(record.get("epoch_seconds") or 0.0)
        value = record.get(metric)
        if value is not None and value >= target - 1e-12:
            return {"epochs": int(record["epoch"]), "compute_seconds": compute,
                    "wall_seconds": float(record.get("elapsed_seconds") or compute)}
    return {"epochs": None, "compute_seconds": None, "wall_seconds": None}


def best(history: list[dict[str, Any]], metric: str = METRIC) -> tuple[float | None, int | None]:
    """Best value of ``metric`` and the (first) epoch it was reached."""
    scored = [(r[metric], r["epoch"]) for r in history if r.get(metric) is not None]
    if not scored:
        return None, None
    value = max(v for v, _ in scored)
    return value, min(e for v, e in scored if v == value)


def rank_policies(results: pd.DataFrame) -> pd.DataFrame:
    """Policies ranked within each cohort (fewest epochs to the validation target, then best
    validation accuracy), over the seed-averaged rows of :func:`over_seeds`.

    Returns one row per policy: mean rank, cohorts where it was best, how often it reached
    the target, median epochs to target, mean best validation and mean test accuracy.
    """
    stage2 = results[results["stage"] == "stage2"].copy()
    if stage2.empty:
        return pd.DataFrame()
    never = stage2["epochs"].max() + 1
    # Lexicographic (epochs to target, then -accuracy) as one number: accuracy is in [0, 1].
    key = (stage2["epochs_to_target"].fillna(never) * 10
           + (1 - stage2["best_val_accuracy"].fillna(0)))
    stage2["rank"] = key.groupby(stage2["cohort"]).rank(method="min")
    wins = stage2[stage2["rank"] == 1].groupby("policy").size()
    table = stage2.groupby("policy").agg(
        mean_rank=("rank", "mean"),
        reached=("epochs_to_target", lambda s: int(s.notna().sum())),
        trials=("cohort", "size"),
        median_epochs_to_target=("epochs_to_target", "median"),
        mean_best_val_accuracy=("best_val_accuracy", "mean"),
        mean_test_accuracy=("test_accuracy", "mean"),
        mean_compute_seconds=("compute_seconds", "mean"),
    )
    table["best_in_cohorts"] = wins.reindex(table.index).fillna(0).astype(int)
    return table.sort_values(["mean_rank", "mean_best_val_accuracy"],
                             ascending=[True, False]).reset_index()


# ----------------------------------------------------------------------------- reading
@dataclass
class Run:
    """One trial's directory, as the report sees it."""

    path: Path
    trial: dict[str, Any]
    plan: dict[str, Any]
    history: list[dict[str, Any]]


def find_runs(experiment: Path) -> list[Run]:
    """Every run under ``experiment`` that has a ``trial.json``, in a stable order."""
    runs = []
    for trial_file in sorted(Path(experiment).rglob(paths.TRIAL_FILE)):
        folder = trial_file.parent
        plan_file = folder / paths.CONFIG_FILE
        runs.append(Run(
            path=folder,
            trial=json.loads(trial_file.read_text()),
            plan=json.loads(plan_file.read_text()) if plan_file.is_file() else {},
            history=paths.read_jsonl(folder / paths.HISTORY_FILE),
        ))
    return runs


def _key(trial: dict[str, Any]) -> tuple[str, int]:
    return trial["cohort"], int(trial.get("seed") or 0)


def _targets(runs: list[Run], target: float | str) -> dict[tuple[str, int], float]:
    """Target validation accuracy per (cohort, seed).

    A number is used for every cohort.  ``"constant"`` (default) is the study's comparison:
    the best validation accuracy the ``constant`` policy reached in stage 2 for that cohort
    and seed, so the question becomes "how many epochs does each policy need to do what
    constant lr did".  ``"stage1"``: the stage-1 model's best validation accuracy.
    """
    if isinstance(target, (int, float)):
        return {_key(r.trial): float(target) for r in runs}
    out: dict[tuple[str, int], float] = {}
    for r in runs:
        want = (r.trial.get("stage") == "stage2" and r.trial.get("policy") == "constant"
                if target == "constant" else r.trial.get("stage") == "stage1")
        if want:
            value, _ = best(r.history)
            if value is not None:
                out[_key(r.trial)] = max(out.get(_key(r.trial), -1.0), value)
    return out


def selected(r: Run) -> dict[str, Any]:
    """The history record of the run's validation-selected epoch (the trial's own choice by
    its checkpoint metric; else the best validation accuracy)."""
    epoch = r.trial.get("selected_epoch")
    if epoch is None:
        epoch = best(r.history)[1]
    return next((h for h in r.history if h["epoch"] == epoch), {})


def results_table(runs: list[Run], target: float | str = "constant",
                  intervals: bool = True) -> pd.DataFrame:
    """One row per trial (the columns: :mod:`cxr_ray.sweep.report`'s docstring, ``results.csv``)."""
    from cxr_ray.sweep import compare

    targets = _targets(runs, target)
    rows = []
    for r in runs:
        t, p, h = r.trial, r.plan, r.history
        chosen = selected(r)
        best_val, best_val_epoch = best(h)
        goal = targets.get(_key(t))
        cross = crossing(h, goal) if goal is not None else crossing([], 0.0)
        policy = p.get("policy", {})
        threshold = chosen.get("val_threshold")
        ci: dict[str, float] = {}
        if intervals and threshold is not None:
            pred = compare.load_predictions(r.path, chosen.get("epoch"))
            if pred is not None:
                ci = compare.trial_intervals(pred, threshold)
        rows.append({
            "stage": t.get("stage"), "cohort": t.get("cohort"),
            "policy": t.get("policy") or policy.get("name"), "seed": int(t.get("seed") or 0),
            "model": (p.get("model") or {}).get("name", t.get("model")),
            "optimizer": (p.get("optimizer") or {}).get("name", t.get("optimizer")),
            **{f"axis_{k}": v for k, v in (t.get("axes") or {}).items()},
            "epochs": len(h), "planned_epochs": p.get("epochs"),
            "selected_epoch": chosen.get("epoch"), "threshold": threshold,
            "val_accuracy": chosen.get("val_accuracy"), "val_auc": chosen.get("val_auc"),
            "best_val_accuracy": best_val, "best_val_epoch": best_val_epoch,
            "test_accuracy": chosen.get("test_accuracy_at_threshold"),
            "test_accuracy_ci_low": ci.get("test_accuracy_ci_low"),
            "test_accuracy_ci_high": ci.get("test_accuracy_ci_high"),
            "test_accuracy_at_0.5": chosen.get("test_accuracy"),
            "test_auc": chosen.get("test_auc"),
            "test_auc_ci_low": ci.get("test_auc_ci_low"),
            "test_auc_ci_high": ci.get("test_auc_ci_high"),
            "test_sensitivity": chosen.get("test_sensitivity_at_threshold"),
            "test_specificity": chosen.get("test_specificity_at_threshold"),
            "test_images": chosen.get("test_images"), "val_images": chosen.get("val_images"),
            "target_val_accuracy": goal, "epochs_to_target": cross["epochs"],
            "compute_seconds_to_target": cross["compute_seconds"],
            "wall_seconds_to_target": cross["wall_seconds"],
            "images_processed": int(sum(rec.get("train_images") or 0 for rec in h)),
            "compute_seconds": float(sum(rec.get("epoch_seconds") or 0.0 for rec in h)),
            "seconds_per_epoch": (float(np.mean([rec.get("epoch_seconds") or 0.0 for rec in h]))
                                  if h else None),
            "base_lr": policy.get("base_lr"), "max_lr": policy.get("max_lr"),
            "step_size": policy.get("step_size"),
            "step_size_epochs": t.get("step_size_epochs"),
            "lr_source": t.get("lr_source"), "batch_size": p.get("batch_size"),
            "image_size": p.get("image_size"), "status": t.get("status", "finished"),
            "run": str(r.path),
        })
    frame = pd.DataFrame(rows)
    if not frame.empty:
        order = {"stage1": 0, "stage2": 1, "comparison": 2}
        frame = frame.sort_values(["stage", "cohort", "policy", "seed"],
                                  key=lambda s: s.map(order) if s.name == "stage" else s,
                                  kind="stable").reset_index(drop=True)
    return frame


#: Columns averaged over seeds (the others are the same for every seed of a trial).
_MEAN = ("epochs", "selected_epoch", "threshold", "val_accuracy", "val_auc",
         "best_val_accuracy", "test_accuracy", "test_accuracy_at_0.5", "test_auc",
         "test_sensitivity", "test_specificity", "target_val_accuracy",
         "compute_seconds_to_target", "compute_seconds", "seconds_per_epoch", "max_lr",
         "base_lr")


def over_seeds(res: pd.DataFrame) -> pd.DataFrame:
    """One row per trial of the grid with its seeds pooled: means, and the 95 % CIs of test
    accuracy and AUC (one seed: its patient bootstrap; several: Student-t over the seeds);
    ``epochs_to_target`` is the mean over the seeds that reached it (``reached`` counts them)."""
    from cxr_ray import stats

    if res.empty:
        return res
    keys = ["stage", "cohort", "policy", "model", "optimizer",
            *[c for c in res.columns if c.startswith("axis_")]]
    rows = []
    for _, g in res.groupby(keys, sort=False, dropna=False):
        row = g.iloc[0].to_dict()
        row["seeds"] = len(g)
        for col in _MEAN:
            if col in g:
                values = pd.to_numeric(g[col], errors="coerce")
                row[col] = float(values.mean()) if values.notna().any() else None
        row["reached"] = int(g["epochs_to_target"].notna().sum())
        row["epochs_to_target"] = (float(g["epochs_to_target"].mean())
                                   if row["reached"] == len(g) else None)
        if len(g) > 1:
            for metric in ("test_accuracy", "test_auc"):
                _, low, high = stats.mean_ci(pd.to_numeric(g[metric], errors="coerce"))
                row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = low, high
        rows.append(row)
    return pd.DataFrame(rows)

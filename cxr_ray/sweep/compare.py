"""Uncertainty and the study's question, from the per-image scores the runs kept.

Every trial keeps the validation and test scores of its **validation-selected** epoch
(``RUN/predictions/``). From them:

* **per trial**: 95 % confidence intervals of test accuracy (at the validation-chosen
  threshold) and test AUC, by a bootstrap over *patients* (a patient's images are
  correlated; resampling images would understate the width);
* **per cohort, each policy against constant**, paired on the same test images: the
  accuracy difference with its patient-bootstrap CI, a p-value (one seed: McNemar's exact
  test on the discordant images; several seeds: the paired patient bootstrap of the
  seed-averaged difference), Holm's correction across every policy × cohort comparison,
  and the minimum detectable difference (80 % power, α 0.05) at that test size. The verdict
  separates "no difference found" (the CI lies within ±:data:`MARGIN`) from "too few images
  to tell" (it does not);
* **the pre-declared question**: per cohort, the CLR policy chosen on validation (highest
  mean best validation accuracy over seeds; ties → fewer epochs to target, then grid order)
  against constant: did it reach constant's best validation accuracy in fewer epochs?
  Never reaching it counts as taking ``planned epochs + 1``; equal epochs are ties; a sign
  test over the cohorts (ties excluded) gives the p-value of the closing sentence.

Pure numpy/pandas over files: no Ray, no torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_ray import paths, stats
from cxr_ray.optim import schedules

#: The accuracy difference (fraction) below which two policies are "no different" in the
#: report's verdicts, declared before any result is seen.
MARGIN = 0.05
ALPHA = 0.05
#: Bootstrap resamples for CIs in the report.
N_BOOT = 1000
#: The policies the study calls cyclical (the pre-declared question picks among these).
CLR = schedules.CLR_POLICIES


def load_predictions(run: Path, epoch: int | None) -> dict[str, np.ndarray] | None:
    """The kept scores of ``epoch`` of a run, or None when it has none."""
    if epoch is None:
        return None
    path = paths.predictions_file(run, int(epoch))
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def trial_intervals(pred: dict[str, np.ndarray], threshold: float, *, seed: int = 0
                    ) -> dict[str, float]:
    """95 % patient-bootstrap CIs of test accuracy (at ``threshold``) and test AUC."""
    s, y, g = pred["test_score"], pred["test_label"], pred["test_patient_id"]
    acc = stats.accuracy_ci(s, y, g, threshold=threshold, n_boot=N_BOOT, seed=seed)
    auc = stats.auc_ci(s, y, g, n_boot=N_BOOT, seed=seed)
    return {"test_accuracy_ci_low": acc[0], "test_accuracy_ci_high": acc[1],
            "test_auc_ci_low": auc[0], "test_auc_ci_high": auc[1]}


def _correct(pred: dict[str, np.ndarray], threshold: float) -> pd.Series:
    """Per test image id: classified correctly at ``threshold``."""
    right = (pred["test_score"] >= threshold) == (pred["test_label"] == 1)
    return pd.Series(right, index=pred["test_image_id"])


def _bootstrap_p(diff: np.ndarray, groups: np.ndarray, *, n_boot: int, seed: int) -> float:
    """Two-sided p of a mean paired difference (rows: images; columns: seeds) being 0, from
    the patient bootstrap of the centred statistic."""
    observed = float(diff.mean())
    values, inverse = np.unique(groups, return_inverse=True)
    sums = np.zeros((len(values), diff.shape[1]))
    np.add.at(sums, inverse, diff)
    counts = np.bincount(inverse, minlength=len(values)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = sums[draws].sum(axis=(1, 2)) / (counts[draws].sum(axis=1) * diff.shape[1])
    centred = means - observed
    return float(min(1.0, (np.abs(centred) >= abs(observed) - 1e-12).mean()))


def paired_against_constant(res: pd.DataFrame) -> pd.DataFrame:
    """One row per cohort × policy other than constant: the paired test-accuracy comparison
    on the same test images (seeds pooled), Holm-adjusted across all rows."""
    s2 = res[(res["stage"] == "stage2") & res["run"].notna()]
    rows = []
    for cohort, group in s2.groupby("cohort", sort=False):
        const = group[group["policy"] == "constant"]
        if const.empty:
            continue
        for policy, mine in group.groupby("policy", sort=False):
            if policy == "constant":
                continue
            row = _paired(cohort, policy, mine, const)
            if row is not None:
                rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["p_holm"] = stats.holm(table["p_value"].to_numpy(float))
    table["verdict"] = [_verdict(r) for _, r in table.iterrows()]
    return table


def _paired(cohort: str, policy: str, mine: pd.DataFrame, const: pd.DataFrame
            ) -> dict[str, Any] | None:
    a_cols, b_cols, groups = [], [], None
    for seed, a_row in mine.set_index("seed").iterrows():
        if seed not in set(const["seed"]):
            continue
        b_row = const[const["seed"] == seed].iloc[0]
        pa = load_predictions(Path(a_row["run"]), a_row["selected_epoch"])
        pb = load_predictions(Path(b_row["run"]), b_row["selected_epoch"])
        if pa is None or pb is None:
            continue
        ca, cb = _correct(pa, a_row["threshold"]), _correct(pb, b_row["threshold"])
        common = ca.index.intersection(cb.index)
        if groups is None:
            patient = pd.Series(pa["test_patient_id"], index=pa["test_image_id"])
            ids = common
            groups = patient.loc[ids].to_numpy()
        a_cols.append(ca.loc[ids].to_numpy())
        b_cols.append(cb.loc[ids].to_numpy())
    if not a_cols:
        return None
    a, b = np.column_stack(a_cols), np.column_stack(b_cols)
    seeds = a.shape[1]
    if seeds == 1:
        p = stats.paired_accuracy(a[:, 0], b[:, 0], groups, n_boot=N_BOOT, alpha=ALPHA)
        diff, ci, pval, mdd = p["diff"], p["ci"], p["p_value"], p["mdd"]
        how = "McNemar exact"
    else:
        d = a.astype(float) - b.astype(float)
        diff = float(d.mean())
        ci = stats.bootstrap_ci(lambda x: float(np.mean(x)), (d,), groups, n_boot=N_BOOT)
        pval = _bootstrap_p(d, groups, n_boot=N_BOOT, seed=0)
        discordant = float(np.mean(a != b))
        mdd = stats.minimum_detectable_difference(len(groups) * seeds, discordant, alpha=ALPHA)
        how = f"patient bootstrap over {seeds} seeds"
    return {"cohort": cohort, "policy": policy, "seeds": seeds, "test_images": len(groups),
            "accuracy_policy": float(a.mean()), "accuracy_constant": float(b.mean()),
            "diff": diff, "ci_low": ci[0], "ci_high": ci[1], "p_value": pval, "mdd": mdd,
            "test": how}


def _verdict(r: pd.Series) -> str:
    if r["p_holm"] < ALPHA:
        return f"{'policy' if r['diff'] > 0 else 'constant'} more accurate"
    if math.isfinite(r["ci_low"]) and -MARGIN <= r["ci_low"] and r["ci_high"] <= MARGIN:
        return "no difference found"
    return "too few images to tell"


def study_question(res: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per cohort: the validation-chosen CLR policy against constant on epochs to constant's
    best validation accuracy (rules in the module docstring); and the closing sentence."""
    s2 = res[res["stage"] == "stage2"].copy()
    clr = s2[s2["policy"].isin(CLR)]
    const = s2[s2["policy"] == "constant"]
    rows = []
    order = {p: i for i, p in enumerate(dict.fromkeys(s2["policy"]))}
    for cohort, group in clr.groupby("cohort", sort=False):
        base = const[const["cohort"] == cohort]
        if base.empty:
            continue
        never = lambda g: g["epochs_to_target"].fillna(g["planned_epochs"] + 1)  # noqa: E731
        per_policy = group.assign(_e=never(group)).groupby("policy").agg(
            val=("best_val_accuracy", "mean"), epochs=("_e", "mean"),
            reached=("epochs_to_target", lambda s: int(s.notna().sum())), seeds=("seed", "size"))
        per_policy["_order"] = [order[p] for p in per_policy.index]
        chosen = per_policy.sort_values(["val", "epochs", "_order"],
                                        ascending=[False, True, True]).iloc[0]
        constant_epochs = float(never(base).mean())
        if chosen["epochs"] < constant_epochs - 1e-9:
            outcome = "sooner"
        elif chosen["epochs"] > constant_epochs + 1e-9:
            outcome = "later" if chosen["reached"] == chosen["seeds"] else "later or never"
        else:
            outcome = "tie"
        rows.append({"cohort": cohort, "chosen_policy": chosen.name,
                     "chosen_best_val_accuracy": chosen["val"],
                     "constant_best_val_accuracy": float(base["best_val_accuracy"].mean()),
                     "chosen_epochs": chosen["epochs"], "constant_epochs": constant_epochs,
                     "outcome": outcome})
    table = pd.DataFrame(rows)
    if table.empty:
        return table, "No cohort had both constant and a CLR policy in stage 2: the study's " \
                      "question could not be asked."
    wins = int((table["outcome"] == "sooner").sum())
    ties = int((table["outcome"] == "tie").sum())
    losses = len(table) - wins - ties
    p = stats.sign_test(wins, losses)
    sentence = (f"The validation-chosen CLR policy reached constant's best validation accuracy "
                f"sooner in {wins} of {len(table)} cohorts (later or never in {losses}, tied in "
                f"{ties}); two-sided sign test, ties excluded: p = {p:.3g}.")
    return table, sentence

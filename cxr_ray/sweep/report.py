"""The report: which lr policy reaches which accuracy, in how many epochs and how much compute.

Reads an experiment directory (what ``cxr-ray sweep`` writes; any directory tree of runs
works) and writes, into ``EXP/report/``:

* ``results.csv``: one row per trial (stage, cohort, policy, seed, model, optimizer, any
  other grid axis; the validation-selected epoch and threshold; validation accuracy/AUC;
  the test accuracy, AUC, sensitivity and specificity of that epoch at that threshold, with
  95 % CIs by a bootstrap over patients, and test accuracy at 0.5; the validation target and
  the epochs / compute seconds / wall seconds to reach it; images and compute seconds);
* ``paired.csv``: each policy against constant per cohort, paired on the test images
  (:mod:`cxr_ray.sweep.compare`);
* ``report.md``: the study's question answered in one sentence, the paired comparisons,
  tables shaped like the study's Table 5 (stage 1), Table 7 (before/after CLR), Table 8
  (CLR parameters, with the LR range test's bounds), epochs-to-target per cohort × policy,
  the best policy per cohort and an overall ranking, and the backbone × optimizer table
  (Table 6) when the experiment has one; the study's numbers beside ours; several seeds are
  pooled (mean, Student-t CI);
* plots (PNG, linked from report.md): lr per step for each policy, LR range test curves,
  validation and test accuracy and validation loss vs epoch for every policy of a cohort
  (the study's Figures 4–10).

Validation selects, test reports: :mod:`cxr_ray.sweep.results` computes the rows (see its
``METRIC`` and ``selected``); this module writes them.  Everything here is pandas and
matplotlib: no Ray.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_ray import paths
from cxr_ray.optim import presets
from cxr_ray.optim.lr_finder import LrRangeResult
from cxr_ray.sweep.results import Run, find_runs, over_seeds, rank_policies, results_table

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- markdown
def _pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _num(x: Any, fmt: str = "{:g}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _md(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ci(r: pd.Series, metric: str, fmt=None) -> str:
    """``value [low, high]`` (accuracy in %, AUC as a fraction)."""
    f = fmt or _pct
    low, high = r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high")
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return f(r.get(metric))
    return f"{f(r.get(metric))} [{f(low)}, {f(high)}]"


def _auc(x: Any) -> str:
    return _num(x, "{:.3f}")


def _table5(agg: pd.DataFrame) -> str:
    s1 = agg[agg["stage"] == "stage1"]
    rows = []
    for _, r in s1.iterrows():
        paper = presets.TABLE5_STAGE1_ACCURACY.get(r["cohort"])
        rows.append([r["cohort"], r["model"], r["optimizer"], _num(r["epochs"]),
                     _num(r["selected_epoch"], "{:.3g}"), _pct(r["val_accuracy"]),
                     _ci(r, "test_accuracy"), _ci(r, "test_auc", _auc),
                     _pct(r["test_sensitivity"]), _pct(r["test_specificity"]),
                     _num(r["threshold"], "{:.2f}"),
                     f"{paper[0]:.2f} ({paper[1]})" if paper else "–"])
    return _md(["cohort", "model", "optimizer", "epochs", "selected epoch", "val accuracy %",
                "test accuracy % [95 % CI]", "test AUC [95 % CI]", "sensitivity %",
                "specificity %", "threshold", "study % (epochs)"], rows)


def _table7(agg: pd.DataFrame) -> str:
    s1 = agg[agg["stage"] == "stage1"].set_index("cohort")
    s2 = agg[agg["stage"] == "stage2"]
    rows = []
    for cohort, group in s2.groupby("cohort", sort=False):
        by_val = group.sort_values("best_val_accuracy", ascending=False)
        top = by_val.iloc[0]
        clr = by_val[by_val["policy"].isin(("triangular", "triangular2", "exp_range",
                                            "modified_triangular2"))]
        top_clr = clr.iloc[0] if len(clr) else None
        paper = presets.TABLE8_CLR.get(cohort)
        before = s1.loc[cohort] if cohort in s1.index else None
        if isinstance(before, pd.DataFrame):
            before = before.iloc[0]
        cell = lambda r: (f"{r['policy']}: {_pct(r['test_accuracy'])} "  # noqa: E731
                          f"(val {_pct(r['best_val_accuracy'])}) @ {_num(r['selected_epoch'], '{:.3g}')}")
        rows.append([
            cohort, _pct(before["test_accuracy"]) if before is not None else "–",
            cell(top_clr) if top_clr is not None else "–", cell(top),
            (f"{_num(paper.accuracy_before)} → {paper.accuracy_after} ({paper.policy}, "
             f"{paper.epochs} ep.)") if paper else "–",
        ])
    return _md(["cohort", "before (stage-1 test %)", "after, CLR policy chosen on val: test %",
                "after, policy chosen on val: test %", "study (test split): before → after"],
               rows)


def _finder_cell(f: dict[str, Any]) -> str:
    """An LR range test's measured max_lr with its spread over the repeats, and the bounds it
    handed on when a fallback replaced them."""
    if not f:
        return "–"
    rule = f.get("rule", "paper")
    measured = f.get("measured_max_lr", f.get("max_lr"))
    cell = _num(measured, "{:.3g}")
    spread = (f.get("spread") or {}).get(rule)
    repeats = len(f.get("curves") or []) or 1
    if spread and repeats > 1:
        cell += f" ({_num(spread[0], '{:.3g}')}–{_num(spread[1], '{:.3g}')}, {repeats} repeats)"
    source = f.get("bounds_source", "lr_find")
    if source != "lr_find":
        cell += (f"; handed on {_num(f.get('max_lr'), '{:.3g}')} / "
                 f"{_num(f.get('base_lr'), '{:.3g}')}: {source}")
    return cell


def _table8(res: pd.DataFrame, finder: dict[str, dict[str, Any]]) -> str:
    s2 = res[(res["stage"] == "stage2") & res["max_lr"].notna()]
    rows = []
    for _, r in s2.iterrows():
        f = finder.get(r["cohort"], {})
        paper = presets.TABLE8_CLR.get(r["cohort"])
        rows.append([r["cohort"], r["policy"], _num(r["step_size_epochs"]), r["epochs"],
                     _num(r["max_lr"], "{:.3g}"), _num(r["base_lr"], "{:.3g}"),
                     r["lr_source"] or "–", _finder_cell(f),
                     (f"{paper.policy}, {paper.step_size_epochs}, {paper.epochs}, {paper.max_lr},"
                      f" {paper.base_lr}") if paper else "–"])
    return _md(["cohort", "policy", "step size (epochs)", "epochs", "max_lr", "base_lr",
                "bounds from", "LR range test max_lr (spread)",
                "study (policy, step, epochs, max, base)"], rows)


def _finder_summary(finder: dict[str, dict[str, Any]]) -> list[str]:
    """One line per LR range test the sweep did not take as measured; each distinct warning
    once, with the cohorts it concerns."""
    lines = []
    warned: dict[str, list[str]] = {}
    for cohort, f in sorted(finder.items()):
        source = f.get("bounds_source", "lr_find")
        if source != "lr_find":
            lines.append(f"- {cohort}: {source}")
        for w in f.get("warnings") or []:
            warned.setdefault(w, []).append(cohort)
    for w, cohorts in warned.items():
        who = "every cohort" if len(cohorts) == len(finder) > 1 else ", ".join(cohorts)
        lines.append(f"- {who}: {w}")
    if not lines:
        return []
    return ["LR range tests whose bounds were not taken as measured, and warnings:", "",
            *lines, ""]


def _epochs_to_target(res: pd.DataFrame) -> str:
    s2 = res[res["stage"] == "stage2"]
    if s2.empty:
        return "_no stage-2 trials_"
    policies = list(dict.fromkeys(s2["policy"]))
    rows = []
    for cohort, group in s2.groupby("cohort", sort=False):
        by = group.set_index("policy")
        cells = []
        for p in policies:
            if p not in by.index:
                cells.append("–")
                continue
            r = by.loc[p]
            r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
            if pd.isna(r["epochs_to_target"]):
                cells.append("not reached" if not r.get("reached") else
                             f"reached in {int(r['reached'])}/{int(r['seeds'])} seeds")
            else:
                cells.append(f"{_num(r['epochs_to_target'], '{:.3g}')} "
                             f"({_num(r['compute_seconds_to_target'], '{:.0f}')} s)")
        rows.append([cohort, _pct(group["target_val_accuracy"].iloc[0]), *cells])
    return _md(["cohort", "target (val) %", *policies], rows)


def _cost(runs: list[Run], experiment: Path) -> str | None:
    """Where the sweep's time went, per stage: the stage's wall time and concurrency (from the
    sweep's log), and per trial its wall time, its train + eval seconds and the rest (reading
    the data, checkpoints, the LR range test of stage 1, and for Ray Train trials the fit's
    start-up and tear-down)."""
    timed = [r for r in runs if r.trial.get("trial_seconds") is not None]
    if not timed:
        return None
    log_rows = paths.read_jsonl(experiment / paths.SWEEP_LOG)
    rows = []
    for stage in ("stage1", "stage2", "comparison"):
        mine = [r.trial for r in timed if r.trial.get("stage") == stage]
        if not mine:
            continue
        runs_of_stage = [x for x in log_rows if x.get("stage") == stage]
        wall = sum(x["wall_seconds"] for x in runs_of_stage) if runs_of_stage else None
        at_once = runs_of_stage[-1]["concurrency"] if runs_of_stage else None
        med = lambda key: float(np.median([t.get(key) or 0.0 for t in mine]))  # noqa: E731
        over = float(np.median([t["trial_seconds"] - (t.get("epoch_seconds") or 0.0)
                                for t in mine]))
        rows.append([stage, len(mine), sum(int(t.get("fits") or 0) for t in mine),
                     _num(wall, "{:.0f}"), _num(at_once), _num(med("trial_seconds"), "{:.1f}"),
                     _num(med("epoch_seconds"), "{:.1f}"), f"{over:.1f}",
                     _num(med("startup_seconds"), "{:.1f}"),
                     _num(med("teardown_seconds"), "{:.1f}")])
    return _md(["stage", "trials", "fits", "stage wall s", "trials at once",
                "median trial s", "median train + eval s", "median overhead s",
                "median fit start-up s", "median fit tear-down s"], rows)


def _backbones(res: pd.DataFrame) -> str | None:
    s1 = res[res["stage"] == "comparison"]
    if s1.empty:
        s1 = res[res["stage"] == "stage1"]
    if s1.empty or (s1["model"].nunique() < 2 and s1["optimizer"].nunique() < 2):
        return None
    rows = []
    for (cohort, model, opt), g in s1.groupby(["cohort", "model", "optimizer"], sort=False):
        r = g.iloc[0]
        paper = presets.TABLE6_BACKBONES.get(model) if opt == "sgd" and cohort == "Atelectasis" \
            else None
        rows.append([cohort, model, opt, r["epochs"], _ci(r, "test_accuracy"),
                     _num(r["seconds_per_epoch"], "{:.1f}"),
                     f"{paper.accuracy:.2f} % ({paper.epochs} ep., {paper.hours_per_epoch} h/epoch)"
                     if paper else "–"])
    return _md(["cohort", "backbone", "optimizer", "epochs", "test accuracy % [95 % CI]",
                "s / epoch",
                "study"], rows)


# ----------------------------------------------------------------------------- plots
def _plots(runs: list[Run], finder: dict[str, dict[str, Any]], out: Path) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, list[str]] = {"lr": [], "lr_find": [], "curves": []}
    stage2 = [r for r in runs if r.trial.get("stage") == "stage2" and r.history]
    # lr per step for each policy (first cohort that has the policy).
    seen: dict[str, Run] = {}
    for r in stage2:
        seen.setdefault(r.trial.get("policy"), r)
    seen = {p: r for p, r in seen.items() if (r.path / paths.STEPS_FILE).is_file()}
    if seen:
        fig, ax = plt.subplots(figsize=(9, 4))
        for policy, r in seen.items():
            frame = pd.read_csv(r.path / paths.STEPS_FILE)
            ax.plot(frame["step"], frame["lr"], label=policy, lw=1.2)
        ax.set(xlabel="optimizer step", ylabel="learning rate",
               title="lr per step for each policy (stage 2)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "lr_policies.png", dpi=110)
        plt.close(fig)
        made["lr"].append("lr_policies.png")
    # LR range test curves: every repeat, the suggestions, the bounds handed on.
    for cohort, f in finder.items():
        if not f.get("curves"):
            continue
        name = f"lr_find_{cohort}.png"
        LrRangeResult.from_dict(f).plot(out / name, title=f"LR range test: {cohort}")
        made["lr_find"].append(name)
    # Validation accuracy, test accuracy and validation loss vs epoch, every policy of a
    # cohort (the first seed's trials).
    first_seed = min((int(r.trial.get("seed") or 0) for r in stage2), default=0)
    stage2 = [r for r in stage2 if int(r.trial.get("seed") or 0) == first_seed]
    cohorts = list(dict.fromkeys(r.trial["cohort"] for r in stage2))
    for cohort in cohorts:
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.8))
        for r in (x for x in stage2 if x.trial["cohort"] == cohort):
            ep = [h["epoch"] for h in r.history]
            for ax, key, scale in ((a1, "val_accuracy", 100), (a2, "test_accuracy", 100),
                                   (a3, "val_loss", 1)):
                ax.plot(ep, [scale * (h.get(key) if h.get(key) is not None else np.nan)
                             for h in r.history], marker="o", ms=3, label=r.trial.get("policy"))
        a1.set(xlabel="epoch", ylabel="val accuracy %",
               title=f"{cohort}: validation accuracy (selects)")
        a2.set(xlabel="epoch", ylabel="test accuracy % (at 0.5)",
               title=f"{cohort}: test accuracy (reported)")
        a3.set(xlabel="epoch", ylabel="val loss", title=f"{cohort}: validation loss")
        a1.legend(fontsize=7)
        fig.tight_layout()
        name = f"curves_{cohort}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        made["curves"].append(name)
    return made


# ----------------------------------------------------------------------------- entry point
def read_lr_finds(experiment: Path) -> dict[str, dict[str, Any]]:
    """LR range test results per cohort (``lr_find.json`` files with a ``cohort`` key)."""
    out = {}
    for path in sorted(Path(experiment).rglob(paths.LR_FIND_FILE)):
        data = json.loads(path.read_text())
        cohort = data.get("cohort") or path.parent.name
        out[cohort] = data
    return out


def _provenance(experiment: Path) -> list[str]:
    """Which data made the experiment (``EXP/data.json``, recorded when the sweep started)."""
    d = paths.read_json(experiment / paths.DATA_FILE)
    if not d:
        return []
    c = d.get("cohorts") or {}
    return [f"Data: shard set `{d.get('shards')}` ({d.get('size')}²) from metadata "
            f"`{d.get('metadata')}` (sha256 `{str(d.get('metadata_sha256'))[:16]}…`); "
            f"`{c.get('split')}` split with split seed {d.get('split_seed')}: test fraction "
            f"{c.get('test_fraction')}, validation {c.get('val_fraction')} of the training "
            "side.", ""]


def _paired_section(paired: pd.DataFrame) -> list[str]:
    from cxr_ray.sweep import compare

    if paired.empty:
        return []
    rows = [[r["cohort"], r["policy"], int(r["seeds"]), int(r["test_images"]),
             _pct(r["accuracy_policy"]), _pct(r["accuracy_constant"]),
             f"{100 * r['diff']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]",
             _num(r["p_value"], "{:.3g}"), _num(r["p_holm"], "{:.3g}"),
             _num(100 * r["mdd"], "{:.1f}"), r["verdict"]] for _, r in paired.iterrows()]
    counts = paired["verdict"].value_counts()
    return ["## Each policy against constant, paired on the same test images", "",
            "Test accuracy at each model's validation-chosen threshold, at its validation-"
            "selected epoch. Difference (points) with its 95 % CI from a bootstrap over "
            f"patients; p from {paired['test'].iloc[0]}; Holm-adjusted over all "
            f"{len(paired)} comparisons; MDD: the smallest difference this test size detects "
            f"with 80 % power at α = {compare.ALPHA}. Verdicts: significant after Holm → "
            f"which is more accurate; else \"no difference found\" when the CI lies within "
            f"±{100 * compare.MARGIN:.0f} points (declared before the results), else \"too "
            "few images to tell\".", "",
            "Verdicts: " + ", ".join(f"{v}: {n}" for v, n in counts.items()) + ".", "",
            _md(["cohort", "policy", "seeds", "test images", "policy %", "constant %",
                 "difference [95 % CI]", "p", "p (Holm)", "MDD (points)", "verdict"], rows), ""]


def _question_section(table: pd.DataFrame, sentence: str) -> list[str]:
    from cxr_ray.sweep import compare

    parts = ["## The study's question", "",
             "Pre-declared, not best-of-many: per cohort, the CLR policy chosen on validation "
             f"({', '.join(compare.CLR)}: highest best validation accuracy, mean over seeds; "
             "ties → fewer epochs to target, then grid order) against constant: does it reach "
             "constant's best validation accuracy in fewer epochs? A policy that never reaches "
             "it counts as the planned epochs + 1; equal epochs are ties; the p-value is a "
             "two-sided sign test over cohorts with ties excluded.", ""]
    if not table.empty:
        parts += [_md(["cohort", "chosen CLR policy", "its best val %", "constant best val %",
                       "epochs (chosen)", "epochs (constant)", "outcome"],
                      [[r["cohort"], r["chosen_policy"], _pct(r["chosen_best_val_accuracy"]),
                        _pct(r["constant_best_val_accuracy"]), _num(r["chosen_epochs"], "{:.3g}"),
                        _num(r["constant_epochs"], "{:.3g}"), r["outcome"]]
                       for _, r in table.iterrows()]), ""]
    return parts + [f"**{sentence}**", ""]


def write_report(experiment: str | Path, *, target: float | str = "constant",
                 title: str | None = None) -> Path:
    """Write ``results.csv``, ``report.md`` and the plots into ``EXP/report/``; return report.md."""
    from cxr_ray.errors import UserError
    from cxr_ray.sweep import compare

    experiment = Path(experiment)
    runs = find_runs(experiment)
    if not runs:
        raise UserError(f"{experiment}: no trials found (no {paths.TRIAL_FILE} below it); pass the "
                        "experiment directory a sweep wrote")
    out = experiment / paths.REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    res = results_table(runs, target)
    res.to_csv(out / "results.csv", index=False)
    agg = over_seeds(res)
    paired = compare.paired_against_constant(res)
    if not paired.empty:
        paired.to_csv(out / "paired.csv", index=False)
    question, sentence = compare.study_question(res)
    finder = read_lr_finds(experiment)
    plots = _plots(runs, finder, out)
    ranking = rank_policies(agg)
    seeds = sorted(set(res["seed"]))
    target_text = (f"{100 * target:.1f} % validation accuracy"
                   if isinstance(target, (int, float)) else
                   {"constant": "the best validation accuracy the constant-lr policy reached in "
                                "stage 2 for that cohort and seed (the study's comparison)",
                    "stage1": "the stage-1 model's best validation accuracy"}.get(target,
                                                                                 str(target)))
    parts = [f"# {title or 'cxr-ray report'}: `{experiment.name}`", "",
             f"{len(res)} trials: {int((res['stage'] == 'stage1').sum())} stage-1, "
             f"{int((res['stage'] == 'stage2').sum())} stage-2; training seeds "
             f"{', '.join(map(str, seeds))}. All trials: [results.csv](results.csv).", "",
             "**Which split each number comes from.** Every cohort is split by patient into "
             "train / validation / test. Everything that *chooses* uses validation only: the "
             "epoch a run keeps (its checkpoint metric), the operating threshold (Youden's J on "
             "validation, reported beside 0.5), the target and the epochs to reach it, the best "
             "policy per cohort and the ranking. Test numbers are those of the validation-"
             "selected epoch at the validation-chosen threshold, with 95 % CIs (bootstrap over "
             "patients" + ("; Student-t over seeds where several" if len(seeds) > 1 else "") +
             "). The study had no validation split: its numbers, shown beside ours, are "
             "test-split numbers selected on test.", "",
             f"Target per cohort: {target_text}. Compute seconds are train + eval time of the "
             "epochs up to the crossing.", "", *_provenance(experiment)]
    stopped = [r for r in runs if r.trial.get("stop_at") is not None]
    if stopped:
        parts += [f"{len(stopped)} stage-2 trials were to stop once their validation accuracy "
                  "reached a target fixed before stage 2 (`[stage2] stop_at`); "
                  f"{sum(bool(r.trial.get('stopped_at_target')) for r in stopped)} did. Their "
                  "final and best accuracies stop there: compare them on epochs and compute to "
                  "the target only.", ""]
    if not question.empty or not paired.empty:
        parts += _question_section(question, sentence)
        parts += _paired_section(paired)
    if not ranking.empty:
        parts += ["## Policy ranking", "",
                  "Within each cohort policies are ranked by epochs to the validation target "
                  "(then best validation accuracy); lower mean rank is better. A ranking is "
                  "descriptive: the paired tests above say which differences are more than "
                  "noise.", "",
                  _md(["policy", "mean rank", "best in cohorts", "reached target",
                       "median epochs to target", "mean best val accuracy %",
                       "mean test accuracy %", "mean compute s"],
                      [[r["policy"], f"{r['mean_rank']:.2f}", r["best_in_cohorts"],
                        f"{r['reached']}/{r['trials']}", _num(r["median_epochs_to_target"]),
                        _pct(r["mean_best_val_accuracy"]), _pct(r["mean_test_accuracy"]),
                        _num(r["mean_compute_seconds"], "{:.1f}")]
                       for _, r in ranking.iterrows()]), ""]
        best_rows = []
        s2 = agg[agg["stage"] == "stage2"]
        for cohort, g in s2.groupby("cohort", sort=False):
            g = g.assign(_e=g["epochs_to_target"].fillna(g["planned_epochs"].max() + 1))
            top = g.sort_values(["_e", "best_val_accuracy"], ascending=[True, False]).iloc[0]
            best_rows.append([cohort, top["policy"], _num(top["epochs_to_target"], "{:.3g}"),
                              _pct(top["best_val_accuracy"]), _ci(top, "test_accuracy")])
        parts += ["## Best policy per cohort (chosen on validation)", "",
                  _md(["cohort", "best policy", "epochs to target", "best val accuracy %",
                       "its test accuracy % [95 % CI]"], best_rows), ""]
        parts += ["## Epochs (compute seconds) to reach the validation target", "",
                  _epochs_to_target(agg), ""]
    parts += ["## Stage 1 per cohort (the study's Table 5)", "", _table5(agg), ""]
    if not ranking.empty:
        parts += ["## Before / after CLR (the study's Table 7)", "", _table7(agg), "",
                  "## CLR parameters used (the study's Table 8)", "", _table8(agg, finder), "",
                  *_finder_summary(finder)]
    backbones = _backbones(agg)
    if backbones:
        parts += ["## Backbone × optimizer (the study's Table 6)", "", backbones, ""]
    cost = _cost(runs, experiment)
    if cost:
        parts += ["## Where the time went", "",
                  "Per trial: wall time of the trial, the train + eval seconds of its epochs, "
                  "and the rest (overhead: reading the data, checkpoints; for Ray Train trials the "
                  "start-up and tear-down of each TorchTrainer fit; for stage 1 also the LR "
                  "range test). Trials resumed "
                  "after a restart count only the resumed part.", "", cost, ""]
    if any(plots.values()):
        parts += ["## Plots", ""]
        parts += [f"![lr per step for each policy]({p})" for p in plots["lr"]]
        parts += [f"![LR range test]({p})" for p in plots["lr_find"]]
        parts += [f"![validation and test accuracy per epoch]({p})" for p in plots["curves"]]
        parts.append("")
    path = out / "report.md"
    path.write_text("\n".join(parts))
    log.info("wrote %s and %s", path, out / "results.csv")
    return path

"""Benchmark: how far do the LR range test's suggestions move with the ramp's length and the
seed, before and after the ramp-scaled analysis? (Not a test.)

For each of three embedded cohorts (default Effusion, Cardiomegaly, Pneumothorax):

1. the embedded data and shards as the demo makes them (``bench/learnability.py``'s
   ``make_data``), then the cohort's stage-1 model as the demo's recipe trains it (one rank
   in this process, seed 0): the start of every range test below, as in the sweep;
2. ramps of 30, 100 and 300 steps from ``--min-lr`` to ``--max-lr`` (the demo's 1e-5 to 1)
   with the stage-1 optimizer, ``--seeds`` batch orders each (repeat j of the sweep's
   ``repeats``), each run to the end of the ramp or a non-finite loss; the raw curves are kept;
3. every curve read twice: **before**, by the analysis of before this benchmark (fastai's
   running average β = 0.98 with bias correction, stop at 4 × the best running average, the
   first 10 % and the last 5 points skipped, rules on the running average; reproduced here
   as it was) and **after**, by :func:`cxr_ray.optim.lr_finder.analyse` with the defaults
   (its divergence stop replayed on the raw curve). Also **equal epochs**: the 300-step curve
   averaged into 30 points of 10 steps each, read as a 30-point ramp: the same training as the
   300-step ramp, so what moves between it and the 300-step reading is the analysis alone;
4. ``--val``: the same from 100-step ramps in the ``val`` loss mode (after the analysis).

Writes a table per cohort (rule × ramp: each seed's max_lr, the median, and the 300/30 ratio
of the medians) to ``--out`` (JSON, with every raw curve) and to bench/RESULTS.md.

Run:  .venv/bin/python bench/lr_find.py --data /tmp/lrn/data --shards /tmp/lrn/shards
About 2 minutes on a 2-core machine (data and stage 1 included, once the data exist).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

RAMPS = (30, 100, 300)
RULES = ("paper", "steepest", "valley")


# --------------------------------------------------------------------------- the old analysis
def before(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """The analysis as it was: running average β = 0.98 (bias-corrected), stop when it exceeds
    4 × its best, skip the first 10 % and the last 5 points, rules on the running average."""
    from cxr_ray.optim.lr_finder import suggest

    avg, best, sm = 0.0, math.inf, []
    for k, loss in enumerate(losses):
        avg = 0.98 * avg + 0.02 * loss
        s = avg / (1 - 0.98 ** (k + 1))
        sm.append(s)
        best = min(best, s)
        if s > 4 * best:
            break
    x, y = np.asarray(lrs[:len(sm)]), np.asarray(sm)
    lo, hi = int(len(x) * 0.1), len(x) - 5
    if hi - lo >= 3:
        x, y = x[lo:hi], y[lo:hi]
    return {rule: suggest(x, y, rule) for rule in RULES}


def after(lrs: list[float], losses: list[float], num_steps: int, **settings: Any
          ) -> dict[str, Any]:
    """The analysis now: :class:`LrRangeTest`'s stop replayed on the raw curve, then
    :func:`analyse`."""
    from cxr_ray.optim.lr_finder import LrRangeConfig, LrRangeTest

    cfg = LrRangeConfig(min_lr=lrs[0], max_lr=lrs[0] * (lrs[1] / lrs[0]) ** (num_steps - 1),
                        num_steps=num_steps, **settings)
    test = LrRangeTest(cfg)
    for i, loss in enumerate(losses):
        if test.record(i, loss):
            break
    curve = test.curve()
    return {**curve.suggestions, "problems": curve.problems}


def binned(lrs: list[float], losses: list[float], per: int) -> tuple[list[float], list[float]]:
    """``per`` consecutive steps → one point (geometric-mean lr, mean loss)."""
    n = len(losses) // per
    return ([float(np.exp(np.mean(np.log(lrs[i * per:(i + 1) * per])))) for i in range(n)],
            [float(np.mean(losses[i * per:(i + 1) * per])) for i in range(n)])


# --------------------------------------------------------------------------- the ramps
def stage1(cohort: str, args: argparse.Namespace, runs: Path) -> tuple[Path, Any]:
    """The cohort's stage-1 run as the demo's recipe trains it (seed 0, one rank)."""
    import learnability

    from cxr_ray.train.config import TrainConfig
    from cxr_ray.train.run import fit_in_process

    train = learnability.stage1_configs(argparse.Namespace(
        recipe=args.recipe, shards=args.shards, ranks=1, threads=args.threads,
        epochs=None))[cohort]
    config = TrainConfig.from_dict({**train, "seed": 0})
    summary = fit_in_process(config, storage_path=runs, name=f"{cohort}-stage1", resume=False)
    return Path(summary.run_dir), config


def raw_ramps(run_dir: Path, config: Any, args: argparse.Namespace, *, steps: int,
              loss: str = "train") -> list[dict[str, Any]]:
    """``--seeds`` ramps of ``steps`` steps from the run's best checkpoint, each to its end or
    a non-finite loss; → their raw curves."""
    import torch

    from cxr_ray import paths
    from cxr_ray.optim.lr_finder import LrRangeConfig
    from cxr_ray.train import checkpoint as ck
    from cxr_ray.train import loop
    from cxr_ray.train.lr_find import held_out_batches, run_ramp, start_checkpoint
    from cxr_ray.train.run import array_feeds, device_for, lr_find_config, plan_run

    summary = paths.read_json(run_dir / paths.SUMMARY_FILE)
    stage1_plan = summary["plan"]
    plan = plan_run(lr_find_config(config), "")
    plan.threads = args.threads
    ctx = loop.RankContext(rank=0, world_size=1, device=device_for(False), launcher="process",
                           prepare_model=lambda m: m, last_checkpoint=lambda: None,
                           save=lambda m, c: None)
    model, _, _ = loop.setup(plan, ctx)
    start = start_checkpoint(dataclasses.replace(plan, run_dir=str(run_dir)),
                             summary["history"], "val_accuracy", "max")
    ck.unwrap(model).load_state_dict(ck.load_checkpoint(start)["model_state"])
    initial = {k: v.clone() for k, v in ck.unwrap(model).state_dict().items()}
    train_feed, eval_feeds = array_feeds(plan)
    cfg = LrRangeConfig(min_lr=args.min_lr, max_lr=args.max_lr, num_steps=steps,
                        diverge_factor=1e12, loss=loss)
    held = held_out_batches(plan, ctx, eval_feeds["val"], cfg) if loss == "val" else None
    out = []
    for seed in args.seeds:
        ck.unwrap(model).load_state_dict(initial)
        t0 = time.perf_counter()
        test = run_ramp(plan, ctx, model, train_feed, cfg, first_epoch=1000 * seed,
                        held_out=held)
        out.append({"seed": seed, "steps": steps, "loss": loss, "lrs": test.lrs,
                    "losses": test.losses, "seconds": time.perf_counter() - t0,
                    "optimizer": stage1_plan["optimizer"]["name"]})
    torch.set_num_threads(args.threads)
    return out


# --------------------------------------------------------------------------- report
def _med(values: list[float]) -> float:
    return float(np.exp(np.median(np.log(values))))


def cohort_table(cohort: str, rows: list[dict[str, Any]], ramps: tuple[int, ...] = RAMPS
                 ) -> tuple[str, dict[str, Any]]:
    """Markdown table of one cohort and the longest/shortest ratios of the medians."""
    short, long = min(ramps), max(ramps)
    lines = [f"**{cohort}** (max_lr per seed → their median; {long}/{short} = ratio of the "
             "medians)", "",
             "| rule | analysis | " + " | ".join(f"{n} steps" for n in ramps)
             + f" | {long} (equal epochs: {long // 10} points) | {long}/{short} |",
             "|---|---|" + "---|" * (len(ramps) + 2)]
    ratios: dict[str, Any] = {}
    for rule in RULES:
        for analysis in ("before", "after"):
            cells, med = [], {}
            for steps in ramps:
                vals = [r[analysis][rule] for r in rows if r["steps"] == steps
                        and r["loss"] == "train"]
                med[steps] = _med(vals)
                cells.append(" ".join(f"{v:.2g}" for v in vals) + f" → **{med[steps]:.2g}**")
            eq = ""
            if analysis == "after":
                vals = [r["equal_epochs"][rule] for r in rows if r["steps"] == long
                        and r["loss"] == "train"]
                eq = " ".join(f"{v:.2g}" for v in vals) + f" → **{_med(vals):.2g}**"
            ratio = med[long] / med[short]
            ratios[f"{rule}/{analysis}"] = ratio
            lines.append(f"| {rule} | {analysis} | {' | '.join(cells)} | {eq or '–'} | "
                         f"{ratio:.2f}× |")
    val = [r for r in rows if r["loss"] == "val"]
    if val:
        for rule in RULES:
            vals = [r["after"][rule] for r in val]
            cell = " ".join(f"{v:.2g}" for v in vals) + f" → **{_med(vals):.2g}**"
            lines.append(f"| {rule} | after, val loss | "
                         + " | ".join(cell if n == 100 else "–" for n in ramps)
                         + " | – | – |")
    flagged = sorted({p.split(":")[0] for r in rows for p in r["after"]["problems"]})
    lines += ["", f"Problems flagged (after): {', '.join(flagged) or 'none'}.", ""]
    return "\n".join(lines), ratios


def main(argv: list[str] | None = None) -> int:
    import learnability

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="synth data set (drawn when missing)")
    p.add_argument("--shards", required=True, help="shard set (prepared; reused if up to date)")
    p.add_argument("--cohorts", nargs="+", default=["Effusion", "Cardiomegaly", "Pneumothorax"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="batch orders per ramp (0 1 2)")
    p.add_argument("--ramps", type=int, nargs="+", default=list(RAMPS),
                   help="ramp lengths in steps (30 100 300)")
    p.add_argument("--min-lr", type=float, default=1e-5, help="ramp start (the demo's 1e-5)")
    p.add_argument("--max-lr", type=float, default=1.0, help="ramp end (1)")
    p.add_argument("--val", action="store_true", help="also 100-step ramps in val loss mode")
    p.add_argument("--recipe", default=str(ROOT / "jobs" / "demo.toml"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="lr_find_bench.json")
    p.add_argument("--no-results", action="store_true", help="do not write bench/RESULTS.md")
    args = p.parse_args(argv)
    for name, default in (("per_class", 150), ("synth_size", 256), ("synth_seed", 0),
                          ("synth_workers", 2), ("size", 48), ("force_prepare", False)):
        setattr(args, name, default)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    learnability.make_data(args)
    runs = Path(tempfile.mkdtemp(prefix="lr-find-bench-"))
    sections, everything, summary = [], [], {}
    for cohort in args.cohorts:
        run_dir, config = stage1(cohort, args, runs)
        rows = []
        ramps = tuple(sorted(args.ramps))
        for steps in ramps:
            rows += raw_ramps(run_dir, config, args, steps=steps)
        if args.val:
            rows += raw_ramps(run_dir, config, args, steps=100, loss="val")
        for r in rows:
            r["cohort"] = cohort
            r["before"] = before(r["lrs"], r["losses"])
            r["after"] = after(r["lrs"], r["losses"], r["steps"])
            if r["steps"] == max(ramps) and r["loss"] == "train":
                lrs, losses = binned(r["lrs"], r["losses"], 10)
                r["equal_epochs"] = after(lrs, losses, max(ramps) // 10)
        text, ratios = cohort_table(cohort, rows, ramps)
        sections.append(text)
        summary[cohort] = ratios
        everything += rows
        print(text, flush=True)
    Path(args.out).write_text(json.dumps({"ratios": summary, "rows": everything},
                                         indent=1))
    worst = {a: max(max(r[f"paper/{a}"], 1 / r[f"paper/{a}"]) for r in summary.values())
             for a in ("before", "after")}
    equal = {c: _med([r["equal_epochs"]["paper"] for r in everything if r["cohort"] == c
                      and "equal_epochs" in r])
             / _med([r["after"]["paper"] for r in everything if r["cohort"] == c
                     and r["steps"] == max(args.ramps) and r["loss"] == "train"])
             for c in args.cohorts}
    body = [f"`bench/lr_find.py` on {platform.machine()} ({time.strftime('%Y-%m-%d')}, "
            f"{time.perf_counter() - t0:.0f} s): range tests from each cohort's stage-1 model "
            f"(the demo's recipe, seed 0), ramps {args.min_lr:g} → {args.max_lr:g}, batch "
            f"orders {' '.join(map(str, args.seeds))}. The paper rule's largest move between "
            f"the shortest and the longest ramp over the cohorts: before "
            f"{worst['before']:.2f}×, after {worst['after']:.2f}×. At equal epochs (the longest "
            "ramp read at a tenth of its points, against itself): "
            + ", ".join(f"{c} {v:.2f}×" for c, v in equal.items()) + ".",
            "",
            "How to read it: *before* at 30 steps is pinned at 0.14 in most ramps, the last lr "
            "before its fixed 5-point tail cut (a sixth of the ramp), whatever the curve; its "
            "running average lags the curve by ~50 steps, which pushes its 100- and 300-step "
            "readings right. *After* reads each curve where it is: at 30 steps the batch order "
            "moves it (one curve flagged flat), at 300 it is tight; the equal-epochs column "
            "(the 300-step curve read at 30 points) matches the 300-step reading, so what "
            "remains between 30 and 300 steps is the curve itself moving with the longer "
            "training, not the analysis. `steepest` moves with the ramp by nature (it sits where "
            "the accumulated lr reaches the curvature scale). In the val-loss mode the "
            "validation-selected stage-1 models' held-out loss barely falls: flagged flat, the "
            "sweep would fall back.", "", *sections]
    if not args.no_results:
        from _results import write_section

        write_section("## LR range test: suggestions by ramp length and seed", "\n".join(body))
    print(f"paper rule, largest 300/30 move: before {worst['before']:.2f}x, after "
          f"{worst['after']:.2f}x; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

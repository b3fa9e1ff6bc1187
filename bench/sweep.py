"""Benchmark: what does a sweep cost per trial, and how close does it come to a bare loop?
(Not a test.)

Run:  .venv/bin/python bench/sweep.py              (about 5 minutes on 2 CPU cores)
      .venv/bin/python bench/sweep.py --no-write   (print only, leave bench/RESULTS.md alone)
      .venv/bin/python bench/sweep.py --cohorts Emphysema --policies constant triangular \\
          --per-class 60 --no-write                (a quick look)

In one process, inside one local Ray started by
:func:`cxr_ray.ray_backend.session.ray_session` (``run_sweep`` joins it):

1. draws the synthetic data set (``--per-class``, 64²) and prepares it at ``--size`` (48²);
2. **bare**: two plain PyTorch loops in two processes at once, one torch thread each (the
   way two stage-2 trials share the machine): the same MobileNetV1 width, batch 16, SGD, no
   augmentation, over a cohort's train split held in memory; images/s per process, steady
   state (every epoch but the first), summed;
3. the same small sweep twice, each in a fresh experiment directory, from one recipe
   template (like ``jobs/demo.toml``: stage 1 in-trial with its LR range test, stage 2 with
   CLR bounds from it): once with stage 2 **in its Tune trials** (``launcher = "auto"``,
   ``workers = 1``), once with every stage-2 trial forced to **Ray Train**
   (``launcher = "ray_train"`` in ``[stage2]``: one ``TorchTrainer`` fit per trial);
4. the bare pair again (the best of the two pairs counts).

For each sweep, from the files it wrote: the median per-trial overhead of stage 2
(``trial_seconds − epoch_seconds`` of every stage-2 ``trial.json``: what a trial costs
beyond its epochs' train + eval seconds), the stage's wall seconds (``sweep_log.jsonl``),
and the sweep throughput = training images of every stage-2 trial (``history.jsonl``'s
``train_images``) / stage-2 wall seconds, as a ratio to the bare pair's images/s. Targets:
in-trial overhead ≤ 1.5 s median; sweep throughput ≥ 0.8 × bare. Writes ``## Sweep`` in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _results import RESULTS, write_section  # noqa: E402 (bench/ is on sys.path when run)

HEADING = "## Sweep"
BATCH = 16
OVERHEAD_TARGET_S = 1.5
THROUGHPUT_TARGET = 0.8

RECIPE = """\
# bench/sweep.py: a small sweep after jobs/demo.toml ({label})
[experiment]
name = "{name}"
storage_path = "{storage}"
shards = "{shards}"
cohorts = {cohorts}
target = "constant"

[train]
model = "mobilenet_v1"
width = {width}
pretrained = false
image_size = {size}
batch_size = {batch}
workers = 1
# 0.9 rather than 1: a Ray Train trial holds 0.01 CPU besides its worker, so with 1 CPU per
# worker only one Ray Train trial fits on 2 CPUs; 0.9 gives both sweeps 2 trials at once.
cpus_per_worker = 0.9
threads = 1
augment = false
checkpoint_metric = "test_accuracy"
keep_checkpoints = 1
log_every = 50

[stage1]
preset = "paper"
epochs = {stage1_epochs}

[lr_find]
enabled = true
num_steps = 20
min_lr = 1e-5
max_lr = 1.0
rule = "paper"

[stage2]
epochs = {stage2_epochs}
step_size_epochs = 1
gamma = 0.97
bounds = "lr_find"
launcher = "{launcher}"

[grid]
policy = {policies}

[resources]
max_concurrent_trials = "auto"
"""

SWEEPS = (("in_trial", "auto", "stage 2 in its Tune trials (`launcher = \"auto\"`, workers 1)"),
          ("ray_train", "ray_train",
           "stage 2 as Ray Train fits (`launcher = \"ray_train\"`, 1 worker)"))


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


# --------------------------------------------------------------------------- the bare pair
def _bare_child(shards: str, cohort: str, epochs: int, width: float, barrier: Any,
                out: Any, index: int) -> None:
    """One bare loop (one torch thread), started with its twin at the barrier."""
    import torch

    torch.set_num_threads(1)
    from cxr_ray.data import shards as shard_io
    import train as bench_train  # bench/train.py: the bare loop

    images, ids, labels = shard_io.read_split(shard_io.open_shards(shards), cohort, "train")
    # Warm up (thread pool, allocator, lazy init) before the twin starts timing.
    bench_train.bare_loop(images[:4 * BATCH], ids[:4 * BATCH], labels[:4 * BATCH], epochs=1,
                          batch=BATCH, width=width, threads=1, device="cpu", augment_on=False)
    barrier.wait()
    t0 = time.perf_counter()
    per_epoch = bench_train.bare_loop(images, ids, labels, epochs=epochs, batch=BATCH,
                                      width=width, threads=1, device="cpu", augment_on=False)
    out.put((index, per_epoch, t0, time.perf_counter()))


def bare_pair(shards: Path, cohort: str, epochs: int, width: float) -> dict[str, Any]:
    """Two bare loops in two processes at once → per-process steady images/s and their sum."""
    import train as bench_train

    ctx = mp.get_context("spawn")  # not fork: this process holds a Ray driver's threads
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_bare_child, args=(str(shards), cohort, epochs, width, barrier,
                                                   out, i)) for i in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get() for _ in procs)
    for p in procs:
        p.join()
    rates = [bench_train.steady(per_epoch)[0] for _, per_epoch, _, _ in results]
    overlap = (min(r[3] for r in results) - max(r[2] for r in results)) / max(
        r[3] - r[2] for r in results)
    return {"rates": rates, "total": sum(rates), "overlap": overlap}


# --------------------------------------------------------------------------- one sweep
def read_stage2(experiment: Path) -> dict[str, Any]:
    """What a finished sweep wrote about its stage 2."""
    from cxr_ray import paths

    trials = []
    for run in sorted((experiment / "stage2").iterdir()):
        trial = paths.read_json(run / paths.TRIAL_FILE)
        if trial is None:
            continue
        history = paths.read_jsonl(run / paths.HISTORY_FILE)
        trials.append({**trial, "images": sum(r["train_images"] for r in history),
                       "train_s": sum(r["train_seconds"] for r in history),
                       "eval_s": sum(r["eval_seconds"] for r in history),
                       "epochs": len(history)})
    log = {r["stage"]: r for r in paths.read_jsonl(experiment / paths.SWEEP_LOG)}
    return {"trials": trials, "stage2": log["stage2"], "stage1": log.get("stage1")}


def summarize(data: dict[str, Any], bare_total: float) -> dict[str, Any]:
    trials, stage = data["trials"], data["stage2"]
    wall, conc = stage["wall_seconds"], stage["concurrency"]
    over = [t["trial_seconds"] - t["epoch_seconds"] for t in trials]
    images = sum(t["images"] for t in trials)
    train_s = sum(t["train_s"] for t in trials)
    eval_s = sum(t["eval_s"] for t in trials)
    in_trials = sum(t["trial_seconds"] for t in trials)
    slots = wall * conc
    med = lambda key: statistics.median(t[key] for t in trials  # noqa: E731
                                        if t.get(key) is not None) if any(
        t.get(key) is not None for t in trials) else float("nan")
    return {
        "n": len(trials), "epochs": trials[0]["epochs"] if trials else 0, "wall": wall,
        "concurrency": conc, "launcher": stage["launcher"],
        "median_trial": statistics.median(t["trial_seconds"] for t in trials),
        "median_epochs": statistics.median(t["epoch_seconds"] for t in trials),
        "median_overhead": statistics.median(over), "max_overhead": max(over),
        "median_startup": med("startup_seconds"), "median_teardown": med("teardown_seconds"),
        "images": images, "rate": images / wall, "ratio": images / wall / bare_total,
        "train_rate": images / train_s,
        # Slot-seconds (wall × trials at once) by where they went.
        "slots": slots, "train_s": train_s, "eval_s": eval_s,
        "overhead_s": in_trials - train_s - eval_s, "outside_s": slots - in_trials,
        "stage1_wall": (data["stage1"] or {}).get("wall_seconds"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohorts", nargs="+", default=["Atelectasis", "Emphysema", "Pneumonia"],
                    help="cohorts (default 3 of similar size)")
    ap.add_argument("--policies", nargs="+", default=["constant", "triangular", "one_cycle"],
                    help="stage-2 policies (default constant triangular one_cycle)")
    ap.add_argument("--per-class", type=int, default=150,
                    help="synthetic images per finding (default 150, as make demo: ~280 "
                         "train images per cohort)")
    ap.add_argument("--size", type=int, default=48, help="training resolution (default 48)")
    ap.add_argument("--width", type=float, default=0.25, help="MobileNetV1 width (0.25)")
    ap.add_argument("--stage1-epochs", type=int, default=2)
    ap.add_argument("--stage2-epochs", type=int, default=3)
    ap.add_argument("--bare-epochs", type=int, default=8,
                    help="epochs of each bare loop (the first is warm-up; default 8)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="work in this directory and keep it (default: a temporary one)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cxr_ray.ray_backend.tune").setLevel(logging.INFO)

    import ray
    import torch

    from cxr_ray.data import cohorts as cohort_names, shards as shard_io, synth
    from cxr_ray.data.prepare import PrepareConfig
    from cxr_ray.ray_backend import ingest
    from cxr_ray.ray_backend.session import LOCAL_ENV, ray_session
    from cxr_ray.ray_backend.tune import run_sweep
    from cxr_ray.sweep.recipe import load_recipe

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    cpus = os.cpu_count() or 1
    cohorts = [cohort_names.resolve_cohort(c) for c in args.cohorts]
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-sweep-")
        root = Path(tmp.name)
    else:
        root = args.keep.resolve()
        for name, _, _ in SWEEPS:  # fresh experiments every run
            shutil.rmtree(root / "experiments" / name, ignore_errors=True)
    try:
        if not (root / "data" / "Data_Entry_2017.csv").is_file():
            synth.write_dataset(root / "data", per_class=args.per_class, size=64, seed=0,
                                workers=cpus)
        shards = root / "shards"
        bares: list[dict[str, Any]] = []
        results: dict[str, dict[str, Any]] = {}
        with ray_session():  # one local Ray with LOCAL_ENV; run_sweep joins it
            ingest.prepare(PrepareConfig(data=root / "data", out=shards, size=args.size))
            sh = shard_io.open_shards(shards)
            n_train = {c: int((shard_io.cohort_table(sh, c)["split"] == "train").sum())
                       for c in cohorts}
            bare_cohort = max(n_train, key=n_train.get)
            print(f"bare pair 1 ({bare_cohort}, {n_train[bare_cohort]} images) ...", flush=True)
            bares.append(bare_pair(shards, bare_cohort, args.bare_epochs, args.width))
            for name, launcher, _ in SWEEPS:
                text = RECIPE.format(
                    label=name, name=name, storage=root / "experiments", shards=shards,
                    cohorts=toml_list(cohorts), width=args.width, size=args.size, batch=BATCH,
                    stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs,
                    launcher=launcher, policies=toml_list(args.policies))
                path = root / f"{name}.toml"
                path.write_text(text)
                recipe = load_recipe(path)
                print(f"sweep {name} ...", flush=True)
                run_sweep(recipe)
                results[name] = read_stage2(recipe.experiment_dir)
            print("bare pair 2 ...", flush=True)
            bares.append(bare_pair(shards, bare_cohort, args.bare_epochs, args.width))
        load = os.getloadavg()
    finally:
        if tmp is not None:
            tmp.cleanup()
    total_s = time.perf_counter() - t_start

    bare = max(bares, key=lambda b: b["total"])
    stats = {name: summarize(results[name], bare["total"]) for name, _, _ in SWEEPS}
    a, b = stats["in_trial"], stats["ray_train"]

    def fmt(x: float | None, digits: int = 1) -> str:
        return "–" if x is None or x != x else f"{x:.{digits}f}"

    pairs = " / ".join(f"{x['total']:.0f}" for x in bares)
    rows = [
        f"| two bare loops at once, 1 thread each ({bare_cohort}, {n_train[bare_cohort]} "
        f"images, {args.bare_epochs} epochs each, the first excluded) | – | – | – | – | – | "
        f"{' + '.join(f'{r:.0f}' for r in bare['rates'])} = **{bare['total']:.0f}** "
        f"(pairs: {pairs}) | 1.00 |"]
    for name, _, label in SWEEPS:
        s = stats[name]
        rows.append(
            f"| {label} | {s['n']} × {s['epochs']} epochs, {s['concurrency']} at a time | "
            f"{fmt(s['median_trial'])} = {fmt(s['median_epochs'])} + "
            f"**{fmt(s['median_overhead'], 2)}** (max {fmt(s['max_overhead'], 2)}) | "
            f"{fmt(s['median_startup'], 2)} + {fmt(s['median_teardown'], 2)} | "
            f"{fmt(s['wall'])} | {s['images']:,} | {s['rate']:.0f} | **{s['ratio']:.2f}** |")
    slot_rows = []
    for name, _, label in SWEEPS:
        s = stats[name]
        parts = [s["train_s"], s["eval_s"], s["overhead_s"], s["outside_s"]]
        slot_rows.append(f"| {label.split(' (')[0]} | {s['slots']:.1f} | "
                         + " | ".join(f"{p:.1f} ({100 * p / s['slots']:.0f}%)" for p in parts)
                         + f" | {s['train_rate']:.0f} |")
    over_ok = a["median_overhead"] <= OVERHEAD_TARGET_S
    rate_ok = a["ratio"] >= THROUGHPUT_TARGET
    biggest = max((("training", a["train_s"]), ("evaluation", a["eval_s"]),
                   ("in-trial overhead", a["overhead_s"]),
                   ("time outside the trials", a["outside_s"])), key=lambda kv: kv[1])
    outside_share = a["outside_s"] / a["slots"]
    command = ("`.venv/bin/python bench/sweep.py --cohorts " + " ".join(cohorts)
               + " --policies " + " ".join(args.policies)
               + f" --per-class {args.per_class} --size {args.size} --width {args.width}"
               + f" --stage1-epochs {args.stage1_epochs} --stage2-epochs {args.stage2_epochs}"
               + f" --bare-epochs {args.bare_epochs}`")
    lines = [
        f"Measured by `bench/sweep.py` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
        f"{cpus} CPU cores, torch {torch.__version__}, ray {ray.__version__}; load average "
        f"{load_start[0]:.2f} at the start, {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(1 / 5 / 15 min) at the end: the machine was shared; whole run "
        f"{total_s / 60:.1f} min).",
        f"Command: {command}.",
        f"Synthetic data ({args.per_class} per finding) prepared at {args.size}²; cohorts "
        + ", ".join(f"{c} ({n_train[c]} train images)" for c in cohorts)
        + f" × policies {', '.join(args.policies)}; MobileNetV1 width {args.width}, batch "
        f"{BATCH}, no augmentation, 1 torch thread and 0.9 CPU per rank; stage 1: "
        f"{args.stage1_epochs} epochs in its Tune trials + a 20-step LR range test; stage 2: "
        f"{args.stage2_epochs} epochs from the stage-1 weights, CLR bounds from the range "
        "test. Both sweeps in one process and one local Ray (`ray_session()`, env "
        + ", ".join(f"{k}={v}" for k, v in LOCAL_ENV.items())
        + "), each in a fresh experiment directory; only `[stage2] launcher` differs "
        "(stage 1 runs in its Tune trials in both).",
        "Bare: two processes started together (spawned, synchronised by a barrier after a "
        "warm-up), each one torch thread running a plain PyTorch loop (same model, batch, "
        "SGD, no augmentation) over the train split held in memory, measured before and after "
        "the two sweeps inside the same Ray session (the best pair counts); images/s of each "
        "process over every epoch but its first, summed.",
        "",
        "| run | stage-2 trials | median trial s = epochs (train + eval) s + **overhead** "
        "s | median start-up + tear-down s | stage-2 wall s | training images | images/s | "
        "ratio to bare |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Targets: in-trial overhead ≤ {OVERHEAD_TARGET_S} s median — measured "
        f"{a['median_overhead']:.2f} s ({'met' if over_ok else 'NOT met'}); sweep throughput "
        f"≥ {THROUGHPUT_TARGET} × bare — measured {a['ratio']:.2f} in trial "
        f"({'met' if rate_ok else 'NOT met'}), {b['ratio']:.2f} with Ray Train fits.",
        "Overhead = `trial_seconds − epoch_seconds` of each stage-2 `trial.json` (plan, data "
        "read, model, checkpoints, `tune.report`, and for Ray Train the whole fit's start-up "
        "and tear-down); images/s = training images of all stage-2 trials / stage-2 wall "
        "seconds (`sweep_log.jsonl`: Tune set-up, trial actors, every trial, the tail).",
        "",
        "Where stage 2's slot-seconds went (wall × trials at once; outside the trials = "
        "slot time not inside any trial's `run_trial`: Tune's set-up and scheduling, trial "
        "actors starting, a slot idle at the tail):",
        "",
        "| stage 2 | slot-s | train s | eval s | in-trial overhead s | outside the trials s | "
        "train images/s inside trials |",
        "|---|---|---|---|---|---|---|",
        *slot_rows,
        "",
        f"Stage 1 (in its Tune trials, with the range test) took {fmt(a['stage1_wall'])} s "
        f"and {fmt(b['stage1_wall'])} s of wall in the two sweeps. In trial, the largest "
        f"share of stage 2's slot-seconds is {biggest[0]} "
        f"({100 * biggest[1] / a['slots']:.0f}%); time outside the trials is "
        f"{100 * outside_share:.0f}% and the in-trial overhead "
        f"{100 * a['overhead_s'] / a['slots']:.0f}%.",
    ]
    section = "\n".join(lines)
    print(f"{HEADING}\n\n{section}")
    if not args.no_write:
        write_section(HEADING, section)
        print(f"\nwrote {HEADING!r} in {RESULTS}")


if __name__ == "__main__":
    main()

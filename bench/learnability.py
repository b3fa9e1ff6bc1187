"""Benchmark: how well does the demo's stage 1 learn each cohort of the embedded data set?
(Not a test.)

The lr-policy comparison of the demo needs cohorts that learn in stage 1 but leave room to
improve: every cohort should end stage 1 between about 60 % and 95 % held-out accuracy, with
difficulty that differs between diseases. This script measures that, without Ray:

1. the embedded data set (``cxr-ray synth``; ``--data DIR``, drawn there when it holds no
   ``Data_Entry_2017.csv`` yet, by default at the demo's ``--per-class 150 --size 256``);
2. the shard set (``cxr-ray prepare``'s planning, checks and publishing, with the decode run
   in this process instead of Ray Data: ``--shards DIR``, at the demo's ``--size 48``;
   an up-to-date set is reused);
3. every cohort's stage-1 trial of the recipe (default ``jobs/demo.toml``: preset
   ``paper``, i.e. per-cohort SGD + time decay and Hernia Adam, 5 epochs, MobileNetV1 width
   0.25 from scratch, batch 16, no augmentation, one thread), once per ``--seeds`` seed. By
   default (``--ranks 2``) as the demo trains it: DDP over two ranks of 8 images per step,
   here two forked processes with a gloo group of their own instead of Ray Train's workers,
   running the same loop with the same sharding; it reproduces the demo's stage-1 numbers
   exactly (seed 0). ``--ranks 1`` trains in this process with the global batch on one rank
   (:func:`cxr_ray.train.run.fit_in_process`): BatchNorm then sees 16 images instead of 8,
   and the numbers differ a lot (the stage-1 runs are short and chaotic).

Per cohort the table gives each seed's last-epoch ``val_accuracy``, their mean, and 'sel': the
mean of each seed's best epoch on validation, the checkpoint stage 1 hands to stage 2 (what
``checkpoint_metric = "val_accuracy"`` selects). The target is on 'sel': every cohort
between 60 % and 95 %. Writes everything (every epoch's history line too) to ``--out`` as
JSON; ``tests/integration/test_demo_learnability.py`` runs it and asserts the target.

Run:  .venv/bin/python bench/learnability.py --data /tmp/lrn/data --shards /tmp/lrn/shards
      .venv/bin/python bench/learnability.py --data D --shards S --cohorts Fibrosis Hernia \
          --seeds 0 --out /tmp/two.json                     (a quick look)

At 2 ranks about 6 s per binary-cohort fit and 25 s for OneClass; the whole 15 × 3 table
takes about 5.5 minutes on a 2-core machine (``--ranks 1 --jobs 2``: 1.5 minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- data
def make_data(args: argparse.Namespace) -> dict[str, Any]:
    """Synth (when ``--data`` holds no set yet) and prepare; → timings."""
    from cxr_ray.data import synth
    from cxr_ray.data.prepare import PrepareConfig, decode_in_process, prepare

    timings: dict[str, Any] = {}
    data = Path(args.data)
    if not (data / "Data_Entry_2017.csv").is_file():
        print(f"synth: drawing --per-class {args.per_class} --size {args.synth_size} "
              f"into {data} ...", flush=True)
        result = synth.write_dataset(data, per_class=args.per_class, size=args.synth_size,
                                     seed=args.synth_seed, workers=args.synth_workers)
        timings["synth_seconds"] = result.seconds
        timings["synth_images"] = result.images
        print(f"synth: {result.images} images, {result.megabytes:.1f} MB in "
              f"{result.seconds:.1f} s", flush=True)
    t0 = time.perf_counter()
    result = prepare(PrepareConfig(data=data, out=Path(args.shards), size=args.size,
                                   force=args.force_prepare),
                     decode_and_write=decode_in_process)
    timings["prepare_seconds"] = time.perf_counter() - t0
    timings["prepare_skipped"] = result.skipped
    print(f"prepare: {result.manifest.get('written')} images at {args.size}² "
          f"{'(up to date, reused)' if result.skipped else ''} in "
          f"{timings['prepare_seconds']:.1f} s", flush=True)
    return timings


# --------------------------------------------------------------------------- training
def stage1_configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The recipe's stage-1 training keys per cohort, as its sweep plans them."""
    from cxr_ray.sweep.plan import plan_trials
    from cxr_ray.sweep.recipe import load_recipe

    recipe = load_recipe(args.recipe, {"experiment.shards": str(Path(args.shards).resolve()),
                                       "experiment.cohorts": "all"})
    stage1, _, _ = plan_trials(recipe)
    from cxr_ray.train.config import SCORE_METRICS

    out = {}
    for spec in stage1:
        if spec.axes:
            raise SystemExit(f"{args.recipe}: [stage1_grid] axes are not supported here")
        train = dict(spec.train)
        # --ranks 1: one rank in this process, with the recipe's global batch; --ranks 2:
        # the demo's 2-rank DDP (forked processes, no Ray).
        train.update(workers=args.ranks, launcher="process", cpus_per_worker=None,
                     threads=args.threads)
        if args.epochs is not None:
            train["epochs"] = args.epochs
        metric = train.get("checkpoint_metric")
        if metric is not None and metric not in SCORE_METRICS:  # a recipe of before the
            train["checkpoint_metric"] = metric.replace("test_", "val_")  # val split
        out[spec.cohort] = train
    return out


def _ddp_rank(plan_dict: dict[str, Any], metric: str, keep: int, rank: int, world: int,
              port: int) -> None:
    """One rank of :func:`fit_ddp` (a forked process): what a Ray Train worker runs, with a
    gloo process group of our own instead of Ray's."""
    import torch
    import torch.distributed as dist

    from cxr_ray.train import checkpoint as ck
    from cxr_ray.train import loop
    from cxr_ray.train import run as runs
    from cxr_ray.train.config import SCORE_METRICS, RunPlan

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        plan = RunPlan.from_dict(plan_dict)
        store = ck.CheckpointStore(Path(plan.run_dir), keep=keep, metric=metric,
                                   mode=SCORE_METRICS[metric]) if rank == 0 else None

        def save(metrics: dict[str, Any], make) -> None:
            if store is not None:
                store.save(make())

        ctx = loop.RankContext(
            rank=rank, world_size=world, device=torch.device("cpu"), launcher="ray_train",
            # What ray.train.torch.prepare_model does on a CPU: DDP with its defaults.
            prepare_model=lambda m: torch.nn.parallel.DistributedDataParallel(m),
            last_checkpoint=lambda: None, save=save)
        train_feed, eval_feeds = runs.array_feeds(plan, rank, world)
        runs.run_rank(plan, ctx, train_feed, eval_feeds, checkpoint_metric=metric)
    finally:
        dist.destroy_process_group()


def fit_ddp(config, *, storage_path: str, name: str):
    """``config`` (``workers`` > 1) trained as DDP over ``workers`` forked processes on this
    machine, without Ray: the demo's stage 1 (2 ranks of 8 images per step), same loop,
    same per-rank sharding and BatchNorm statistics; → the run's summary."""
    import multiprocessing
    import socket

    from cxr_ray.train import run as runs

    t0, started = time.perf_counter(), time.time()
    run_dir = Path(storage_path).resolve() / name
    plan, done = runs.open_run(config, run_dir, resume=False)
    plan.threads = config.threads or 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_ddp_rank, args=(plan.to_dict(), config.checkpoint_metric,
                                                  config.keep_checkpoints, rank, plan.workers,
                                                  port)) for rank in range(plan.workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise RuntimeError(f"{name}: a rank failed (exit codes {[p.exitcode for p in procs]})")
    return runs.finish_run(config, plan, run_dir, done, t0=t0, started=started,
                           launcher="ray_train")


def fit_one(job: tuple[dict[str, Any], int, str, str]) -> dict[str, Any]:
    """One stage-1 fit; → the last epoch's held-out accuracy and the history."""
    train, seed, storage, name = job
    import torch

    from cxr_ray.train.config import TrainConfig
    from cxr_ray.train.run import fit_in_process

    torch.set_num_threads(int(train.get("threads") or 1))
    t0 = time.perf_counter()
    if int(train.get("workers") or 1) > 1:
        config = TrainConfig.from_dict({**train, "seed": seed, "launcher": "ray_train"})
        summary = fit_ddp(config, storage_path=storage, name=name)
    else:
        config = TrainConfig.from_dict({**train, "seed": seed})
        summary = fit_in_process(config, storage_path=storage, name=name, resume=False)
    last = summary.history[-1]
    chosen = next(r for r in summary.history if r["epoch"] == summary.selected_epoch)
    split = "val" if last.get("val_accuracy") is not None else "test"
    return {"cohort": config.cohort, "seed": seed, "split": split,
            "accuracy": last[f"{split}_accuracy"],
            "test_accuracy": last.get("test_accuracy"), "val_accuracy": last.get("val_accuracy"),
            "auc": last.get(f"{split}_auc"),
            # The epoch the run's checkpoint_metric selected: what stage 2 starts from and
            # what the report's stage-1 table shows.
            "selected_accuracy": chosen[f"{split}_accuracy"],
            "selected_epoch": summary.selected_epoch,
            "train_images": summary.plan.get("train_images"),
            "test_images": summary.plan.get("test_images"),
            "val_images": summary.plan.get("val_images"),
            "fit_seconds": time.perf_counter() - t0,
            "history": summary.history}


# --------------------------------------------------------------------------- report
def table(results: list[dict[str, Any]], cohorts: list[str], seeds: list[int]) -> str:
    """Cohort × seed held-out accuracy, its mean; with a val split also the test split's
    mean (about twice as many images: the steadier estimate of the same thing)."""
    by = {(r["cohort"], r["seed"]): r for r in results}
    splits = sorted({r["split"] for r in results})
    both = splits == ["val"]
    lines = [f"held-out accuracy (%) at the end of stage 1 (last epoch), on the "
             f"{'/'.join(splits)} split; 'sel': at the best epoch on it (what checkpoint_metric "
             f"= {splits[0]}_accuracy selects)" + ("; 'test': the test split's, last epoch"
                                                  if both else ""),
             f"{'cohort':<20}" + "".join(f"{'seed ' + str(s):>8}" for s in seeds)
             + f"{'mean':>8}{'sel':>7}" + (f"{'test':>7}" if both else "") + f"{'auc':>6}"
             + f"{'n held':>8}{'s/fit':>7}"]
    means, sels = [], []
    for c in cohorts:
        rs = [by[(c, s)] for s in seeds if (c, s) in by]
        if not rs:
            continue
        mean = 100 * statistics.fmean(r["accuracy"] for r in rs)
        means.append(mean)
        sels.append(100 * statistics.fmean(r["selected_accuracy"] for r in rs))
        held = rs[0]["val_images"] if rs[0]["split"] == "val" else rs[0]["test_images"]
        auc = statistics.fmean(r["auc"] for r in rs if r["auc"] is not None) \
            if any(r["auc"] is not None for r in rs) else float("nan")
        sel = 100 * statistics.fmean(r["selected_accuracy"] for r in rs)
        flag = "" if 60 <= sel <= 95 else "  <-- sel outside 60-95"
        lines.append(
            f"{c:<20}" + "".join(f"{100 * by[(c, s)]['accuracy']:>8.1f}" if (c, s) in by
                                 else f"{'-':>8}" for s in seeds)
            + f"{mean:>8.1f}{sel:>7.1f}"
            + (f"{100 * statistics.fmean(r['test_accuracy'] for r in rs):>7.1f}" if both else "")
            + f"{auc:>6.2f}{held:>8}{statistics.fmean(r['fit_seconds'] for r in rs):>7.1f}{flag}")
    if means:
        lines.append(f"{'range of means':<20}{min(means):.1f} .. {max(means):.1f}")
    if sels:
        lines.append(f"{'range of sel':<20}{min(sels):.1f} .. {max(sels):.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="synth data set (drawn here when it has no Data_Entry_2017.csv yet)")
    p.add_argument("--shards", required=True, help="shard set (prepared here; reused if "
                   "up to date)")
    p.add_argument("--per-class", type=int, default=150, help="synth --per-class (150)")
    p.add_argument("--synth-size", type=int, default=256, help="synth --size (256)")
    p.add_argument("--synth-seed", type=int, default=0, help="synth --seed (0)")
    p.add_argument("--synth-workers", type=int, default=2, help="synth processes (2)")
    p.add_argument("--size", type=int, default=48, help="prepare --size (48)")
    p.add_argument("--force-prepare", action="store_true",
                   help="re-prepare even when the shards are up to date")
    p.add_argument("--recipe", default=str(ROOT / "jobs" / "demo.toml"),
                   help="sweep recipe whose stage 1 is trained (jobs/demo.toml)")
    p.add_argument("--cohorts", nargs="+", default=["all"], help="cohorts, or all (default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds (0 1 2)")
    p.add_argument("--epochs", type=int, default=None,
                   help="stage-1 epochs (default: the recipe's)")
    p.add_argument("--ranks", type=int, default=2, choices=(1, 2),
                   help="2: as the demo's stage 1, DDP over 2 forked processes (gloo, 8 images "
                   "per rank and step), without Ray (default); 1: each fit in this process "
                   "(fit_in_process, the global batch on one rank)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (1)")
    p.add_argument("--jobs", type=int, default=1, help="fits at once, in processes (1)")
    p.add_argument("--runs", default=None,
                   help="where the runs are written (default: a temporary directory)")
    p.add_argument("--out", default="learnability.json", help="results JSON")
    args = p.parse_args(argv)
    if args.ranks > 1 and args.jobs > 1:
        p.error("--ranks 2 runs its two ranks as processes of its own: use --jobs 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from cxr_ray.data.cohorts import COHORTS, resolve_cohort

    started = time.perf_counter()
    timings = make_data(args)
    cohorts = list(COHORTS) if args.cohorts == ["all"] else [resolve_cohort(c)
                                                             for c in args.cohorts]
    configs = stage1_configs(args)
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="learnability-"))
    stamp = f"{int(time.time())}-{os.getpid()}"
    jobs = [(configs[c], s, str(runs), f"{c}__seed{s}__{stamp}") for c in cohorts
            for s in args.seeds]
    # Biggest first, so two workers finish together.
    jobs.sort(key=lambda j: j[0]["cohort"] != "OneClass")
    results: list[dict[str, Any]] = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for r in pool.map(fit_one, jobs):
                results.append(r)
                print(f"  {r['cohort']:<20} seed {r['seed']}: {100 * r['accuracy']:5.1f} % "
                      f"({r['split']}, {r['fit_seconds']:.1f} s)", flush=True)
    else:
        for job in jobs:
            r = fit_one(job)
            results.append(r)
            print(f"  {r['cohort']:<20} seed {r['seed']}: {100 * r['accuracy']:5.1f} % "
                  f"({r['split']}, {r['fit_seconds']:.1f} s)", flush=True)
    report = table(results, cohorts, args.seeds)
    print()
    print(report)
    from cxr_ray.data import synth

    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "generator_version": synth.GENERATOR_VERSION,
        "contrast": synth.CONTRAST, "subtle": getattr(synth, "SUBTLE", None),
        "data": str(Path(args.data).resolve()), "shards": str(Path(args.shards).resolve()),
        "recipe": args.recipe, "epochs": sorted({c["epochs"] for c in configs.values()}),
        "seeds": args.seeds,
        "timings": {**timings, "total_seconds": time.perf_counter() - started,
                    "fit_seconds_mean": statistics.fmean(r["fit_seconds"] for r in results)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "mean_accuracy": {c: statistics.fmean(r["accuracy"] for r in results
                                              if r["cohort"] == c) for c in cohorts},
        "mean_selected_accuracy": {c: statistics.fmean(r["selected_accuracy"] for r in results
                                                       if r["cohort"] == c) for c in cohorts},
        "table": report,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out}; runs in {runs}; "
          f"{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

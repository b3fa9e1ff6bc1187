"""Benchmark: `cxr-ray predict` on Ray Data against a plain loop over the same models.
(Not a test.)

Every path reads the same input list (the images of ``--images`` repeated to each
``--count``, through a list file), decodes and resizes each file as ``prepare`` does, and
applies every cohort's chosen model of ``--experiment``:

* **loop**: :func:`cxr_ray.predict.output.predict_in_process` in this process with one torch
  thread (one core): the single-process, single-thread baseline;
* **control**: the same loop in one fresh process per CPU, each on its share of the inputs:
  what the machine gives independent processes, their start (imports, model loading)
  included, without Ray;
* **ray**: :func:`cxr_ray.ray_backend.infer.predict` on a local Ray with all the machine's
  CPUs (one model-holding actor per CPU, one thread each).

Reported per count: seconds and images/s of each (wall time of the whole call), the ratio
ray / (loop × CPUs) (target ≥ 0.8), and the control's, which says how much of the gap is
the machine's and the fresh processes' rather than Ray's. Every path is warmed up once
first; rounds alternate the paths. Ray's and the loop's probabilities are checked equal.
Writes bench/RESULTS.md's "Predict throughput" section.

Run (after ``make demo``; about 7 minutes on 2 CPUs):
  .venv/bin/python bench/predict.py --experiment demo-run/experiments/demo \\
      --images demo-run/data/images
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _loop_part(job: tuple[str, str, str]) -> None:
    """One control process: the plain loop over its share of the inputs."""
    from cxr_ray.predict.output import predict_in_process

    experiment, listing, out = job
    predict_in_process(experiment, listing, out, threads=1)


def control(experiment: str, files: list[str], work: Path, processes: int) -> float:
    """Wall seconds of the loop in ``processes`` fresh processes, the inputs split evenly."""
    import multiprocessing as mp

    jobs = []
    for i in range(processes):
        part = work / f"part{i}.txt"
        part.write_text("\n".join(files[i::processes]) + "\n")
        jobs.append((experiment, str(part), str(work / f"part{i}.csv")))
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_loop_part, jobs)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True)
    p.add_argument("--images", required=True, help="a directory of images")
    p.add_argument("--count", type=int, nargs="+", default=[5000, 20000],
                   help="inputs per measurement (the images repeated); default 5000 20000")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds (medians)")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray

    from cxr_ray.predict.inputs import list_inputs
    from cxr_ray.predict.output import predict_in_process
    from cxr_ray.ray_backend import infer

    distinct = list_inputs(args.images)
    work = Path(tempfile.mkdtemp(prefix="predict-bench-"))
    cpus = os.cpu_count() or 1
    for f in distinct:  # every path reads from the page cache, the first one timed too
        Path(f).read_bytes()

    def listing(n: int) -> tuple[list[str], Path]:
        files = (distinct * (n // len(distinct) + 1))[:n]
        path = work / f"inputs{n}.txt"
        path.write_text("\n".join(files) + "\n")
        return files, path

    rows, checked, loop_rates = [], 0, []
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        # Warm-up: the first call in a process (or on a fresh Ray) pays one-off costs (kernel
        # selection, Ray Data's first plan) that no later call does.
        _, small = listing(args.batch_size)
        predict_in_process(args.experiment, small, work / "warm.csv", threads=1)
        infer.predict(args.experiment, small, work / "warm-ray.csv")
        for n in args.count:
            files, inputs = listing(n)
            # Rounds alternate the paths, so a slow spell of the machine hits them alike.
            loop_t, control_t, ray_t = [], [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                loop, _ = predict_in_process(args.experiment, inputs, work / "loop.csv",
                                             batch_size=args.batch_size, threads=1)
                loop_t.append(time.perf_counter() - t0)
                loop_rates.append(n / loop_t[-1])
                control_t.append(control(args.experiment, files, work, cpus))
                t0 = time.perf_counter()
                fast, _ = infer.predict(args.experiment, inputs, work / "ray.csv",
                                        batch_size=args.batch_size)
                ray_t.append(time.perf_counter() - t0)
            cols = [c for c in loop.columns if c == "anomaly_score" or c in fast.columns
                    and loop[c].dtype.kind == "f" and not c.endswith("_threshold")]
            for c in cols:
                np.testing.assert_allclose(fast[c].to_numpy(float), loop[c].to_numpy(float),
                                           atol=1e-6, equal_nan=True)
            checked += len(fast)
            loop_s, control_s, ray_s = (float(np.median(t)) for t in (loop_t, control_t, ray_t))
            rows.append(f"| {n} | {loop_s:.1f} ({n / loop_s:.0f}/s) | {control_s:.1f} "
                        f"({n / control_s:.0f}/s) | {ray_s:.1f} ({n / ray_s:.0f}/s) | "
                        f"**{loop_s / ray_s / cpus:.2f}** | {loop_s / control_s / cpus:.2f} | "
                        f"{control_s / ray_s:.2f} |")
            print(rows[-1], flush=True)
    finally:
        ray.shutdown()
    cohorts = sum(1 for c in loop.columns if c.endswith("_checkpoint"))
    body = (f"`bench/predict.py` on {platform.machine()}, {cpus} CPUs "
            f"({time.strftime('%Y-%m-%d')}): the {len(distinct)} images of `{args.images}` "
            f"repeated to each count, through {cohorts} cohort models of `{args.experiment}`, "
            f"batch {args.batch_size}; wall time of the whole call (model loading and, for "
            "Ray, the actors' start included; Ray itself already running, every path warmed "
            f"up once), median of {args.rounds} round(s) alternating the paths.\n\n"
            "- **loop**: one process, one torch thread (already imported);\n"
            f"- **control**: the same loop in {cpus} fresh processes, the inputs split (what "
            "the machine gives independent processes, their start included);\n"
            f"- **ray**: Ray Data, {cpus} model-holding actors × 1 thread.\n\n"
            f"| inputs | loop s | control s | ray s | ray / (loop × {cpus}) | "
            f"control / (loop × {cpus}) | ray / control |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\nTarget: ray / (loop × {cpus}) ≥ 0.8. The loop's own rate "
            f"ranged {min(loop_rates):.0f}-{max(loop_rates):.0f} images/s in this run, which "
            "moves every ratio; the control column is what plain processes get on the same "
            f"machine at the same time. Probabilities of ray and loop equal to 1e-6 on all "
            f"{checked} rows.")
    print(body)
    if not args.no_results:
        from _results import write_section

        write_section("## Predict throughput", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

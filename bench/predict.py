"""Benchmark: `cxr-ray predict` on Ray Data against a plain loop over the same models.
(Not a test.)

Both read the same input list (``--images``, repeated to at least ``--count`` files through a
list file), decode and resize each file as ``prepare`` does, and apply every cohort's chosen
model of ``--experiment``:

* **loop**: :func:`cxr_ray.predict.output.predict_in_process` in this process with one torch
  thread (one core): the single-process, single-thread baseline;
* **ray**: :func:`cxr_ray.ray_backend.infer.predict` on a local Ray with all the machine's
  CPUs (read tasks + one model-holding actor per CPU, one thread each).

Reported: images/s of each (wall time of the whole call: model loading and, for Ray, the
actors' start included), and the ratio ray / (loop × CPUs), target ≥ 0.8. Both write a
preds.csv; their probabilities are checked equal. Writes bench/RESULTS.md's "Predict
throughput" section.

Run (after ``make demo``):
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True)
    p.add_argument("--images", required=True, help="a directory of images")
    p.add_argument("--count", type=int, default=5000, help="inputs (the images repeated)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from cxr_ray.predict.inputs import list_inputs
    from cxr_ray.predict.output import predict_in_process

    files = list_inputs(args.images)
    files = (files * (args.count // len(files) + 1))[:args.count]
    work = Path(tempfile.mkdtemp(prefix="predict-bench-"))
    listing = work / "inputs.txt"
    listing.write_text("\n".join(files) + "\n")
    cpus = os.cpu_count() or 1

    t0 = time.perf_counter()
    loop, _ = predict_in_process(args.experiment, listing, work / "loop.csv",
                                 batch_size=args.batch_size, threads=1)
    loop_s = time.perf_counter() - t0

    import ray

    from cxr_ray.ray_backend import infer

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        fast, _ = infer.predict(args.experiment, listing, work / "ray.csv",
                                batch_size=args.batch_size)
        ray_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    cols = [c for c in loop.columns if c == "anomaly_score" or c in fast.columns
            and loop[c].dtype.kind == "f" and not c.endswith("_threshold")]
    for c in cols:
        np.testing.assert_allclose(fast[c].to_numpy(float), loop[c].to_numpy(float),
                                   atol=1e-6, equal_nan=True)
    n = len(files)
    ratio = (n / ray_s) / (n / loop_s * cpus)
    cohorts = sum(1 for c in loop.columns if c.endswith("_checkpoint"))
    body = (f"`bench/predict.py` on {platform.machine()}, {cpus} CPUs "
            f"({time.strftime('%Y-%m-%d')}): {n} inputs ({len(set(files))} distinct images "
            f"repeated) through {cohorts} cohort models of `{args.experiment}`, batch "
            f"{args.batch_size}, wall time of the whole call (model loading and Ray's actor "
            "start included).\n\n"
            "| path | seconds | images/s |\n|---|---|---|\n"
            f"| loop: one process, one thread | {loop_s:.1f} | {n / loop_s:.1f} |\n"
            f"| Ray Data: read tasks + {cpus} actors × 1 thread | {ray_s:.1f} | "
            f"{n / ray_s:.1f} |\n\n"
            f"Ratio ray / (loop × {cpus} CPUs): **{ratio:.2f}** (target ≥ 0.8). "
            "Probabilities of the two paths equal to 1e-6.")
    print(body)
    if not args.no_results:
        from _results import write_section

        write_section("## Predict throughput", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: does ``cxr-ray prepare`` use every CPU as well as a plain PIL loop uses one?  (Not a test.)

Run:  .venv/bin/python bench/prepare.py              (about 2–3 minutes on 2 CPU cores)
      .venv/bin/python bench/prepare.py --no-write   (print only, leave bench/RESULTS.md alone)
      .venv/bin/python bench/prepare.py --data DIR   (your own NIH-layout data set)

Without ``--data`` it draws ``--images`` synthetic 1024² chest X-rays once (cached in
``--cache``) and lists each file ``--copies`` times under new NIH-style names (hard links),
so that there is enough work for the fixed costs of a Ray Data execution to matter as
little as they do on real data, without drawing thousands of images.

Measures, over the same files in the same run, interleaved so that background load hits
both alike:

* the baseline: one process, ``PIL.Image.open`` → grey → ``resize(size², BILINEAR,
  reducing_gap=None)`` → numpy, for every listed file (no writing);
* ``cxr-ray prepare`` (:func:`cxr_ray.ray_backend.ingest.prepare`) on a running local Ray (Ray start-up measured separately and
  excluded): decode, resize, Parquet write, cohort tables, manifest, atomic publish —
  the whole command minus ``ray.init``.  The first run also starts Ray's worker
  processes ("cold"); the ratio uses the median of the warm runs.

Prints ``prepare_rate / (baseline_rate × CPUs)`` (target ≥ 0.8) and writes the numbers
under ``## Prepare`` in bench/RESULTS.md, leaving other sections untouched.  The
augmentation rate has its own benchmark, bench/augment.py (``## Augmentation``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr_ray.data import nih, synth
from cxr_ray.data.prepare import PrepareConfig

from _results import RESULTS, write_section  # noqa: E402 (bench/ is on sys.path when run)

HEADING = "## Prepare"


def make_data(cache: Path, images: int, copies: int, size: int) -> Path:
    """Synthetic 1024² set (cached), each file listed ``copies`` times via hard links."""
    base = cache / f"synth-{size}-{images}"
    if not (base / "Data_Entry_2017.csv").is_file():
        per_class = max(1, round(images / 17))  # synth draws ~17 images per unit of per_class
        print(f"drawing ~{images} synthetic {size}² images into {base} (once; cached)")
        synth.write_dataset(base, per_class=per_class, size=size, seed=0)
    meta = pd.read_csv(base / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    data = cache / f"listed-{size}-{images}x{copies}"
    if (data / "Data_Entry_2017.csv").is_file():
        return data
    shutil.rmtree(data, ignore_errors=True)
    (data / "images").mkdir(parents=True)
    rows = []
    for k in range(copies):
        for row in meta.to_dict("records"):
            pid = int(row[nih.PATIENT]) + 40000 * k  # new patients: the cohorts stay valid
            name = f"{pid:08d}_{int(row['Follow-up #']):03d}.png"
            os.link(base / "images" / row[nih.IMAGE], data / "images" / name)
            rows.append({**row, nih.IMAGE: name, nih.PATIENT: str(pid)})
    pd.DataFrame(rows).to_csv(data / "Data_Entry_2017.csv", index=False)
    return data


def listed_paths(data: Path) -> list[Path]:
    meta = pd.read_csv(data / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    found = {p.name: p for p in data.rglob("*") if p.is_file()}
    return [found[n] for n in meta[nih.IMAGE] if n in found]


def baseline(paths: list[Path], size: int) -> float:
    """Images/s of a single-process PIL decode + antialiased resize loop."""
    return baseline_timed(paths, size)[0]


def baseline_timed(paths: list[Path], size: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of the baseline loop."""
    t0, c0 = time.perf_counter(), time.process_time()
    for path in paths:
        with Image.open(path) as im:
            gray = im if im.mode == "L" else im.convert("L")
            np.asarray(gray.resize((size, size), Image.BILINEAR, reducing_gap=None))
    return len(paths) / (time.perf_counter() - t0), (time.process_time() - c0) / len(paths)


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and all its descendants (Linux /proc).

    The local Ray's GCS, raylet and workers are descendants of the driver that started
    it, so the difference around a run is everything ``prepare`` cost, Ray's own overhead
    included, whatever else the machine was doing.
    """
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parent[pid] = int(fields[1])
        # utime, stime, cutime, cstime (fields 14-17 of stat; 11-14 after the name)
        times[pid] = sum(int(v) for v in fields[11:15]) / tick
    me = os.getpid()
    total = 0.0
    for pid, t in times.items():
        p = pid
        while p > 1 and p != me:
            p = parent.get(p, 0)
        if p == me:
            total += t
    return total


def _half(args: tuple[list[Path], int]) -> float:
    return baseline(*args)


def parallel_loop(paths: list[Path], size: int, procs: int) -> tuple[float, float]:
    """(images/s, CPU s/image) of the baseline loop in ``procs`` plain processes: the
    machine's parallel ceiling at the time, and the CPU cost of the work when every core
    is busy (caches and memory bandwidth shared), without Ray."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(procs) as pool:
        pool.submit(baseline, paths[:2], size).result()  # start the workers
        t0, c0 = time.perf_counter(), tree_cpu_seconds()
        list(pool.map(_half, [(paths[i::procs], size) for i in range(procs)]))
        cpu = tree_cpu_seconds() - c0
        return len(paths) / (time.perf_counter() - t0), cpu / len(paths)


def run_prepare(data: Path, out: Path, size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    cpu0, tree0 = time.process_time(), tree_cpu_seconds()
    from cxr_ray.ray_backend.ingest import prepare

    result = prepare(PrepareConfig(data=data, out=out, size=size))
    seconds = time.perf_counter() - t0
    driver_cpu, tree_cpu = time.process_time() - cpu0, tree_cpu_seconds() - tree0
    m = result.manifest
    return {"seconds": seconds, "rate": m["rows"] / seconds, "decode_seconds": m["decode_seconds"],
            "rows": m["rows"], "written": m["written"], "shards": len(m["shards"]),
            "bytes": sum(s["bytes"] for s in m["shards"]), "driver_cpu": driver_cpu,
            "cpu_per_image": tree_cpu / max(m["rows"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="NIH-layout data set (default: synthetic)")
    ap.add_argument("--images", type=int, default=160, help="synthetic images to draw (default 160)")
    ap.add_argument("--copies", type=int, default=8, help="times each synthetic file is listed (default 8)")
    ap.add_argument("--input-size", type=int, default=1024, help="synthetic image side (default 1024)")
    ap.add_argument("--size", type=int, default=224, help="prepared resolution (default 224)")
    ap.add_argument("--rounds", type=int, default=3, help="baseline/prepare rounds (default 3)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cxr-ray-bench")
    ap.add_argument("--no-write", action="store_true", help="print only; do not edit bench/RESULTS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data = args.data or make_data(args.cache, args.images, args.copies, args.input_size)
    paths = listed_paths(data)
    with Image.open(paths[0]) as im:
        input_desc = f"{im.size[0]}×{im.size[1]} {im.mode} PNG"
    print(f"{len(paths)} listed files ({input_desc}) in {data} → {args.size}²")

    import ray  # Ray-specific: one local Ray for all runs, its start-up timed on its own

    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cpus = int(ray.cluster_resources()["CPU"])
    print(f"ray.init: {ray_start:.1f} s; {cpus} CPUs")

    out = args.cache / "bench-shards"
    base_rates, runs, par_rates, base_cpu, par_cpu = [], [], [], [], []
    try:
        for r in range(args.rounds):
            rate_, cpu_ = baseline_timed(paths, args.size)
            base_rates.append(rate_)
            base_cpu.append(cpu_)
            print(f"round {r}: baseline {rate_:.1f} images/s (1 process), {cpu_ * 1e3:.1f} ms CPU/image")
            rate_, cpu_ = parallel_loop(paths, args.size, cpus)
            par_rates.append(rate_)
            par_cpu.append(cpu_)
            print(f"round {r}: same loop in {cpus} processes {rate_:.1f} images/s, "
                  f"{cpu_ * 1e3:.1f} ms CPU/image")
            runs.append(run_prepare(data, out, args.size))
            print(f"round {r}: prepare  {runs[-1]['rate']:.1f} images/s "
                  f"({runs[-1]['seconds']:.2f} s, of which Ray Data {runs[-1]['decode_seconds']:.2f} s; "
                  f"driver CPU {runs[-1]['driver_cpu']:.2f} s; "
                  f"{runs[-1]['cpu_per_image'] * 1e3:.1f} ms CPU/image in all Ray processes)")
        base_rates.append(baseline(paths, args.size))
        print(f"final  : baseline {base_rates[-1]:.1f} images/s")
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)

    base = statistics.median(base_rates)
    warm = runs[1:] or runs
    prep = statistics.median(r["rate"] for r in warm)
    ratio = prep / (base * cpus)
    cold = runs[0]["rate"] / (base * cpus)
    par = statistics.median(par_rates)
    b_cpu = statistics.median(base_cpu)
    p_cpu = statistics.median(r["cpu_per_image"] for r in warm)
    efficiency = b_cpu / p_cpu
    c_cpu = statistics.median(par_cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nratio prepare_rate / (baseline_rate × CPUs) = {prep:.1f} / ({base:.1f} × {cpus}) "
          f"= {ratio:.2f} (target ≥ 0.8); cold first run {cold:.2f}; the plain loop in {cpus} "
          f"processes reached {par / (base * cpus):.2f}, prepare/that = {prep / par:.2f}; CPU per "
          f"image: baseline {b_cpu * 1e3:.1f} ms, prepare {p_cpu * 1e3:.1f} ms (all Ray processes) "
          f"→ CPU efficiency {efficiency:.2f}; the {cpus}-process loop used {c_cpu * 1e3:.1f} ms "
          f"(Ray's own share: {(p_cpu - c_cpu) / p_cpu:.0%})")

    w = warm[len(warm) // 2]
    warm_rates = ", ".join(f"{r['rate']:.1f}" for r in warm)
    base_list = ", ".join(f"{b:.1f}" for b in base_rates)
    env = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Ray {ray.__version__}, "
           f"load average at the end {load:.2f}")
    table = "\n".join([
        "| measure | value |",
        "|---|---|",
        f"| input | {len(paths)} listed files, {input_desc} "
        f"({'synthetic: ' + str(args.images) + ' drawn, each listed ' + str(args.copies) + '×' if args.data is None else data}) |",
        f"| output | {args.size}² uint8, zstd Parquet, {w['shards']} shards, "
        f"{w['bytes'] / max(w['written'], 1) / 1024:.1f} KiB/image |",
        f"| baseline: single-process PIL decode + resize loop | {base:.1f} images/s "
        f"(median of {len(base_rates)}: {base_list}) |",
        f"| `prepare` on a running local Ray, {cpus} CPUs (warm, median of {len(warm)}) | "
        f"**{prep:.1f} images/s** ({warm_rates}) |",
        f"| of a warm run: the Ray Data decode + write | {w['decode_seconds']:.2f} s of "
        f"{w['seconds']:.2f} s (driver process CPU {w['driver_cpu']:.2f} s) |",
        f"| control: the baseline loop in {cpus} plain processes (the machine's parallel ceiling "
        f"at the time) | {par:.1f} images/s = {par / (base * cpus):.2f} × baseline × CPUs; "
        f"prepare reaches {prep / par:.2f} of it |",
        f"| CPU time per image: baseline / `prepare` (driver + GCS + raylet + workers) | "
        f"{b_cpu * 1e3:.1f} ms / {p_cpu * 1e3:.1f} ms → CPU efficiency **{efficiency:.2f}** "
        "(the ratio an otherwise idle machine would give, if all CPUs were busy) |",
        f"| CPU time per image of the {cpus}-process loop (all cores busy, no Ray) | "
        f"{c_cpu * 1e3:.1f} ms: Ray, Parquet and the rest of `prepare` add "
        f"{(p_cpu - c_cpu) * 1e3:.1f} ms ({(p_cpu - c_cpu) / p_cpu:.0%} of its CPU) |",
        f"| `prepare`, first run (cold Ray workers) | {runs[0]['rate']:.1f} images/s |",
        f"| Ray start-up (`ray.init`, excluded above) | {ray_start:.1f} s |",
        f"| **ratio** `prepare_rate / (baseline_rate × CPUs)` | **{ratio:.2f}** (target ≥ 0.8; cold run {cold:.2f}) |",
    ])
    section = (f"{HEADING}\n\nMeasured by `bench/prepare.py` ({time.strftime('%Y-%m-%d')}; {env}).\n\n"
               f"{table}\n\n"
               "Baseline and `prepare` alternate over the same files (in the page cache for both), "
               "so background load hits both alike. `prepare` does more than the baseline: it also "
               "writes compressed Parquet, the cohort tables and the manifest, and publishes atomically. "
               "The CPU efficiency depends much less on what else the machine runs than the wall-clock "
               "ratio (see the control row). Augmentation rates vs MobileNetV1 training: "
               "`## Augmentation` (bench/augment.py).\n")
    if not args.no_write:
        write_section(HEADING, section)
        print(f"wrote {HEADING!r} in {RESULTS}")


if __name__ == "__main__":
    main()

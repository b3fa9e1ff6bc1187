"""Benchmark: what does a sweep cost per trial, and how close does it come to a bare loop?
(Not a test.)

Run:  .venv/bin/python bench/sweep.py              (about 4–7 minutes on 2 shared CPU cores)
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
   with a bare pair before, between and after them (each sweep against the mean of the
   pairs on either side).

Ray starts its workers at niceness 15, so on a machine shared with other jobs the trials lose
CPU to them long before nice-0 bare loops do: unless ``--ray-niceness``, the local Ray starts
with ``RAY_worker_niceness=0``; the bare processes take the Ray workers' niceness either way.

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
import threading
import time
from pathlib import Path
from typing import Any

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
checkpoint_metric = "val_accuracy"
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
    """One bare loop (one torch thread), started with its twin at the barrier, at the
    niceness of the Ray workers (those of the trials)."""
    import train as bench_train  # bench/train.py: the bare loop

    os.nice(int(os.environ.get(bench_train.NICENESS_ENV, "15")) - os.nice(0))
    import torch

    torch.set_num_threads(1)
    from cxr_ray.data import shards as shard_io

    images, ids, labels = shard_io.read_split(shard_io.open_shards(shards), cohort, "train")
    # The first optimizer of a process imports torch._dynamo (what a fresh trial actor pays).
    t_opt = time.perf_counter()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    t_opt = time.perf_counter() - t_opt
    # Warm up (thread pool, allocator, lazy imports) before the twin starts timing.
    bench_train.bare_loop(images[:4 * BATCH], ids[:4 * BATCH], labels[:4 * BATCH], epochs=1,
                          batch=BATCH, width=width, threads=1, device="cpu", augment_on=False)
    barrier.wait()
    t0 = time.perf_counter()
    per_epoch = bench_train.bare_loop(images, ids, labels, epochs=epochs, batch=BATCH,
                                      width=width, threads=1, device="cpu", augment_on=False)
    out.put((index, per_epoch, t0, time.perf_counter(), t_opt))


def bare_pair(shards: Path, cohort: str, epochs: int, width: float) -> dict[str, Any]:
    """Two bare loops in two processes at once → per-process steady images/s, their sum,
    CPU ms per image, and how much of the longer loop's time the two overlapped."""
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
    steady = [bench_train.steady(r[1]) for r in results]
    overlap = (min(r[3] for r in results) - max(r[2] for r in results)) / max(
        r[3] - r[2] for r in results)
    rates = [r for r, _ in steady]
    return {"rates": rates, "total": sum(rates), "overlap": overlap,
            "cpu_ms": statistics.mean(c for _, c in steady),
            "first_optimizer_s": statistics.mean(r[4] for r in results)}


# --------------------------------------------------------------------------- CPU accounting
CPU_CLASSES = ("Ray workers", "driver (Tune)", "raylet + GCS", "other Ray processes",
               "other jobs")
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float, str, int]]:
    """pid → (ppid, CPU seconds so far, command line, start time) of every process readable
    in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK, cmd,
                             int(fields[19]))
    return table


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (/proc/stat: all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / _TICK


class CpuSampler(threading.Thread):
    """Every ``interval`` s, the CPU seconds each process of this process's tree used since
    the last sample, by class (:data:`CPU_CLASSES`; "other jobs" = the rest of the machine).
    A process that exits between two samples loses at most one interval of its CPU."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.samples = interval, []
        self._stop_event, self._last = threading.Event(), {}
        self._busy = _machine_busy()

    @staticmethod
    def _kind(pid: int, cmd: str) -> str:
        if pid == os.getpid():
            return "driver (Tune)"
        if "raylet" in cmd.split(" ")[0] or "gcs_server" in cmd.split(" ")[0]:
            return "raylet + GCS"
        worker = cmd.startswith("ray::") or "default_worker.py" in cmd
        return "Ray workers" if worker else "other Ray processes"

    def sample(self) -> None:
        table, now = _proc_table(), time.time()
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_) in table.items():
            children.setdefault(ppid, []).append(pid)
        mine, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            mine.append(pid)
            todo += children.get(pid, [])
        used = dict.fromkeys(CPU_CLASSES, 0.0)
        for pid in mine:
            _, cpu, cmd, started = table[pid]
            key = (pid, started)
            used[self._kind(pid, cmd)] += cpu - self._last.get(key, 0.0)
            self._last[key] = cpu
        busy = _machine_busy()
        used["other jobs"] = max(0.0, busy - self._busy - sum(used.values()))
        self._busy = busy
        self.samples.append((now, used))

    def run(self) -> None:
        self.sample()
        self.samples.clear()  # the first sample holds every process's CPU since its start
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds by class in the samples taken in (start, end]."""
        out = dict.fromkeys(CPU_CLASSES, 0.0)
        for t, used in self.samples:
            if start < t <= end:
                for k, v in used.items():
                    out[k] += v
        return out


# --------------------------------------------------------------------------- one sweep
def read_stage2(experiment: Path) -> dict[str, Any]:
    """What a finished sweep wrote about its stage 2. A trial's end is its ``trial.json``'s
    mtime (written last, atomically); its start that minus ``trial_seconds``."""
    from cxr_ray import paths

    trials = []
    for run in sorted((experiment / "stage2").iterdir()):
        file = run / paths.TRIAL_FILE
        trial = paths.read_json(file)
        if trial is None:
            continue
        history = paths.read_jsonl(run / paths.HISTORY_FILE)
        end = file.stat().st_mtime
        trials.append({**trial, "images": sum(r["train_images"] for r in history),
                       "train_s": sum(r["train_seconds"] for r in history),
                       "train_cpu_s": sum(r["train_cpu_seconds"] for r in history),
                       "eval_s": sum(r["eval_seconds"] for r in history),
                       "epochs": len(history), "end": end,
                       "start": end - trial["trial_seconds"], "name": run.name})
    log = {r["stage"]: r for r in paths.read_jsonl(experiment / paths.SWEEP_LOG)}
    return {"trials": trials, "stage2": log["stage2"], "stage1": log.get("stage1")}


def slots_of(trials: list[dict[str, Any]], n: int) -> list[list[dict[str, Any]]]:
    """The trials of each of ``n`` concurrent slots, in order: each trial goes to the slot
    that freed last before it started (a new slot while fewer than ``n`` are in use)."""
    slots: list[list[dict[str, Any]]] = []
    for t in sorted(trials, key=lambda t: t["start"]):
        if len(slots) < n:
            slots.append([t])
            continue
        free = [s for s in slots if s[-1]["end"] <= t["start"] + 0.05]
        slot = max(free, key=lambda s: s[-1]["end"]) if free else min(
            slots, key=lambda s: s[-1]["end"])
        slot.append(t)
    return slots


def summarize(data: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    trials, stage = data["trials"], data["stage2"]
    wall, conc = stage["wall_seconds"], stage["concurrency"]
    t0, t_end = stage["started"], stage["started"] + stage["wall_seconds"]
    over = [t["trial_seconds"] - t["epoch_seconds"] for t in trials]
    images = sum(t["images"] for t in trials)
    train_s = sum(t["train_s"] for t in trials)
    eval_s = sum(t["eval_s"] for t in trials)
    in_trials = sum(t["trial_seconds"] for t in trials)
    slots = slots_of(trials, conc)
    firsts = [s[0] for s in slots]
    later = [t for s in slots for t in s[1:]]
    gaps = [b["start"] - a["end"] for s in slots for a, b in zip(s, s[1:])]

    def median(values: list[float]) -> float:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else float("nan")

    # Past the stage's start: the later trials' images per slot-second (their spans and the
    # gaps before them), times the slots.
    later_span = sum(t["trial_seconds"] for t in later) + sum(gaps)
    steady_rate = conc * sum(t["images"] for t in later) / later_span if later_span else None
    return {
        "steady_ratio": steady_rate / bare["total"] if steady_rate else float("nan"),
        "n": len(trials), "epochs": trials[0]["epochs"] if trials else 0, "wall": wall,
        "concurrency": conc, "launcher": stage["launcher"],
        "median_trial": median([t["trial_seconds"] for t in trials]),
        "median_epochs": median([t["epoch_seconds"] for t in trials]),
        "median_overhead": median(over), "max_overhead": max(over),
        "median_startup": median([t.get("startup_seconds") for t in trials]),
        "median_teardown": median([t.get("teardown_seconds") for t in trials]),
        "first_overhead": median([t["trial_seconds"] - t["epoch_seconds"] for t in firsts]),
        "later_overhead": median([t["trial_seconds"] - t["epoch_seconds"] for t in later]),
        "images": images, "rate": images / wall, "ratio": images / wall / bare["total"],
        "train_rate": images / train_s, "cpu_ms": 1000 * sum(
            t["train_cpu_s"] for t in trials) / images,
        # Slot-seconds (wall × trials at once) by where they went; they add up to slots.
        "slots": wall * conc, "train_s": train_s, "eval_s": eval_s,
        "overhead_s": in_trials - train_s - eval_s,
        "lead_in_s": sum(t["start"] - t0 for t in firsts),
        "lead_in": median([t["start"] - t0 for t in firsts]),
        "gaps_s": sum(gaps), "median_gap": median(gaps),
        "tail_s": sum(t_end - s[-1]["end"] for s in slots),
        "wrap_up": t_end - max(t["end"] for t in trials),
        "stage1_wall": (data["stage1"] or {}).get("wall_seconds"),
        "cpu": data.get("cpu"), "train_cpu_s": sum(t["train_cpu_s"] for t in trials),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohorts", nargs="+", default=["Emphysema", "Pneumonia"],
                    help="cohorts (default 2 of the same size)")
    ap.add_argument("--policies", nargs="+", default=["constant", "triangular", "one_cycle"],
                    help="stage-2 policies (default constant triangular one_cycle)")
    ap.add_argument("--per-class", type=int, default=150,
                    help="synthetic images per finding (default 150, as make demo: ~280 "
                         "train images per cohort)")
    ap.add_argument("--size", type=int, default=48, help="training resolution (default 48)")
    ap.add_argument("--width", type=float, default=0.25, help="MobileNetV1 width (0.25)")
    ap.add_argument("--stage1-epochs", type=int, default=2)
    ap.add_argument("--stage2-epochs", type=int, default=3)
    ap.add_argument("--bare-epochs", type=int, default=6,
                    help="epochs of each bare loop (the first is warm-up; default 6)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="work in this directory and keep it (default: a temporary one)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--ray-niceness", action="store_true",
                    help="keep Ray's worker niceness (15) instead of RAY_worker_niceness=0 "
                         "(the bare processes then run at nice 15 too)")
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
    import train as bench_train

    niceness = bench_train.ray_niceness(args.ray_niceness)
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

            def pair() -> None:
                print(f"bare pair {len(bares) + 1} ({bare_cohort}) ...", flush=True)
                bares.append(bare_pair(shards, bare_cohort, args.bare_epochs, args.width))
                print(f"  {bares[-1]['total']:.0f} images/s", flush=True)

            pair()
            for name, launcher, _ in SWEEPS:  # bare, sweep, bare, sweep, bare
                text = RECIPE.format(
                    label=name, name=name, storage=root / "experiments", shards=shards,
                    cohorts=toml_list(cohorts), width=args.width, size=args.size, batch=BATCH,
                    stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs,
                    launcher=launcher, policies=toml_list(args.policies))
                path = root / f"{name}.toml"
                path.write_text(text)
                recipe = load_recipe(path)
                print(f"sweep {name} ...", flush=True)
                sampler = CpuSampler()
                sampler.start()
                try:
                    run_sweep(recipe)
                finally:
                    sampler.stop()
                results[name] = read_stage2(recipe.experiment_dir)
                stage = results[name]["stage2"]
                results[name]["cpu"] = sampler.window(
                    stage["started"], stage["started"] + stage["wall_seconds"])
                pair()
        load = os.getloadavg()
    finally:
        if tmp is not None:
            tmp.cleanup()
    total_s = time.perf_counter() - t_start

    # Each sweep against the mean of the bare pairs measured just before and just after it.
    brackets = {name: {"total": statistics.mean(b["total"] for b in bares[i:i + 2]),
                       "cpu_ms": statistics.mean(b["cpu_ms"] for b in bares[i:i + 2])}
                for i, (name, _, _) in enumerate(SWEEPS)}
    stats = {name: summarize(results[name], brackets[name]) for name, _, _ in SWEEPS}
    a, b = stats["in_trial"], stats["ray_train"]

    def fmt(x: float | None, digits: int = 1) -> str:
        return "–" if x is None or x != x else f"{x:.{digits}f}"

    pairs = " / ".join(
        f"{' + '.join(f'{r:.0f}' for r in x['rates'])} = {x['total']:.0f}" for x in bares)
    rows = []
    for name, _, label in SWEEPS:
        s = stats[name]
        rows.append(
            f"| {label} | {s['n']} × {s['epochs']} epochs, {s['concurrency']} at a time | "
            f"{fmt(s['median_trial'])} = {fmt(s['median_epochs'])} + "
            f"**{fmt(s['median_overhead'], 2)}** | {fmt(s['first_overhead'], 1)} / "
            f"{fmt(s['later_overhead'], 2)} | "
            f"{fmt(s['median_startup'], 2)} + {fmt(s['median_teardown'], 2)} | "
            f"{fmt(s['wall'])} | {s['images']:,} | {s['rate']:.0f} | "
            f"{brackets[name]['total']:.0f} | **{s['ratio']:.2f}** |")
    slot_rows = []
    for name, _, label in SWEEPS:
        s = stats[name]
        parts = [s["train_s"], s["eval_s"], s["overhead_s"], s["lead_in_s"], s["gaps_s"],
                 s["tail_s"]]
        slot_rows.append(f"| {label.split(' (')[0]} | {s['slots']:.1f} | "
                         + " | ".join(f"{p:.1f} ({100 * p / s['slots']:.0f}%)" for p in parts)
                         + f" | {s['train_rate']:.0f} / {s['cpu_ms']:.2f} |")
    cpu_rows = []
    for name, _, label in SWEEPS:
        s = stats[name]
        if not s["cpu"]:
            continue
        have = cpus * s["wall"]
        cpu = dict(s["cpu"])
        parts = {"training": s["train_cpu_s"],
                 "Ray workers, besides training": cpu.pop("Ray workers") - s["train_cpu_s"],
                 **cpu}
        parts["idle"] = have - sum(parts.values())
        cpu_rows.append(f"| {label.split(' (')[0]} | {have:.1f} | "
                        + " | ".join(f"{v:.1f} ({100 * v / have:.0f}%)" for v in parts.values())
                        + " |")
        cpu_head = list(parts)
    over_ok = a["median_overhead"] <= OVERHEAD_TARGET_S
    rate_ok = a["ratio"] >= THROUGHPUT_TARGET
    losses = {"in-trial overhead": a["overhead_s"], "the lead-in": a["lead_in_s"],
              "gaps between trials": a["gaps_s"], "the tail": a["tail_s"],
              "evaluation": a["eval_s"]}
    worst = max(losses, key=losses.get)
    command = ("`.venv/bin/python bench/sweep.py --cohorts " + " ".join(cohorts)
               + " --policies " + " ".join(args.policies)
               + f" --per-class {args.per_class} --size {args.size} --width {args.width}"
               + f" --stage1-epochs {args.stage1_epochs} --stage2-epochs {args.stage2_epochs}"
               + f" --bare-epochs {args.bare_epochs}"
               + (" --ray-niceness" if args.ray_niceness else "") + "`")
    lines = [
        f"Measured by `bench/sweep.py` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
        f"{cpus} CPU cores, torch {torch.__version__}, ray {ray.__version__}; load average "
        f"{load_start[0]:.2f} at the start, {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(1 / 5 / 15 min) at the end; whole run {total_s / 60:.1f} min).",
        f"Command: {command}.",
        f"Synthetic data ({args.per_class} per finding) prepared at {args.size}²; cohorts "
        + ", ".join(f"{c} ({n_train[c]} train images)" for c in cohorts)
        + f" × policies {', '.join(args.policies)}; MobileNetV1 width {args.width}, batch "
        f"{BATCH}, no augmentation, 1 torch thread and 0.9 CPU per rank (a Ray Train trial "
        "holds 0.01 CPU besides its worker: with 1 CPU per worker only one would fit on 2 "
        f"CPUs); stage 1: {args.stage1_epochs} epochs in its Tune trials + a 20-step LR range "
        f"test; stage 2: {args.stage2_epochs} epochs from the stage-1 weights, CLR bounds from "
        "the range test. Both sweeps in one process and one local Ray (`ray_session()`, env "
        + ", ".join(f"{k}={v}" for k, v in LOCAL_ENV.items())
        + "), each in a fresh experiment directory from the same recipe template; only "
        "`[stage2] launcher` differs (stage 1 runs in its Tune trials in both); "
        f"{niceness}, the bare processes at the Ray workers' niceness.",
        f"Bare: two processes started together (spawned; a barrier after a warm-up), each one "
        f"torch thread running a plain PyTorch loop (same model, batch, SGD, no augmentation) "
        f"over the {bare_cohort} train split held in memory for {args.bare_epochs} epochs; "
        "images/s of each over every epoch but its first, summed. Pairs ran before, between "
        "and after the two sweeps in the same Ray session (each sweep is compared with the "
        f"mean of the pairs on either side of it): {pairs} images/s.",
        "",
        "| stage 2 | trials | median trial s = epochs (train + eval) s + **overhead** s | "
        "overhead s: first trial of a slot / later (median) | median start-up + tear-down s | "
        "stage wall s | training images | images/s | bare pair images/s | ratio to bare |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Targets: in-trial overhead ≤ {OVERHEAD_TARGET_S} s median — measured "
        f"{a['median_overhead']:.2f} s ({'met' if over_ok else 'NOT met'}); sweep throughput "
        f"≥ {THROUGHPUT_TARGET} × bare — measured {a['ratio']:.2f} in trial "
        f"({'met' if rate_ok else 'NOT met'}), {b['ratio']:.2f} with Ray Train fits.",
        "Overhead = `trial_seconds − epoch_seconds` of each stage-2 `trial.json` (plan, data "
        "read, model, checkpoints, `tune.report`; for Ray Train the whole fit's start-up and "
        "tear-down); images/s = training images of all stage-2 trials (`history.jsonl`) / the "
        "stage's wall seconds (`sweep_log.jsonl`).",
        "",
        "Where stage 2's slot-seconds went (wall × trials at once). A trial's span is "
        "`trial_seconds` ending at its `trial.json`'s mtime; lead-in = stage start → the "
        "first trial of each slot (Tune set-up, trial actors starting, their imports); gaps = "
        "between a slot's trials (Tune scheduling, actor reuse); tail = a slot's last trial "
        "→ stage end:",
        "",
        "| stage 2 | slot-s | train | eval | in-trial overhead | lead-in | gaps | tail | "
        "train images/s / CPU ms per image inside trials |",
        "|---|---|---|---|---|---|---|---|---|",
        *slot_rows,
        "",
        f"CPU seconds during stage 2 ({cpus} cores × stage wall), sampled every 0.5 s from "
        "/proc over this process's tree (Ray workers: the trial actors and Ray Train "
        "processes, their training CPU from `history.jsonl`; driver: this process, where Tune "
        "runs; other jobs: the rest of the machine's busy time):",
        "",
        "| stage 2 | core-s | " + " | ".join(cpu_head) + " |",
        "|---|---|" + "---|" * len(cpu_head),
        *cpu_rows,
        "",
        f"Bare pairs: {statistics.mean(x['cpu_ms'] for x in bares):.2f} CPU ms per image "
        f"(mean). Stage 1 took {fmt(a['stage1_wall'])} s and {fmt(b['stage1_wall'])} s of "
        f"wall. In trial, the lead-in was {a['lead_in']:.1f} s per slot (median), gaps "
        f"between trials {fmt(a['median_gap'], 2)} s, the tail {a['tail_s']:.1f} slot-s; "
        f"the first trial of a slot spent {a['first_overhead']:.1f} s beyond its epochs, "
        f"later ones {fmt(a['later_overhead'], 2)} s (the first optimizer of a fresh process "
        f"alone took {statistics.mean(x['first_optimizer_s'] for x in bares):.1f} s in the bare "
        "processes: torch imports `torch._dynamo` then). Largest loss in trial: "
        f"{worst} ({100 * losses[worst] / a['slots']:.0f}% of the slot-seconds). Past the "
        "stage's start (the later trials of each slot, gaps included), in-trial throughput is "
        f"{fmt(a['steady_ratio'], 2)} × bare ({fmt(b['steady_ratio'], 2)} with Ray Train "
        "fits).",
    ]
    section = "\n".join(lines)
    print(f"{HEADING}\n\n{section}")
    if not args.no_write:
        write_section(HEADING, section)
        print(f"\nwrote {HEADING!r} in {RESULTS}")


if __name__ == "__main__":
    main()

"""Benchmark: what do the two launchers cost against a bare PyTorch loop?  (Not a test.)

Run:  .venv/bin/python bench/train.py              (about 4–6 minutes on 2 CPU cores at 224²)
      .venv/bin/python bench/train.py --no-write   (print only, leave bench/RESULTS.md alone)
      .venv/bin/python bench/train.py --gpu        (on a GPU machine: bf16, channels_last)
      .venv/bin/python bench/train.py --size 64 --per-class 20 --width 0.25 --no-write
                                                   (a quick look)

In one run, on the same synthetic Atelectasis cohort (prepared at ``--size``), inside one
local Ray started by :func:`cxr_ray.ray_backend.session.ray_session` (so the Ray Train
controller intervals of ``session.LOCAL_ENV`` apply, as for ``cxr-ray``):

* **bare**: a plain PyTorch loop over the train split held in memory as a uint8 tensor —
  the same MobileNetV1, batch size (Table 3: 16), SGD + Keras time decay (Table 4),
  per-image augmentation (``augment_by_id``), BCE + the head's penalties, the lr policy
  stepped every batch.
* **in process**: :func:`cxr_ray.train.run.fit_in_process` (one rank, all CPU threads): the
  loop of a single-rank sweep trial and of ``cxr-ray train --launcher process``, with its
  evaluation, checkpoints, history and TensorBoard every epoch.
* **Ray Train, 1 worker**: :func:`cxr_ray.ray_backend.train_launcher.fit` (a
  ``TorchTrainer``, all CPU threads in its one worker), the same loop.

  The three alternate ``--rounds`` times (default 2; the order rotates every round; the
  machine may be shared: the best round of each counts).
* **Ray Train, 2 workers** (DDP over gloo, one thread each; ``--no-ddp`` skips it): scaling.
* **per-fit overhead**: a tiny fit (width 0.25, 1 epoch of the small Hernia cohort, no
  augmentation) with each launcher: wall − (train + eval) seconds, split into start-up
  (call → loop) and tear-down (last epoch → return).

Ray starts its workers at niceness 15, so on a machine shared with other jobs a Ray Train
worker loses CPU to them long before the nice-0 bare loop does: unless ``--ray-niceness``, the
local Ray starts with ``RAY_worker_niceness=0`` so that every process here runs at nice 0.

Steady state = every epoch after the first (the first pays warm-up: thread pools, allocator).
images/s of the launchers are the training pass only (the evaluation of the test split and the
checkpoint are in the epoch time); start-up and tear-down are reported separately. Writes
``## Train`` in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxr_ray import models
from cxr_ray.data import augment, shards as shard_io, synth
from cxr_ray.data.prepare import PrepareConfig
from cxr_ray.optim import optimizers as optim, presets
from cxr_ray.optim.schedules import PolicyLR
from cxr_ray.ray_backend import ingest, train_launcher
from cxr_ray.ray_backend.session import LOCAL_ENV, ray_session
from cxr_ray.train import TrainConfig, TrainSummary, fit_in_process

from _results import RESULTS, write_section  # noqa: E402 (bench/ is on sys.path when run)

HEADING = "## Train"
COHORT = "Atelectasis"
STUDY_EPOCH_IMAGES = 18_847  # the study's Atelectasis train split (docs/study.md §2)
STUDY_EPOCH_HOURS = 2.5  # MobileNetV1, Table 6
TARGET = 0.95


def bare_loop(images: np.ndarray, ids: np.ndarray, labels: np.ndarray, *, epochs: int,
              batch: int, width: float, threads: int, device: str, seed: int = 0,
              augment_on: bool = True) -> list[tuple[int, float, float]]:
    """The same training as a cxr-ray rank, without Ray or cxr-ray's loop.
    → (images, seconds, CPU seconds) per epoch."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    amp = dev.type == "cuda"
    model = models.create_model("mobilenet_v1", width=width, pretrained=False).to(dev)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    recipe = presets.stage1_recipe(COHORT)
    opt = optim.build_optimizer(model.parameters(), recipe.optimizer, lr=recipe.lr0)
    sched = PolicyLR(opt, presets.stage1_policy(COHORT))
    x_all = torch.from_numpy(images.copy())
    if amp:
        x_all = x_all.pin_memory()
    y_all = torch.from_numpy(labels)
    cfg = augment.AugmentConfig() if augment_on else augment.AugmentConfig.none()
    out = []
    for epoch in range(epochs):
        model.train()
        if amp:
            torch.cuda.synchronize()
        t0, cpu0, n = time.perf_counter(), time.process_time(), 0
        for idx in torch.randperm(len(x_all)).split(batch):
            if len(idx) < 2:
                continue
            xb = x_all[idx].to(dev, non_blocking=True)
            x = augment.augment_by_id(xb, ids[idx.numpy()], seed=seed, epoch=epoch, cfg=cfg)
            if amp:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y_all[idx].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x).float()
            loss = F.binary_cross_entropy_with_logits(logits, y) + model.penalty().float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n += len(idx)
        loss.item()  # the loop's only sync
        if amp:
            torch.cuda.synchronize()
        out.append((n, time.perf_counter() - t0, time.process_time() - cpu0))
    return out


def steady(per_epoch: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(images/s, CPU milliseconds per image) over every epoch but the first."""
    rest = per_epoch[1:] or per_epoch
    n = sum(e[0] for e in rest)
    return n / sum(e[1] for e in rest), 1000 * sum(e[2] for e in rest) / n


def fit_rate(summary: TrainSummary) -> tuple[float, float]:
    return steady([(r["train_images"], r["train_seconds"], r["train_cpu_seconds"])
                   for r in summary.history])


def run_fit(launcher: str, shards: Path, runs: Path, name: str, **kw) -> TrainSummary:
    """One fresh run with ``launcher`` (``process`` or ``ray_train``)."""
    kw.setdefault("cohort", COHORT)
    config = TrainConfig(shards=str(shards), pretrained=False, **kw)
    if launcher == "process":
        return fit_in_process(config, storage_path=runs, name=name, resume=False,
                              threads=config.threads)
    return train_launcher.fit(config, storage_path=runs, name=name, resume=False)


def tiny_fit(launcher: str, shards: Path, runs: Path, name: str) -> TrainSummary:
    """A trivial fit (width 0.25, 1 epoch, Hernia's small cohort, no augmentation)."""
    return run_fit(launcher, shards, runs, name, cohort="Hernia", width=0.25, epochs=1,
                   workers=1, threads=1, augment=False)


#: Ray starts its worker processes at niceness 15 (the raylet's ``worker_niceness``): on a
#: machine shared with other jobs they then lose CPU to those jobs long before a nice-0 bare
#: loop or in-process run does, which is not what this benchmark compares. Unless
#: ``--ray-niceness``, the local Ray starts with this set to 0 (every process at nice 0).
NICENESS_ENV = "RAY_worker_niceness"


def ray_niceness(keep: bool) -> str:
    """Set (unless ``keep``) and describe the niceness of the Ray workers to be started."""
    if not keep:
        os.environ[NICENESS_ENV] = "0"
    value = os.environ.get(NICENESS_ENV)
    return (f"Ray workers at niceness {value} ({NICENESS_ENV}={value}; Ray's default is 15), "
            f"this process at {os.nice(0)}" if value is not None
            else f"Ray workers at Ray's default niceness 15, this process at {os.nice(0)}")


LAUNCHERS = {"process": "in process (`fit_in_process`, 1 rank)",
             "ray_train": "Ray Train, 1 worker (`train_launcher.fit`)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224, help="training resolution (default 224)")
    ap.add_argument("--per-class", type=int, default=50,
                    help="synthetic images per finding (default 50: ~100 Atelectasis train "
                         "images)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (first = warm-up)")
    ap.add_argument("--width", type=float, default=1.0, help="MobileNetV1 width (default 1.0)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of (bare, in process, Ray Train 1 worker); the best of each "
                         "counts")
    ap.add_argument("--gpu", action="store_true", help="train on the GPU (bf16, channels_last)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--no-ddp", action="store_true", help="skip the 2-worker DDP run")
    ap.add_argument("--no-overhead", action="store_true", help="skip the per-fit overhead runs")
    ap.add_argument("--ray-niceness", action="store_true",
                    help="keep Ray's worker niceness (15) instead of starting Ray with "
                         f"{NICENESS_ENV}=0 (see the module docstring)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    t_start = time.perf_counter()
    cpus = os.cpu_count() or 1
    batch = presets.batch_size(COHORT)
    device = "cuda" if args.gpu else "cpu"
    order = ["bare", "process", "ray_train"]
    rates: dict[str, list[tuple[float, float]]] = {k: [] for k in order}
    fits: dict[str, list[TrainSummary]] = {"process": [], "ray_train": []}
    tiny: dict[str, TrainSummary] = {}
    two = None
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        synth.write_dataset(root / "data", per_class=args.per_class, size=max(args.size, 64),
                            seed=0, workers=cpus)
        niceness = ray_niceness(args.ray_niceness)
        with ray_session():  # a local Ray with LOCAL_ENV, as cxr-ray starts it
            ingest.prepare(PrepareConfig(data=root / "data", out=root / "shards",
                                         size=args.size))
            shards = root / "shards"
            images, ids, labels = shard_io.read_split(shard_io.open_shards(shards), COHORT,
                                                      "train")
            common = dict(width=args.width, epochs=args.epochs, workers=1, threads=cpus,
                          gpu=args.gpu)
            for k in range(args.rounds):
                for what in order[k % 3:] + order[:k % 3]:  # rotate: no run always goes first
                    if what == "bare":
                        rates["bare"].append(steady(bare_loop(
                            images, ids, labels, epochs=args.epochs, batch=batch,
                            width=args.width, threads=cpus, device=device)))
                    else:
                        s = run_fit(what, shards, root / "runs", f"{what}-{k}", **common)
                        fits[what].append(s)
                        rates[what].append(fit_rate(s))
            if not args.gpu and not args.no_ddp and cpus >= 2:
                two = run_fit("ray_train", shards, root / "runs", "w2", width=args.width,
                              epochs=args.epochs, workers=2, threads=1)
            if not args.no_overhead:
                for what in ("process", "ray_train"):
                    tiny[what] = tiny_fit(what, shards, root / "runs", f"tiny-{what}")
            load = os.getloadavg()
    total_s = time.perf_counter() - t_start

    def best(what: str) -> tuple[float, float]:
        return max(r for r, _ in rates[what]), min(c for _, c in rates[what])

    def cores(rate: float, cpu_ms: float) -> str:
        return f"{rate * cpu_ms / 1000:.2f}"

    bare, cpu_b = best("bare")
    rows = [("bare PyTorch loop, in-memory uint8 tensors",
             " / ".join(f"{r:.2f}" for r, _ in rates["bare"]), "1.00",
             " / ".join(f"{c:.0f}" for _, c in rates["bare"]), "1.00",
             " / ".join(cores(r, c) for r, c in rates["bare"]), "–")]
    ratio = {}
    for what in ("process", "ray_train"):
        r, c = best(what)
        ratio[what] = r / bare
        rows.append((f"{LAUNCHERS[what]}, {cpus} threads",
                     " / ".join(f"{x:.2f}" for x, _ in rates[what]),
                     f"**{r / bare:.2f}**", " / ".join(f"{y:.0f}" for _, y in rates[what]),
                     f"{cpu_b / c:.2f}", " / ".join(cores(x, y) for x, y in rates[what]),
                     " / ".join(f"{s.startup_seconds:.1f} + {s.teardown_seconds:.1f}"
                                for s in fits[what])))
    if two is not None:
        r2, cpu2 = fit_rate(two)
        r1 = best("ray_train")[0]
        rows.append(("Ray Train, 2 workers (DDP, gloo, 1 thread each)", f"{r2:.2f}",
                     f"{r2 / bare:.2f} (scaling {r2 / r1:.2f}× vs 1 worker)", f"{cpu2:.0f}",
                     f"{cpu_b / cpu2:.2f}", cores(r2, cpu2),
                     f"{two.startup_seconds:.1f} + {two.teardown_seconds:.1f}"))

    def epoch_parts(s: TrainSummary) -> tuple[float, float]:
        rest = s.history[1:] or s.history
        return (statistics.mean(r["epoch_seconds"] for r in rest),
                statistics.mean(r["eval_seconds"] for r in rest))

    best_fit = {w: max(fits[w], key=lambda s: fit_rate(s)[0]) for w in fits}
    n_train = len(ids)
    r_proc, r_ray = best("process")[0], best("ray_train")[0]
    verdict = " and ".join(f"{w.replace('_', ' ')} {ratio[w]:.2f}" for w in ratio)
    met = all(v >= TARGET for v in ratio.values())
    lines = [
        f"Measured by `bench/train.py` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
        f"{cpus} CPU cores{', GPU ' + torch.cuda.get_device_name() if args.gpu else ''}, "
        f"torch {torch.__version__}, ray {ray.__version__}; load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min); whole run "
        f"{total_s / 60:.1f} min).",
        "Command: `.venv/bin/python bench/train.py"
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in
                  (("size", args.size), ("per_class", args.per_class),
                   ("epochs", args.epochs), ("width", args.width),
                   ("rounds", args.rounds)))
        + (" --gpu" if args.gpu else "") + (" --ray-niceness" if args.ray_niceness else "")
        + "`.",
        f"MobileNetV1 width {args.width} at {args.size}², batch {batch} (Table 3, {COHORT}), "
        f"SGD + time decay (Table 4), Keras augmentation per image; synthetic {COHORT} train "
        f"split of {n_train} images; {args.epochs} epochs per run, the first excluded "
        f"(warm-up); one local Ray started by `ray_session()` (env "
        + ", ".join(f"{k}={v}" for k, v in LOCAL_ENV.items()) + ") for the whole run; "
        f"{niceness}.",
        "",
        "| run | train images/s (steady; each round) | ratio to bare (best / best) | "
        "CPU ms / image | CPU ratio | cores used | start-up + tear-down s |",
        "|---|---|---|---|---|---|---|",
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
        f"Target: ratio ≥ {TARGET} for both launchers; measured {verdict} "
        f"({'met' if met else 'NOT met'}).",
        "Ratios: best round of each launcher against the best bare round (CPU: the least CPU "
        "per image). CPU ms / image: CPU time of the training processes (the bare loop's; "
        "the in-process run's own process; the Ray workers' summed) per training image, "
        "which other load on a shared machine disturbs much less than wall time; CPU ratio = "
        "bare / launcher (1.00: no extra work per image); cores used = CPU time / wall time "
        f"of those processes ({cpus:.2f} = every core; less: the machine was shared).",
        "",
        *[f"Epoch of the {LAUNCHERS[w].split(' (')[0].lower()} run (best round): "
          f"{epoch_parts(best_fit[w])[0]:.1f} s, of which {epoch_parts(best_fit[w])[1]:.1f} s "
          "evaluating the test split; a checkpoint and the history line follow each epoch."
          for w in fits],
        f"Projected Atelectasis epoch ({STUDY_EPOCH_IMAGES:,} training images at "
        f"{args.size}², 1 rank): **{STUDY_EPOCH_IMAGES / r_proc / 3600:.2f} h** in process "
        f"({r_proc:.2f} images/s), {STUDY_EPOCH_IMAGES / r_ray / 3600:.2f} h under Ray Train "
        f"({r_ray:.2f} images/s), against the study's {STUDY_EPOCH_HOURS} h "
        f"(~{STUDY_EPOCH_IMAGES / (STUDY_EPOCH_HOURS * 3600):.1f} images/s).",
    ]
    if tiny:
        lines += [
            "",
            "Per-fit overhead (a trivial fit: width 0.25, 1 epoch of the small Hernia cohort, "
            "no augmentation, 1 rank, 1 thread, inside the already running local Ray; "
            "overhead = wall − (train + eval); start-up = call → loop (plan, data, model, "
            "Ray Train workers, restore), tear-down = last epoch → return):",
            "",
            "| launcher | wall s | train + eval s | overhead s | start-up s | tear-down s |",
            "|---|---|---|---|---|---|",
            *[f"| {LAUNCHERS[w]} | {s.wall_seconds:.2f} | {s.compute_seconds:.2f} | "
              f"**{s.wall_seconds - s.compute_seconds:.2f}** | {s.startup_seconds:.2f} | "
              f"{s.teardown_seconds:.2f} |" for w, s in tiny.items()],
        ]
    section = "\n".join(lines)
    print(f"{HEADING}\n\n{section}")
    if not args.no_write:
        write_section(HEADING, section)
        print(f"\nwrote {HEADING!r} in {RESULTS}")


if __name__ == "__main__":
    main()

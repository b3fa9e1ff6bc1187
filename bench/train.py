"""Benchmark: what does Ray Train cost?  ``cxr-ray train`` vs a bare PyTorch loop.  (Not a test.)

Run:  .venv/bin/python bench/train.py              (about 12 minutes on 2 CPU cores at 224²)
      .venv/bin/python bench/train.py --no-write   (print only, leave bench/RESULTS.md alone)
      .venv/bin/python bench/train.py --gpu        (on a GPU machine: bf16, channels_last)
      .venv/bin/python bench/train.py --size 64 --per-class 60 --no-write   (a quick look)

In one run, on the same synthetic Atelectasis cohort (prepared at ``--size``):

* **bare**: a plain PyTorch loop over the train split held in memory as a uint8 tensor —
  the same MobileNetV1, batch size (Table 3: 16), SGD + Keras time decay (Table 4),
  per-image augmentation (``augment_by_id``), BCE + the head's penalties, the lr policy
  stepped every batch.  Interleaved with the 1-worker runs, ``--rounds`` times (default 2;
  the machine may be shared: the best round of each counts).
* **cxr-ray train, 1 worker** (``workers=1``, all CPU threads): the TorchTrainer loop with
  Ray Data streaming the cached split, checkpoints and metrics every epoch.
* **cxr-ray train, 2 workers** (DDP over gloo, one thread each): scaling on this machine.
* **per-fit overhead**: a tiny 1-epoch fit with the Ray Train controller intervals of
  :data:`cxr_ray.train.FAST_CONTROL_ENV` and with Ray's defaults (2 s health check, 5 s
  preemption poll): start-up (call → training loop), tear-down (last epoch → return).

Steady state = every epoch after the first (the first pays warm-up: thread pools, allocator,
the first Ray Data execution).  images/s of the Ray runs are the training pass only (the
evaluation of the test split and the checkpoint are reported in the epoch time); start-up
and tear-down seconds are reported separately.  Writes ``## Train`` in bench/RESULTS.md.
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

from cxr_ray import models, pipeline, train
from cxr_ray.data import augment, synth
from cxr_ray.optim import optimizers as optim, presets
from cxr_ray.optim.schedules import PolicyLR

from _results import RESULTS, write_section  # noqa: E402 (bench/ is on sys.path when run)

HEADING = "## Train"
COHORT = "Atelectasis"
STUDY_EPOCH_IMAGES = 18_847  # the study's Atelectasis train split (SPEC §2)
STUDY_EPOCH_HOURS = 2.5  # MobileNetV1, Table 6


def bare_loop(images: np.ndarray, ids: np.ndarray, labels: np.ndarray, *, epochs: int,
              batch: int, width: float, threads: int, device: str, seed: int = 0
              ) -> list[tuple[int, float, float]]:
    """The same training as a cxr-ray worker, without Ray. → (images, seconds, CPU seconds)
    per epoch."""
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
    cfg = augment.AugmentConfig()
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


def ray_fit(shards: Path, runs: Path, name: str, **kw) -> train.TrainSummary:
    config = train.TrainConfig(shards=str(shards), cohort=COHORT, pretrained=False, **kw)
    return train.fit(config, storage_path=runs, name=name, resume=False)


def fit_rate(summary: train.TrainSummary) -> tuple[float, float]:
    return steady([(r["train_images"], r["train_seconds"], r["train_cpu_seconds"])
                   for r in summary.history])


def overhead(shards: Path, runs: Path, env: dict[str, str], name: str) -> train.TrainSummary:
    """A trivial fit (width 0.25, 1 epoch, Hernia's small cohort) under ``env``."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = train.TrainConfig(shards=str(shards), cohort="Hernia", width=0.25,
                                   pretrained=False, epochs=1, workers=1, augment=False)
        return train.fit(config, storage_path=runs, name=name, resume=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224, help="training resolution (default 224)")
    ap.add_argument("--per-class", type=int, default=50,
                    help="synthetic images per finding (default 50: ~115 Atelectasis train images)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run (first = warm-up)")
    ap.add_argument("--width", type=float, default=1.0, help="MobileNetV1 width (default 1.0)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved (bare, 1 worker) rounds; the best of each counts")
    ap.add_argument("--gpu", action="store_true", help="train on the GPU (bf16, channels_last)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--no-overhead", action="store_true", help="skip the per-fit overhead runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    cpus = os.cpu_count() or 1
    batch = presets.batch_size(COHORT)
    device = "cuda" if args.gpu else "cpu"
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        synth.write_dataset(root / "data", per_class=args.per_class, size=max(args.size, 64),
                            seed=0, workers=cpus)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        pipeline.prepare(pipeline.PrepareConfig(data=root / "data", out=root / "shards",
                                                size=args.size))
        shards = pipeline.open_shards(root / "shards")
        images, ids, labels = train.read_split(shards, COHORT, "train")
        common = dict(epochs=args.epochs, batch=batch, width=args.width, device=device)

        # Interleaved rounds (bare, 1 worker), then 2 workers: on a shared machine the best
        # of each is the least disturbed measurement.
        bares, ones = [], []
        for k in range(args.rounds):
            bares.append(steady(bare_loop(images, ids, labels, threads=cpus, **common)))
            ones.append(ray_fit(root / "shards", root / "runs", f"w1-{k}", width=args.width,
                                workers=1, epochs=args.epochs,
                                threads=None if args.gpu else cpus, gpu=args.gpu))
        two = None
        if not args.gpu:
            two = ray_fit(root / "shards", root / "runs", "w2", width=args.width, workers=2,
                          epochs=args.epochs, threads=1)
        bare, cpu_b = max(r for r, _ in bares), min(c for _, c in bares)
        rates = [fit_rate(s) for s in ones]
        best = max(range(len(ones)), key=lambda i: rates[i][0])
        one, (r1, cpu1) = ones[best], rates[best]

        def cores(rate: float, cpu_ms: float) -> str:
            return f"{rate * cpu_ms / 1000:.2f}"

        rows.append(("bare PyTorch loop, in-memory uint8 tensors",
                     " / ".join(f"{r:.2f}" for r, _ in bares), "1.00",
                     " / ".join(f"{c:.0f}" for _, c in bares), "1.00",
                     " / ".join(cores(r, c) for r, c in bares), "–"))
        rows.append(("cxr-ray train, 1 worker", " / ".join(f"{r:.2f}" for r, _ in rates),
                     f"**{r1 / bare:.2f}**", " / ".join(f"{c:.0f}" for _, c in rates),
                     f"{cpu_b / cpu1:.2f}", " / ".join(cores(r, c) for r, c in rates),
                     " / ".join(f"{s.startup_seconds:.1f} + {s.teardown_seconds:.1f}"
                                for s in ones)))
        if two is not None:
            r2, cpu2 = fit_rate(two)
            rows.append(("cxr-ray train, 2 workers (DDP, gloo, 1 thread each)", f"{r2:.2f}",
                         f"{r2 / bare:.2f} (scaling {r2 / r1:.2f}× vs 1 worker)", f"{cpu2:.0f}",
                         f"{cpu_b / cpu2:.2f}", cores(r2, cpu2),
                         f"{two.startup_seconds:.1f} + {two.teardown_seconds:.1f}"))
        epoch_s = statistics.mean(r["epoch_seconds"] for r in one.history[1:] or one.history)
        eval_s = statistics.mean(r["eval_seconds"] for r in one.history[1:] or one.history)
        fast = slow = None
        if not args.no_overhead:
            fast = overhead(root / "shards", root / "runs", train.FAST_CONTROL_ENV, "fast")
            slow = overhead(root / "shards", root / "runs",
                            {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2",
                             "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "5"}, "defaults")
        load = os.getloadavg()[0]
        ray.shutdown()

    n_train = len(ids)
    projected_h = STUDY_EPOCH_IMAGES / r1 / 3600
    lines = [
        f"Measured by `bench/train.py` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, "
        f"{cpus} CPU cores{', GPU ' + torch.cuda.get_device_name() if args.gpu else ''}, "
        f"torch {torch.__version__}, ray {ray.__version__}; load average at the end "
        f"{load:.2f}).",
        f"MobileNetV1 width {args.width} at {args.size}², batch {batch} (Table 3, {COHORT}), "
        f"SGD + time decay (Table 4), Keras augmentation per image; synthetic {COHORT} train "
        f"split of {n_train} images; {args.epochs} epochs per run, the first excluded "
        f"(warm-up).",
        "",
        "| run | train images/s (steady; each round) | ratio to bare (best / best) | "
        "CPU ms / image | CPU ratio | cores used | start-up + tear-down s |",
        "|---|---|---|---|---|---|---|",
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
        "Ratios: best cxr-ray round against the best bare round (CPU: the least CPU per image). "
        "CPU ms / image: "
        "CPU time of the training processes (the bare loop's; the Ray workers' summed) per "
        "training image, which other load on a shared machine disturbs much less than wall "
        "time; CPU ratio = bare / cxr-ray (1.00: no extra work per image); cores used = CPU "
        "time / wall time of those processes (2.00 = both cores; less: the machine was shared).",
        "",
        f"cxr-ray's epoch (1 worker): {epoch_s:.1f} s, of which {eval_s:.1f} s evaluating the "
        f"test split (all workers' scores gathered) and the rest training; a checkpoint and "
        f"the history line follow each epoch.",
        f"Projected Atelectasis epoch ({STUDY_EPOCH_IMAGES:,} training images at {args.size}², "
        f"1 worker): **{projected_h:.2f} h** at {r1:.2f} images/s, against the study's "
        f"{STUDY_EPOCH_HOURS} h (~{STUDY_EPOCH_IMAGES / (STUDY_EPOCH_HOURS * 3600):.1f} "
        "images/s).",
    ]
    if fast is not None and slow is not None:
        lines += [
            "",
            "Per-fit overhead (a trivial fit: width 0.25, 1 epoch of the small Hernia cohort, "
            "1 worker, inside an already running local Ray):",
            "",
            "| Ray Train controller intervals | wall s | start-up s | training s | "
            "tear-down s |",
            "|---|---|---|---|---|",
            *[f"| {label} | {s.wall_seconds:.1f} | {s.startup_seconds:.1f} | "
              f"{s.compute_seconds:.1f} | {s.teardown_seconds:.1f} |"
              for label, s in (("cxr-ray's (health check 0.2 s, preemption poll 1 s)", fast),
                               ("Ray's defaults (2 s, 5 s)", slow))],
        ]
    section = "\n".join(lines)
    print(f"{HEADING}\n\n{section}")
    if not args.no_write:
        write_section(HEADING, section)
        print(f"\nwrote {HEADING!r} in {RESULTS}")


if __name__ == "__main__":
    main()

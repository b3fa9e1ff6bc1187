"""Benchmark: can per-image augmentation keep up with training?  (Not a test.)

Run:  .venv/bin/python bench/augment.py            (about 1–2 minutes on 2 CPU cores)
      .venv/bin/python bench/augment.py --no-write  (print only, leave bench/RESULTS.md alone)
      .venv/bin/python bench/augment.py --no-ray    (skip the end-to-end local Ray Data run, -30 s)

Measures, at 224² and 64² (the test size), batch 32:

* ``augment`` on a torch uint8 batch ("on the training device"), 1 and 2 threads;
* ``AugmentBatch`` on a numpy dict (what Ray Data's ``map_batches`` calls: id hashing,
  numpy → torch → uint8 numpy), 1 and 2 threads;
* the same inside a real local Ray Data pipeline, end to end (``--no-ray`` skips it);
* the baseline it replaces: Keras' way, one image at a time through
  ``scipy.ndimage.affine_transform`` (if scipy is installed);
* the consumption rate of training: MobileNetV1 forward + backward + SGD step, using
  all threads.  cxr_ray's model is preferred; torchvision's ``mobilenet_v2`` (1-channel
  stem) stands in when cxr_ray's is not importable, and the output says so.

Prints a table (images/s, and aug_rate / train_rate) and writes it under
``## Augmentation`` in bench/RESULTS.md, leaving other sections untouched.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from cxr_ray.data.augment import AugmentBatch, AugmentConfig, augment, params_for_ids

BATCH = 32
SIZES = (224, 64)
from _results import RESULTS, write_section  # noqa: E402 (bench/ is on sys.path when run)

HEADING = "## Augmentation"


def rate(fn: Callable[[], object], images: int, min_time: float, repeats: int = 3) -> float:
    """Images/s: the median over ``repeats`` runs of calls totalling ≥ ``min_time`` each."""
    fn()  # warm-up: allocator, thread pool, lazy init
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, int(min_time / once))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append(calls * images / (time.perf_counter() - t0))
    return statistics.median(runs)


def build_model() -> tuple[nn.Module, int, str]:
    """(model, input channels, description): cxr_ray's MobileNetV1, else a stand-in."""
    try:
        from cxr_ray.models import create_model

        params = inspect.signature(create_model).parameters
        wanted = (("in_chans", 1), ("weights", None), ("pretrained", False))  # random init: no files
        kwargs = {k: v for k, v in wanted if k in params}
        model = create_model("mobilenet_v1", **kwargs)
        desc = f"cxr_ray create_model('mobilenet_v1', {', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    except Exception as exc:  # noqa: BLE001 — any failure means "not ready yet": fall back
        try:
            from cxr_ray.models.mobilenet_v1 import MobileNetV1

            model = MobileNetV1(in_chans=1, num_classes=1)
            desc = ("cxr_ray MobileNetV1(in_chans=1, num_classes=1) backbone "
                    f"(create_model unavailable: {exc!r})")
        except Exception as exc2:  # noqa: BLE001
            import torchvision

            model = torchvision.models.mobilenet_v2(weights=None, num_classes=1)
            first = model.features[0][0]
            model.features[0][0] = nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride,
                                             first.padding, bias=False)
            desc = f"STAND-IN torchvision mobilenet_v2 (1-channel stem); cxr_ray model unavailable: {exc2!r}"
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return model, first_conv.in_channels, desc


def train_rate(model: nn.Module, in_chans: int, size: int, steps: int) -> float:
    """Images/s of SGD steps on random input, after one warm-up step (steps are seconds on CPU)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(BATCH, in_chans, size, size)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().square().mean().backward()  # the loss form does not change the cost
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - t0)


def scipy_baseline(images: np.ndarray, cfg: AugmentConfig) -> Callable[[], object] | None:
    """Keras' own path: per image, a 3×3 matrix and scipy.ndimage.affine_transform."""
    try:
        from scipy import ndimage
    except ImportError:
        return None
    p = params_for_ids(np.arange(len(images)), seed=0, epoch=0, cfg=cfg)
    h, w = images.shape[1:]
    center = np.array([[1, 0, h / 2 - 0.5], [0, 1, w / 2 - 0.5], [0, 0, 1]])
    uncenter = np.array([[1, 0, -(h / 2 - 0.5)], [0, 1, -(w / 2 - 0.5)], [0, 0, 1]])

    def run() -> None:
        for i, img in enumerate(images):
            t, s = np.deg2rad(float(p.angle_deg[i])), np.deg2rad(float(p.shear_deg[i]))
            m = (
                center
                @ np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
                @ np.array([[1, 0, float(p.shift_y[i]) * h], [0, 1, float(p.shift_x[i]) * w], [0, 0, 1]])
                @ np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
                @ np.diag([float(p.zoom_y[i]), float(p.zoom_x[i]), 1.0])
                @ uncenter
            )
            out = ndimage.affine_transform(img.astype(np.float32), m[:2, :2], m[:2, 2],
                                           order=1, mode="nearest")
            if p.flip[i]:
                out = out[:, ::-1]
            out = out - out.min()
            np.clip(out * (255.0 / max(out.max(), 1e-12)) * float(p.brightness[i]), 0, 255)

    return run


def ray_data_rate(size: int, cfg: AugmentConfig, n_images: int = 1024) -> float:
    """End to end through Ray Data: materialised uint8 rows → map_batches(AugmentBatch) → iterate.

    Includes Ray's scheduling, serialisation and object-store traffic, on a local Ray.
    """
    import ray

    def make(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        rng = np.random.default_rng(0)
        return {"image": rng.integers(0, 256, (len(ids), size, size), dtype=np.uint8), "image_id": ids}

    ds = ray.data.range(n_images).map_batches(make, batch_size=BATCH).materialize()
    best = 0.0
    for epoch in range(3):  # the first pass warms Ray's workers up
        t0 = time.perf_counter()
        aug = ds.map_batches(AugmentBatch(cfg, seed=0, epoch=epoch), batch_size=BATCH, batch_format="numpy")
        count = sum(len(b["image"]) for b in aug.iter_batches(batch_size=BATCH))
        best = max(best, count / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true", help="print only; do not edit bench/RESULTS.md")
    ap.add_argument("--min-time", type=float, default=0.25, help="seconds per timing run of augmentation")
    ap.add_argument("--no-ray", action="store_true",
                    help="skip the end-to-end local Ray Data pipeline (saves about 30 s)")
    args = ap.parse_args()

    cfg = AugmentConfig()
    cores = os.cpu_count() or 1
    thread_counts = sorted({1, min(2, cores)})
    model, in_chans, model_desc = build_model()
    rows: list[tuple[str, dict[int, float]]] = []
    rng = np.random.default_rng(0)
    data = {s: rng.integers(0, 256, (BATCH, s, s), dtype=np.uint8) for s in SIZES}
    ids = np.array([f"{i:08d}_000.png" for i in range(BATCH)], dtype=object)

    for threads in thread_counts:
        torch.set_num_threads(threads)
        torch_rates, ray_rates = {}, {}
        for s in SIZES:
            batch_t = torch.from_numpy(data[s])

            def on_device(batch_t: torch.Tensor = batch_t) -> object:
                with torch.no_grad():
                    return augment(batch_t, params_for_ids(ids, seed=0, epoch=1, cfg=cfg), cfg)

            fn = AugmentBatch(cfg, seed=0, epoch=1)
            batch = {"image": data[s], "image_id": ids}
            torch_rates[s] = rate(on_device, BATCH, args.min_time)
            ray_rates[s] = rate(lambda fn=fn, batch=batch: fn(batch), BATCH, args.min_time)
        rows.append((f"augment(), torch uint8 in, float out, {threads} thread(s)", torch_rates))
        rows.append((f"AugmentBatch (Ray map_batches fn, numpy uint8 in/out), {threads} thread(s)",
                     ray_rates))

    if not args.no_ray:
        import ray

        logging.getLogger("ray").setLevel(logging.WARNING)
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name in ("ray", "ray.data"):  # ray.init installs its own handlers and levels
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            ray_data = {s: ray_data_rate(s, cfg) for s in SIZES}
        finally:
            ray.shutdown()
        rows.append((f"Ray Data map_batches(AugmentBatch) end to end, local Ray, {cores} CPUs",
                     ray_data))

    torch.set_num_threads(1)
    baseline = {}
    for s in SIZES:
        run = scipy_baseline(data[s], cfg)
        if run is not None:
            baseline[s] = rate(run, BATCH, args.min_time, repeats=3)
    if baseline:
        rows.append(("baseline: Keras-style per-image scipy.ndimage loop, 1 thread", baseline))

    torch.set_num_threads(cores)
    train = {s: train_rate(model, in_chans, s, steps=2 if s >= 128 else 4) for s in SIZES}

    header = ("| path | " + " | ".join(f"{s}² img/s" for s in SIZES) + " | "
              + " | ".join(f"{s}² aug/train" for s in SIZES) + " |")
    lines = [header, "|" + "---|" * (1 + 2 * len(SIZES))]
    for name, r in rows:
        cells = [f"{r[s]:,.0f}" for s in SIZES] + [f"{r[s] / train[s]:,.1f}×" for s in SIZES]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append(f"| **training: MobileNetV1 fwd+bwd+SGD, batch {BATCH}, {cores} thread(s)** | "
                 + " | ".join(f"**{train[s]:,.1f}**" for s in SIZES) + " | "
                 + " | ".join("1×" for _ in SIZES) + " |")
    table = "\n".join(lines)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = (f"{platform.processor() or platform.machine()}, {cores} CPU cores, torch {torch.__version__}, "
           f"batch {BATCH}, default Keras settings (docs/study.md §3); load average at the end {load:.2f}")
    print(f"model: {model_desc}\n{env}\n\n{table}")

    if not args.no_write:
        section = (
            f"{HEADING}\n\nMeasured by `bench/augment.py` ({time.strftime('%Y-%m-%d')}; {env}).\n"
            f"Model: {model_desc}.\n\n{table}\n\n"
            "`aug/train` > 1 means augmentation produces images faster than training consumes them.\n"
        )
        if load > cores:
            section += (
                f"\nThe machine was shared with other jobs (load average {load:.1f} on {cores} cores): "
                "absolute rates are pessimistic and the 2-thread rows mostly measure contention; "
                "the ratios to training (measured under the same load) are what matter.\n"
            )
        write_section(HEADING, section)
        print(f"\nwrote {HEADING!r} in {RESULTS}")


if __name__ == "__main__":
    main()

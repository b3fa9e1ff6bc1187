"""``cxr-ray predict`` on Ray: offline batch inference with Ray Data.

The Ray Data pattern for it: the input list as a dataset → ``map_batches`` read tasks
(decode + resize, :func:`cxr_ray.predict.output.read_batch`; a bad file becomes a row with
its reason) → ``map_batches`` with a model-holding class (:class:`PredictActor`: every
cohort's model loaded once per actor; one GPU per actor when the cluster has GPUs, else one
CPU and one torch thread each, as many actors as CPUs) → the rows gathered in input order
and written by :func:`cxr_ray.predict.output.finish`, which checks one row per input.

The chosen checkpoints are read once by the driver and reach the actors through Ray's object
store, so the experiment may be a local folder of the driver or an ``s3://`` URI (whose
chosen checkpoints the driver fetches) whatever node an actor lands on.

Heatmap overlays are written by the actors straight into ``--heatmaps`` (a path every node
can reach: local on one machine, the shared file system on a cluster).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data

from cxr_ray.predict import output
from cxr_ray.predict.engine import Predictor
from cxr_ray.predict.select import CohortModel
from cxr_ray.ray_backend.session import ray_session

log = logging.getLogger(__name__)


def _read(batch: dict[str, np.ndarray], size: int) -> dict[str, Any]:
    """Read task: the batch's files → pixels (zeros where unreadable) and status columns."""
    paths = [str(p) for p in batch["image"]]
    pixels, rows = output.read_batch(paths, size)
    ok = np.array([r["status"] == "ok" for r in rows])
    full = np.zeros((len(paths), size, size), np.uint8)
    full[ok] = pixels
    return {"row": batch["row"], "name": batch["name"], "pixels": full, "ok": ok,
            **{k: np.array([r[k] for r in rows], dtype=object)
               for k in ("image", "status", "reason", "source")}}


class PredictActor:
    """Holds every chosen model (loaded once); predicts a read batch."""

    def __init__(self, models: dict[str, dict[str, Any]], provenance: dict[str, Any],
                 heatmaps: str | None, heatmap_cohorts: list[str], device: str,
                 threads: int, weights: dict[str, Any]) -> None:
        chosen = {c: CohortModel(**m) for c, m in models.items()}
        # The checkpoints' bytes come through the object store: an actor on another node
        # needs neither the experiment's folder nor the store's credentials.
        blobs = dict(zip(weights, ray.get(list(weights.values()))))
        self.predictor = Predictor(chosen, device=device, threads=threads, blobs=blobs)
        self.provenance = provenance
        self.heatmaps = heatmaps
        self.heatmap_cohorts = heatmap_cohorts

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        ok = batch["ok"].astype(bool)
        rows = [{k: batch[k][i] for k in ("image", "status", "reason", "source")}
                for i in range(len(ok))]
        out = output.predict_rows(self.predictor, batch["pixels"][ok], rows,
                                  [str(n) for n in batch["name"]], self.provenance,
                                  heatmaps=self.heatmaps, heatmap_cohorts=self.heatmap_cohorts)
        frame = pd.DataFrame(out)
        frame.insert(0, "row", batch["row"])
        return frame


def predict(experiment: str | Path, images: str | Path, out: str | Path, *,
            cohorts: list[str] | None = None, heatmaps: str | None = None,
            heatmap_cohorts: list[str] | None = None, address: str | None = None,
            batch_size: int = 64, actors: int | None = None
            ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Predict every input with Ray Data; → (preds, external-validation metrics or None)."""
    s = output.setup(experiment, images, cohorts=cohorts, heatmap_cohorts=heatmap_cohorts,
                     heatmaps=heatmaps)
    if heatmaps:
        Path(heatmaps).mkdir(parents=True, exist_ok=True)
    with ray_session(address):
        total = ray.cluster_resources()
        gpus = int(total.get("GPU", 0))
        cpus = max(1, int(total.get("CPU", 1)))
        n = actors or (gpus if gpus else cpus)
        per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        log.info("predict: %d inputs, %d cohort model(s), %d actor(s) with %s each",
                 len(s.inputs), len(s.models), n, "a GPU" if gpus else "one CPU")
        t0 = time.perf_counter()
        weights = {c: ray.put(Path(m.checkpoint).read_bytes()) for c, m in s.models.items()}
        ds = ray.data.from_items(
            [{"row": i, "image": p, "name": name}
             for i, (p, name) in enumerate(zip(s.inputs, s.names))],
            override_num_blocks=max(1, min(len(s.inputs), 4 * n)))
        ds = ds.map_batches(_read, fn_kwargs={"size": s.size}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=1)
        ds = ds.map_batches(
            PredictActor, batch_size=batch_size, batch_format="numpy", concurrency=n,
            fn_constructor_kwargs={
                "models": {c: m.to_dict() for c, m in s.models.items()},
                "provenance": s.provenance, "heatmaps": heatmaps,
                "heatmap_cohorts": s.heatmap_cohorts, "device": "cuda" if gpus else "cpu",
                "threads": 1, "weights": weights}, **per_actor)
        frame = ds.to_pandas().sort_values("row")
        log.info("predict: %d rows in %.1f s", len(frame), time.perf_counter() - t0)
    rows = frame.drop(columns=["row"]).to_dict("records")
    return output.finish(rows, s, out, images)

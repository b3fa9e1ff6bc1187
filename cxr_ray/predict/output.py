"""``preds.csv``, heatmap overlays and external-validation metrics; the in-process path.

**preds.csv**: one row per input file, in input order (``rows == inputs``, checked):

* ``image`` (the path as listed), ``status`` (``ok`` or ``unreadable``), ``reason`` (why not,
  ``kind: detail``), ``source`` (what the file was: ``image L 1024x1024``, ``DICOM
  MONOCHROME1 12-bit 2048x2500``; no header field that identifies a patient);
* per disease cohort ``C``: ``C`` (the probability), ``C_positive`` (1 when the probability
  reaches the cohort's threshold), ``C_threshold`` and ``C_checkpoint`` (the model, relative
  to the experiment): where the number came from;
* the one-class model: ``anomaly_score`` (its probability of "not No Finding"),
  ``anomaly`` (at its threshold), ``anomaly_threshold``, ``anomaly_checkpoint``;
* ``C_heatmap``: the overlay PNG for each ``--heatmap-cohorts`` cohort;
* ``experiment`` and ``recipe_hash`` (:func:`cxr_ray.predict.select.recipe_hash`).

**External validation**: when an NIH-layout ``Data_Entry_2017*.csv`` lies in the images'
folder (or the folder above it, or beside a list file), images whose ``Image Index`` it lists
are scored per cohort (positives: the disease among the labels; negatives: No Finding; the
one-class cohort: any finding vs No Finding): accuracy at the cohort's threshold and ROC AUC,
each with a 95 % patient-bootstrap CI, sensitivity and specificity → ``<out>.metrics.csv``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_ray import metrics, stats, storage
from cxr_ray.data import nih
from cxr_ray.data.cohorts import resolve_cohort
from cxr_ray.errors import UserError
from cxr_ray.sweep import remote
from cxr_ray.predict.engine import Predictor, write_overlay
from cxr_ray.predict.inputs import list_inputs, read_input
from cxr_ray.predict.select import CohortModel, is_anomaly_model, recipe_hash, select_models

log = logging.getLogger(__name__)


def column(cohort: str) -> str:
    """The probability column of a cohort (``anomaly_score`` for the one-class model)."""
    return "anomaly_score" if is_anomaly_model(cohort) else cohort


def _prefix(cohort: str) -> str:
    return "anomaly" if is_anomaly_model(cohort) else cohort


@dataclass
class Provenance:
    """What every row repeats about its models."""

    experiment: str
    recipe_hash: str
    models: dict[str, CohortModel]
    root: str = ""
    """The experiment's local directory (its local copy for an object store), from which
    checkpoints are named; default: ``experiment``."""

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        base = Path(self.root or self.experiment)
        for c, m in self.models.items():
            p = _prefix(c)
            out[f"{p}_threshold"] = m.threshold
            ckpt = Path(m.checkpoint)
            out[f"{p}_checkpoint"] = str(ckpt.relative_to(base)) if ckpt.is_relative_to(
                base) else str(ckpt)
        out["experiment"] = self.experiment
        out["recipe_hash"] = self.recipe_hash
        return out


def heatmap_names(paths: list[str]) -> list[str]:
    """A file-name stem per input: its own stem, prefixed by its index where stems repeat."""
    stems = [Path(p).stem for p in paths]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    return [s if seen[s] == 1 else f"{i:05d}_{s}" for i, s in enumerate(stems)]


def read_batch(paths: list[str], size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Read a batch of inputs: the readable ones' pixels (in order) and a status row per
    input."""
    pixels, rows = [], []
    for path in paths:
        px, source, reason = read_input(path, size)
        rows.append({"image": path, "status": "ok" if px is not None else "unreadable",
                     "reason": reason, "source": source})
        if px is not None:
            pixels.append(px)
    stack = np.stack(pixels) if pixels else np.zeros((0, size, size), np.uint8)
    return stack, rows


def predict_rows(predictor: Predictor, pixels: np.ndarray, rows: list[dict[str, Any]],
                 names: list[str], provenance: dict[str, Any], *,
                 heatmaps: str | None = None, heatmap_cohorts: Iterable[str] = ()
                 ) -> list[dict[str, Any]]:
    """Fill the status rows of one batch with probabilities, decisions, heatmap files."""
    probs = predictor.probabilities(pixels)
    cams = {c: predictor.heatmaps(pixels, c) for c in heatmap_cohorts} if heatmaps and len(
        pixels) else {}
    k = 0
    out = []
    for row, name in zip(rows, names):
        row = {**row}
        for c, m in predictor.chosen.items():
            p = _prefix(c)
            if row["status"] == "ok":
                prob = float(probs[c][k])
                row[column(c)] = prob
                row["anomaly" if is_anomaly_model(c) else f"{p}_positive"] = int(
                    prob >= m.threshold)
            else:
                row[column(c)] = math.nan
                row["anomaly" if is_anomaly_model(c) else f"{p}_positive"] = None
        for c, maps in cams.items():
            if row["status"] == "ok":
                file = Path(heatmaps) / f"{name}__{c}.png"
                write_overlay(file, pixels[k], maps[k])
                row[f"{_prefix(c)}_heatmap"] = str(file)
            else:
                row[f"{_prefix(c)}_heatmap"] = ""
        if row["status"] == "ok":
            k += 1
        out.append({**row, **provenance})
    return out


def columns(models: dict[str, CohortModel], heatmap_cohorts: Iterable[str]) -> list[str]:
    """preds.csv's column order."""
    cols = ["image", "status", "reason", "source"]
    for c in models:
        if not is_anomaly_model(c):
            cols += [c, f"{c}_positive"]
    if any(is_anomaly_model(c) for c in models):
        cols += ["anomaly_score", "anomaly"]
    cols += [f"{_prefix(c)}_heatmap" for c in heatmap_cohorts]
    for c in models:
        cols += [f"{_prefix(c)}_threshold", f"{_prefix(c)}_checkpoint"]
    return cols + ["experiment", "recipe_hash"]


@dataclass
class PredictSetup:
    """Everything a prediction run needs, resolved once in the driver."""

    experiment: str
    inputs: list[str]
    models: dict[str, CohortModel]
    provenance: dict[str, Any]
    names: list[str]
    heatmap_cohorts: list[str]
    size: int


def setup(experiment: str | Path, images: str | Path, *, cohorts: list[str] | None = None,
          heatmap_cohorts: list[str] | None = None, heatmaps: str | None = None
          ) -> PredictSetup:
    """Resolve inputs, models, provenance and the heatmap cohorts (default: every cohort)."""
    uri = str(experiment) if storage.is_uri(experiment) else None
    if uri:  # an object-store experiment: its committed files, then the chosen checkpoints
        local = remote.pull_experiment(uri)
        if not (local / "recipe.json").is_file():
            raise UserError(f"{uri}: no cxr-ray experiment committed there (no recipe.json); "
                            "pass storage_path/name of a sweep's recipe")
        chosen = select_models(local, cohorts, kept_checkpoints=remote.committed_checkpoints(uri))
        remote.pull_files(uri, [Path(m.checkpoint).relative_to(local).as_posix()
                                for m in chosen.values()])
        experiment = uri
    else:
        local = Path(experiment).expanduser().resolve()
        experiment = str(local)
        chosen = select_models(local, cohorts)
    inputs = list_inputs(images)
    if heatmap_cohorts and not heatmaps:
        raise UserError("--heatmap-cohorts needs --heatmaps DIR (where the overlays go)")
    wanted = list(chosen) if heatmap_cohorts is None else [resolve_cohort(c)
                                                           for c in heatmap_cohorts]
    missing = [c for c in wanted if c not in chosen]
    if heatmaps and missing:
        raise UserError(f"--heatmap-cohorts {', '.join(missing)}: not among the predicted "
                        f"cohorts ({', '.join(chosen)})")
    prov = Provenance(experiment, recipe_hash(local), chosen, root=str(local)).fields()
    size = next(iter(chosen.values())).image_size
    return PredictSetup(experiment, inputs, chosen, prov, heatmap_names(inputs),
                        wanted if heatmaps else [], size)


def finish(rows: list[dict[str, Any]], s: PredictSetup, out: str | Path,
           images: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Write preds.csv (checking one row per input, in order) and, when labels lie beside
    the images (:func:`find_labels`), the external-validation metrics."""
    frame = pd.DataFrame(rows)
    if list(frame["image"]) != s.inputs:
        raise RuntimeError(f"predict produced {len(frame)} rows for {len(s.inputs)} inputs")
    frame = frame.reindex(columns=columns(s.models, s.heatmap_cohorts))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    labels = find_labels(images)
    scores = None
    if labels:
        scores = external_validation(frame, s.models, labels)
        scores.to_csv(metrics_file(out), index=False)
    return frame, scores


def metrics_file(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".metrics.csv")


def predict_in_process(experiment: str | Path, images: str | Path, out: str | Path, *,
                       cohorts: list[str] | None = None, heatmaps: str | None = None,
                       heatmap_cohorts: list[str] | None = None, batch_size: int = 64,
                       device: str = "cpu", threads: int | None = None
                       ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``cxr-ray predict`` in this process (no Ray): the reference for the Ray Data path."""
    s = setup(experiment, images, cohorts=cohorts, heatmap_cohorts=heatmap_cohorts,
              heatmaps=heatmaps)
    predictor = Predictor(s.models, device=device, threads=threads)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for start in range(0, len(s.inputs), batch_size):
        paths = s.inputs[start:start + batch_size]
        pixels, status = read_batch(paths, s.size)
        rows += predict_rows(predictor, pixels, status, s.names[start:start + batch_size],
                             s.provenance, heatmaps=heatmaps, heatmap_cohorts=s.heatmap_cohorts)
    log.info("predicted %d images in %.1f s", len(rows), time.perf_counter() - t0)
    return finish(rows, s, out, images)


# --------------------------------------------------------------------------- labels
def find_labels(images: str | Path) -> Path | None:
    """An NIH ``Data_Entry_2017*.csv`` in the images' folder, the folder above, or beside a
    list file; None when there is none."""
    src = Path(images).expanduser()
    folders = [src, src.parent] if src.is_dir() else [src.parent]
    for folder in folders:
        found = sorted(folder.glob("Data_Entry_2017*.csv"))
        if found:
            return found[0]
    return None


def external_validation(frame: pd.DataFrame, models: dict[str, CohortModel],
                        labels: str | Path) -> pd.DataFrame:
    """Per cohort: n, positives, accuracy at the threshold and AUC with 95 % patient-bootstrap
    CIs, sensitivity and specificity on the labelled, readable inputs."""
    meta = nih.load_metadata(labels)
    by_name = meta.set_index(nih.IMAGE)
    names = frame["image"].map(lambda p: Path(p).name)
    known = names.isin(by_name.index) & (frame["status"] == "ok")
    if not known.any():
        raise UserError(f"labels {labels}: none of the readable inputs' file names is listed "
                        f"in its '{nih.IMAGE}' column")
    sub = frame[known]
    findings = by_name.loc[names[known], nih.FINDINGS].str.split("|")
    patients = by_name.loc[names[known], nih.PATIENT].to_numpy()
    rows = []
    for c, m in models.items():
        healthy = findings.map(lambda f: f == [nih.NO_FINDING]).to_numpy()
        if is_anomaly_model(c):
            y = np.where(healthy, 0, 1)
            use = np.ones(len(y), bool)
        else:
            has = findings.map(lambda f, c=c: c in f).to_numpy()
            y = np.where(has, 1, 0)
            use = has | healthy
        s = sub[column(c)].to_numpy(float)[use]
        yy, g = y[use], patients[use]
        row = {"cohort": c, "images": int(use.sum()), "positives": int(yy.sum()),
               "threshold": m.threshold}
        if use.sum() == 0 or yy.min() == yy.max():
            row.update(note="needs both classes among the labelled inputs")
            rows.append(row)
            continue
        m_all = metrics.binary_metrics(s, yy, m.threshold)
        acc_lo, acc_hi = stats.accuracy_ci(s, yy, g, m.threshold)
        auc_lo, auc_hi = stats.auc_ci(s, yy, g)
        row.update(accuracy=m_all["accuracy"], accuracy_ci_low=acc_lo, accuracy_ci_high=acc_hi,
                   auc=m_all["auc"], auc_ci_low=auc_lo, auc_ci_high=auc_hi,
                   sensitivity=m_all["sensitivity"], specificity=m_all["specificity"])
        rows.append(row)
    return pd.DataFrame(rows)

"""Every file and folder name of a run and of an experiment, once; and the three small I/O
rules every writer follows (atomic replace, tolerant JSONL, one settings-diff message).

A run directory (``cxr-ray train --out RUN``, or ``EXP/<stage>/<run>`` in a sweep)::

    RUN/config.json                  the resolved RunPlan (a re-run must match it)
    RUN/history.jsonl                one JSON line per finished epoch
    RUN/steps.csv                    step,epoch,lr,loss for every optimizer step
    RUN/attempts.jsonl               one line per start of the loop (resumes, restarts)
    RUN/summary.json                 what the run returned, written last (= finished)
    RUN/tensorboard/                 one TensorBoard run: per-step and per-epoch scalars
    RUN/checkpoint_epoch_0003/checkpoint.pt   the kept checkpoints (best k + the latest)
    RUN/predictions/epoch_0003.npz   per-image val and test scores of the selected epoch
                                     (best by the validation metric) and of the latest

An experiment directory (``storage_path/name`` of a sweep recipe)::

    EXP/recipe.json                  the validated recipe (a re-run must match it)
    EXP/data.json                    the data it ran on: shard fingerprint, metadata sha256,
                                     split seed (a re-run must match it)
    EXP/stage1/<run>/, EXP/stage2/<run>/, EXP/comparison/<run>/   run directories
    EXP/<stage>/<run>/trial.json     a finished trial's summary (written last)
    EXP/lr_find/<run>/               LR range test of a stage-1 model: lr_find.json, .png,
                                     tensorboard/
    EXP/tune/<stage>/                Tune's own experiment state (driver resume)
    EXP/sweep_log.jsonl              one line per stage run: trials, concurrency, seconds
    EXP/report/                      results.csv, report.md, plots

In an object store (``storage_path = "s3://…"``) the same layout, plus each writer's commit
marker ``.cxr-ray-sync.json`` (in EXP/ and in every run and LR range test folder) and Ray
Train's own ``.ray_train/`` in each Ray Train run; everything here is then read and written
in a local copy (:mod:`cxr_ray.storage`, :mod:`cxr_ray.sweep.remote`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- a run
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"
STEPS_FILE = "steps.csv"
ATTEMPTS_FILE = "attempts.jsonl"
SUMMARY_FILE = "summary.json"
TB_DIR = "tensorboard"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
PREDICTIONS_DIR = "predictions"

# --------------------------------------------------------------------------- LR range test
LR_FIND_FILE = "lr_find.json"
LR_FIND_PLOT = "lr_find.png"

# --------------------------------------------------------------------------- an experiment
RECIPE_FILE = "recipe.json"
DATA_FILE = "data.json"
TRIAL_FILE = "trial.json"
SWEEP_LOG = "sweep_log.jsonl"
STAGES = ("stage1", "stage2", "comparison")
LR_FIND_DIR = "lr_find"
TUNE_DIR = "tune"
REPORT_DIR = "report"


def checkpoint_dir_name(epoch: int) -> str:
    """The folder of the checkpoint taken after ``epoch`` epochs (both launchers)."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def checkpoint_epoch(folder: Path) -> int | None:
    """Epochs done in a checkpoint folder named by :func:`checkpoint_dir_name`, else None."""
    name = folder.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    tail = name[len(CHECKPOINT_PREFIX):]
    return int(tail) if tail.isdigit() else None


def predictions_file(run: Path, epoch: int) -> Path:
    """Per-image scores of the epoch ``epoch`` of a run: for ``split`` in val/test the arrays
    ``{split}_image_id``, ``{split}_patient_id``, ``{split}_score``, ``{split}_label``."""
    return Path(run) / PREDICTIONS_DIR / f"epoch_{epoch:04d}.npz"


def run_dir(experiment: Path, stage: str, run_name: str) -> Path:
    return experiment / stage / run_name


def lr_find_dir(experiment: Path, run_name: str) -> Path:
    return experiment / LR_FIND_DIR / run_name


# --------------------------------------------------------------------------- I/O rules
def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: a reader sees
    the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """:func:`atomic_write` of indented JSON (``default=str`` for paths and the like)."""
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path`` (none if it is missing). A last line cut short by
    a kill, or any unparsable line, is skipped rather than failing the reader."""
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (a local or shared-mount file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def settings_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """``key old → new`` for every differing key, nested dicts flattened (``policy.max_lr``):
    the one message of every "this directory holds other settings" error."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(settings_diff(a, b, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key} {a!r} → {b!r}")
    return "; ".join(parts)

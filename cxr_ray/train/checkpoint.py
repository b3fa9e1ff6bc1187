"""The checkpoint file, and the kept checkpoints of a run directory.

``checkpoint.pt`` (``torch.save`` of a dict of tensors and plain values, read with
``weights_only=True``)::

    format "cxr-ray-checkpoint", format_version 2, model_name, model {ModelConfig fields},
    cohort, image_size, model_state (unwrapped state_dict), optimizer (state_dict),
    epoch (epochs done), step (optimizer steps done: the loop's one step counter; the lr of
    the next step is lr_at(policy, step)), history [per-epoch dicts],
    steps {"lr": [...], "loss": [...]}, plan {RunPlan}

Version 1 (which also stored the lr scheduler's own counter) is still read, for its weights.

Both launchers keep checkpoints as ``RUN/checkpoint_epoch_NNNN/checkpoint.pt``: Ray Train
writes (and prunes) them through ``ray.train.report``; an in-process run through
:class:`CheckpointStore`, with the same rule: the ``keep`` best by the run's
``checkpoint_metric``, plus the latest.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cxr_ray import paths
from cxr_ray.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cxr-ray-checkpoint"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def checkpoint_dict(*, plan: dict[str, Any], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, epoch: int, step: int,
                    history: list[dict[str, Any]], lrs: list[float],
                    losses: list[float]) -> dict[str, Any]:
    """The checkpoint's content (the format in the module docstring)."""
    return {
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
        "model_name": plan["model"]["name"], "model": dict(plan["model"]),
        "cohort": plan["cohort"], "image_size": plan["image_size"],
        "model_state": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
        "epoch": epoch, "step": step, "history": history,
        "steps": {"lr": lrs, "loss": losses}, "plan": plan,
    }


def load_checkpoint(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """Read a ``checkpoint.pt`` (``weights_only=True``) or a :class:`UserError` saying why not.
    ``data``: the file's bytes, already read elsewhere (``path`` then only names it)."""
    path = Path(path)
    try:
        ckpt = torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu",
                          weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path}: no such file") from None
    except Exception as exc:  # unpickling errors come in many types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"checkpoint {path} is not readable as a torch file (weights_only): "
                        f"{type(exc).__name__}: {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a cxr-ray training checkpoint")
    if ckpt.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"{path}: checkpoint format {ckpt.get('format_version')} (this cxr-ray "
                        f"reads {', '.join(map(str, READABLE_VERSIONS))})")
    return ckpt


def kept_checkpoints(run_dir: Path) -> dict[int, Path]:
    """``{epochs done: checkpoint.pt}`` of every complete checkpoint folder in ``run_dir``."""
    out = {}
    for folder in run_dir.glob(f"{paths.CHECKPOINT_PREFIX}*"):
        epoch = paths.checkpoint_epoch(folder)
        if epoch is not None and (folder / paths.CHECKPOINT_FILE).is_file():
            out[epoch] = folder / paths.CHECKPOINT_FILE
    return dict(sorted(out.items()))


def latest_readable(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint in ``run_dir`` that loads (a copy cut short by a kill is
    skipped for the one before it), or None."""
    for epoch, file in sorted(kept_checkpoints(run_dir).items(), reverse=True):
        try:
            return load_checkpoint(file)
        except UserError as exc:
            log.warning("skipping checkpoint of epoch %d: %s", epoch, exc)
    return None


def best_epoch(history: list[dict[str, Any]], epochs: set[int] | list[int], metric: str,
               mode: str) -> int | None:
    """The epoch among ``epochs`` with the best ``metric`` (the later one on a tie)."""
    scored = [(r[metric], r["epoch"]) for r in history
              if r["epoch"] in set(epochs) and r.get(metric) is not None
              and math.isfinite(r[metric])]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda t: (sign * t[0], t[1]))[1]


def find_checkpoint(path: str | Path) -> Path:
    """A ``checkpoint.pt`` from a file, a checkpoint directory, or a run directory (its best
    checkpoint per ``summary.json``, else its latest)."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / paths.CHECKPOINT_FILE).is_file():
        return p / paths.CHECKPOINT_FILE
    summary = paths.read_json(p / paths.SUMMARY_FILE) or {}
    best = summary.get("best_checkpoint")
    if best and (Path(best) / paths.CHECKPOINT_FILE).is_file():
        return Path(best) / paths.CHECKPOINT_FILE
    kept = kept_checkpoints(p)
    if kept:
        return kept[max(kept)]
    raise UserError(f"{p}: no {paths.CHECKPOINT_FILE} there (pass a checkpoint file, a "
                    "checkpoint directory or a run directory of cxr-ray train)")


class CheckpointStore:
    """cxr-ray's own checkpoints of an in-process run: written atomically (a temporary folder
    renamed into place, so a kill never leaves a half-written checkpoint that looks complete)
    and pruned to the ``keep`` best by ``metric`` plus the latest."""

    def __init__(self, run_dir: Path, *, keep: int, metric: str, mode: str) -> None:
        self.run_dir, self.keep, self.metric, self.mode = run_dir, keep, metric, mode

    def save(self, ckpt: dict[str, Any]) -> Path:
        epoch = int(ckpt["epoch"])
        final = self.run_dir / paths.checkpoint_dir_name(epoch)
        tmp = self.run_dir / f".{final.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(ckpt, tmp / paths.CHECKPOINT_FILE)
        if final.exists():  # a restart redid this epoch
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune(ckpt["history"])
        return final / paths.CHECKPOINT_FILE

    def _prune(self, history: list[dict[str, Any]]) -> None:
        kept = kept_checkpoints(self.run_dir)
        latest = max(kept)
        keep = {latest}
        pool = set(kept)
        for _ in range(self.keep):
            best = best_epoch(history, pool, self.metric, self.mode)
            if best is None:
                break
            keep.add(best)
            pool.discard(best)
        for epoch, file in kept.items():
            if epoch not in keep:
                shutil.rmtree(file.parent, ignore_errors=True)


def summary_best(run_dir: Path, history: list[dict[str, Any]], metric: str,
                 mode: str) -> tuple[Path | None, Path | None, float | None]:
    """``(best checkpoint dir, latest checkpoint dir, best metric)`` of a finished run."""
    kept = kept_checkpoints(run_dir)
    best = best_epoch(history, list(kept), metric, mode)
    value = next((r[metric] for r in history if r["epoch"] == best), None)
    return (kept[best].parent if best is not None else None,
            kept[max(kept)].parent if kept else None, value)


def write_plan(run_dir: Path, plan: dict[str, Any]) -> None:
    paths.atomic_write(run_dir / paths.CONFIG_FILE, json.dumps(plan, indent=2) + "\n")

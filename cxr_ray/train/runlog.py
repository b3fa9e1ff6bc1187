"""Rank 0's files of a run: history.jsonl, steps.csv, attempts.jsonl, predictions/ and one
TensorBoard run.

TensorBoard: one run per training run (``RUN/tensorboard``), with ``train/lr`` and
``train/loss`` at every optimizer step and the epoch metrics (``train/*``, ``val/*``,
``test/*``, ``perf/*``) at their epoch's last optimizer step, so every chart shares one x axis
(optimizer steps) and a resumed run discards what an interrupted attempt logged past its
checkpoint with a single ``purge_step``. The hyperparameters go to the HParams tab.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cxr_ray import paths


@dataclass
class LoopState:
    """Where the loop is; restored from a checkpoint on resume."""

    epoch: int = 0
    """Epochs finished."""
    step: int = 0
    """Optimizer steps taken (= index of the next step): the loop's one step counter."""
    history: list[dict[str, Any]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    """lr in force at every step (rank 0)."""
    losses: list[float] = field(default_factory=list)
    """Rank 0's training loss (BCE + penalty) at every step."""


class RunLog:
    """Rank 0's view of the run directory. Every method is a no-op on other ranks."""

    def __init__(self, plan: dict[str, Any], state: LoopState, rank: int, *,
                 launcher: str) -> None:
        self.on = rank == 0 and bool(plan.get("run_dir"))
        self.dir = Path(plan.get("run_dir") or ".")
        self.state, self.every = state, plan["log_every"]
        self.shards, self.cohort = plan["shards"], plan["cohort"]
        self._pending: list[tuple[int, float, torch.Tensor]] = []
        if not self.on:
            return
        from torch.utils.tensorboard import SummaryWriter

        resumed = state.step > 0
        self.tb = SummaryWriter(self.dir / paths.TB_DIR, flush_secs=10,
                                purge_step=state.step if resumed else None)
        if not resumed:
            self._hparams(plan)
        self.write_files()  # truncate what an interrupted attempt wrote past the checkpoint
        paths.append_jsonl(self.dir / paths.ATTEMPTS_FILE, {
            "time": time.time(), "resumed_from_epoch": state.epoch, "step": state.step,
            "workers": plan["workers"], "launcher": launcher, "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})

    def _hparams(self, plan: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        p = plan["policy"]
        hp = {"cohort": plan["cohort"], "model": plan["model"]["name"],
              "width": plan["model"]["width"], "optimizer": plan["optimizer"]["name"],
              "policy": p["name"], "base_lr": p["base_lr"], "max_lr": p["max_lr"] or 0.0,
              "step_size": p["step_size"] or 0, "decay": p["decay"],
              "batch_size": plan["batch_size"], "epochs": plan["epochs"],
              "workers": plan["workers"], "image_size": plan["image_size"],
              "stage": 2 if plan["init_from"] else 1}
        for summary in hparams(hp, {f"{split}/{k}": 0.0 for split in ("val", "test")
                                    for k in ("accuracy", "auc", "loss")}):
            self.tb.file_writer.add_summary(summary)
        self.tb.add_text("run_plan", f"```\n{json.dumps(plan, indent=2)}\n```")

    def step(self, step: int, lr: float, loss: torch.Tensor) -> None:
        if self.on:
            self._pending.append((step, lr, loss.detach()))
            if len(self._pending) >= self.every:
                self.flush_steps()

    def flush_steps(self) -> None:
        """One device sync for the buffered losses, then TensorBoard and the state."""
        if not self.on or not self._pending:
            return
        losses = torch.stack([t for _, _, t in self._pending]).float().cpu().tolist()
        for (step, lr, _), loss in zip(self._pending, losses):
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/loss", loss, step)
            self.state.lrs.append(lr)
            self.state.losses.append(loss)
        self._pending.clear()

    def epoch(self, record: dict[str, Any]) -> None:
        """TensorBoard scalars of one finished epoch (written before the checkpoint)."""
        if not self.on:
            return
        self.flush_steps()
        at = record["step"] - 1  # the epoch's last step: a resume purges from its checkpoint's
        self.tb.add_scalar("train/epoch", record["epoch"], at)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step", "time"):
                group, _, name = key.partition("_")
                tag = f"{group}/{name}" if group in ("train", "val", "test") else f"perf/{key}"
                if tag != "train/loss":  # the per-step curve owns that tag
                    self.tb.add_scalar(tag, value, at)
        self.tb.flush()

    def predictions(self, epoch: int, scores: dict[str, Any], history: list[dict[str, Any]],
                    metric: str, mode: str) -> None:
        """Write the epoch's per-image scores (``{split: loop.Scores}``); keep only the files
        of the best epoch by ``metric`` and of the latest."""
        if not self.on:
            return
        import numpy as np

        from cxr_ray.train import checkpoint as ck

        patients = self._patients()
        arrays = {}
        for split, sc in scores.items():
            arrays.update({f"{split}_image_id": sc.image_id, f"{split}_score": sc.score,
                           f"{split}_label": sc.label, f"{split}_patient_id": np.asarray(
                               [patients.get(int(i), -1) for i in sc.image_id], np.int64)})
        path = paths.predictions_file(self.dir, epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        done = [r["epoch"] for r in history]
        keep = {epoch, ck.best_epoch(history, done, metric, mode)}
        for old in path.parent.glob("epoch_*.npz"):
            tail = old.stem.partition("_")[2]
            if tail.isdigit() and int(tail) not in keep:
                old.unlink(missing_ok=True)

    def _patients(self) -> dict[int, int]:
        """image id → patient id of the run's cohort (read once from the shards)."""
        if getattr(self, "_patient_of", None) is None:
            from cxr_ray.data import shards as shard_io

            table = shard_io.cohort_table(self.shards, self.cohort)
            self._patient_of = dict(zip(table["image_id"].tolist(),
                                        table["patient_id"].tolist()))
        return self._patient_of

    def write_files(self) -> None:
        """history.jsonl and steps.csv from the state (atomically replaced)."""
        if not self.on:
            return
        paths.atomic_write(self.dir / paths.HISTORY_FILE,
                           "".join(json.dumps(r) + "\n" for r in self.state.history))
        ends = [r["step"] for r in self.state.history]  # step count at each epoch's end
        rows = ["step,epoch,lr,loss\n"] + [
            f"{i},{bisect.bisect_right(ends, i) + 1},{lr!r},{loss!r}\n"
            for i, (lr, loss) in enumerate(zip(self.state.lrs, self.state.losses))]
        paths.atomic_write(self.dir / paths.STEPS_FILE, "".join(rows))

    def close(self) -> None:
        if self.on:
            self.flush_steps()
            self.tb.close()


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """One line per epoch for the console."""
    def f(key: str, fmt: str = ".4f") -> str:
        v = record.get(key)
        return "n/a" if v is None else format(v, fmt)

    return (f"epoch {record['epoch']}/{epochs}: train loss {f('train_loss')} acc "
            f"{f('train_accuracy')} | val loss {f('val_loss')} acc {f('val_accuracy')} auc "
            f"{f('val_auc')} | test acc {f('test_accuracy')} auc {f('test_auc')} sens "
            f"{f('test_sensitivity')} spec {f('test_specificity')} | "
            f"{f('images_per_s', '.1f')} img/s, {f('epoch_seconds', '.1f')} s")

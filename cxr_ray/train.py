"""Ray Train: one cohort, one model, DDP over K workers (SPEC §5, §6, §8).

Launch (after ``cxr-ray prepare``)::

    cxr-ray train --shards SHARDS --cohort Pneumothorax --out runs/ptx-stage1 --epochs 10
    cxr-ray train --shards SHARDS --cohort Pneumothorax --out runs/ptx-clr \\
        --init-from runs/ptx-stage1 --policy triangular --lr-bounds runs/ptx-lrfind/lr_find.json

What this module owns
---------------------
* :class:`TrainConfig`: what one run trains (typed, documented, ``to_dict``/``from_dict`` for
  recipes) and :func:`plan_run`, which resolves it against the shard set and the study's
  tables (Table 3 batch size, Table 4 optimizer and lr, Table 8 CLR settings) into the plain
  :class:`RunPlan` every worker receives.
* :func:`train_loop_per_worker`: the loop each Ray Train worker runs (fits one screen).
* :func:`fit`: the library entry point (``cxr-ray train`` and the Tune sweep call it).
* The checkpoint format (:func:`save_checkpoint`, :func:`load_checkpoint`) and rank 0's files.

A run is identified by its directory ``storage_path/name`` (``--out DIR``). In it::

    DIR/config.json               the resolved RunPlan (a re-run must match it)
    DIR/history.jsonl             one JSON line per finished epoch (rank 0; = the checkpoint's)
    DIR/steps.csv                 step,epoch,lr,loss for every optimizer step (rank 0's loss)
    DIR/attempts.jsonl            one line per start of the worker group (resumes, restarts)
    DIR/summary.json              what fit() returned, written at the end
    DIR/tensorboard/steps/        per-step lr and loss
    DIR/tensorboard/epochs/       per-epoch metrics and the hyperparameters (HParams tab)
    DIR/checkpoint_epoch_0003/    Ray Train checkpoints: checkpoint.pt (best k + the latest)
    DIR/checkpoint_manager_snapshot.json, ...   Ray Train's own bookkeeping

Re-running with the same directory resumes: Ray Train finds its snapshot, every worker gets the
latest checkpoint from ``ray.train.get_checkpoint()`` and continues at the next epoch with the
lr policy at the exact step it had reached. A worker that dies mid-epoch makes Ray Train restart
the group from that checkpoint (``FailureConfig(max_failures)``); the half-done epoch is redone,
and rank 0 rewrites history.jsonl / steps.csv from the checkpoint and TensorBoard discards the
redone steps (``purge_step``), so no epoch or step is repeated or missing.

Checkpoint (``checkpoint.pt``, ``torch.save`` of a dict of tensors and plain Python values,
loaded with ``weights_only=True``)::

    format "cxr-ray-checkpoint", format_version 1, model_name, model {ModelConfig fields},
    cohort, image_size, model_state (unwrapped state_dict), optimizer (state_dict),
    scheduler (PolicyLR state), epoch (epochs done), step (optimizer steps done),
    history [per-epoch dicts], steps {"lr": [...], "loss": [...]}, plan {RunPlan}

Data: each worker takes its equal share of the cohort's train split, reshuffled every epoch
(equal rows per worker, so every worker takes the same number of DDP steps), and augments it
on its device with :func:`cxr_ray.pipeline.train_transform` for the epoch; the test split is
split without dropping rows, and the scores of all workers are gathered, so test metrics cover
every test image exactly once. By default (``cache``) the driver reads the cohort's two splits
from Parquet once into Ray's object store and the workers map them zero-copy
(:class:`CachedShard`): no Ray Data actors or tasks per run or epoch, which on a small machine
cost more than an epoch of a small cohort. ``cache=False`` streams both splits from Parquet
with Ray Data every epoch (``DataConfig`` sharding), for cohorts larger than the object store.

LR range test (:func:`lr_find`, ``cxr-ray lr-find``): the same workers and training step with
an exponential lr ramp, the loss averaged over the workers every step; writes
``OUT/lr_find.json`` (curve + suggested ``base_lr``/``max_lr``, what ``--lr-bounds`` reads),
``OUT/lr_find.png`` and ``OUT/tensorboard/``.

On a multi-node cluster ``DIR`` must be storage every node sees (rank 0 writes its files there,
Ray Train its checkpoints), like the shard set.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cxr_ray import metrics as M
from cxr_ray import models, pipeline
from cxr_ray.optim import optimizers as optim, presets, schedules
from cxr_ray.data.cohorts import resolve_cohort
from cxr_ray.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "cxr-ray-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_FILE, HISTORY_FILE, STEPS_FILE = "config.json", "history.jsonl", "steps.csv"
ATTEMPTS_FILE, SUMMARY_FILE, TB_DIR = "attempts.jsonl", "summary.json", "tensorboard"
PRESETS = ("paper", "none")
#: Per-epoch metrics a run can keep its best checkpoints by (``checkpoint_metric``).
SCORE_METRICS = {"test_auc": "max", "test_accuracy": "max", "test_loss": "min",
                 "test_sensitivity": "max", "test_specificity": "max", "train_loss": "min"}


# =========================================================================== config
@dataclass
class TrainConfig:
    """One training run (stage 1 or stage 2). Field names are the recipe keys; ``None`` means
    "from the preset" (the study's tables with ``preset="paper"``)."""

    shards: str = ""
    """Shard set made by ``cxr-ray prepare`` (``SHARDS``)."""
    cohort: str = ""
    """Cohort name: one of the 14 diseases or ``OneClass``."""
    image_size: int | None = None
    """Expected training resolution; the shard set must have been prepared at it. None: any."""
    model: str = "mobilenet_v1"
    """Backbone: ``mobilenet_v1``, ``alexnet`` or ``densenet121``."""
    width: float = 1.0
    """MobileNetV1 width multiplier (1.0 for the others)."""
    weights: str | None = None
    """ImageNet backbone weights file (see :mod:`cxr_ray.models`); ignored with ``init_from``."""
    pretrained: str | bool = "auto"
    """Without ``weights``: ``auto`` (torchvision's cache if present), ``true``, ``false``."""
    dropout: float = 0.5
    """Head dropout."""
    epochs: int = 10
    """Epochs to train in total (a resumed run trains the missing ones)."""
    preset: str = "paper"
    """``paper``: unset fields come from the study's Tables 3, 4 and 8; ``none``: generic
    defaults (batch 32, SGD momentum 0.9, constant lr 0.01)."""
    batch_size: int | None = None
    """Global batch size (split over the workers). Paper: Table 3 (32; 16; Hernia 4)."""
    optimizer: str | None = None
    """``sgd``, ``adam`` or ``rmsprop``. Paper: Table 4 (SGD; Hernia Adam)."""
    momentum: float | None = None
    """SGD/RMSprop momentum, Adam beta1. Paper: 0.9."""
    policy: str | None = None
    """lr policy (:data:`cxr_ray.optim.schedules.POLICIES`). Paper: ``time_decay`` (stage 1)."""
    base_lr: float | None = None
    """lr of step 0 / lower CLR bound. Paper: Table 4's lr0, or Table 8's base for CLR."""
    max_lr: float | None = None
    """Upper CLR / one-cycle bound. Paper: Table 8 for the CLR policies."""
    lr_bounds: str | None = None
    """JSON with ``base_lr`` and ``max_lr`` (``cxr-ray lr-find``'s ``lr_find.json``); flags win."""
    step_size_epochs: float | None = None
    """CLR half cycle in epochs (converted to optimizer steps). Paper: 2."""
    decay: float | None = None
    """Keras time decay on top of the policy. Paper: Table 4's for ``time_decay``, else 0."""
    gamma: float = 1.0
    """``exp_range`` amplitude factor per step."""
    pct_start: float = 0.3
    """``one_cycle``: fraction of the run spent rising."""
    init_from: str | None = None
    """Stage 2: start from the weights of this checkpoint (file, checkpoint dir or run dir,
    whose best checkpoint is used); fresh optimizer and policy."""
    workers: int = 1
    """Ray Train workers (DDP ranks)."""
    cpus_per_worker: float | None = None
    """CPUs Ray reserves for each worker; None: 1, or less where the cluster would otherwise
    keep no CPU for Ray Data (2 workers on 2 CPUs: 0.5 each)."""
    threads: int | None = None
    """torch threads per worker; None: with ``cpus_per_worker`` unset and no GPU, the
    cluster's CPUs divided among the workers (the run has the machine to itself), else
    ``cpus_per_worker`` (rounded down, at least 1)."""
    gpu: bool = False
    """One GPU per worker (NCCL, bf16 autocast, channels_last)."""
    amp: bool | None = None
    """bf16 autocast; None: on with a GPU."""
    seed: int = 0
    """Seeds the weights, the shuffle and the augmentation."""
    augment: bool = True
    """Apply the study's Keras augmentation to training images."""
    cache: bool = True
    """Read the cohort's splits from Parquet once per run (in the driver) into Ray's object
    store; every worker maps them zero-copy and takes its share of a new permutation each
    epoch. False: Ray Data streams and shuffles them from Parquet every epoch (for cohorts
    larger than the object store)."""
    checkpoint_metric: str = "test_auc"
    """Per-epoch metric ranking the kept checkpoints (:data:`SCORE_METRICS`)."""
    keep_checkpoints: int = 2
    """Best checkpoints kept by ``checkpoint_metric`` (the latest is always kept too)."""
    max_failures: int = 3
    """Worker-group restarts from the latest checkpoint before the run fails."""
    log_every: int = 20
    """Rank 0 writes buffered per-step losses every this many steps (one device sync each)."""
    address: str | None = None
    """Ray cluster; default ``RAY_ADDRESS``, else a local Ray for the run."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra (custom) resources every worker asks for, on top of its CPUs/GPU, e.g.
    ``{"gpu_node": 0.01}`` to put workers on the autoscaled GPU nodes of ``cluster.yaml``."""
    throttle_s: float = 0.0
    """Testing aid: sleep this long after every optimizer step (lets a test kill a worker
    mid-epoch)."""

    def validate(self) -> "TrainConfig":
        """Raise a :class:`UserError` naming the offending key; returns self."""
        def bad(key: str, why: str) -> UserError:
            return UserError(f"train config {key}: {why}")

        if not self.shards:
            raise bad("shards", "is required (a directory made by cxr-ray prepare)")
        if not self.cohort:
            raise bad("cohort", "is required")
        self.cohort = resolve_cohort(self.cohort)
        if self.model not in models.list_models():
            raise UserError(f"unknown model {self.model!r}; valid: {', '.join(models.list_models())}")
        if self.policy is not None and self.policy not in schedules.POLICIES:
            raise UserError(f"unknown lr policy {self.policy!r}; valid: "
                            f"{', '.join(schedules.POLICIES)}")
        if self.optimizer is not None and self.optimizer not in optim.OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; valid: "
                            f"{', '.join(optim.OPTIMIZERS)}")
        if self.preset not in PRESETS:
            raise bad("preset", f"{self.preset!r} is not one of {', '.join(PRESETS)}")
        for key, low in (("epochs", 1), ("workers", 1), ("keep_checkpoints", 1), ("log_every", 1),
                         ("batch_size", 2), ("image_size", 8), ("threads", 1)):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < low):
                raise bad(key, f"must be an integer >= {low}, got {value!r}")
        for key in ("base_lr", "max_lr", "step_size_epochs", "width", "cpus_per_worker"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and value > 0
                                          and math.isfinite(value)):
                raise bad(key, f"must be a number > 0, got {value!r}")
        if self.decay is not None and not self.decay >= 0:
            raise bad("decay", f"must be >= 0, got {self.decay!r}")
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU") or not (isinstance(amount, (int, float)) and amount > 0):
                raise bad("worker_resources", f"{name} = {amount!r}: custom resource names "
                          "with amounts > 0 (CPU/GPU come from cpus_per_worker/gpu)")
        if self.max_failures < -1:
            raise bad("max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        if self.checkpoint_metric not in SCORE_METRICS:
            raise bad("checkpoint_metric", f"{self.checkpoint_metric!r} is not one of "
                      f"{', '.join(SCORE_METRICS)}")
        if self.batch_size is not None and self.batch_size % self.workers:
            raise bad("batch_size", f"{self.batch_size} (global) is not divisible by "
                      f"workers={self.workers}")
        for key in ("lr_bounds", "init_from", "weights"):
            value = getattr(self, key)
            if value is not None and not Path(value).exists():
                raise bad(key, f"{value}: no such file or directory")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON/TOML ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; an unknown key is a :class:`UserError` naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown train config key(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)


# =========================================================================== plan
@dataclass
class RunPlan:
    """A :class:`TrainConfig` resolved against the shard set and the presets: everything a
    worker needs, as plain values (it travels to the workers and into ``config.json``)."""

    cohort: str
    shards: str
    image_size: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    policy: dict[str, Any]
    epochs: int
    batch_size: int
    worker_batch: int
    workers: int
    steps_per_epoch: int
    train_images: int
    test_images: int
    seed: int
    augment: bool
    amp: bool | None
    threads: int
    gpu: bool
    init_from: str | None
    log_every: int
    run_dir: str = ""
    throttle_s: float = 0.0

    #: Fields a re-run may change without starting a new run.
    MUTABLE = ("epochs", "workers", "worker_batch", "steps_per_epoch", "threads", "run_dir",
               "shards", "log_every", "init_from", "throttle_s")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunPlan":
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        """What makes two plans the same run (everything a re-run may not change)."""
        d = self.to_dict()
        for key in self.MUTABLE:
            d.pop(key, None)
        if self.policy.get("name") == "one_cycle":
            d["policy"] = {k: v for k, v in self.policy.items() if k != "total_steps"}
        return d


def steps_per_epoch(train_images: int, workers: int, worker_batch: int) -> int:
    """Optimizer steps per epoch: every worker gets ``train_images // workers`` rows (equal
    split) in batches of ``worker_batch``; a final batch of one image is dropped (BatchNorm)."""
    rows = train_images // workers
    full, rest = divmod(rows, worker_batch)
    return full + (1 if rest >= 2 else 0)


def plan_run(config: TrainConfig, run_dir: str | Path = "") -> RunPlan:
    """Resolve ``config`` (validated here) into a :class:`RunPlan`; every UserError a run can
    meet before Ray starts is raised here."""
    c = config.validate()
    shards = pipeline.open_shards(c.shards, expect_size=c.image_size)
    size = shards.size
    minimum = models.torchvision_backbones.MIN_INPUT_SIZE.get(c.model, 8)
    if size < minimum:
        raise UserError(f"{c.model} needs images of at least {minimum} px; {shards.root} was "
                        f"prepared at {size}: re-run cxr-ray prepare --size {minimum} or more")
    table = pipeline.cohort_table(shards, c.cohort)
    n_train = int((table["split"] == "train").sum())
    n_test = int((table["split"] == "test").sum())
    paper = c.preset == "paper"
    batch = c.batch_size or (presets.batch_size(c.cohort) if paper else 32)
    if batch % c.workers:
        raise UserError(f"train config batch_size: {batch} (global) is not divisible by "
                        f"workers={c.workers}; pass a batch size that is")
    worker_batch = batch // c.workers
    spe = steps_per_epoch(n_train, c.workers, worker_batch)
    if spe < 1:
        raise UserError(f"cohort {c.cohort} has {n_train} training images in {shards.root}: too "
                        f"few for a batch of {worker_batch} on each of {c.workers} worker(s)")
    if n_test < 1:
        raise UserError(f"cohort {c.cohort} has no test images in {shards.root}")

    stage1 = presets.stage1_recipe(c.cohort)
    opt = optim.OptimizerConfig(
        name=c.optimizer or (stage1.optimizer if paper else "sgd"),
        lr=1.0,  # replaced by the policy's lr of step 0
        momentum=c.momentum if c.momentum is not None else presets.TABLE4_MOMENTUM)
    policy = _resolve_policy(c, paper, stage1, spe)
    init = resolve_init_checkpoint(c.init_from, c) if c.init_from else None
    model_cfg = {"name": c.model, "width": c.width, "in_chans": 1, "dropout": c.dropout,
                 "weights": None if init else c.weights,
                 "pretrained": False if init else c.pretrained}
    if not init:  # fail early on a bad weights file, in the driver
        models.build_model(models.ModelConfig(**model_cfg))
    return RunPlan(
        cohort=c.cohort, shards=str(shards.root.resolve()), image_size=size, model=model_cfg,
        optimizer=dataclasses.asdict(opt), policy=policy.to_dict(), epochs=c.epochs,
        batch_size=batch, worker_batch=worker_batch, workers=c.workers, steps_per_epoch=spe,
        train_images=n_train, test_images=n_test, seed=c.seed, augment=c.augment, amp=c.amp,
        threads=c.threads or 1, gpu=c.gpu,
        init_from=str(init) if init else None, log_every=c.log_every, run_dir=str(run_dir),
        throttle_s=c.throttle_s)


def _resolve_policy(c: TrainConfig, paper: bool, stage1: presets.Stage1Recipe,
                    spe: int) -> schedules.PolicyConfig:
    name = c.policy or ("time_decay" if paper else "constant")
    base, top = c.base_lr, c.max_lr
    if c.lr_bounds:
        bounds = read_lr_bounds(c.lr_bounds)
        base = base if base is not None else bounds["base_lr"]
        top = top if top is not None else bounds["max_lr"]
    row = presets.TABLE8_CLR.get(c.cohort) or (presets.ONE_CLASS_CLR if c.cohort == "OneClass"
                                               else None)
    step_epochs = c.step_size_epochs or (row.step_size_epochs if paper and row else 2.0)
    if name in ("constant", "time_decay"):
        base = base if base is not None else (stage1.lr0 if paper else 0.01)
        decay = c.decay if c.decay is not None else (
            stage1.decay if paper and name == "time_decay" else 0.0)
        if name == "time_decay" and decay == 0:
            raise UserError("policy time_decay needs decay > 0 (--decay)")
        return schedules.PolicyConfig(name=name, base_lr=base, decay=decay).validate()
    if (base is None or top is None) and paper and row is not None and row.policy == name:
        base = base if base is not None else row.base_lr
        top = top if top is not None else row.max_lr
    if name == "one_cycle" and base is None and top is not None:
        base = top / 25.0  # torch OneCycleLR's div_factor
    if base is None or top is None:
        raise UserError(f"policy {name} needs --base-lr and --max-lr (or --lr-bounds FILE from "
                        "cxr-ray lr-find)")
    return schedules.PolicyConfig(
        name=name, base_lr=base, max_lr=top, step_size=max(1, round(step_epochs * spe)),
        gamma=c.gamma, decay=c.decay or 0.0, total_steps=c.epochs * spe,
        pct_start=c.pct_start).validate()


def read_lr_bounds(path: str | Path) -> dict[str, float]:
    """``{"base_lr", "max_lr"}`` from an lr-find JSON (or any JSON with those two keys)."""
    try:
        data = json.loads(Path(path).read_text())
        bounds = {k: float(data[k]) for k in ("base_lr", "max_lr")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--lr-bounds {path}: not a JSON file with numeric base_lr and max_lr "
                        f"({type(exc).__name__}: {exc}); use lr_find.json from cxr-ray lr-find"
                        ) from None
    if not 0 < bounds["base_lr"] <= bounds["max_lr"]:
        raise UserError(f"--lr-bounds {path}: need 0 < base_lr <= max_lr, got {bounds}")
    return bounds


# =========================================================================== checkpoints
def save_checkpoint(path: Path, *, plan: RunPlan, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: schedules.PolicyLR,
                    state: "LoopState") -> None:
    """Write ``checkpoint.pt`` (the format in the module docstring)."""
    torch.save({
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
        "model_name": plan.model["name"], "model": dict(plan.model), "cohort": plan.cohort,
        "image_size": plan.image_size, "model_state": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": state.epoch, "step": state.step, "history": state.history,
        "steps": {"lr": state.lrs, "loss": state.losses}, "plan": plan.to_dict(),
    }, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``checkpoint.pt`` (``weights_only=True``) or a :class:`UserError` saying why not."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path}: no such file") from None
    except Exception as exc:  # unpickling errors come in many types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"checkpoint {path} is not readable as a torch file (weights_only): "
                        f"{type(exc).__name__}: {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a cxr-ray training checkpoint")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint format {ckpt.get('format_version')} (this cxr-ray "
                        f"reads {CHECKPOINT_VERSION})")
    return ckpt


def find_checkpoint(path: str | Path) -> Path:
    """A ``checkpoint.pt`` from a file, a checkpoint directory, or a run directory (its best
    checkpoint per ``summary.json``, else its latest)."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / CHECKPOINT_FILE).is_file():
        return p / CHECKPOINT_FILE
    summary = p / SUMMARY_FILE
    if summary.is_file():
        best = json.loads(summary.read_text()).get("best_checkpoint")
        if best and (Path(best) / CHECKPOINT_FILE).is_file():
            return Path(best) / CHECKPOINT_FILE
    found = sorted(p.glob(f"checkpoint_epoch_*/{CHECKPOINT_FILE}"))
    if found:
        return found[-1]
    raise UserError(f"{p}: no {CHECKPOINT_FILE} there (pass a checkpoint file, a checkpoint "
                    "directory or a run directory of cxr-ray train)")


def resolve_init_checkpoint(path: str | Path, config: TrainConfig) -> Path:
    """Stage 2: the checkpoint file to start from, after checking it fits ``config``'s model."""
    file = find_checkpoint(path)
    ckpt = load_checkpoint(file)
    theirs = ckpt.get("model", {})
    if ckpt.get("model_name") != config.model:
        raise UserError(f"checkpoint {file} is a {ckpt.get('model_name')} model; this run trains "
                        f"{config.model} (pass --model {ckpt.get('model_name')} or another "
                        "checkpoint)")
    if float(theirs.get("width", 1.0)) != float(config.width):
        raise UserError(f"checkpoint {file} has width {theirs.get('width')}; this run uses "
                        f"width {config.width}")
    if ckpt.get("cohort") != config.cohort:
        log.warning("stage 2 of %s starts from a %s checkpoint (%s)", config.cohort,
                    ckpt.get("cohort"), file)
    return file.resolve()


def _unwrap(model: torch.nn.Module) -> models.CxrClassifier:
    return getattr(model, "module", model)


# =========================================================================== rank 0's files
@dataclass
class LoopState:
    """Where the loop is; restored from a checkpoint on resume."""

    epoch: int = 0
    """Epochs finished."""
    step: int = 0
    """Optimizer steps taken (= index of the next step)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    """lr in force at every step (rank 0)."""
    losses: list[float] = field(default_factory=list)
    """Rank 0's training loss (BCE + penalty) at every step."""


class RunLog:
    """Rank 0's view of the run directory: TensorBoard, history.jsonl, steps.csv. Every method
    is a no-op on other ranks."""

    def __init__(self, plan: RunPlan, state: LoopState, rank: int) -> None:
        self.on = rank == 0 and bool(plan.run_dir)
        self.dir = Path(plan.run_dir)
        self.state, self.every = state, plan.log_every
        self._pending: list[tuple[int, float, torch.Tensor]] = []
        if not self.on:
            return
        from torch.utils.tensorboard import SummaryWriter

        resumed = state.step > 0
        # purge_step: TensorBoard drops what an interrupted attempt logged past the checkpoint.
        self.tb_steps = SummaryWriter(self.dir / TB_DIR / "steps", flush_secs=10,
                                      purge_step=state.step if resumed else None)
        self.tb_epochs = SummaryWriter(self.dir / TB_DIR / "epochs", flush_secs=10,
                                       purge_step=state.epoch + 1 if resumed else None)
        if not resumed:
            self._hparams(plan)
        self.write_files()  # truncate what an interrupted attempt wrote past the checkpoint
        with open(self.dir / ATTEMPTS_FILE, "a") as fh:
            fh.write(json.dumps({"time": time.time(), "resumed_from_epoch": state.epoch,
                                 "step": state.step, "workers": plan.workers,
                                 "pid": os.getpid()}) + "\n")

    def _hparams(self, plan: RunPlan) -> None:
        from torch.utils.tensorboard.summary import hparams

        p = plan.policy
        hp = {"cohort": plan.cohort, "model": plan.model["name"], "width": plan.model["width"],
              "optimizer": plan.optimizer["name"], "policy": p["name"], "base_lr": p["base_lr"],
              "max_lr": p["max_lr"] or 0.0, "step_size": p["step_size"] or 0, "decay": p["decay"],
              "batch_size": plan.batch_size, "epochs": plan.epochs, "workers": plan.workers,
              "image_size": plan.image_size, "stage": 2 if plan.init_from else 1}
        for summary in hparams(hp, {f"test/{k}": 0.0 for k in ("accuracy", "auc", "loss")}):
            self.tb_epochs.file_writer.add_summary(summary)
        self.tb_epochs.add_text("run_plan", f"```\n{json.dumps(plan.to_dict(), indent=2)}\n```")

    def step(self, step: int, lr: float, loss: torch.Tensor) -> None:
        if self.on:
            self._pending.append((step, lr, loss.detach()))
            if len(self._pending) >= self.every:
                self.flush_steps()

    def flush_steps(self) -> None:
        if not self.on or not self._pending:
            return
        losses = torch.stack([t for _, _, t in self._pending]).float().cpu().tolist()
        for (step, lr, _), loss in zip(self._pending, losses):
            self.tb_steps.add_scalar("train/lr", lr, step)
            self.tb_steps.add_scalar("train/loss", loss, step)
            self.state.lrs.append(lr)
            self.state.losses.append(loss)
        self._pending.clear()

    def epoch(self, record: dict[str, Any]) -> None:
        """TensorBoard scalars of one finished epoch (written before the checkpoint)."""
        if not self.on:
            return
        self.flush_steps()
        for key, value in record.items():
            if isinstance(value, (int, float)) and value is not None and key != "epoch":
                group, _, name = key.partition("_")
                tag = f"{group}/{name}" if group in ("train", "test") else f"perf/{key}"
                self.tb_epochs.add_scalar(tag, value, record["epoch"])
        self.tb_epochs.flush()
        self.tb_steps.flush()

    def write_files(self) -> None:
        """history.jsonl and steps.csv from the state (atomically replaced)."""
        if not self.on:
            return
        _atomic_write(self.dir / HISTORY_FILE,
                      "".join(json.dumps(r) + "\n" for r in self.state.history))
        ends = [r["step"] for r in self.state.history]  # step count at each epoch's end
        rows = ["step,epoch,lr,loss\n"] + [
            f"{i},{bisect.bisect_right(ends, i) + 1},{lr!r},{loss!r}\n"
            for i, (lr, loss) in enumerate(zip(self.state.lrs, self.state.losses))]
        _atomic_write(self.dir / STEPS_FILE, "".join(rows))

    def close(self) -> None:
        if self.on:
            self.flush_steps()
            self.tb_steps.close()
            self.tb_epochs.close()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# =========================================================================== the worker
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: setup, restore, then train → evaluate → report."""
    import ray.train  # Ray-specific: context, shards, checkpoints

    plan = RunPlan.from_dict(config["plan"])
    rank = ray.train.get_context().get_world_rank()
    model, optimizer, scheduler, device, amp = setup(plan)
    state = restore(ray.train.get_checkpoint(), model, optimizer, scheduler)  # Ray
    runlog = RunLog(plan, state, rank)
    train_shard = worker_split(config.get("data"), "train", plan.seed)
    test_shard = worker_split(config.get("data"), "test", plan.seed)
    for epoch in range(state.epoch, plan.epochs):
        t0 = time.perf_counter()
        train = train_epoch(plan, model, optimizer, scheduler, train_shard, epoch, state,
                            runlog, device, amp)
        t1 = time.perf_counter()
        test = evaluate(model, test_shard, device, amp, expect=plan.test_images)
        record = epoch_record(plan, state, epoch, train, test, t1 - t0, time.perf_counter() - t1)
        runlog.epoch(record)
        state.epoch, state.history = epoch + 1, state.history + [record]
        report(record, plan, model, optimizer, scheduler, state, rank)  # Ray
        runlog.write_files()
    runlog.close()


def setup(plan: RunPlan):
    """Model (DDP-wrapped, on the worker's device), optimizer and lr policy for ``plan``."""
    import ray.train.torch  # Ray-specific: device and DDP

    torch.set_num_threads(plan.threads)
    torch.manual_seed(plan.seed)
    device = ray.train.torch.get_device()
    amp = plan.amp if plan.amp is not None else device.type == "cuda"
    model = initial_model(plan)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # Ray: to device, DDP when workers > 1
    optimizer = optim.optimizer_from_config(model.parameters(),
                                            optim.OptimizerConfig(**plan.optimizer))
    scheduler = schedules.PolicyLR(optimizer, schedules.PolicyConfig.from_dict(plan.policy))
    return model, optimizer, scheduler, device, amp


def initial_model(plan: RunPlan) -> models.CxrClassifier:
    """The model before training: ImageNet/random init, or stage 2's stage-1 weights."""
    model = models.build_model(models.ModelConfig(**plan.model))
    if plan.init_from:  # fresh optimizer and policy; only the weights (and BN statistics)
        model.load_state_dict(load_checkpoint(plan.init_from)["model_state"])
    return model


def restore(checkpoint, model, optimizer, scheduler) -> LoopState:
    """Load a Ray checkpoint (if any) into model, optimizer and policy; the loop state."""
    if checkpoint is None:
        return LoopState()
    with checkpoint.as_directory() as folder:
        ckpt = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    _unwrap(model).load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    steps = ckpt["steps"]
    log.info("resuming at epoch %d, step %d (lr %.6g)", ckpt["epoch"], ckpt["step"],
             scheduler.get_last_lr()[0])
    return LoopState(epoch=ckpt["epoch"], step=ckpt["step"], history=list(ckpt["history"]),
                     lrs=list(steps["lr"]), losses=list(steps["loss"]))


def train_step(model, optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool):
    """One optimizer step: BCE with logits + the head's Keras penalties. → (loss, bce, logits)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x).float()
    bce = F.binary_cross_entropy_with_logits(logits, y)
    loss = bce + _unwrap(model).penalty().float()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), bce.detach(), logits.detach()


def train_epoch(plan: RunPlan, model, optimizer, scheduler, shard, epoch: int,
                state: LoopState, runlog: RunLog, device, amp: bool) -> dict[str, float]:
    """One pass over this worker's train shard; the lr policy steps after every batch.
    → global sums (all-reduced): bce, loss, correct, images, steps."""
    from cxr_ray.data.augment import AugmentConfig

    model.train()
    aug = AugmentConfig() if plan.augment else AugmentConfig.none()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # bce·n, correct, n, loss·n
    steps, cpu0 = 0, time.process_time()
    batches = _Timed(_batches(shard, plan.worker_batch, device, epoch))
    for batch in batches:
        if len(batch["label"]) < 2:  # BatchNorm1d in the head needs two images
            continue
        x, y = pipeline.train_transform(batch, epoch=epoch, seed=plan.seed, cfg=aug, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        lr = scheduler.get_last_lr()[0]
        loss, bce, logits = train_step(model, optimizer, x, y, amp)
        scheduler.step()
        runlog.step(state.step, lr, loss)
        n = y.numel()
        sums += torch.stack([bce * n, ((logits > 0) == (y > 0.5)).sum(), torch.tensor(
            float(n), device=device), loss * n]).double()
        state.step += 1
        steps += 1
        if plan.throttle_s:
            time.sleep(plan.throttle_s)
    if steps != plan.steps_per_epoch:
        log.warning("epoch %d: %d steps on this worker, planned %d", epoch + 1, steps,
                    plan.steps_per_epoch)
    extra = torch.tensor([time.process_time() - cpu0, batches.wait], dtype=torch.float64,
                         device=device)
    sums = torch.cat([sums, extra])
    _all_reduce(sums)
    return {"bce": float(sums[0]), "correct": float(sums[1]), "images": float(sums[2]),
            "loss": float(sums[3]), "cpu_seconds": float(sums[4]),
            "data_wait_seconds": float(sums[5]) / _world_size()}


@torch.no_grad()
def evaluate(model, shard, device, amp: bool, expect: int | None = None) -> dict[str, float]:
    """Scores of this worker's test shard, gathered from every worker and de-duplicated by
    image id, → loss and the metrics of :mod:`cxr_ray.metrics` over the whole test split."""
    net = _unwrap(model)  # no DDP in evaluation: shards may differ in size
    _broadcast_buffers(net)  # every rank evaluates rank 0's model, the one checkpointed
    net.eval()
    ids, logits, labels = [], [], []
    for batch in _batches(shard, 256, device):
        x, y = pipeline.eval_transform(batch, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits.append(net(x).float().cpu())
        ids.append(torch.as_tensor(batch["image_id"]).cpu())
        labels.append(y.cpu())
    local = [torch.cat(t).numpy() if t else np.zeros(0) for t in (ids, logits, labels)]
    ids_all, z, y = (np.concatenate(parts) for parts in zip(*_all_gather(local)))
    _, first = np.unique(ids_all.astype(np.int64), return_index=True)
    z, y = z[first], y[first]
    if expect is not None and len(first) != expect:
        log.warning("evaluated %d distinct test images, expected %d", len(first), expect)
    probs = 1.0 / (1.0 + np.exp(-z))
    return {**M.binary_metrics(probs, y), "loss": M.bce_with_logits(z, y)}


def epoch_record(plan: RunPlan, state: LoopState, epoch: int, train: dict[str, float],
                 test: dict[str, float], train_s: float, eval_s: float) -> dict[str, Any]:
    """The history line of one epoch (NaN → None so the JSON stays strict)."""
    n = max(train["images"], 1.0)
    prev = state.history[-1]["elapsed_seconds"] if state.history else 0.0
    record = {
        "epoch": epoch + 1, "step": state.step,
        "train_loss": train["bce"] / n, "train_objective": train["loss"] / n,
        "train_accuracy": train["correct"] / n, "train_images": int(train["images"]),
        "test_loss": test["loss"], "test_accuracy": test["accuracy"], "test_auc": test["auc"],
        "test_sensitivity": test["sensitivity"], "test_specificity": test["specificity"],
        "test_images": int(test["images"]),
        "lr_last": float(schedules.lr_at(schedules.PolicyConfig.from_dict(plan.policy),
                                         state.step - 1)) if state.step else None,
        "images_per_s": train["images"] / train_s if train_s > 0 else None,
        "train_seconds": train_s, "train_cpu_seconds": train["cpu_seconds"],
        "data_wait_seconds": train["data_wait_seconds"],
        "eval_seconds": eval_s, "epoch_seconds": train_s + eval_s,
        "elapsed_seconds": prev + train_s + eval_s, "workers": plan.workers,
        "time": time.time(),
    }
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def report(record: dict[str, Any], plan: RunPlan, model, optimizer, scheduler,
           state: LoopState, rank: int) -> None:
    """``ray.train.report`` the epoch's metrics with a checkpoint written by rank 0."""
    import ray.train  # Ray-specific

    metric = dict(record)
    for key, mode in SCORE_METRICS.items():  # Ray ranks checkpoints by a number, never None
        if metric.get(key) is None:
            metric[key] = -math.inf if mode == "max" else math.inf
    name = f"checkpoint_epoch_{state.epoch:04d}"
    if rank != 0:
        ray.train.report(metric, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder) / CHECKPOINT_FILE, plan=plan, model=model,
                        optimizer=optimizer, scheduler=scheduler, state=state)
        ray.train.report(metric, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=name)


def _batches(shard, batch_size: int, device: torch.device, epoch: int = 0):
    """The worker's shard (a :class:`CachedShard` or a Ray Data shard) as dicts of CPU
    tensors (pinned for a GPU): one pass, in ``epoch``'s order."""
    if isinstance(shard, CachedShard):
        return shard.iter_torch_batches(batch_size, epoch=epoch, pin_memory=device.type == "cuda")
    return shard.iter_torch_batches(batch_size=batch_size, device="cpu", prefetch_batches=2,
                                    pin_memory=device.type == "cuda")


class CachedShard:
    """A worker's part of a split the driver put into Ray's object store (``cache=True``).

    ``shuffle`` (train): every epoch a permutation of the whole split seeded by (seed, epoch),
    cut into ``world`` equal parts (``DistributedSampler`` semantics: the same number of rows
    on every worker, up to world-1 rows left out, a different few each epoch); otherwise
    (test) rows ``rank::world``, so the workers together cover the split exactly once.
    """

    def __init__(self, arrays: tuple[np.ndarray, np.ndarray, np.ndarray], *, rank: int,
                 world: int, seed: int, shuffle: bool) -> None:
        self.images, self.ids, self.labels = arrays
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle

    def indices(self, epoch: int) -> np.ndarray:
        n = len(self.ids)
        if not self.shuffle:
            return np.arange(self.rank, n, self.world)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        per = n // self.world
        return order[self.rank * per:(self.rank + 1) * per]

    def iter_torch_batches(self, batch_size: int, *, epoch: int = 0,
                           pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        idx = self.indices(epoch)
        for start in range(0, len(idx), batch_size):
            rows = np.sort(idx[start:start + batch_size]) if not self.shuffle else \
                idx[start:start + batch_size]
            batch = {"image": torch.from_numpy(self.images[rows]),
                     "image_id": torch.from_numpy(self.ids[rows]),
                     "label": torch.from_numpy(self.labels[rows])}
            if pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch


def worker_split(data: dict[str, Any] | None, name: str, seed: int) -> Any:
    """This worker's shard of split ``name``: from the object store when the driver cached
    the splits (``data``), else Ray Data's ``get_dataset_shard``."""
    import ray
    import ray.train  # Ray-specific

    if data is None:
        return ray.train.get_dataset_shard(name)
    ctx = ray.train.get_context()
    return CachedShard(ray.get(data[name]), rank=ctx.get_world_rank(),
                       world=ctx.get_world_size(), seed=seed, shuffle=name == "train")


class _Timed:
    """An iterator wrapper that adds up the seconds spent waiting for the next batch."""

    def __init__(self, iterable: Any) -> None:
        self._it, self.wait = iter(iterable), 0.0

    def __iter__(self) -> "_Timed":
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.wait += time.perf_counter() - t0


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _all_reduce(t: torch.Tensor) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)


def _broadcast_buffers(net: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics to every rank (DDP syncs them only at the next forward)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in net.buffers():
            torch.distributed.broadcast(buffer, 0)


def _all_gather(obj: Any) -> list[Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]



# =========================================================================== LR range test
LR_FIND_FILE, LR_FIND_PLOT, LR_FIND_RAW = "lr_find.json", "lr_find.png", "lr_find_raw.json"


def lr_find_loop_per_worker(config: dict[str, Any]) -> None:
    """The LR range test on every worker: the training step of :func:`train_loop_per_worker`
    with the lr of :meth:`LrRangeTest.lr_at`, the loss averaged over the workers, and the
    stop decision (the same on every rank) from :meth:`LrRangeTest.record`."""
    import ray.train  # Ray-specific: context and shard

    from cxr_ray.data.augment import AugmentConfig
    from cxr_ray.optim.lr_finder import LrRangeConfig, LrRangeTest

    plan = RunPlan.from_dict(config["plan"])
    test = LrRangeTest(LrRangeConfig(**config["range"]))
    model, optimizer, _, device, amp = setup(plan)
    shard = worker_split(config.get("data"), "train", plan.seed)
    aug = AugmentConfig() if plan.augment else AugmentConfig.none()
    world = ray.train.get_context().get_world_size()
    step, epoch, stop = 0, 0, False
    while not stop:
        for batch in _batches(shard, plan.worker_batch, device, epoch):
            if len(batch["label"]) < 2:
                continue
            x, y = pipeline.train_transform(batch, epoch=epoch, seed=plan.seed, cfg=aug,
                                            device=device)
            for group in optimizer.param_groups:
                group["lr"] = test.lr_at(step)
            loss, _, _ = train_step(model, optimizer, x, y, amp)
            _all_reduce(loss)
            stop = test.record(step, float(loss) / world)
            step += 1
            if stop:
                break
        epoch += 1
    if ray.train.get_context().get_world_rank() == 0:
        _atomic_write(Path(plan.run_dir) / LR_FIND_RAW, json.dumps(
            {"losses": test.losses, "stop_reason": test.stop_reason, "world_size": world}))


def lr_find(config: TrainConfig, *, out: str | Path, num_steps: int | None = None,
            **settings: Any) -> dict[str, Any]:
    """Run the LR range test (SPEC §7) for ``config``'s cohort and model (``init_from``
    included) inside Ray Train, and write ``out/lr_find.json`` (the curve, every rule's
    suggestion and the chosen ``base_lr``/``max_lr``: ``train --lr-bounds`` reads it),
    ``out/lr_find.png`` and ``out/tensorboard/``. Returns the JSON's dict.

    ``settings``: :class:`cxr_ray.optim.lr_finder.LrRangeConfig` fields (``min_lr``, ``max_lr`` —
    the ramp's ends —, ``rule``, ``smoothing``, ...). ``num_steps`` defaults to
    ``config.epochs`` epochs' worth of steps, at least 50 (the study: 1–5 epochs).
    """
    from cxr_ray.optim.lr_finder import LrRangeConfig, LrRangeTest

    out = Path(out).expanduser().resolve()
    fixed = dataclasses.replace(config, policy="constant", base_lr=1e-7, max_lr=None,
                                lr_bounds=None, decay=0.0, step_size_epochs=None)
    plan = plan_run(fixed, out)
    settings = {k: v for k, v in settings.items() if v is not None}
    rng = LrRangeConfig(num_steps=num_steps or max(50, config.epochs * plan.steps_per_epoch),
                        **settings).validate()
    out.mkdir(parents=True, exist_ok=True)
    (out / LR_FIND_RAW).unlink(missing_ok=True)
    _run_trainer(fixed, plan, out, loop=lr_find_loop_per_worker,
                 loop_config={"range": dataclasses.asdict(rng)})
    raw = json.loads((out / LR_FIND_RAW).read_text())
    test = LrRangeTest(rng)  # replay the averaged losses: the same curve and stop as rank 0
    for i, loss in enumerate(raw["losses"]):
        test.record(i, loss)
    test.stop_reason = raw["stop_reason"] or test.stop_reason
    result = test.result()
    data = {**result.to_dict(), "cohort": plan.cohort, "model": plan.model,
            "init_from": plan.init_from, "batch_size": plan.batch_size,
            "workers": plan.workers, "steps_per_epoch": plan.steps_per_epoch}
    _atomic_write(out / LR_FIND_FILE, json.dumps(data, indent=2) + "\n")
    result.plot(out / LR_FIND_PLOT, title=f"LR range test: {plan.cohort}, {plan.model['name']}")
    _lr_find_tensorboard(out, result)
    log.info("LR range test of %s: %d steps (%s); %s rule: base_lr %.3g, max_lr %.3g",
             plan.cohort, len(result.lrs), result.stop_reason, result.rule, result.base_lr,
             result.max_lr)
    return data


def _lr_find_tensorboard(out: Path, result: Any) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(out / TB_DIR) as tb:
        for i, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
            tb.add_scalar("lr_find/lr", lr, i)
            tb.add_scalar("lr_find/loss", loss, i)
            tb.add_scalar("lr_find/smoothed_loss", smooth, i)
        tb.add_text("lr_find/suggestion", json.dumps(
            {"base_lr": result.base_lr, "max_lr": result.max_lr, "rule": result.rule,
             "suggestions": result.suggestions, "stop_reason": result.stop_reason}))


# =========================================================================== the driver
@dataclass
class TrainSummary:
    """What :func:`fit` returns (and writes to ``DIR/summary.json``)."""

    run_dir: str
    """``storage_path/name``."""
    history: list[dict[str, Any]]
    """Every finished epoch, in order (also ``DIR/history.jsonl``)."""
    best_checkpoint: str | None
    """Directory of the kept checkpoint with the best ``checkpoint_metric``."""
    last_checkpoint: str | None
    """Directory of the latest checkpoint."""
    checkpoint_metric: str
    best_metric: float | None
    wall_seconds: float
    """This call, start to end (start-up and tear-down included)."""
    images: int
    """Training images processed in this call, all workers together."""
    compute_seconds: float
    """Sum of the epochs' train + eval seconds over the whole run (resumes included)."""
    resumed_from_epoch: int
    """Epochs already done when this call started."""
    startup_seconds: float | None = None
    """From the call to the start of the training loop (Ray, data, workers, restore);
    None when nothing was left to train."""
    teardown_seconds: float | None = None
    """From the end of the last epoch to the return of this call (checkpoint, shutdown)."""
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Ray Train controller intervals (seconds) used unless the environment sets them: the
#: defaults (2 s health check, 5 s preemption poll) add seconds to every short run.
FAST_CONTROL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
#: Also when cxr-ray starts the local Ray itself (one machine, nothing to preempt): no
#: preemption-watcher actor per fit (one Python process, ~2.5 CPU-seconds here, saved).
LOCAL_CONTROL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def set_control_env(address: str | None) -> None:
    """Put :data:`FAST_CONTROL_ENV` (and, for a local Ray started here,
    :data:`LOCAL_CONTROL_ENV`) into ``os.environ`` unless already set: Ray Train's controller
    reads them from the process that calls ``fit()``, and a local Ray's workers (the sweep's
    trials) inherit them."""
    import ray  # Ray-specific

    local = not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    for key, value in {**FAST_CONTROL_ENV, **(LOCAL_CONTROL_ENV if local else {})}.items():
        os.environ.setdefault(key, value)


def fit(config: TrainConfig, *, storage_path: str | Path, name: str,
        resume: bool = True) -> TrainSummary:
    """Train ``config`` as the run ``storage_path/name``; re-running resumes it.

    ``resume=False`` refuses a directory that already holds a run. Starts a local Ray unless
    one is initialised (a Tune trial's, a test's) or ``config.address``/``RAY_ADDRESS`` names
    a cluster.
    """
    t0, started = time.perf_counter(), time.time()
    run_dir = Path(storage_path).expanduser().resolve() / name
    plan = plan_run(config, run_dir)
    done = _check_run_dir(run_dir, plan, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / CONFIG_FILE, json.dumps(plan.to_dict(), indent=2) + "\n")
    if done < plan.epochs:
        _run_trainer(config, plan, run_dir)
    history = _read_history(run_dir)
    if len(history) != plan.epochs or [r["epoch"] for r in history] != list(
            range(1, plan.epochs + 1)):
        raise RuntimeError(f"{run_dir}: history holds epochs {[r['epoch'] for r in history]}, "
                           f"expected 1..{plan.epochs}")
    summary = _summarize(config, plan, run_dir, history, done, time.perf_counter() - t0, started)
    _atomic_write(run_dir / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _check_run_dir(run_dir: Path, plan: RunPlan, resume: bool) -> int:
    """Epochs already done in ``run_dir``; UserError when it holds another run."""
    if not (run_dir / CONFIG_FILE).is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()) and not (
                run_dir / "checkpoint_manager_snapshot.json").exists():
            raise UserError(f"--out {run_dir} is not empty and holds no cxr-ray run; choose a "
                            "new directory")
        return 0
    if not resume:
        raise UserError(f"{run_dir} already holds a run; re-run without --no-resume to resume "
                        "it, or choose another --out")
    old = RunPlan.from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
    mine, theirs = plan.identity(), old.identity()
    if mine != theirs:
        raise UserError(f"{run_dir} holds a run with other settings ({_diff(theirs, mine)}); "
                        "re-run with the same settings to resume it, or choose another --out")
    done = len(_read_history(run_dir))
    if done > plan.epochs:
        raise UserError(f"{run_dir} already trained {done} epochs, more than --epochs "
                        f"{plan.epochs}")
    if done:
        log.info("%s: resuming after epoch %d of %d", run_dir, done, plan.epochs)
    return done


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """``key: old → new`` for every differing key, nested dicts flattened (``policy.max_lr``)."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(_diff(a, b, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key} {a!r} → {b!r}")
    return "; ".join(parts)


def _run_trainer(config: TrainConfig, plan: RunPlan, run_dir: Path, *,
                 loop: Any = None, loop_config: dict[str, Any] | None = None) -> None:
    """Build and fit the ``TorchTrainer``. Every Ray Train line of the driver is here."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    set_control_env(config.address)
    with ray_session(config.address):
        cpus, plan.threads = _cpu_split(config, plan)
        t0 = time.perf_counter()
        loop_config = {**(loop_config or {}), "plan": plan.to_dict()}
        if config.cache:  # the splits in the object store; the workers shard them
            sh = pipeline.open_shards(plan.shards)
            loop_config["data"] = {split: ray.put(read_split(sh, plan.cohort, split))
                                   for split in ("train", "test")}
            datasets, dataset_config = None, None
        else:  # Ray Data streams (and shuffles) them from the Parquet shards every epoch
            datasets = cohort_datasets(plan.shards, plan.cohort, seed=plan.seed)
            dataset_config = TrainTestSplit()
        log.info("cohort %s: %d train / %d test images ready in %.1f s", plan.cohort,
                 plan.train_images, plan.test_images, time.perf_counter() - t0)
        trainer = TorchTrainer(
            loop or train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if plan.gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=plan.workers, use_gpu=plan.gpu,
                resources_per_worker={"CPU": cpus, **({"GPU": 1} if plan.gpu else {}),
                                      **config.worker_resources}),
            run_config=ray.train.RunConfig(
                name=run_dir.name, storage_path=str(run_dir.parent),
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=config.keep_checkpoints,
                    checkpoint_score_attribute=config.checkpoint_metric,
                    checkpoint_score_order=SCORE_METRICS[config.checkpoint_metric])),
            datasets=datasets,
            dataset_config=dataset_config,
        )
        try:
            with _progress(run_dir, plan.epochs) if loop is None else contextlib.nullcontext():
                trainer.fit()
        except ray.train.TrainingFailedError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            cause = lines[-1] if lines else type(exc).__name__
            if loop is not None:
                raise UserError(f"the run in {run_dir} failed: {cause}") from exc
            done = len(_read_history(run_dir))
            raise UserError(f"training failed after epoch {done} of {plan.epochs} ({cause}); "
                            f"re-run the same command to resume from the last checkpoint"
                            ) from exc


def cohort_datasets(shards: str, cohort: str, *, seed: int) -> dict[str, Any]:
    """``{"train", "test"}`` Ray Datasets of a cohort streamed from the Parquet shards
    (``cache=False``): ``image`` uint8 (H, W), ``image_id``, ``label``; train shuffled with a
    new seeded permutation every epoch (:func:`cxr_ray.pipeline.cohort_dataset`)."""
    train = pipeline.cohort_dataset(shards, cohort, "train", seed=seed)
    test = pipeline.cohort_dataset(shards, cohort, "test")
    for ds in (train, test):  # a progress bar per epoch and split is only noise
        ds.context.enable_progress_bars = False
        ds.context.print_on_execution_start = False
    return {"train": train, "test": test}


def read_split(shards: pipeline.Shards, cohort: str, split: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One cohort split read in this process: uint8 images (n, H, W), image ids, float32
    labels (the columns of :func:`cxr_ray.pipeline.cohort_dataset`, in shard order)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from cxr_ray.data import decode

    table = pipeline.cohort_table(shards, cohort, split)
    ids = table["image_id"].to_numpy(np.int64)
    data = pads.dataset(str(shards.images_dir), format="parquet").to_table(
        columns=["image_id", "pixels"], filter=pads.field("image_id").isin(pa.array(ids)))
    got = data.column("image_id").to_numpy()
    order = np.argsort(ids)
    where = order[np.searchsorted(ids, got, sorter=order).clip(0, len(ids) - 1)]
    if len(got) != len(ids) or not np.array_equal(ids[where], got) or len(set(got)) != len(got):
        raise UserError(f"{shards.root}: the {cohort} {split} split lists {len(ids)} images, "
                        f"the shards hold {len(set(got) & set(ids))} of them; re-run "
                        f"cxr-ray prepare --force --out {shards.root}")
    images = decode.pixels_to_numpy(data.column("pixels"), shards.size)
    return images, got.astype(np.int64), table["label"].to_numpy(np.float32)[where]


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """:func:`cxr_ray.pipeline.ray_session`, except that a local Ray started here does not
    forward its workers' logs (they stay in Ray's session log directory; the driver prints
    one line per epoch instead): without a dashboard, Ray Train's placement-group cleaner
    would print a State-API warning every second."""
    import ray  # Ray-specific

    if ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"):
        with pipeline.ray_session(address):
            yield
        return
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """One line per epoch for the console."""
    def f(key: str, fmt: str = ".4f") -> str:
        v = record.get(key)
        return "n/a" if v is None else format(v, fmt)

    return (f"epoch {record['epoch']}/{epochs}: train loss {f('train_loss')} acc "
            f"{f('train_accuracy')} | test loss {f('test_loss')} acc {f('test_accuracy')} auc "
            f"{f('test_auc')} sens {f('test_sensitivity')} spec {f('test_specificity')} | "
            f"{f('images_per_s', '.1f')} img/s, {f('epoch_seconds', '.1f')} s")


@contextlib.contextmanager
def _progress(run_dir: Path, epochs: int) -> Iterator[None]:
    """Log each epoch as rank 0 appends it to history.jsonl (the driver sees no worker logs)."""
    import threading

    stop = threading.Event()
    seen = len(_read_history(run_dir))

    def watch() -> None:
        nonlocal seen
        while not stop.wait(1.0):
            try:
                history = _read_history(run_dir)
            except (OSError, ValueError):
                continue  # mid-replace
            for record in history[seen:]:
                log.info("%s", format_epoch(record, epochs))
            seen = max(seen, len(history)) if len(history) >= seen else len(history)

    thread = threading.Thread(target=watch, name="cxr-ray-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _cpu_split(config: TrainConfig, plan: RunPlan) -> tuple[float, int]:
    """CPUs Ray reserves per worker and torch threads per worker (see the config fields).

    Ray Data needs a CPU of its own for reading and shuffling: with every CPU reserved by
    the workers it would wait forever.
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 1))
    cpus = config.cpus_per_worker
    if cpus is None:
        cpus = 1.0 if total - plan.workers >= 1 or plan.gpu else max(
            0.1, (total - 1) / plan.workers)
    if not plan.gpu and plan.workers * cpus > total:
        raise UserError(f"{plan.workers} workers × {cpus:g} CPUs exceed the cluster's "
                        f"{total:g} CPUs; lower --workers or --cpus-per-worker")
    if config.threads:
        threads = config.threads
    elif config.cpus_per_worker is None and not plan.gpu:  # the run has the machine to itself
        threads = max(1, int(total // plan.workers))
    else:  # e.g. concurrent sweep trials: stay within the reservation
        threads = max(1, int(cpus))
    return cpus, threads


def _train_test_split_class():
    from ray.train import DataConfig

    class _TrainTestSplit(DataConfig):
        """Shard ``train`` equally (same number of DDP steps on every worker; up to K-1 images
        of an epoch are left out, a different few each epoch) and ``test`` without dropping
        any row, so that the gathered test scores cover the split exactly once."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = super().configure({k: v for k, v in datasets.items() if k != "test"},
                                    world_size, worker_handles, worker_node_ids, **kwargs)
            if "test" in datasets:
                test = datasets["test"].copy(datasets["test"])
                test.context.execution_options = self._resolve_execution_options("test")
                for i, split in enumerate(test.streaming_split(world_size, equal=False)):
                    out[i]["test"] = split
            return out

    return _TrainTestSplit


def TrainTestSplit():  # noqa: N802 - a class factory (keeps `import ray` out of module import)
    """The ``DataConfig`` of a run: equal train shards, complete test shards."""
    return _train_test_split_class()()


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summarize(config: TrainConfig, plan: RunPlan, run_dir: Path, history: list[dict[str, Any]],
               done: int, wall: float, started: float) -> TrainSummary:
    kept = {int(p.name.rsplit("_", 1)[1]): p for p in run_dir.glob("checkpoint_epoch_*")
            if (p / CHECKPOINT_FILE).is_file()}
    metric, mode = config.checkpoint_metric, SCORE_METRICS[config.checkpoint_metric]
    scored = [(r[metric], r["epoch"]) for r in history
              if r["epoch"] in kept and r.get(metric) is not None]
    best = (max if mode == "max" else min)(scored) if scored else None
    return TrainSummary(
        run_dir=str(run_dir), history=history,
        best_checkpoint=str(kept[best[1]]) if best else None,
        last_checkpoint=str(kept[max(kept)]) if kept else None,
        checkpoint_metric=metric, best_metric=best[0] if best else None,
        wall_seconds=wall, images=sum(r["train_images"] for r in history[done:]),
        compute_seconds=sum(r["epoch_seconds"] for r in history),
        resumed_from_epoch=done, plan=plan.to_dict(),
        startup_seconds=_first_attempt_after(run_dir, started),
        teardown_seconds=(started + wall - history[-1]["time"]) if done < len(history)
        and "time" in history[-1] else None)


def _first_attempt_after(run_dir: Path, started: float) -> float | None:
    path = run_dir / ATTEMPTS_FILE
    if not path.is_file():
        return None
    times = [json.loads(line)["time"] for line in path.read_text().splitlines() if line.strip()]
    later = [t for t in times if t >= started]
    return min(later) - started if later else None


__all__ = ["CHECKPOINT_FILE", "lr_find", "lr_find_loop_per_worker", "LoopState", "RunPlan", "TrainConfig", "TrainSummary",
           "evaluate", "find_checkpoint", "fit", "load_checkpoint", "plan_run",
           "read_lr_bounds", "save_checkpoint", "steps_per_epoch", "train_loop_per_worker"]

"""What one training run trains: :class:`TrainConfig` (the recipe keys and CLI flags, one
docstring per field) resolved by :func:`plan_run` against the shard set and the study's tables
(batch size, optimizer and lr of stage 1, the CLR settings: docs/study.md §2, §5, §6) into the
plain :class:`RunPlan` that travels to every rank and into ``config.json``.

No Ray, no model training: every user error a run can meet before it starts is raised here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_ray import models, storage
from cxr_ray.data import shards as shard_io
from cxr_ray.data.cohorts import resolve_cohort
from cxr_ray.errors import UserError
from cxr_ray.optim import optimizers, presets, schedules
from cxr_ray.train.checkpoint import find_checkpoint, load_checkpoint

log = logging.getLogger(__name__)

PRESETS = ("paper", "none")
LAUNCHERS = ("auto", "ray_train", "process")
AUGMENT_ON = ("trainer", "ray_data")
#: Per-epoch metrics a run can keep its best checkpoints by (``checkpoint_metric``): the
#: validation split's, never the test split's (test is reported, not selected on).
SCORE_METRICS = {"val_auc": "max", "val_accuracy": "max", "val_loss": "min",
                 "val_sensitivity": "max", "val_specificity": "max", "train_loss": "min"}
#: The accuracy ``stop_at`` and the sweep's targets are read from.
SELECTION_ACCURACY = "val_accuracy"


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
    """lr policy (one of :data:`cxr_ray.optim.schedules.POLICIES`). Paper: ``time_decay``
    (stage 1)."""
    base_lr: float | None = None
    """lr of step 0 / lower CLR bound. Paper: Table 4's lr0, or Table 8's base for CLR."""
    max_lr: float | None = None
    """Upper CLR / one-cycle / warmup_cosine / sgdr bound. Paper: Table 8 for the CLR
    policies."""
    lr_bounds: str | None = None
    """JSON with ``base_lr`` and ``max_lr`` (``cxr-ray lr-find``'s ``lr_find.json``); flags win."""
    step_size_epochs: float | None = None
    """CLR half cycle in epochs (converted to optimizer steps, rounded down, so a run of
    ``epochs`` holds at least ``epochs / (2 * step_size_epochs)`` full cycles; ``sgdr``
    restarts every twice this). Paper: 2."""
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
    """Training ranks (DDP over Ray Train workers when > 1)."""
    launcher: str = "auto"
    """Where the loop runs: ``ray_train`` (a ``TorchTrainer``: DDP, worker restarts, the
    dashboard's Train view), ``process`` (this process: a sweep trial's own Tune actor, or
    the CLI itself; one rank only) or ``auto`` (a sweep trial with ``workers = 1`` runs in
    its Tune trial, everything else under Ray Train)."""
    cpus_per_worker: float | None = None
    """CPUs Ray reserves for each worker; None: 1, or less where the cluster would otherwise
    keep no CPU for Ray Data (2 workers on 2 CPUs: 0.5 each)."""
    threads: int | None = None
    """torch threads per worker; None: with ``cpus_per_worker`` unset and no GPU, the
    cluster's CPUs divided among the workers (the run has the machine to itself), else
    ``cpus_per_worker`` (rounded down, at least 1)."""
    gpu: bool = False
    """Train on GPUs (NCCL between ranks, bf16 autocast and channels_last by default)."""
    gpus_per_worker: float = 1.0
    """GPU share each rank asks for with ``gpu``: 0.25 lets four single-rank trials share a
    GPU (MobileNetV1 at the study's batch sizes uses a sliver of one); whole GPUs when
    ``workers > 1`` (NCCL refuses two ranks on one device)."""
    amp: bool | None = None
    """bf16 autocast; None: on with a GPU."""
    channels_last: bool | None = None
    """channels_last memory format for the model and batches; None: on with a GPU."""
    seed: int = 0
    """Seeds the weights, the shuffle and the augmentation."""
    augment: bool = True
    """Apply the study's Keras augmentation to training images."""
    augment_on: str = "trainer"
    """Where training images are augmented: ``trainer`` (the rank augments the uint8 batch on
    its own device) or ``ray_data`` (Ray Data streams the rank's rows from the shards and
    augments them in ``map_batches`` tasks on the cluster's CPUs: CPU nodes feeding GPU
    trainers). Both give the same image for the same (seed, epoch, image)."""
    data_cpus: float = 1.0
    """With ``augment_on = "ray_data"``: CPUs a trial reserves for its Ray Data tasks."""
    checkpoint_metric: str = "val_auc"
    """Per-epoch validation metric that selects the run's model: it ranks the kept
    checkpoints, and the best epoch by it gives the run's headline test numbers
    (:data:`SCORE_METRICS`)."""
    keep_checkpoints: int = 2
    """Best checkpoints kept by ``checkpoint_metric`` (the latest is always kept too)."""
    max_failures: int = 3
    """Restarts from the latest checkpoint before the run fails (Ray Train worker group, or
    the Tune trial of an in-process run)."""
    log_every: int = 20
    """Rank 0 writes buffered per-step losses every this many steps (one device sync each)."""
    address: str | None = None
    """Ray cluster; default ``RAY_ADDRESS``, else a local Ray for the run."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra (custom) resources every worker asks for, on top of its CPUs/GPU, e.g.
    ``{"gpu_node": 0.01}`` to put workers on the autoscaled GPU nodes of ``cluster.yaml``."""
    stop_at: float | None = None
    """Stop once an epoch's validation accuracy reaches this (a target fixed before the run starts);
    a run stopped there is compared on epochs and compute to the target only."""
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
        if self.optimizer is not None and self.optimizer not in optimizers.OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; valid: "
                            f"{', '.join(optimizers.OPTIMIZERS)}")
        for key, choices in (("preset", PRESETS), ("launcher", LAUNCHERS),
                             ("augment_on", AUGMENT_ON)):
            if getattr(self, key) not in choices:
                raise bad(key, f"{getattr(self, key)!r} is not one of {', '.join(choices)}")
        if self.launcher == "process" and self.workers != 1:
            raise bad("launcher", f"'process' runs one rank; workers = {self.workers} needs "
                      "'ray_train' (or 'auto')")
        if self.gpu and self.workers > 1 and self.gpus_per_worker != 1:
            raise bad("gpus_per_worker", f"{self.gpus_per_worker:g} with workers = "
                      f"{self.workers}: DDP ranks need a whole GPU each (NCCL refuses two "
                      "ranks on one device); use 1, or workers = 1 to share GPUs")
        if self.augment_on == "ray_data" and self.data_cpus < 1:
            raise bad("data_cpus", f"{self.data_cpus:g}: every Ray Data task needs a whole "
                      "CPU; give 1 or more")
        if self.gpus_per_worker > 1:
            raise bad("gpus_per_worker", f"{self.gpus_per_worker:g}: one rank uses one GPU; "
                      "give a share <= 1")
        for key, low in (("epochs", 1), ("workers", 1), ("keep_checkpoints", 1), ("log_every", 1),
                         ("batch_size", 2), ("image_size", 8), ("threads", 1)):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < low):
                raise bad(key, f"must be an integer >= {low}, got {value!r}")
        for key in ("base_lr", "max_lr", "step_size_epochs", "width", "cpus_per_worker",
                    "gpus_per_worker", "data_cpus"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and value > 0
                                          and math.isfinite(value)):
                raise bad(key, f"must be a number > 0, got {value!r}")
        if self.stop_at is not None and not 0 < self.stop_at <= 1:
            raise bad("stop_at", f"a validation accuracy in (0, 1], got {self.stop_at!r}")
        if self.decay is not None and not self.decay >= 0:
            raise bad("decay", f"must be >= 0, got {self.decay!r}")
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU") or not (isinstance(amount, (int, float)) and amount > 0):
                raise bad("worker_resources", f"{name} = {amount!r}: custom resource names "
                          "with amounts > 0 (CPU/GPU come from cpus_per_worker/gpu)")
        if self.max_failures < -1:
            raise bad("max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        if self.checkpoint_metric not in SCORE_METRICS:
            hint = (f"; models are selected on the validation split: use "
                    f"val_{self.checkpoint_metric[5:]}"
                    if self.checkpoint_metric.startswith("test_") else "")
            raise bad("checkpoint_metric", f"{self.checkpoint_metric!r} is not one of "
                      f"{', '.join(SCORE_METRICS)}{hint}")
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
    val_images: int
    seed: int
    augment: bool
    amp: bool | None
    threads: int
    gpu: bool
    channels_last: bool | None
    augment_on: str
    init_from: str | None
    log_every: int
    run_dir: str = ""
    throttle_s: float = 0.0
    stop_at: float | None = None

    def finished(self, history: list[dict[str, Any]]) -> bool:
        """All epochs done, or the last one reached ``stop_at``."""
        if len(history) >= self.epochs:
            return True
        acc = history[-1].get(SELECTION_ACCURACY) if history else None
        return self.stop_at is not None and acc is not None and acc >= self.stop_at

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
        if self.policy.get("name") in schedules.TOTAL_STEPS_POLICIES:
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
    shards = shard_io.open_shards(c.shards, expect_size=c.image_size)
    size = shards.size
    minimum = models.torchvision_backbones.MIN_INPUT_SIZE.get(c.model, 8)
    if size < minimum:
        raise UserError(f"{c.model} needs images of at least {minimum} px; {shards.root} was "
                        f"prepared at {size}: re-run cxr-ray prepare --size {minimum} or more")
    table = shard_io.cohort_table(shards, c.cohort)
    n_train = int((table["split"] == "train").sum())
    n_test = int((table["split"] == "test").sum())
    n_val = int((table["split"] == "val").sum())
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
    for split, n in (("test", n_test), ("validation", n_val)):
        if n < 1:
            raise UserError(f"cohort {c.cohort} has no {split} images in {shards.root}; "
                            "re-run cxr-ray prepare with more images or other split fractions")

    stage1 = presets.stage1_recipe(c.cohort)
    opt = optimizers.OptimizerConfig(
        name=c.optimizer or (stage1.optimizer if paper else "sgd"),
        lr=1.0,  # replaced by the policy's lr of step 0
        momentum=c.momentum if c.momentum is not None else presets.TABLE4_MOMENTUM)
    policy = _resolve_policy(c, paper, stage1, spe, batch, opt.name)
    init = resolve_init_checkpoint(c.init_from, c) if c.init_from else None
    model_cfg = {"name": c.model, "width": c.width, "in_chans": 1, "dropout": c.dropout,
                 "weights": None if init else c.weights,
                 "pretrained": False if init else c.pretrained}
    if not init:  # fail early on a bad weights file, in the driver
        models.build_model(models.ModelConfig(**model_cfg))
    return RunPlan(
        cohort=c.cohort, shards=str(c.shards) if storage.is_uri(c.shards) else str(shards.root),
        image_size=size, model=model_cfg,
        optimizer=dataclasses.asdict(opt), policy=policy.to_dict(), epochs=c.epochs,
        batch_size=batch, worker_batch=worker_batch, workers=c.workers, steps_per_epoch=spe,
        train_images=n_train, test_images=n_test, val_images=n_val, seed=c.seed, augment=c.augment, amp=c.amp,
        threads=c.threads or 1, gpu=c.gpu, channels_last=c.channels_last,
        augment_on=c.augment_on,
        init_from=str(init) if init else None, log_every=c.log_every, run_dir=str(run_dir),
        throttle_s=c.throttle_s, stop_at=c.stop_at)


def _resolve_policy(c: TrainConfig, paper: bool, stage1: presets.Stage1Recipe,
                    spe: int, batch: int, optimizer: str) -> schedules.PolicyConfig:
    name = c.policy or ("time_decay" if paper else "constant")
    base, top = c.base_lr, c.max_lr
    if c.lr_bounds:
        bounds = read_lr_bounds(c.lr_bounds)
        scale = batch_scale(bounds.get("batch_size"), batch, optimizer)
        if scale != 1.0:
            log.info("lr bounds of %s found at batch %d, this run's batch is %d (%s): x %.3g",
                     c.lr_bounds, bounds["batch_size"], batch, optimizer, scale)
        base = base if base is not None else bounds["base_lr"] * scale
        top = top if top is not None else bounds["max_lr"] * scale
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
        name=name, base_lr=base, max_lr=top, step_size=max(1, math.floor(step_epochs * spe + 1e-9)),
        gamma=c.gamma, decay=c.decay or 0.0,
        total_steps=c.epochs * spe if name in schedules.TOTAL_STEPS_POLICIES else None,
        pct_start=c.pct_start).validate()


def cpu_split(config: TrainConfig, workers: int, gpu: bool, total: float) -> tuple[float, int]:
    """CPUs Ray reserves per rank and torch threads per rank on a cluster of ``total`` CPUs:
    with ``cpus_per_worker`` unset and no GPU the run has the cluster to itself (its CPUs
    divided among the ranks); otherwise (e.g. concurrent sweep trials) threads stay within
    the reservation."""
    cpus = config.cpus_per_worker or (1.0 if total - workers >= 1 or gpu
                                      else max(0.1, (total - 1) / workers))
    if not gpu and workers * cpus > total:
        raise UserError(f"{workers} workers × {cpus:g} CPUs exceed the cluster's {total:g} "
                        "CPUs; lower --workers or --cpus-per-worker")
    if config.threads:
        return cpus, config.threads
    if config.cpus_per_worker is None and not gpu:
        return cpus, max(1, int(total // workers))
    return cpus, max(1, int(cpus))


#: How bounds found at one batch size carry to another, per optimizer: ``lr ∝ (B'/B)**power``.
#: SGD: linear (Goyal et al. 2017: the noise scale of SGD is lr / B); Adam and RMSprop:
#: square root (their update is normalised by the gradient's scale; the square-root rule of
#: Hoffer et al. 2017 / Malladi et al. 2022 keeps the update's noise the same).
BATCH_SCALING = {"sgd": 1.0, "adam": 0.5, "rmsprop": 0.5}


def batch_scale(found_at: int | None, batch: int, optimizer: str) -> float:
    """Factor for lr bounds found at global batch ``found_at`` used at ``batch``
    (:data:`BATCH_SCALING`); 1 when the batch is the same or unknown."""
    if not found_at or found_at == batch:
        return 1.0
    return (batch / found_at) ** BATCH_SCALING.get(optimizer, 1.0)


def read_lr_bounds(path: str | Path) -> dict[str, float]:
    """``{"base_lr", "max_lr"}`` from an lr-find JSON (or any JSON with those two keys), and
    ``batch_size`` (the global batch the test ran at) when it says."""
    try:
        data = json.loads(Path(path).read_text())
        bounds = {k: float(data[k]) for k in ("base_lr", "max_lr")}
        if data.get("batch_size"):
            bounds["batch_size"] = int(data["batch_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--lr-bounds {path}: not a JSON file with numeric base_lr and max_lr "
                        f"({type(exc).__name__}: {exc}); use lr_find.json from cxr-ray lr-find"
                        ) from None
    if not 0 < bounds["base_lr"] <= bounds["max_lr"]:
        raise UserError(f"--lr-bounds {path}: need 0 < base_lr <= max_lr, got {bounds}")
    return bounds


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

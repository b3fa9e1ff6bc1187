"""The training loop: plain PyTorch and ``torch.distributed``, no Ray.

One function, :func:`run`, trains a :class:`~cxr_ray.train.config.RunPlan` on a rank and,
when asked, runs the LR range test from the model it trained (docs/study.md §7) in the same
process. A launcher supplies a :class:`RankContext` (rank, world size, device, how to wrap
the model, where the last checkpoint is and how to persist one) and the rank's
:class:`~cxr_ray.train.feed.Feed` of each split:

* Ray Train (:mod:`cxr_ray.ray_backend.train_launcher`): one ``TorchTrainer`` worker per rank,
  DDP over gloo/NCCL, checkpoints through ``ray.train.report``;
* in process (:mod:`cxr_ray.train.run`): the Tune trial's own actor or the CLI, one rank,
  cxr-ray's own checkpoint files.

Both write the same run directory (:mod:`cxr_ray.paths`), history, TensorBoard tags and
checkpoints. Every epoch evaluates the validation split (which selects the model: checkpoint
ranking, the operating threshold by Youden's J, ``stop_at``) and the test split (reported:
at 0.5 and at the validation-chosen threshold); rank 0 keeps the per-image scores of the
selected epoch and of the latest (``RUN/predictions/``) for the report's confidence
intervals and paired comparisons. The loop owns the step counter: the lr of step ``t`` is
``lr_at(policy, t)``, set by the policy hook before the step; a checkpoint holds ``t``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from cxr_ray import metrics as M
from cxr_ray import models, stats
from cxr_ray.data import shards as shard_io
from cxr_ray.data.augment import AugmentConfig
from cxr_ray.optim import optimizers, schedules
from cxr_ray.train import checkpoint as ck
from cxr_ray.train.config import SCORE_METRICS, RunPlan
from cxr_ray.train.feed import Feed, Timed
from cxr_ray.train.runlog import LoopState, RunLog

log = logging.getLogger(__name__)


@dataclass
class RankContext:
    """What a launcher tells the loop about this rank."""

    rank: int
    world_size: int
    device: torch.device
    launcher: str
    """``ray_train`` or ``process`` (recorded in attempts.jsonl)."""
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module]
    """Move to the device and wrap for DDP when ``world_size > 1``."""
    last_checkpoint: Callable[[], dict[str, Any] | None]
    """The checkpoint to resume from (a loaded ``checkpoint.pt``), or None."""
    save: Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]
    """``save(metrics, make_checkpoint)`` after every epoch on every rank: persist
    ``make_checkpoint()`` (called on rank 0 only) and report the metrics."""


# --------------------------------------------------------------------------- setup
def initial_model(plan: RunPlan) -> models.CxrClassifier:
    """The model before training: ImageNet/random init, or stage 2's stage-1 weights."""
    model = models.build_model(models.ModelConfig(**plan.model))
    if plan.init_from:  # fresh optimizer and policy; only the weights (and BN statistics)
        model.load_state_dict(ck.load_checkpoint(plan.init_from)["model_state"])
    return model


def channels_last(plan: RunPlan, device: torch.device) -> bool:
    return plan.channels_last if plan.channels_last is not None else device.type == "cuda"


def autocast(plan: RunPlan, device: torch.device) -> bool:
    return plan.amp if plan.amp is not None else device.type == "cuda"


def setup(plan: RunPlan, ctx: RankContext):
    """Model (on the device, DDP-wrapped when distributed), optimizer and the lr policy hook."""
    torch.set_num_threads(plan.threads)
    torch.manual_seed(plan.seed)
    model = initial_model(plan)
    if channels_last(plan, ctx.device):
        model = model.to(memory_format=torch.channels_last)
    model = ctx.prepare_model(model)
    optimizer = optimizers.optimizer_from_config(
        model.parameters(), optimizers.OptimizerConfig(**plan.optimizer))
    policy = schedules.PolicyLR(optimizer, schedules.PolicyConfig.from_dict(plan.policy))
    return model, optimizer, policy


def restore(ckpt: dict[str, Any] | None, model, optimizer) -> LoopState:
    """Load a checkpoint (if any) into model and optimizer; the loop state it holds."""
    if ckpt is None:
        return LoopState()
    ck.unwrap(model).load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer"])
    steps = ckpt["steps"]
    log.info("resuming at epoch %d, step %d", ckpt["epoch"], ckpt["step"])
    return LoopState(epoch=ckpt["epoch"], step=ckpt["step"], history=list(ckpt["history"]),
                     lrs=list(steps["lr"]), losses=list(steps["loss"]))


# --------------------------------------------------------------------------- one step
def train_step(model, optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool):
    """One optimizer step: BCE with logits + the head's Keras penalties. → (loss, bce, logits)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x).float()
    bce = F.binary_cross_entropy_with_logits(logits, y)
    loss = bce + ck.unwrap(model).penalty().float()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), bce.detach(), logits.detach()


def model_input(batch: dict[str, torch.Tensor], feed: Feed, plan: RunPlan, epoch: int,
                device: torch.device, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A feed's batch → ``(x, y)`` on the device (augmented for training unless the feed
    already augmented it)."""
    if feed.augmented:
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, torch.float32, non_blocking=True)
    elif train:
        aug = AugmentConfig() if plan.augment else AugmentConfig.none()
        x, y = shard_io.train_transform(batch, epoch=epoch, seed=plan.seed, cfg=aug,
                                        device=device)
    else:
        x, y = shard_io.eval_transform(batch, device=device)
    if channels_last(plan, device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


# --------------------------------------------------------------------------- epochs
def train_epoch(plan: RunPlan, ctx: RankContext, model, optimizer, policy, feed: Feed,
                epoch: int, state: LoopState, runlog: RunLog) -> dict[str, float]:
    """One pass over this rank's share; the policy sets the lr before every step.
    → global sums (all-reduced): bce, loss, correct, images; CPU and data-wait seconds."""
    device, amp = ctx.device, autocast(plan, ctx.device)
    model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # bce·n, correct, n, loss·n
    steps, cpu0 = 0, time.process_time()
    batches = Timed(feed.batches(plan.worker_batch, epoch, pin_memory=device.type == "cuda"))
    for batch in batches:
        if len(batch["label"]) < 2:  # BatchNorm1d in the head needs two images
            continue
        x, y = model_input(batch, feed, plan, epoch, device, train=True)
        policy.step(state.step)  # the lr of this step: lr_at(policy, state.step)
        lr = policy.get_last_lr()[0]
        loss, bce, logits = train_step(model, optimizer, x, y, amp)
        runlog.step(state.step, lr, loss)
        n = y.numel()
        sums += torch.stack([bce * n, ((logits > 0) == (y > 0.5)).sum(), torch.tensor(
            float(n), device=device), loss * n]).double()
        state.step += 1
        steps += 1
        if plan.throttle_s:
            time.sleep(plan.throttle_s)
    if steps != plan.steps_per_epoch:
        log.warning("epoch %d: %d steps on this rank, planned %d", epoch + 1, steps,
                    plan.steps_per_epoch)
    extra = torch.tensor([time.process_time() - cpu0, batches.wait], dtype=torch.float64,
                         device=device)
    sums = all_reduce(torch.cat([sums, extra]))
    return {"bce": float(sums[0]), "correct": float(sums[1]), "images": float(sums[2]),
            "loss": float(sums[3]), "cpu_seconds": float(sums[4]),
            "data_wait_seconds": float(sums[5]) / ctx.world_size}


@dataclass
class Scores:
    """One evaluation split's per-image outputs, every rank's share gathered, one row per
    image (sorted by image id)."""

    image_id: np.ndarray
    score: np.ndarray
    """``sigmoid(logit)``, float64."""
    label: np.ndarray
    loss: float

    def metrics(self, threshold: float = M.THRESHOLD) -> dict[str, float]:
        return M.binary_metrics(self.score, self.label, threshold)


@torch.no_grad()
def evaluate(plan: RunPlan, ctx: RankContext, model, feed: Feed,
             expect: int | None = None) -> Scores:
    """Scores of this rank's share of an evaluation split, gathered from every rank and
    de-duplicated by image id: the whole split, on every rank."""
    net = ck.unwrap(model)  # no DDP in evaluation: shares may differ in size
    broadcast_buffers(net)  # every rank evaluates rank 0's model, the one checkpointed
    net.eval()
    ids, logits, labels = [], [], []
    for batch in feed.batches(256, 0, pin_memory=ctx.device.type == "cuda"):
        x, y = model_input(batch, feed, plan, 0, ctx.device, train=False)
        with torch.autocast(x.device.type, dtype=torch.bfloat16,
                            enabled=autocast(plan, ctx.device)):
            logits.append(net(x).float().cpu())
        ids.append(torch.as_tensor(batch["image_id"]).cpu())
        labels.append(y.cpu())
    local = [torch.cat(t).numpy() if t else np.zeros(0) for t in (ids, logits, labels)]
    ids_all, z, y = (np.concatenate(parts) for parts in zip(*all_gather(local)))
    ids_all, first = np.unique(ids_all.astype(np.int64), return_index=True)
    z, y = z[first].astype(np.float64), y[first]
    if expect is not None and len(first) != expect:
        log.warning("evaluated %d distinct images, expected %d", len(first), expect)
    return Scores(ids_all, 1.0 / (1.0 + np.exp(-z)), y.astype(np.int8),
                  M.bce_with_logits(z, y))


#: The metrics of an evaluation split in an epoch's record (``val_*``, ``test_*``).
SPLIT_METRICS = ("loss", "accuracy", "auc", "sensitivity", "specificity")


def eval_record(val: Scores, test: Scores) -> dict[str, Any]:
    """An epoch's evaluation metrics: both splits at 0.5; the operating threshold chosen on
    validation (Youden's J); the test split at that threshold."""
    threshold = stats.youden_threshold(val.score, val.label)
    record: dict[str, Any] = {}
    for split, scores in (("val", val), ("test", test)):
        m = {**scores.metrics(), "loss": scores.loss}
        record.update({f"{split}_{k}": m[k] for k in SPLIT_METRICS})
        record[f"{split}_images"] = int(m["images"])
    record["val_threshold"] = threshold
    at = test.metrics(threshold)
    record.update({f"test_{k}_at_threshold": at[k]
                   for k in ("accuracy", "sensitivity", "specificity")})
    return record


def epoch_record(plan: RunPlan, state: LoopState, epoch: int, train: dict[str, float],
                 evals: dict[str, Any], train_s: float, eval_s: float) -> dict[str, Any]:
    """The history line of one epoch (NaN → None so the JSON stays strict)."""
    n = max(train["images"], 1.0)
    prev = state.history[-1]["elapsed_seconds"] if state.history else 0.0
    policy = schedules.PolicyConfig.from_dict(plan.policy)
    record = {
        "epoch": epoch + 1, "step": state.step,
        "train_loss": train["bce"] / n, "train_objective": train["loss"] / n,
        "train_accuracy": train["correct"] / n, "train_images": int(train["images"]),
        **evals,
        "lr_last": float(schedules.lr_at(policy, state.step - 1)) if state.step else None,
        "images_per_s": train["images"] / train_s if train_s > 0 else None,
        "train_seconds": train_s, "train_cpu_seconds": train["cpu_seconds"],
        "data_wait_seconds": train["data_wait_seconds"],
        "eval_seconds": eval_s, "epoch_seconds": train_s + eval_s,
        "elapsed_seconds": prev + train_s + eval_s, "workers": plan.workers,
        "time": time.time(),
    }
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def train(plan: RunPlan, ctx: RankContext, train_feed: Feed, eval_feeds: dict[str, Feed],
          checkpoint_metric: str = "val_auc"):
    """Train the epochs the run still lacks: train → evaluate (val, test) → log →
    checkpoint. → (model, optimizer, state) at the end."""
    model, optimizer, policy = setup(plan, ctx)
    state = restore(ctx.last_checkpoint(), model, optimizer)
    runlog = RunLog(plan.to_dict(), state, ctx.rank, launcher=ctx.launcher)
    plan_dict = plan.to_dict()
    expect = {"val": plan.val_images, "test": plan.test_images}
    for epoch in range(state.epoch, plan.epochs):
        if plan.finished(state.history):  # reached stop_at
            break
        t0 = time.perf_counter()
        sums = train_epoch(plan, ctx, model, optimizer, policy, train_feed, epoch, state,
                           runlog)
        t1 = time.perf_counter()
        scores = {split: evaluate(plan, ctx, model, eval_feeds[split], expect=expect[split])
                  for split in ("val", "test")}
        record = epoch_record(plan, state, epoch, sums, eval_record(scores["val"],
                              scores["test"]), t1 - t0, time.perf_counter() - t1)
        runlog.epoch(record)
        state.epoch, state.history = epoch + 1, state.history + [record]
        runlog.predictions(record["epoch"], scores, state.history, checkpoint_metric,
                           SCORE_METRICS.get(checkpoint_metric, "max"))
        ctx.save(record, lambda: ck.checkpoint_dict(
            plan=plan_dict, model=model, optimizer=optimizer, epoch=state.epoch,
            step=state.step, history=state.history, lrs=state.lrs, losses=state.losses))
        runlog.write_files()
    runlog.close()
    return model, optimizer, state


# --------------------------------------------------------------------------- collectives
def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    if distributed():
        torch.distributed.all_reduce(t)
    return t


def broadcast_buffers(net: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics to every rank (DDP syncs them only at the next forward)."""
    if distributed():
        for buffer in net.buffers():
            torch.distributed.broadcast(buffer, 0)


def all_gather(obj: Any) -> list[Any]:
    if distributed():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]

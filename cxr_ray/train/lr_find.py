"""The LR range test as the loop runs it (docs/study.md §7): on every rank, in the process
(or the Ray Train fit) that trained the model it starts from, no start-up of its own.

It takes the loop's training step with the lr of :meth:`~cxr_ray.optim.lr_finder.LrRangeTest.
lr_at` set before each step, the loss averaged over the ranks every step, and the stop
decision (the same on every rank) from :meth:`~cxr_ray.optim.lr_finder.LrRangeTest.record`.
It starts from the run's best checkpoint (the weights stage 2 starts from) with a fresh
optimizer and leaves no trace in the run: rank 0 writes ``OUT/lr_find.json`` (the curve,
every rule's suggestion and the chosen ``base_lr``/``max_lr``: what ``--lr-bounds`` reads),
``OUT/lr_find.png`` and ``OUT/tensorboard/``.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cxr_ray import paths
from cxr_ray.optim import optimizers
from cxr_ray.errors import UserError
from cxr_ray.optim import presets
from cxr_ray.optim.lr_finder import (
    LrRangeConfig,
    LrRangeResult,
    LrRangeTest,
    combine,
    momentum_note,
)
from cxr_ray.train import checkpoint as ck
from cxr_ray.train import loop
from cxr_ray.train.config import RunPlan
from cxr_ray.train.feed import Feed

log = logging.getLogger(__name__)


@dataclass
class LrFindSpec:
    """One LR range test to run after (or instead of) training."""

    out: str
    """Directory of its files."""
    settings: dict[str, Any] = field(default_factory=dict)
    """:class:`~cxr_ray.optim.lr_finder.LrRangeConfig` fields (``num_steps`` included)."""
    trained_lr: float | None = None
    """The lr the start model was trained with (the ``stage1`` fallback); None: the run's own
    policy's ``base_lr`` when the test follows training in the same run."""

    @property
    def done(self) -> bool:
        return (Path(self.out) / paths.LR_FIND_FILE).is_file()

    def config(self, plan: RunPlan) -> LrRangeConfig:
        """The range test's settings; ``num_steps`` defaults to one epoch, at least 50."""
        s = {k: v for k, v in self.settings.items() if v is not None and k != "enabled"}
        s.setdefault("num_steps", max(50, plan.steps_per_epoch))
        return LrRangeConfig(**s).validate()


def start_checkpoint(plan: RunPlan, history: list[dict[str, Any]], metric: str,
                     mode: str) -> Path | None:
    """The run's best kept checkpoint (None: the run trained nothing)."""
    if not plan.run_dir or not history:
        return None
    kept = ck.kept_checkpoints(Path(plan.run_dir))
    best = ck.best_epoch(history, list(kept), metric, mode)
    return kept[best] if best is not None else None


def range_test(plan: RunPlan, ctx: loop.RankContext, model: torch.nn.Module, feed: Feed,
               spec: LrFindSpec, *, start: Path | None = None,
               val_feed: Feed | None = None) -> LrRangeResult:
    """Run the test on this rank (every rank calls it) from the weights of checkpoint
    ``start`` (None: the model as it is), ``repeats`` times, and on rank 0 write its files.

    Repeat ``j`` restores the start weights, builds a fresh optimizer and draws its batches as
    epochs ``1000 j, 1000 j + 1, ...`` of the feed (its own batch order). In ``val`` mode the
    loss of each step is measured after the step, in eval mode, on the first ``val_batches``
    batches of ``val_feed`` (this rank's share; averaged over the ranks)."""
    cfg = spec.config(plan)
    net = ck.unwrap(model)
    if start is not None:
        net.load_state_dict(ck.load_checkpoint(start)["model_state"])
    initial = copy.deepcopy(net.state_dict())
    held_out = held_out_batches(plan, ctx, val_feed, cfg) if cfg.loss == "val" else None
    curves = []
    for j in range(cfg.repeats):
        net.load_state_dict(initial)
        test = run_ramp(plan, ctx, model, feed, cfg, first_epoch=1000 * j, held_out=held_out)
        curves.append(test.curve(repeat=j))
    result = combine(curves, cfg)
    opt = optimizers.OptimizerConfig(**plan.optimizer)
    note = momentum_note(cfg.num_steps, optimizers.momentum_of(opt))
    if note:
        result.warnings.append(note)
    if not result.trusted:
        apply_fallback(result, cfg, plan, spec)
    if ctx.rank == 0:
        write_result(result, spec, plan, start)
    return result


def run_ramp(plan: RunPlan, ctx: loop.RankContext, model: torch.nn.Module, feed: Feed,
          cfg: LrRangeConfig, *, first_epoch: int,
          held_out: list[tuple[torch.Tensor, torch.Tensor]] | None) -> LrRangeTest:
    """One ramp from the model's current weights with a fresh optimizer."""
    optimizer = optimizers.optimizer_from_config(
        model.parameters(), optimizers.OptimizerConfig(**plan.optimizer))
    test = LrRangeTest(cfg)
    amp = loop.autocast(plan, ctx.device)
    model.train()
    step, epoch, stop = 0, first_epoch, False
    while not stop:
        seen = 0
        for batch in feed.batches(plan.worker_batch, epoch):
            if len(batch["label"]) < 2:
                continue
            seen += 1
            x, y = loop.model_input(batch, feed, plan, epoch, ctx.device, train=True)
            for group in optimizer.param_groups:
                group["lr"] = test.lr_at(step)
            loss, _, _ = loop.train_step(model, optimizer, x, y, amp)
            if held_out is not None:
                loss = _held_out_loss(model, held_out, amp)
            stop = test.record(step, float(loop.all_reduce(loss.clone())) / ctx.world_size)
            step += 1
            if stop:
                break
        if not seen:
            test.stop_reason = f"no training batches after {step} steps"
            break
        epoch += 1
    return test


def held_out_batches(plan: RunPlan, ctx: loop.RankContext, feed: Feed | None,
                 cfg: LrRangeConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out batches of ``val`` mode, on the device."""
    if feed is None:
        raise UserError("LR range test loss = 'val' needs the run's validation split; this "
                        "launcher gave none")
    out = []
    for batch in feed.batches(max(plan.worker_batch, 32), 0):
        out.append(loop.model_input(batch, feed, plan, 0, ctx.device, train=False))
        if len(out) == cfg.val_batches:
            break
    if not out:
        raise UserError(f"LR range test loss = 'val': cohort {plan.cohort} has no validation "
                        "images on this rank")
    return out


def _held_out_loss(model: torch.nn.Module, held_out: list[tuple[torch.Tensor, torch.Tensor]],
                   amp: bool) -> torch.Tensor:
    """Mean BCE of the held-out batches in eval mode (no DDP: no gradient to synchronise)."""
    net = ck.unwrap(model)
    net.eval()
    total, n = torch.zeros((), device=held_out[0][0].device), 0
    with torch.no_grad():
        for x, y in held_out:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x).float()
            total += F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
            n += y.numel()
    net.train()
    return total / max(n, 1)


def apply_fallback(result: LrRangeResult, cfg: LrRangeConfig, plan: RunPlan,
                   spec: LrFindSpec) -> None:
    """Replace untrusted measured bounds by the ones ``cfg.fallback`` names."""
    why = "; ".join(result.problems)
    if cfg.fallback == "measured":
        result.bounds_source = f"lr_find (untrusted, kept: fallback = 'measured'): {why}"
        return
    if cfg.fallback == "error":
        raise UserError(f"LR range test of {plan.cohort} ({spec.out}): {why}; set [lr_find] "
                        "fallback to 'stage1', 'paper' or 'measured', or change the ramp")
    if cfg.fallback == "paper":
        row = presets.TABLE8_CLR.get(plan.cohort) or (
            presets.ONE_CLASS_CLR if plan.cohort == "OneClass" else None)
        study = (plan.model.get("name") == "mobilenet_v1" and plan.model.get("width") == 1.0
                 and plan.image_size == presets.STUDY_IMAGE_SIZE)
        if row is not None and study:
            result.fall_back(row.base_lr, row.max_lr, f"fallback: the study's Table 8 bounds "
                             f"for {plan.cohort} ({why})")
            return
        reason = ("the study gives no bounds for it" if row is None else
                  "the study's bounds hold only for MobileNetV1 width 1 at "
                  f"{presets.STUDY_IMAGE_SIZE}²")
        why = f"{why}; not Table 8: {reason}"
    lr = spec.trained_lr or ((plan.policy or {}).get("base_lr") if plan.run_dir else None)
    if not lr:
        raise UserError(f"LR range test of {plan.cohort} ({spec.out}): {why}; no stage-1 lr "
                        "to fall back to: pass --fallback measured, or bounds by hand")
    result.fall_back(cfg.base_fraction * lr, lr, f"fallback: the stage-1 lr {lr:.3g} × "
                     f"[{cfg.base_fraction:g}, 1] ({why})")


def write_result(result: LrRangeResult, spec: LrFindSpec, plan: RunPlan,
                 start: Path | None) -> dict[str, Any]:
    """``lr_find.json`` (with the run it came from), the plot and TensorBoard (one step series
    per repeat: ``lr_find/repeat_J/...``)."""
    from torch.utils.tensorboard import SummaryWriter

    out = Path(spec.out)
    data = {**result.to_dict(), "cohort": plan.cohort, "model": plan.model,
            "optimizer": plan.optimizer, "init_from": plan.init_from,
            "from_run": plan.run_dir or None,
            "start_checkpoint": str(start) if start else plan.init_from,
            "batch_size": plan.batch_size, "workers": plan.workers,
            "image_size": plan.image_size, "steps_per_epoch": plan.steps_per_epoch}
    result.plot(out / paths.LR_FIND_PLOT,
                title=f"LR range test: {plan.cohort}, {plan.model['name']}, "
                      f"{result.config.get('loss', 'train')} loss")
    with SummaryWriter(out / paths.TB_DIR) as tb:
        for curve in result.curves:
            tag = f"lr_find/repeat_{curve.repeat}" if len(result.curves) > 1 else "lr_find"
            for i, (lr, loss, smooth) in enumerate(zip(curve.lrs, curve.losses,
                                                       curve.smoothed)):
                tb.add_scalar(f"{tag}/lr", lr, i)
                tb.add_scalar(f"{tag}/loss", loss, i)
                tb.add_scalar(f"{tag}/smoothed_loss", smooth, i)
        tb.add_text("lr_find/suggestion", json.dumps(
            {k: data[k] for k in ("base_lr", "max_lr", "rule", "suggestions", "spread",
                                  "problems", "warnings", "bounds_source")}))
    paths.write_json(out / paths.LR_FIND_FILE, data)  # last: its presence means "done"
    lo, hi = result.spread[result.rule]
    log.info("LR range test of %s: %d repeat(s) of %d steps; %s rule: max_lr %.3g (%.3g-%.3g); "
             "handing on base_lr %.3g, max_lr %.3g from %s", plan.cohort, len(result.curves),
             result.config.get("num_steps", 0), result.rule, result.measured_max_lr, lo, hi,
             result.base_lr, result.max_lr, result.bounds_source)
    return data

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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cxr_ray import paths
from cxr_ray.optim import optimizers
from cxr_ray.optim.lr_finder import LrRangeConfig, LrRangeResult, LrRangeTest
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
               spec: LrFindSpec, *, start: Path | None = None) -> LrRangeResult:
    """Run the test on this rank (every rank calls it) from the weights of checkpoint
    ``start`` (None: the model as it is) and, on rank 0, write its files."""
    cfg = spec.config(plan)
    if start is not None:
        ck.unwrap(model).load_state_dict(ck.load_checkpoint(start)["model_state"])
    optimizer = optimizers.optimizer_from_config(
        model.parameters(), optimizers.OptimizerConfig(**plan.optimizer))
    test = LrRangeTest(cfg)
    amp = loop.autocast(plan, ctx.device)
    model.train()
    step, epoch, stop = 0, 0, False
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
            stop = test.record(step, float(loop.all_reduce(loss.clone())) / ctx.world_size)
            step += 1
            if stop:
                break
        if not seen:
            test.stop_reason = f"no training batches after {step} steps"
            break
        epoch += 1
    result = test.result()
    if ctx.rank == 0:
        write_result(result, spec, plan, start)
    return result


def write_result(result: LrRangeResult, spec: LrFindSpec, plan: RunPlan,
                 start: Path | None) -> dict[str, Any]:
    """``lr_find.json`` (with the run it came from), the plot and TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    out = Path(spec.out)
    data = {**result.to_dict(), "cohort": plan.cohort, "model": plan.model,
            "init_from": plan.init_from, "from_run": plan.run_dir or None,
            "start_checkpoint": str(start) if start else plan.init_from,
            "batch_size": plan.batch_size, "workers": plan.workers,
            "steps_per_epoch": plan.steps_per_epoch}
    result.plot(out / paths.LR_FIND_PLOT,
                title=f"LR range test: {plan.cohort}, {plan.model['name']}")
    with SummaryWriter(out / paths.TB_DIR) as tb:
        for i, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
            tb.add_scalar("lr_find/lr", lr, i)
            tb.add_scalar("lr_find/loss", loss, i)
            tb.add_scalar("lr_find/smoothed_loss", smooth, i)
        tb.add_text("lr_find/suggestion", json.dumps(
            {"base_lr": result.base_lr, "max_lr": result.max_lr, "rule": result.rule,
             "suggestions": result.suggestions, "stop_reason": result.stop_reason}))
    paths.write_json(out / paths.LR_FIND_FILE, data)  # last: its presence means "done"
    log.info("LR range test of %s: %d steps (%s); %s rule: base_lr %.3g, max_lr %.3g",
             plan.cohort, len(result.lrs), result.stop_reason, result.rule, result.base_lr,
             result.max_lr)
    return data

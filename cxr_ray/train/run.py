"""A run from start to summary, and the in-process launcher.

Launch (after ``cxr-ray prepare``)::

    cxr-ray train --shards SHARDS --cohort Pneumothorax --out runs/ptx --launcher process

Every launcher goes through the same three steps: :func:`open_run` (plan, refuse a
directory holding another run, count the epochs already done), the rank loop
(:func:`run_rank`: train what is missing, then the LR range test when asked), and
:func:`finish_run` (check the history, pick the best checkpoint, write ``summary.json``).
:func:`fit_in_process` runs the rank loop in this process: what a single-rank sweep trial
does inside its own Tune actor (Ray's guidance for non-distributed trials: no Ray Train
start-up, ~15 s and ~30 CPU-seconds per fit on 2 cores), and ``cxr-ray train --launcher
process`` without any Ray at all. Its checkpoints are cxr-ray's own files in the run
directory (:class:`~cxr_ray.train.checkpoint.CheckpointStore`), so a re-run resumes from
them exactly as a Ray Train run resumes from its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cxr_ray import paths
from cxr_ray.data import shards as shard_io
from cxr_ray.errors import UserError
from cxr_ray.train import checkpoint as ck
from cxr_ray.train import loop
from cxr_ray.train.config import SCORE_METRICS, RunPlan, TrainConfig, plan_run
from cxr_ray.train.feed import ArrayFeed, Feed
from cxr_ray.train.lr_find import LrFindSpec, range_test, start_checkpoint
from cxr_ray.train.runlog import format_epoch

log = logging.getLogger(__name__)

#: Test-only switch: a run asked for a GPU that CUDA cannot see trains on the CPU instead of
#: stopping (so the GPU scheduling can be tested on a machine without one).
ALLOW_NO_CUDA_ENV = "CXR_RAY_TEST_ALLOW_NO_CUDA"

#: ``(plan, rank, world) -> (train feed, {"val": feed, "test": feed})``.
MakeFeeds = Callable[[RunPlan, int, int], tuple[Feed, dict[str, Feed]]]
#: The splits a run evaluates every epoch.
EVAL_SPLITS = ("val", "test")


@dataclass
class TrainSummary:
    """What a run returns (and writes to ``RUN/summary.json``)."""

    run_dir: str
    history: list[dict[str, Any]]
    """Every finished epoch, in order (also ``RUN/history.jsonl``)."""
    best_checkpoint: str | None
    """Directory of the kept checkpoint with the best ``checkpoint_metric``."""
    last_checkpoint: str | None
    checkpoint_metric: str
    best_metric: float | None
    wall_seconds: float
    """This call, start to end (start-up and tear-down included)."""
    images: int
    """Training images processed in this call, all ranks together."""
    compute_seconds: float
    """Sum of the epochs' train + eval seconds over the whole run (resumes included)."""
    resumed_from_epoch: int
    """Epochs already done when this call started."""
    launcher: str = "process"
    selected_epoch: int | None = None
    """The epoch with the best ``checkpoint_metric`` (validation): the run's model, whose
    test numbers are the run's headline (the later epoch on a tie)."""
    stopped_at_target: bool = False
    """True when the run ended before ``epochs`` because it reached ``stop_at``."""
    startup_seconds: float | None = None
    """From the call to the start of the loop (Ray, data, workers, restore); None when
    nothing was left to train."""
    teardown_seconds: float | None = None
    """From the end of the last epoch to the return of this call."""
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- the steps
def open_run(config: TrainConfig, run_dir: Path, resume: bool) -> tuple[RunPlan, int]:
    """Plan ``config`` for ``run_dir``; the epochs already done there. UserError when the
    directory holds another run (the message names every differing setting)."""
    plan = plan_run(config, run_dir)
    done = 0
    old = paths.read_json(run_dir / paths.CONFIG_FILE)
    if old is None:
        if run_dir.is_dir() and any(p.name != paths.TB_DIR for p in run_dir.iterdir()):
            raise UserError(f"--out {run_dir} is not empty and holds no cxr-ray run; choose a "
                            "new directory")
    else:
        if not resume:
            raise UserError(f"{run_dir} already holds a run; re-run without --no-resume to "
                            "resume it, or choose another --out")
        mine, theirs = plan.identity(), RunPlan.from_dict(old).identity()
        if mine != theirs:
            raise UserError(f"{run_dir} holds a run with other settings "
                            f"({paths.settings_diff(theirs, mine)}); re-run with the same "
                            "settings to resume it, or choose another --out")
        done = len(paths.read_jsonl(run_dir / paths.HISTORY_FILE))
        if done > plan.epochs:
            raise UserError(f"{run_dir} already trained {done} epochs, more than --epochs "
                            f"{plan.epochs}")
        if done:
            log.info("%s: resuming after epoch %d of %d", run_dir, done, plan.epochs)
    run_dir.mkdir(parents=True, exist_ok=True)
    ck.write_plan(run_dir, plan.to_dict())
    return plan, done


def run_rank(plan: RunPlan, ctx: loop.RankContext, train_feed: Feed,
             eval_feeds: dict[str, Feed], *, checkpoint_metric: str,
             lr_find: LrFindSpec | None = None) -> None:
    """What every rank runs: the missing epochs, then the LR range test (once) from the
    run's best checkpoint."""
    model, _, state = loop.train(plan, ctx, train_feed, eval_feeds, checkpoint_metric)
    if lr_find is None or lr_find.done:
        return
    start = start_checkpoint(plan, state.history, checkpoint_metric,
                             SCORE_METRICS[checkpoint_metric])
    range_test(plan, ctx, model, train_feed, lr_find, start=start,
               val_feed=eval_feeds.get("val"))


def finish_run(config: TrainConfig, plan: RunPlan, run_dir: Path, done: int, *, t0: float,
               started: float, launcher: str) -> TrainSummary:
    """Check the history is complete, pick the checkpoints, write ``summary.json``."""
    history = paths.read_jsonl(run_dir / paths.HISTORY_FILE)
    if [r["epoch"] for r in history] != list(range(1, len(history) + 1)) or not (
            plan.finished(history)):
        raise RuntimeError(f"{run_dir}: history holds epochs {[r['epoch'] for r in history]}, "
                           f"expected 1..{plan.epochs}")
    metric = config.checkpoint_metric
    best, last, value = ck.summary_best(run_dir, history, metric, SCORE_METRICS[metric])
    attempts = [a["time"] for a in paths.read_jsonl(run_dir / paths.ATTEMPTS_FILE)
                if a.get("time", 0) >= started]
    wall = time.perf_counter() - t0
    summary = TrainSummary(
        run_dir=str(run_dir), history=history,
        best_checkpoint=str(best) if best else None, last_checkpoint=str(last) if last else None,
        checkpoint_metric=metric, best_metric=value, wall_seconds=wall,
        images=sum(r["train_images"] for r in history[done:]),
        compute_seconds=sum(r["epoch_seconds"] for r in history), resumed_from_epoch=done,
        launcher=launcher, plan=plan.to_dict(), stopped_at_target=len(history) < plan.epochs,
        selected_epoch=ck.best_epoch(history, [r["epoch"] for r in history], metric,
                                     SCORE_METRICS[metric]),
        startup_seconds=min(attempts) - started if attempts else None,
        teardown_seconds=(started + wall - history[-1]["time"]) if done < len(history)
        and "time" in history[-1] else None)
    paths.write_json(run_dir / paths.SUMMARY_FILE, summary.to_dict())
    return summary


# --------------------------------------------------------------------------- in process
def device_for(gpu: bool) -> torch.device:
    """The device of a rank asked (or not) for a GPU; a GPU that CUDA cannot see stops the
    run with one line (a broken driver must not train 100× slower unnoticed)."""
    if not gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the granted GPU
    if os.environ.get(ALLOW_NO_CUDA_ENV) == "1":
        log.warning("gpu = true but CUDA sees no GPU; training on the CPU (%s=1)",
                    ALLOW_NO_CUDA_ENV)
        return torch.device("cpu")
    raise UserError("gpu = true but CUDA sees no GPU here (torch.cuda.is_available() is "
                    f"False; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                    "check the node's driver, or train with gpu = false")


def array_feeds(plan: RunPlan, rank: int = 0, world: int = 1
                ) -> tuple[Feed, dict[str, Feed]]:
    """The three splits read from the shards into this process."""
    if plan.augment_on == "ray_data":
        raise UserError("augment_on = 'ray_data' streams through Ray Data: run it in a sweep "
                        "or with --launcher ray_train")
    sh = shard_io.open_shards(plan.shards)
    return (ArrayFeed(shard_io.read_split(sh, plan.cohort, "train"), rank=rank, world=world,
                      seed=plan.seed, shuffle=True),
            {split: ArrayFeed(shard_io.read_split(sh, plan.cohort, split), rank=rank,
                              world=world, seed=plan.seed, shuffle=False)
             for split in EVAL_SPLITS})


def fit_in_process(config: TrainConfig, *, storage_path: str | Path, name: str,
                   resume: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                   lr_find: LrFindSpec | None = None, make_feeds: MakeFeeds | None = None,
                   threads: int | None = None) -> TrainSummary:
    """Train ``config`` as the run ``storage_path/name`` in this process (one rank); a re-run
    resumes from the run's own latest checkpoint. ``on_epoch(metrics)`` is called after
    every epoch's checkpoint (a Tune trial reports there)."""
    t0, started = time.perf_counter(), time.time()
    run_dir = Path(storage_path).expanduser().resolve() / name
    plan, done = open_run(config, run_dir, resume)
    plan.threads = threads or config.threads or max(1, int(config.cpus_per_worker or 1))
    history = paths.read_jsonl(run_dir / paths.HISTORY_FILE)
    if not plan.finished(history) or (lr_find is not None and not lr_find.done):
        metric = config.checkpoint_metric
        store = ck.CheckpointStore(run_dir, keep=config.keep_checkpoints, metric=metric,
                                   mode=SCORE_METRICS[metric])


        def save(metrics: dict[str, Any], make: Callable[[], dict[str, Any]]) -> None:
            store.save(make())
            log.info("%s", format_epoch(metrics, plan.epochs))
            if on_epoch is not None:
                on_epoch(metrics)

        ctx = loop.RankContext(rank=0, world_size=1, device=device_for(plan.gpu),
                               launcher="process", prepare_model=lambda m: m.to(ctx.device),
                               last_checkpoint=lambda: ck.latest_readable(run_dir),
                               save=save)
        train_feed, eval_feeds = (make_feeds or array_feeds)(plan, 0, 1)
        run_rank(plan, ctx, train_feed, eval_feeds, checkpoint_metric=metric, lr_find=lr_find)
    return finish_run(config, plan, run_dir, done, t0=t0, started=started, launcher="process")


def lr_find_config(config: TrainConfig) -> TrainConfig:
    """The run a standalone LR range test plans: the model and data of ``config``, a
    constant lr (the ramp sets every step's lr itself), one epoch."""
    return dataclasses.replace(config, policy="constant", base_lr=1e-7, max_lr=None,
                               lr_bounds=None, decay=0.0, step_size_epochs=None, epochs=1)


def lr_find_in_process(config: TrainConfig, spec: LrFindSpec) -> dict[str, Any]:
    """``cxr-ray lr-find --launcher process``: the range test from ``config``'s initial model
    (``init_from`` included) in this process; → ``lr_find.json``'s content."""
    plan = plan_run(lr_find_config(config), "")
    plan.threads = config.threads or torch.get_num_threads()
    ctx = loop.RankContext(rank=0, world_size=1, device=device_for(plan.gpu),
                           launcher="process", prepare_model=lambda m: m.to(ctx.device),
                           last_checkpoint=lambda: None, save=lambda m, c: None)
    model, _, _ = loop.setup(plan, ctx)
    train_feed, eval_feeds = array_feeds(plan)
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    range_test(plan, ctx, model, train_feed, spec, val_feed=eval_feeds.get("val"))
    return paths.read_json(Path(spec.out) / paths.LR_FIND_FILE)

"""A run as a Ray Train ``TorchTrainer``: DDP over ``workers`` ranks, worker-group restarts
from the last checkpoint, the dashboard's Train view.

Launch (after ``cxr-ray prepare``)::

    cxr-ray train --shards SHARDS --cohort Pneumothorax --out runs/ptx-stage1 --workers 2
    cxr-ray train --shards SHARDS --cohort Pneumothorax --out runs/ptx-clr \\
        --init-from runs/ptx-stage1 --policy triangular --lr-bounds runs/ptx-lrfind/lr_find.json

The worker function is the plain loop (:func:`cxr_ray.train.run.run_rank`) plus the Ray
calls numbered below. Data: the driver reads the cohort's three splits from the Parquet shards
once into Ray's object store and every worker maps them zero-copy and takes its share
(:class:`~cxr_ray.train.feed.ArrayFeed`): no Ray Data actors or tasks per run or epoch, which
on a small machine cost more than an epoch of a small cohort. With ``augment_on =
"ray_data"`` every worker streams its share through Ray Data instead
(:mod:`cxr_ray.ray_backend.data_feed`).

Re-running with the same directory resumes: Ray Train finds its checkpoints there, every
worker gets the latest from ``ray.train.get_checkpoint()`` and continues at the next epoch
with the lr policy at the exact step it had reached. A worker that dies mid-epoch makes Ray
Train restart the group from that checkpoint (``FailureConfig(max_failures)``); the half-done
epoch is redone, rank 0 rewrites history.jsonl / steps.csv from the checkpoint, and
TensorBoard discards the redone steps (``purge_step``). On a multi-node cluster the run
directory must be storage every node sees, like the shard set.

A run of an object-store experiment (a sweep with ``storage_path = "s3://..."``, ``remote``
below) keeps cxr-ray's own files the same way the in-trial launcher does
(:mod:`cxr_ray.sweep.remote`): rank 0 makes its local copy of the run equal to the last
commit, keeps its checkpoints there (:class:`~cxr_ray.train.checkpoint.CheckpointStore`),
commits the run after every epoch and the LR range test at the end; Ray Train's own storage
(which must be reachable from every node) is the run's ``.ray_train/`` folder in the store,
and its reports carry metrics only. The trial then pulls the committed run to finish it.
"""

from __future__ import annotations

import dataclasses

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train.torch import TorchConfig, TorchTrainer

from cxr_ray import paths
from cxr_ray.data import shards as shard_io
from cxr_ray.errors import UserError
from cxr_ray.train import checkpoint as ck
from cxr_ray.train import loop
from cxr_ray.train import run as runs
from cxr_ray.train.config import SCORE_METRICS, RunPlan, TrainConfig, cpu_split
from cxr_ray.train.feed import ArrayFeed
from cxr_ray.train.lr_find import LrFindSpec
from cxr_ray.ray_backend.session import ray_session

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    plan = RunPlan.from_dict(config["plan"])
    # [1] This worker's place in the group and its device (Ray sets CUDA_VISIBLE_DEVICES).
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if plan.gpu else runs.device_for(False)
    if plan.gpu and device.type != "cuda":
        device = runs.device_for(True)  # one-line error (or the test-only CPU fallback)

    mirrors = _remote_mirrors(config.get("remote")) if rank == 0 else {}
    if "run" in mirrors:  # an object-store run: the last commit is the truth
        mirrors["run"].pull()
        store = ck.CheckpointStore(Path(plan.run_dir), keep=config["keep_checkpoints"],
                                   metric=config["checkpoint_metric"],
                                   mode=SCORE_METRICS[config["checkpoint_metric"]])
    if "lr_find" in mirrors:
        mirrors["lr_find"].pull()

    def last_checkpoint() -> dict[str, Any] | None:
        # [2] The checkpoint Ray Train restores after a restart or a driver re-run; or a
        # newer one in the run directory that Ray Train had persisted but not yet registered
        # when the run was killed (the run's checkpoint files are the source of truth).
        restored = None
        checkpoint = ray.train.get_checkpoint() if not config.get("remote") else None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                restored = ck.load_checkpoint(Path(folder) / paths.CHECKPOINT_FILE)
        own = ck.latest_readable(Path(plan.run_dir))
        if own is not None and (restored is None or own["epoch"] > restored["epoch"]):
            return own
        return restored

    def save(metrics: dict[str, Any], make_checkpoint) -> None:
        # [3] Report the epoch; rank 0 hands Ray Train the checkpoint to persist and prune.
        scored = dict(metrics)
        for key, mode in SCORE_METRICS.items():  # Ray ranks checkpoints by a number
            if scored.get(key) is None:
                scored[key] = float("-inf") if mode == "max" else float("inf")
        name = paths.checkpoint_dir_name(metrics["epoch"])
        if rank != 0:
            ray.train.report(scored, checkpoint=None, checkpoint_dir_name=name)
            return
        if "run" in mirrors:  # cxr-ray keeps and commits the checkpoint itself
            store.save(make_checkpoint())
            ray.train.report(scored, checkpoint=None, checkpoint_dir_name=name)
            mirrors["run"].push()
            return
        with tempfile.TemporaryDirectory() as folder:
            import torch

            torch.save(make_checkpoint(), Path(folder) / paths.CHECKPOINT_FILE)
            ray.train.report(scored, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)

    ctx = loop.RankContext(
        rank=rank, world_size=world, device=device, launcher="ray_train",
        # [4] Device placement and DDP (gloo on CPUs, NCCL on GPUs).
        prepare_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=device),
        last_checkpoint=last_checkpoint, save=save)
    if plan.augment_on == "ray_data":
        from cxr_ray.ray_backend import data_feed

        train_feed, eval_feeds = data_feed.feeds(plan, rank, world)
    else:
        train_feed, *evals = (
            ArrayFeed(ray.get(config["data"][split]), rank=rank, world=world, seed=plan.seed,
                      shuffle=split == "train") for split in ("train", *runs.EVAL_SPLITS))
        eval_feeds = dict(zip(runs.EVAL_SPLITS, evals))
    lr_find = LrFindSpec(**config["lr_find"]) if config.get("lr_find") else None
    runs.run_rank(plan, ctx, train_feed, eval_feeds,
                  checkpoint_metric=config["checkpoint_metric"], lr_find=lr_find)
    for mirror in mirrors.values():  # the LR range test and the run's last files committed
        mirror.push()


def _remote_mirrors(remote: dict[str, str] | None) -> dict[str, Any]:
    """Rank 0's mirrors of an object-store run: ``run`` (and ``lr_find``), see the module
    docstring; none for a run in a directory."""
    if not remote:
        return {}
    from cxr_ray.sweep import remote as sweep_remote

    out = {"run": sweep_remote.run_mirror(remote["uri"], remote["run"],
                                          skip=(f"{sweep_remote.RAY_TRAIN_DIR}/",))}
    if remote.get("lr_find"):
        out["lr_find"] = sweep_remote.run_mirror(remote["uri"], remote["lr_find"])
    return out


def _pull_committed(remote: dict[str, str] | None) -> None:
    """After a fit of an object-store run: what rank 0 committed, wherever it ran."""
    for mirror in _remote_mirrors(remote).values():
        mirror.pull()


def trainer(config: TrainConfig, plan: RunPlan, run_dir: Path, *,
            lr_find: LrFindSpec | None = None, callbacks: list[Any] | None = None,
            remote: dict[str, str] | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` of a planned run (call inside a Ray session). ``remote``: the
    run of an object-store experiment, ``{"uri": experiment URI, "run": "stage/run",
    "lr_find": "lr_find/run" or absent}``."""
    cpus, plan.threads = cpu_split(config, plan.workers, plan.gpu,
                                   float(ray.cluster_resources().get("CPU", 1)))
    loop_config: dict[str, Any] = {"plan": plan.to_dict(),
                                   "checkpoint_metric": config.checkpoint_metric,
                                   "keep_checkpoints": config.keep_checkpoints,
                                   "lr_find": lr_find.__dict__ if lr_find else None,
                                   "remote": remote}
    storage_path, name = str(run_dir.parent), run_dir.name
    if remote:
        from cxr_ray import storage
        from cxr_ray.sweep.remote import RAY_TRAIN_DIR

        storage_path, name = storage.join(remote["uri"], remote["run"]), RAY_TRAIN_DIR
    if plan.augment_on == "trainer":  # the splits in the object store; the workers shard them
        sh = shard_io.open_shards(plan.shards)
        loop_config["data"] = {split: ray.put(shard_io.read_split(sh, plan.cohort, split))
                               for split in ("train", *runs.EVAL_SPLITS)}
    resources = {"CPU": cpus, **config.worker_resources}
    if plan.gpu:
        resources["GPU"] = config.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if plan.gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=plan.workers, use_gpu=plan.gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=config.checkpoint_metric,
                checkpoint_score_order=SCORE_METRICS[config.checkpoint_metric])))


def fit(config: TrainConfig, *, storage_path: str | Path, name: str, resume: bool = True,
        lr_find: LrFindSpec | None = None, callbacks: list[Any] | None = None,
        remote: dict[str, str] | None = None) -> runs.TrainSummary:
    """Train ``config`` as the run ``storage_path/name`` under Ray Train; a re-run resumes
    it. Joins the initialised Ray, else ``config.address``/``RAY_ADDRESS``, else starts a
    local one. ``callbacks``: Ray Train ``UserCallback``s (a Tune trial's report bridge).
    ``remote``: see :func:`trainer` (the caller has pulled the run's last commit)."""
    t0, started = time.perf_counter(), time.time()
    run_dir = Path(storage_path).expanduser().resolve() / name
    plan, done = runs.open_run(config, run_dir, resume)
    history = paths.read_jsonl(run_dir / paths.HISTORY_FILE)
    if not plan.finished(history) or (lr_find is not None and not lr_find.done):
        with ray_session(config.address):
            fitter = trainer(config, plan, run_dir, lr_find=lr_find, callbacks=callbacks,
                             remote=remote)
            try:
                fitter.fit()
            except ray.train.TrainingFailedError as exc:
                _pull_committed(remote)
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                cause = lines[-1] if lines else type(exc).__name__
                done_now = len(paths.read_jsonl(run_dir / paths.HISTORY_FILE))
                raise UserError(f"training failed after epoch {done_now} of {plan.epochs} "
                                f"({cause}); re-run the same command to resume from the last "
                                "checkpoint") from exc
            _pull_committed(remote)
    return runs.finish_run(config, plan, run_dir, done, t0=t0, started=started,
                           launcher="ray_train")


def lr_find(config: TrainConfig, spec: LrFindSpec) -> dict[str, Any]:
    """``cxr-ray lr-find``: the range test from ``config``'s initial model on Ray Train's
    workers (the loss averaged over them every step); → ``lr_find.json``'s content."""
    fixed = runs.lr_find_config(config)
    out = Path(spec.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = dataclasses.replace(spec, out=str(out))
    (out / paths.LR_FIND_FILE).unlink(missing_ok=True)
    plan = runs.plan_run(fixed, "")  # no run directory: the test leaves no run behind
    plan.epochs = 0
    with ray_session(config.address), tempfile.TemporaryDirectory() as scratch:
        trainer(fixed, plan, Path(scratch) / "lr_find", lr_find=spec).fit()
    return paths.read_json(out / paths.LR_FIND_FILE)

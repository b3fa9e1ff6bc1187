"""The sweep on Ray Tune: one Tune experiment per stage, one trial per planned run.

Launch::

    cxr-ray sweep --config jobs/demo.toml            # re-running the same command resumes
    ray job submit --working-dir . -- cxr-ray sweep --config jobs/paper.toml   # on a cluster

Each trial is a Tune *function* trainable (:func:`_trial`) that trains its run with one of
two launchers (:func:`cxr_ray.sweep.plan.launcher_of`):

* **in the trial** (``workers = 1``): the loop runs in the trial's own actor, which asks Tune
  for the rank's CPUs and GPU share (``tune.with_resources``); checkpoints are cxr-ray's files
  in the run directory; every epoch goes to ``tune.report``. No Ray Train start-up.
* **Ray Train** (``workers > 1``): the trial holds a sliver of a CPU and fits a
  ``TorchTrainer``; ``TuneReportCallback`` forwards every epoch to Tune.

Tune thus sees a learning curve per trial (its ``ResultGrid``, schedulers), reuses a finished
trial's actor for the next one (torch already imported), retries a failed trial from its last
checkpoint (``FailureConfig``), and restores its experiment state after a driver kill; the
trial itself skips anything already finished (:mod:`cxr_ray.sweep.trial`). The driver prints
one line per stage and per finished trial in cxr-ray's words, and none of Tune's tables.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from cxr_ray import paths, storage
from cxr_ray.data import shards as shard_io
from cxr_ray.sweep import remote as sweep_remote
from cxr_ray.sweep import capacity, report
from cxr_ray.sweep.plan import TrialSpec, check_data, check_recipe, launcher_of, plan_trials
from cxr_ray.sweep.recipe import Recipe
from cxr_ray.sweep.trial import run_trial
from cxr_ray.errors import UserError
from cxr_ray.ray_backend import cluster, train_launcher
from cxr_ray.ray_backend.session import cluster_cpus, local_ray_started_here, ray_session
from cxr_ray.train import run as runs

log = logging.getLogger(__name__)

#: Tune's console output off for the driver (cxr-ray prints its own lines): without the
#: first, Tune adds a TensorBoard logger per trial (a second TensorBoard run per trial, and a
#: hint pointing at a folder under /tmp/ray that holds nothing of the experiment; its CSV and
#: JSON loggers are passed explicitly, since Tune's result reading needs their files); the
#: second selects the reporter that ``verbose=0`` silences completely.
QUIET_TUNE_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0"}


# --------------------------------------------------------------------------- the trial
def _trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: one trial, in its Tune actor."""
    spec = TrialSpec.from_dict(config["spec"])
    experiment = config["experiment"]  # a directory or an object-store URI
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    reported = []

    def on_epoch(metrics: dict[str, Any]) -> None:
        reported.append(metrics["epoch"])
        tune.report({**metrics, "stage": spec.stage, "cohort": spec.cohort})

    launcher = launcher_of(spec.train)
    if launcher == "process":
        make_feeds = None
        if spec.train.get("augment_on") == "ray_data":
            from cxr_ray.ray_backend import data_feed

            make_feeds = data_feed.feeds
        threads = max(1, int(tune.get_context().get_trial_resources().required_resources
                             .get("CPU", 1)))
        fit = functools.partial(runs.fit_in_process, make_feeds=make_feeds,
                                threads=spec.train.get("threads") or threads)
    else:
        fit = functools.partial(train_launcher.fit, callbacks=[TuneReportCallback()])
    metrics = run_trial(spec, experiment, fit, launcher=launcher, on_epoch=on_epoch)
    if not reported and launcher == "process":  # finished before: Tune still needs a result
        tune.report(metrics)


def trial_resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """What a trial asks Tune for: its rank's CPUs/GPU share in the trial (plus a bundle for
    its Ray Data tasks, which run inside the trial's placement group), or a sliver of a CPU
    when it only waits on its ``TorchTrainer``."""
    train, trial_cpus = config["spec"]["train"], config["trial_cpus"]
    if launcher_of(train) != "process":
        return tune.PlacementGroupFactory([{"CPU": trial_cpus}])
    rank = {"CPU": float(train.get("cpus_per_worker") or 1.0),
            **{k: float(v) for k, v in (train.get("worker_resources") or {}).items()}}
    if train.get("gpu"):
        rank["GPU"] = float(train.get("gpus_per_worker", 1.0))
    bundles = [rank]
    if train.get("augment_on") == "ray_data":
        bundles.append({"CPU": float(train.get("data_cpus", 1.0))})
    return tune.PlacementGroupFactory(bundles)


# --------------------------------------------------------------------------- the driver
def concurrency(recipe: Recipe, train: dict[str, Any]) -> int:
    """Trials at once for a stage whose trials train with ``train``: the recipe's number, or
    for ``"auto"`` how many trials' ranks fit on the cluster at its largest
    (:mod:`cxr_ray.sweep.capacity`: GPUs ÷ GPUs per rank on a GPU cluster)."""
    groups, cap, source = cluster.node_groups(recipe.resources.autoscale)
    request, workers = capacity.worker_request(train, recipe.resources.trial_cpus)
    fit = capacity.ranks_that_fit(groups, request, max_worker_nodes=cap)
    if fit < workers:
        what = (f"a trial needs {workers} rank(s) of {request} at once and the cluster "
                f"({source}) holds {fit}")
        if local_ray_started_here():  # no autoscaler will add a node: it would wait forever
            raise UserError(f"{recipe.source}: {what}; lower cpus_per_worker or workers")
        log.warning("%s; the stage waits for the autoscaler to add nodes that can", what)
    setting = recipe.resources.max_concurrent_trials
    if setting != "auto":
        return int(setting)
    n = capacity.trials_at_once(groups, request, workers, data_reserve=0.0,
                                max_worker_nodes=cap)
    log.info("max_concurrent_trials auto: %d (%d rank(s) of %s per trial; nodes from %s)",
             n, workers, request, source)
    return n


class _Progress(tune.Callback):
    """One line per finished or failed trial (a local Ray keeps the trials' logs in its
    session directory): its last validation accuracy and, when an earlier epoch did better,
    that epoch's (what a ``val_accuracy`` checkpoint metric keeps)."""

    def __init__(self, stage: str, total: int) -> None:
        self.stage, self.total, self.done = stage, total, 0
        self.t0 = time.time()  # wall clock: a restored callback keeps it
        self.best: dict[str, tuple[float, Any]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        acc = result.get("val_accuracy")
        if isinstance(acc, float) and acc >= self.best.get(trial.trial_id, (-1.0, None))[0]:
            self.best[trial.trial_id] = (acc, result.get("epoch"))

    def _line(self, trial: Any, what: str) -> None:
        self.done += 1
        acc = (trial.last_result or {}).get("val_accuracy")
        text = f": val accuracy {acc:.3f}" if isinstance(acc, float) else ""
        best, epoch = self.best.get(trial.trial_id, (None, None))
        if text and best is not None and best > acc:
            text += f" (best {best:.3f}, epoch {epoch})"
        log.info("%s %d/%d %s %s%s (%.0f s)", self.stage, self.done, self.total, what,
                 trial.config["spec"]["run_name"], text, time.time() - self.t0)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "FAILED")


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """:data:`QUIET_TUNE_ENV` in the driver while Tune sets up and runs a stage."""
    saved = {k: os.environ.get(k) for k in QUIET_TUNE_ENV}
    os.environ.update(QUIET_TUNE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_stage(recipe: Recipe, stage: str, specs: list[TrialSpec], experiment: Path,
              mirror: storage.Mirror | None = None) -> None:
    """One Tune experiment: the stage's trials (resumed if Tune saved it before).
    ``mirror``: the experiment's own files, when it lives in an object store."""
    if not specs:
        return
    t0, started = time.perf_counter(), time.time()
    trainable = tune.with_resources(_trial, trial_resources)
    where = recipe.experiment_uri  # in an object store Tune keeps its state there itself
    tune_root = storage.join(where, paths.TUNE_DIR)
    path = storage.join(tune_root, stage)
    n = concurrency(recipe, specs[0].train)
    launcher = launcher_of(specs[0].train)
    log.info("%s: %d trials, %d at a time (%s)", stage, len(specs), n,
             "in their Tune trials" if launcher == "process" else "each a Ray Train fit")
    with _quiet_tune():
        if tune.Tuner.can_restore(path):
            log.info("%s: resuming the Tune experiment in %s", stage, path.partition("?")[0])
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                       restart_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"spec": tune.grid_search([s.to_dict() for s in specs]),
                             "experiment": where,
                             "trial_cpus": recipe.resources.trial_cpus},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=n,
                    # A finished trial's actor (torch and cxr-ray imported) runs the next one.
                    reuse_actors=True,
                    trial_name_creator=lambda t: t.config["spec"]["run_name"],
                    trial_dirname_creator=lambda t: t.config["spec"]["run_name"]),
                run_config=tune.RunConfig(
                    name=stage, storage_path=tune_root,
                    callbacks=[CSVLoggerCallback(), JsonLoggerCallback(),
                               _Progress(stage, len(specs))],
                    failure_config=tune.FailureConfig(max_failures=1), verbose=0),
            )
        results = tuner.fit()
    paths.append_jsonl(experiment / paths.SWEEP_LOG, {
        "stage": stage, "trials": len(specs), "concurrency": n, "launcher": launcher,
        "started": started, "wall_seconds": time.perf_counter() - t0, "cpus": cluster_cpus()})
    if mirror is not None:
        mirror.push()
    failed = [r for r in results if r.error is not None]
    if failed:
        first = failed[0]
        raise RuntimeError(f"{stage}: {len(failed)} of {len(results)} trials failed; first: "
                           f"{first.path}: {str(first.error).strip().splitlines()[-1]}")


def run_sweep(recipe: Recipe, *, resume: bool = False, address: str | None = None) -> Path:
    """Run (or resume) the whole sweep and write the report; returns report.md's path
    (in the local copy when the experiment lives in an object store)."""
    experiment, uri = recipe.experiment_dir, recipe.experiment_uri
    mirror = sweep_remote.experiment_mirror(uri) if storage.is_uri(uri) else None
    if mirror is not None:
        storage.check_writable(mirror.remote)
        mirror.pull()
    if resume and not (experiment / paths.RECIPE_FILE).is_file():
        raise UserError(f"--resume: {uri} holds no sweep to resume; run without --resume")
    shard_io.open_shards(recipe.experiment.shards, expect_size=recipe.train.get("image_size"))
    stage1, stage2, comparison = plan_trials(recipe)
    experiment.mkdir(parents=True, exist_ok=True)
    check_recipe(experiment, recipe)
    check_data(experiment, recipe)
    if mirror is not None:
        mirror.push()
    start = time.perf_counter()
    with ray_session(address):
        log.info("Ray: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0),
                 ray.cluster_resources().get("GPU", 0))
        for stage, specs in (("stage1", stage1), ("stage2", stage2),
                             ("comparison", comparison)):
            run_stage(recipe, stage, specs, experiment, mirror)
    if mirror is not None:
        sweep_remote.pull_experiment(uri)
    path = report.write_report(experiment, target=recipe.experiment.target)
    if mirror is not None:
        mirror.push()
    log.info("sweep of %d trials done in %.0f s", len(stage1) + len(stage2) + len(comparison),
             time.perf_counter() - start)
    return path

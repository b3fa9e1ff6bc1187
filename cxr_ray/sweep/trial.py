"""One sweep trial from its spec to ``trial.json``, whichever launcher trains it.

Idempotent: a finished trial (its ``trial.json``, written last) returns the metrics stored
there without touching its run; an unfinished one resumes from its last checkpoint (the
launcher's own resume). So a trial that Tune restarts after a driver kill, or retries after
a failure (``FailureConfig``), costs only what it had not done.

An experiment in an object store (:mod:`cxr_ray.sweep.remote`): the trial first makes its
local copy of its run (and, in stage 2, of its stage-1 run) equal to the last commit, trains
there, commits the run after every epoch's checkpoint, and commits ``trial.json`` last.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from cxr_ray import paths, storage
from cxr_ray.sweep import remote
from cxr_ray.sweep.plan import TrialSpec
from cxr_ray.train import LrFindSpec, TrainConfig, TrainSummary
from cxr_ray.train.config import SELECTION_ACCURACY

log = logging.getLogger(__name__)


class Fit(Protocol):
    """A launcher: train ``config`` as ``storage_path/name`` (resuming), then the LR range
    test ``lr_find`` if given; the run's summary. ``on_epoch`` (the in-trial launcher only)
    is called after every epoch's checkpoint."""

    def __call__(self, config: TrainConfig, *, storage_path: Path, name: str,
                 lr_find: LrFindSpec | None, **on_epoch: Any) -> TrainSummary: ...


def trial_config(spec: TrialSpec, experiment: Path) -> TrainConfig:
    """The trial's training config: stage 2 starts from its stage-1 run (which must have
    finished) with the bounds of that run's LR range test when the recipe asks for them."""
    cfg = dict(spec.train)
    if spec.stage == "stage2":
        source = paths.run_dir(experiment, "stage1", str(spec.stage1_run))
        if not (source / paths.SUMMARY_FILE).is_file():
            raise RuntimeError(f"stage-1 run {source} has not finished; stage 2 of "
                               f"{spec.cohort} cannot start")
        cfg["init_from"] = str(source)
        if spec.lr_source == "lr_find":
            cfg["lr_bounds"] = str(paths.lr_find_dir(experiment, str(spec.stage1_run))
                                   / paths.LR_FIND_FILE)
        if isinstance(spec.stop_at, str):  # "stage1+MARGIN": fixed before stage 2 trains
            stage1 = paths.read_json(source / paths.SUMMARY_FILE)["history"]
            best = max(r[SELECTION_ACCURACY] for r in stage1
                       if r.get(SELECTION_ACCURACY) is not None)
            cfg["stop_at"] = min(1.0, best + float(spec.stop_at.split("+", 1)[1]))
        elif spec.stop_at is not None:
            cfg["stop_at"] = float(spec.stop_at)
    return TrainConfig.from_dict(cfg)


def finished_metrics(spec: TrialSpec, experiment: Path) -> dict[str, Any] | None:
    """The stored metrics of a finished trial, or None."""
    done = paths.read_json(paths.run_dir(experiment, spec.stage, spec.run_name)
                           / paths.TRIAL_FILE)
    return done["metrics"] if done else None


def _pull(spec: TrialSpec, uri: str) -> tuple[storage.Mirror, list[storage.Mirror]]:
    """An object-store experiment: this trial's run (and LR range test) folders made equal to
    their last commit, and stage 2's stage-1 run fetched; (the run's mirror, the others this
    trial writes)."""
    own = remote.run_mirror(uri, f"{spec.stage}/{spec.run_name}",
                            skip=(f"{remote.RAY_TRAIN_DIR}/",))
    own.pull()
    writes = []
    if spec.lr_find is not None:
        writes.append(remote.run_mirror(uri, f"{paths.LR_FIND_DIR}/{spec.run_name}"))
        writes[-1].pull()
    if spec.stage == "stage2":
        remote.run_mirror(uri, f"stage1/{spec.stage1_run}", skip=(f"{paths.TB_DIR}/",)).pull()
        remote.run_mirror(uri, f"{paths.LR_FIND_DIR}/{spec.stage1_run}").pull()
    return own, writes


def run_trial(spec: TrialSpec, experiment: str | Path, fit: Fit, *, launcher: str,
              on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train one trial (and its LR range test) with ``fit``; its final metrics.
    ``experiment``: a local directory or an object-store URI."""
    uri = str(experiment) if storage.is_uri(experiment) else None
    experiment = storage.local_path(experiment)
    own, writes = _pull(spec, uri) if uri else (None, [])
    if own is not None and paths.TRIAL_FILE not in own.committed():
        (own.local / paths.TRIAL_FILE).unlink(missing_ok=True)  # never committed: not done
    stored = finished_metrics(spec, experiment)
    if stored is not None:  # finished before a driver restart: Tune may not have recorded it
        log.info("%s/%s finished before; not re-run", spec.stage, spec.run_name)
        return stored
    t0 = time.perf_counter()
    config = trial_config(spec, experiment)
    lr_find = None
    if spec.lr_find is not None:
        lr_find = LrFindSpec(out=str(paths.lr_find_dir(experiment, spec.run_name)),
                             settings=dict(spec.lr_find))

    def after_epoch(metrics: dict[str, Any]) -> None:
        if on_epoch is not None:
            on_epoch(metrics)
        if own is not None:
            own.push()  # the epoch's checkpoint committed

    if launcher == "process":
        hooks: dict[str, Any] = {"on_epoch": after_epoch}
    else:  # rank 0 of the TorchTrainer commits the run and its LR range test itself
        hooks = {"remote": {"uri": uri, "run": f"{spec.stage}/{spec.run_name}",
                            **({"lr_find": f"{paths.LR_FIND_DIR}/{spec.run_name}"}
                               if spec.lr_find is not None else {})}} if uri else {}
    summary = fit(config, storage_path=experiment / spec.stage, name=spec.run_name,
                  lr_find=lr_find, **hooks)
    plan = summary.plan or {}
    step_size_epochs = config.step_size_epochs
    if spec.stage == "stage2" and step_size_epochs is None:
        step = (plan.get("policy") or {}).get("step_size")
        spe = plan.get("steps_per_epoch")
        step_size_epochs = step / spe if step and spe else None
    # Where this trial's time went (the report's cost table): wall time of this call, the
    # Ray Train fits it started, and the train + eval seconds of the epochs it trained.
    trained = summary.history[summary.resumed_from_epoch:]
    # The run's model is its validation-selected epoch: its test numbers are the headline.
    chosen = next((r for r in summary.history if r["epoch"] == summary.selected_epoch),
                  summary.history[-1] if summary.history else {})
    trial = {
        "stage": spec.stage, "cohort": spec.cohort, "policy": spec.policy, "axes": spec.axes,
        "lr_source": spec.lr_source, "stage1_run": spec.stage1_run,
        "step_size_epochs": step_size_epochs, "status": "finished", "launcher": launcher,
        "stop_at": config.stop_at, "stopped_at_target": summary.stopped_at_target,
        "seed": config.seed, "selected_epoch": chosen.get("epoch"),
        "trial_seconds": time.perf_counter() - t0,
        "fits": int(launcher == "ray_train" and summary.startup_seconds is not None),
        "epoch_seconds": sum(r.get("epoch_seconds") or 0.0 for r in trained),
        "startup_seconds": summary.startup_seconds,
        "teardown_seconds": summary.teardown_seconds,
        "metrics": {
            "cohort": spec.cohort, "policy": spec.policy or "", "stage": spec.stage,
            "epochs": summary.epochs, "compute_seconds": summary.compute_seconds,
            "seed": config.seed, "selected_epoch": chosen.get("epoch"),
            **{k: v for k, v in chosen.items()
               if k.startswith(("test_", "val_")) and v is not None},
            "best_metric": summary.best_metric if summary.best_metric is not None
            else math.nan},
    }
    if lr_find is not None:
        found = paths.read_json(Path(lr_find.out) / paths.LR_FIND_FILE) or {}
        log.info("%s: LR range test suggests base %.3g, max %.3g", spec.run_name,
                 found.get("base_lr", math.nan), found.get("max_lr", math.nan))
    # A Ray Train fit's rank 0 committed the run and the LR range test under its own name:
    # the trial takes them back (refresh) to add trial.json. In-trial, this process wrote
    # every commit, and a commit by anyone else means it was presumed dead (fencing).
    handed_back = launcher != "process"
    for mirror in writes:  # the LR range test committed before the trial is
        if handed_back:
            mirror.refresh()
        mirror.push()
    paths.write_json(paths.run_dir(experiment, spec.stage, spec.run_name) / paths.TRIAL_FILE,
                     trial)  # written last: its presence marks a finished trial
    if own is not None:
        if handed_back:
            own.refresh()
        own.push()
    return trial["metrics"]

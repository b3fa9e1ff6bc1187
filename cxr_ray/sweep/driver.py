"""Ray Tune: the study's two-stage comparison over cohorts × lr policies (SPEC §6, §8).

Launch::

    cxr-ray sweep --config jobs/demo.toml            # re-running the same command resumes
    ray job submit --working-dir . -- cxr-ray sweep --config jobs/paper.toml   # on a cluster

The protocol, one Tune experiment per stage:

1. **stage 1**: one trial per cohort (× any ``[stage1_grid]`` axis, e.g. backbone × optimizer),
   trained with the study's stage-1 optimizer (Table 4: SGD with time decay; Hernia Adam);
   then, from that model, the **LR range test** whose suggestion becomes the cohort's CLR bounds;
2. **stage 2**: cohort × policy (× any ``[grid]`` axis), every trial starting from its cohort's
   stage-1 checkpoint (fresh optimizer and policy), CLR / one-cycle bounds from the LR range
   test, the recipe or the study's Table 8;
3. the **report** (:mod:`cxr_ray.sweep.report`).

Each trial is a Tune *function* trainable that builds and fits a ``TorchTrainer`` through
:func:`cxr_ray.train.fit` (the Train V2 pattern); the trial itself holds a sliver of a CPU and
Tune runs ``max_concurrent_trials`` of them at once, so the cluster's CPUs/GPUs decide how many
trainers train at a time.  The experiment directory ``storage_path/name`` holds everything::

    EXP/recipe.json                 the validated recipe (a re-run must match it)
    EXP/stage1/<run>/               train.fit run dirs: history, checkpoints, tensorboard/
    EXP/lr_find/<run>/lr_find.json  LR range test of a stage-1 model (+ PNG, tensorboard/)
    EXP/stage2/<run>/               one per cohort × policy (× axes)
    EXP/comparison/<run>/           ``[comparison]`` trials (e.g. backbone × optimizer)
    EXP/tune/stage1, EXP/tune/stage2   Tune's experiment state (resume) and TBX logs
    EXP/sweep_log.jsonl             per stage run: trials, concurrency, wall seconds
    EXP/report/                     results.csv, report.md, plots

Run names carry the stage, cohort, policy and axis values (``stage2/Fibrosis__triangular``),
so ``tensorboard --logdir EXP`` lists every trial side by side.  Resume: finished trials are
never re-run (Tune restores its experiment state, and a finished run dir is returned as is);
unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_ray.sweep import report
from cxr_ray.sweep.recipe import BOUNDED_POLICIES, Recipe
from cxr_ray.errors import UserError

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
#: One JSON line per stage run (resumes append): trials, concurrency, wall seconds.
SWEEP_LOG = "sweep_log.jsonl"
#: Training keys that change the architecture: a stage-2 axis on one must be a stage-1 axis
#: too, so every stage-2 trial has a stage-1 model of its kind to start from.
ARCHITECTURE_KEYS = ("model", "width", "image_size", "dropout")
#: CPUs ``max_concurrent_trials = "auto"`` leaves free for Ray Data on CPU-only clusters.
DATA_RESERVE = 0.5


@dataclass
class TrialSpec:
    """One trial: what it trains and where (plain values: it travels in Tune's config)."""

    stage: str
    cohort: str
    run_name: str
    train: dict[str, Any]
    """TrainConfig fields (without ``init_from``/``lr_bounds``, resolved in the trial)."""
    policy: str | None = None
    axes: dict[str, Any] = field(default_factory=dict)
    lr_source: str | None = None
    """Stage 2: ``lr_find``, ``recipe``, ``paper`` or ``preset`` (constant/time decay)."""
    stage1_run: str | None = None
    """Stage 2: the stage-1 run it starts from."""
    lr_find: dict[str, Any] | None = None
    """Stage 1: the LR range test to run after training (None: none)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialSpec":
        return cls(**d)


def _axis_suffix(axes: dict[str, Any]) -> str:
    return "".join(f"__{k}-{v}" for k, v in axes.items())


def _combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    combos: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def plan_trials(recipe: Recipe) -> tuple[list[TrialSpec], list[TrialSpec], list[TrialSpec]]:
    """Stage-1, stage-2 and comparison trials of a recipe, in a stable order."""
    shared = {**recipe.train, "shards": str(Path(recipe.experiment.shards).expanduser().resolve())}
    s1_axes = _combinations(recipe.stage1_grid)
    s2_grid = {k: v for k, v in recipe.grid.items() if k != "policy"}
    for key in s2_grid:
        if key in ARCHITECTURE_KEYS and not set(map(repr, s2_grid[key])) <= set(
                map(repr, recipe.stage1_grid.get(key, []))):
            raise UserError(f"{recipe.source}: [grid] {key} changes the model; list the same "
                            f"values in [stage1_grid] {key} so stage 2 has stage-1 models to "
                            "start from")
    stage1, stage2 = [], []
    lr_cfg = dataclasses.asdict(recipe.lr_find) if recipe.lr_find.enabled else None
    for cohort in recipe.cohort_names:
        for axes in s1_axes:
            spec = TrialSpec(stage="stage1", cohort=cohort, run_name=cohort + _axis_suffix(axes),
                             train={**shared, **recipe.stage1, **axes, "cohort": cohort},
                             axes=axes, lr_find=None)
            stage1.append(spec)
        for policy_axes in _combinations(s2_grid):
            # The stage-1 run whose axes agree with this trial's on every shared key.
            source = next(s for s in stage1 if s.cohort == cohort and all(
                s.axes.get(k, v) == v for k, v in policy_axes.items()))
            if lr_cfg is not None and source.lr_find is None:
                source.lr_find = lr_cfg
            for policy in recipe.grid["policy"]:
                bounded = policy in BOUNDED_POLICIES
                lr_source = recipe.stage2_extra.bounds if bounded else "preset"
                train = {**shared, **recipe.stage2,
                         **recipe.stage2_extra.by_cohort.get(cohort, {}), **policy_axes,
                         "cohort": cohort, "policy": policy}
                if bounded and lr_source == "paper":
                    train.setdefault("preset", "paper")
                stage2.append(TrialSpec(
                    stage="stage2", cohort=cohort, policy=policy, axes=policy_axes,
                    run_name=f"{cohort}__{policy}{_axis_suffix(policy_axes)}", train=train,
                    lr_source=lr_source, stage1_run=source.run_name))
    comparison = [
        TrialSpec(stage="comparison", cohort=cohort, run_name=cohort + _axis_suffix(axes),
                  train={**shared, **recipe.stage1, **recipe.comparison.train, **axes,
                         "cohort": cohort}, axes=axes)
        for cohort in recipe.comparison.cohorts
        for axes in _combinations(recipe.comparison.grid)]
    return stage1, stage2, comparison


# --------------------------------------------------------------------------- the trial
def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_trial(spec: TrialSpec, experiment: Path) -> dict[str, Any]:
    """Train one trial (and its LR range test); returns its final metrics.

    Idempotent: a finished trial (its ``trial.json``) returns the metrics stored there, without
    touching its run; an unfinished one resumes from its last checkpoint (``train.fit``). So a
    trial Tune restarts after a driver crash costs only its start-up.
    """
    from cxr_ray import train

    run_dir = experiment / spec.stage / spec.run_name
    done = run_dir / report.TRIAL_FILE
    if done.is_file():  # finished before a driver restart: Tune may not have recorded it
        log.info("%s/%s finished before; not re-run", spec.stage, spec.run_name)
        return json.loads(done.read_text())["metrics"]
    t0 = time.perf_counter()
    cfg = dict(spec.train)
    if spec.stage == "stage2":
        source = experiment / "stage1" / str(spec.stage1_run)
        if not (source / train.SUMMARY_FILE).is_file():
            raise RuntimeError(f"stage-1 run {source} has not finished; stage 2 of "
                               f"{spec.cohort} cannot start")
        cfg["init_from"] = str(source)
        if spec.lr_source == "lr_find":
            cfg["lr_bounds"] = str(experiment / "lr_find" / str(spec.stage1_run) / "lr_find.json")
    trial = {"stage": spec.stage, "cohort": spec.cohort, "policy": spec.policy,
             "axes": spec.axes, "lr_source": spec.lr_source, "stage1_run": spec.stage1_run,
             "step_size_epochs": cfg.get("step_size_epochs"), "status": "finished"}
    summary = train.fit(train.TrainConfig.from_dict(cfg), storage_path=experiment / spec.stage,
                        name=spec.run_name)
    plan = summary.plan or {}
    if spec.stage == "stage2" and trial["step_size_epochs"] is None:
        step = (plan.get("policy") or {}).get("step_size")
        spe = plan.get("steps_per_epoch")
        trial["step_size_epochs"] = step / spe if step and spe else None
    fits = int(summary.startup_seconds is not None)
    if spec.lr_find is not None:
        fits += _lr_find(spec, cfg, experiment, summary)
    # Where this trial's time went (the report's cost table): wall time of this call, its
    # fits, and the train + eval seconds of the epochs it trained.
    trained = summary.history[summary.resumed_from_epoch:]
    trial.update(trial_seconds=time.perf_counter() - t0, fits=fits,
                 epoch_seconds=sum(r.get("epoch_seconds") or 0.0 for r in trained),
                 startup_seconds=summary.startup_seconds,
                 teardown_seconds=summary.teardown_seconds)
    last = summary.history[-1] if summary.history else {}
    trial["metrics"] = {
        "cohort": spec.cohort, "policy": spec.policy or "", "stage": spec.stage,
        "epochs": summary.epochs, "compute_seconds": summary.compute_seconds,
        **{k: v for k, v in last.items() if k.startswith("test_") and v is not None},
        "best_metric": summary.best_metric if summary.best_metric is not None else math.nan}
    # Written last: its presence marks a finished trial (the report reads only those).
    _write_json(done, trial)
    return trial["metrics"]


def _lr_find(spec: TrialSpec, cfg: dict[str, Any], experiment: Path, summary) -> int:
    """The LR range test of a finished stage-1 run (once); → fits run (0 or 1)."""
    from cxr_ray import train

    out = experiment / "lr_find" / spec.run_name
    if (out / "lr_find.json").is_file():
        return 0
    lr = dict(spec.lr_find or {})
    lr.pop("enabled", None)
    config = train.TrainConfig.from_dict({**cfg, "init_from": summary.run_dir})
    result = train.lr_find(config, out=out, **lr)
    data = json.loads((out / "lr_find.json").read_text())
    if data.get("cohort") != spec.cohort:
        data["cohort"] = spec.cohort
        _write_json(out / "lr_find.json", data)
    log.info("%s: LR range test suggests base %.3g, max %.3g", spec.run_name,
             result["base_lr"], result["max_lr"])
    return 1


def _tune_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: one trial (runs in a Tune trial actor)."""
    from ray import tune  # Ray-specific

    spec = TrialSpec.from_dict(config["spec"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = run_trial(spec, Path(config["experiment"]))
    tune.report(metrics)


# --------------------------------------------------------------------------- the driver
def concurrency(recipe: Recipe) -> int:
    """Trials at once: the recipe's number, or for ``"auto"`` how many trials' workers fit on
    the cluster at its largest (:mod:`cxr_ray.sweep.capacity`).

    The rule: the nodes are the live ones, or, on a cluster with an autoscaler whose config
    can be read (the GCS's cluster config, this cluster's ``--autoscaling-config``,
    ``~/ray_bootstrap_config.yaml``), every worker node type ``max_workers`` times plus the
    head, so a cluster that starts with zero workers runs what it can scale to. A worker
    asks ``{"CPU": cpus_per_worker + trial_cpus / workers, "GPU": 1 with gpu,
    **worker_resources}``; a node holds as many as fit in every requested resource (none on
    nodes lacking one, e.g. the head for ``worker_resources = {gpu_node = 0.01}``), the head
    keeping ``DATA_RESERVE`` CPUs free for CPU-only training; trials = workers that fit //
    ``workers``, at least 1. On one machine that is ``(CPUs - 0.5) // (workers ×
    cpus_per_worker + trial_cpus)``.
    """
    from cxr_ray.sweep import capacity

    setting = recipe.resources.max_concurrent_trials
    if setting != "auto":
        return int(setting)
    groups, cap, source = capacity.cluster_node_groups()
    request, workers = capacity.worker_request(recipe.train, recipe.resources.trial_cpus)
    n = capacity.trials_at_once(groups, request, workers, data_reserve=DATA_RESERVE,
                                max_worker_nodes=cap)
    log.info("max_concurrent_trials auto: %d (%d worker(s) of %s per trial; nodes from %s)",
             n, workers, request, source)
    return n


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def _progress(stage: str, total: int) -> Any:
    """A Tune callback logging one line per finished or failed trial (the driver's progress:
    a local Ray keeps the trials' own logs in its session directory)."""
    from ray.tune import Callback  # Ray-specific

    class _Progress(Callback):
        def __init__(self) -> None:
            self.done, self.t0 = 0, time.time()  # wall clock: a restored callback keeps it

        def _line(self, trial: Any, what: str) -> None:
            self.done += 1
            r = trial.last_result or {}
            acc = r.get("test_accuracy")
            log.info("%s %d/%d %s %s%s (%.0f s)", stage, self.done, total, what,
                     trial.config["spec"]["run_name"],
                     f": test accuracy {acc:.3f}" if isinstance(acc, float) else "",
                     time.time() - self.t0)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "FAILED")

    return _Progress()


def _run_stage(recipe: Recipe, stage: str, specs: list[TrialSpec], experiment: Path) -> None:
    """One Tune experiment: the stage's trials (resumed if Tune saved it before)."""
    from ray import tune  # Ray-specific from here on
    from ray.tune.logger import TBXLoggerCallback

    if not specs:
        return
    t0, started = time.perf_counter(), time.time()
    trainable = tune.with_resources(_tune_trial, {"CPU": recipe.resources.trial_cpus})
    tune_dir = experiment / "tune"
    path = tune_dir / stage
    n = concurrency(recipe)
    log.info("%s: %d trials, %d at a time", stage, len(specs), n)
    if tune.Tuner.can_restore(str(path)):
        log.info("%s: resuming the Tune experiment in %s", stage, path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"spec": tune.grid_search([s.to_dict() for s in specs]),
                         "experiment": str(experiment)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=n,
                # A finished trial's actor (torch and cxr-ray already imported) runs the next
                # trial: one process start and ~4 CPU-seconds of imports saved per trial.
                reuse_actors=True,
                trial_name_creator=lambda t: t.config["spec"]["run_name"],
                trial_dirname_creator=lambda t: t.config["spec"]["run_name"]),
            run_config=tune.RunConfig(
                name=stage, storage_path=str(tune_dir),
                callbacks=[TBXLoggerCallback(), _progress(stage, len(specs))],
                failure_config=tune.FailureConfig(max_failures=1), verbose=0),
        )
    results = tuner.fit()
    with open(experiment / SWEEP_LOG, "a") as fh:  # the report's cost table reads it
        fh.write(json.dumps({"stage": stage, "trials": len(specs), "concurrency": n,
                             "started": started, "wall_seconds": time.perf_counter() - t0,
                             "cpus": _cluster_cpus()}) + "\n")
    failed = [r for r in results if r.error is not None]
    if failed:
        first = failed[0]
        raise RuntimeError(f"{stage}: {len(failed)} of {len(results)} trials failed; first: "
                           f"{first.path}: {str(first.error).strip().splitlines()[-1]}")


def _check_recipe(experiment: Path, recipe: Recipe) -> None:
    stored = experiment / RECIPE_FILE
    current = json.loads(json.dumps(recipe.to_dict(), default=str))
    if stored.is_file():
        before = json.loads(stored.read_text())
        before.pop("source", None)
        now = dict(current)
        now.pop("source", None)
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise UserError(f"{experiment} was started with a different recipe (sections "
                            f"{', '.join(changed)} differ); use a new experiment name, or "
                            "restore the recipe to resume")
    else:
        _write_json(stored, current)


def run_sweep(recipe: Recipe, *, resume: bool = False, address: str | None = None) -> Path:
    """Run (or resume) the whole sweep and write the report; returns report.md's path."""
    from cxr_ray.pipeline import open_shards
    from cxr_ray.train import ray_session  # a local Ray keeps the workers' logs to itself

    experiment = recipe.experiment_dir
    if resume and not (experiment / RECIPE_FILE).is_file():
        raise UserError(f"--resume: {experiment} holds no sweep to resume; run without --resume")
    open_shards(recipe.experiment.shards, expect_size=recipe.train.get("image_size"))
    stage1, stage2, comparison = plan_trials(recipe)
    experiment.mkdir(parents=True, exist_ok=True)
    _check_recipe(experiment, recipe)
    start = time.perf_counter()
    from cxr_ray.train import set_control_env

    set_control_env(address)  # read by the Ray Train controllers the trials start
    with ray_session(address):
        _run_stage(recipe, "stage1", stage1, experiment)
        _run_stage(recipe, "stage2", stage2, experiment)
        _run_stage(recipe, "comparison", comparison, experiment)
    path = report.write_report(experiment, target=recipe.experiment.target)
    log.info("sweep of %d trials done in %.0f s", len(stage1) + len(stage2) + len(comparison),
             time.perf_counter() - start)
    return path

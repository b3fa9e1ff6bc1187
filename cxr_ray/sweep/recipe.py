"""Sweep recipes: TOML in, typed and validated sections out.

A recipe (``jobs/demo.toml``, ``jobs/paper.toml``) describes one experiment: which shards,
which cohorts, the training settings every trial shares, what stage 1, the LR range test and
stage 2 change, and the grid axes.  Every section is a small dataclass with a docstring per
field; an unknown or ill-typed key is a :class:`~cxr_ray.errors.UserError` naming the file and
the key (``jobs/demo.toml: [stage2] epochs: must be an integer >= 1, got 'four'``).

Grid axes are recipe keys, not hard-coded: ``[grid]`` holds stage-2 axes (``policy`` by
default, any :class:`~cxr_ray.train.TrainConfig` key too), ``[stage1_grid]`` stage-1 axes
(e.g. ``model`` × ``optimizer`` for the study's backbone comparison).  The cohort axis is
``experiment.cohorts``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_ray import storage
from cxr_ray.data import cohorts
from cxr_ray.optim import lr_finder, schedules
from cxr_ray.errors import UserError

#: The stage-2 policies compared by default: the study's, plus one-cycle as a modern baseline.
DEFAULT_POLICIES = ("constant", "time_decay", "triangular", "triangular2",
                    "modified_triangular2", "exp_range", "one_cycle")
#: Policies whose bounds come from the LR range test (``bounds = "lr_find"``).
BOUNDED_POLICIES = schedules.BOUNDED_POLICIES


@dataclass
class ExperimentSection:
    """``[experiment]``: what and where."""

    name: str = ""
    """Experiment name: the directory ``storage_path/name`` holds everything. Stable, no
    timestamps: re-running the same recipe resumes the same experiment."""
    storage_path: str = "experiments"
    """Where experiments live: a local directory, or shared storage (NFS mount) on a cluster.
    Relative paths are relative to the current directory."""
    shards: str = ""
    """Shard set made by ``cxr-ray prepare``."""
    cohorts: list[str] | str = "all"
    """Cohorts to run: ``"all"`` (the 15) or a list of names."""
    target: float | str = "constant"
    """Target validation accuracy for "epochs to reach": a fraction (0.8), ``"constant"``
    (the best validation accuracy the constant policy reached in stage 2 for that cohort
    and seed) or ``"stage1"``."""
    seeds: list[int] | int | None = None
    """Training seeds: a count (``3`` = seeds 0, 1, 2) or a list; default one seed (the
    ``[train] seed``, else 0). Each seed trains its own stage 1, LR range test and stage 2
    on the same splits (the shard set's split seed); the report gives mean ± 95 % CI over
    seeds."""

    @property
    def seed_list(self) -> list[int]:
        if self.seeds is None:
            return [0]
        if isinstance(self.seeds, int):
            return list(range(self.seeds))
        return list(self.seeds)


@dataclass
class LrFindSection:
    """``[lr_find]``: the LR range test from each cohort's stage-1 model."""

    enabled: bool = True
    """Run it (stage 2's CLR bounds need it unless ``[stage2] bounds`` says otherwise)."""
    min_lr: float = 1e-7
    """Start of the exponential ramp."""
    max_lr: float = 1.0
    """End of the ramp."""
    num_steps: int = 100
    """Optimizer steps of the ramp (over as many epochs as that takes). With momentum β, at
    least 20/ln(1/β) (190 for 0.9), or the test reads the first overshoot (a warning says so)."""
    rule: str = "paper"
    """Suggestion rule: ``paper`` (lr at minimum loss, base = max/4), ``steepest``, ``valley``."""
    repeats: int = 1
    """Ramps from the same start with their own batch order: the bounds are the median, their
    spread is reported, and repeats disagreeing by more than ``spread_tolerance`` fall back."""
    loss: str = "train"
    """``train`` (each step's training batch) or ``val`` (fixed validation batches after
    each step)."""
    window: float = 0.04
    """Smoothing, as a fraction of the ramp (see cxr_ray.optim.lr_finder)."""
    min_descent: float = 0.05
    """A curve whose smoothed loss falls less than this fraction is flat: fall back."""
    spread_tolerance: float = 3.0
    """Repeats whose max_lr differ by more than this factor disagree: fall back."""
    fallback: str = "stage1"
    """Bounds when the curve has a problem: ``stage1`` (the cohort's stage-1 lr × [1/4, 1]),
    ``paper`` (Table 8 where the model and resolution are the study's, else ``stage1``),
    ``measured`` (keep the measured ones, flagged in the report) or ``error``."""


@dataclass
class Stage2Section:
    """``[stage2]`` extras beyond the training keys."""

    bounds: str = "lr_find"
    """Where CLR / one-cycle bounds come from: ``lr_find`` (the cohort's LR range test),
    ``recipe`` (``base_lr``/``max_lr`` in ``[stage2]``) or ``paper`` (Table 8 where given)."""
    by_cohort: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Training keys for one cohort's stage-2 trials, e.g. Table 8's epochs:
    ``[stage2.by_cohort] Atelectasis = { epochs = 32 }``."""
    stop_at: float | str | None = None
    """Off by default. Stop a stage-2 trial once its validation accuracy reaches a target fixed
    before stage 2 starts: a number (0.8), or ``"stage1+0.02"`` (the cohort's stage-1
    accuracy plus a margin; what constant will reach is not known yet). Such trials are
    compared on epochs and compute to the target only."""


@dataclass
class ComparisonSection:
    """``[comparison]``: extra stage-1-style trials outside the CLR protocol, e.g. the study's
    backbone × optimizer comparison on Atelectasis (Table 6). No LR range test, no stage 2."""

    cohorts: list[str] = field(default_factory=list)
    """Cohorts to compare on (empty: no comparison)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Axes, e.g. ``{model = ["mobilenet_v1", "alexnet", "densenet121"], optimizer = [...]}``."""
    train: dict[str, Any] = field(default_factory=dict)
    """Training keys for these trials (on top of ``[train]``), e.g. ``epochs``."""


@dataclass
class ResourcesSection:
    """``[resources]``: how trials share the cluster."""

    max_concurrent_trials: int | str = "auto"
    """Trials at once; ``auto``: what the cluster's CPUs (GPUs with ``gpu``) can hold at its
    largest (``autoscale`` below, else the live nodes), so more GPUs means more trials."""
    trial_cpus: float = 0.01
    """CPU the Tune trial itself holds (it only waits on its TorchTrainer)."""
    autoscale: dict[str, Any] = field(default_factory=dict)
    """The autoscaling cluster's worker node types, which ``auto`` counts at full scale
    (Ray has no documented API that returns them): a subset of the autoscaler config's
    ``available_node_types``, each with ``max_workers`` and ``resources``, plus the optional
    global ``max_workers``; it must mirror the cluster's YAML. E.g. ``{max_workers = 8, gpu =
    {max_workers = 8, resources = {CPU = 4, GPU = 1, gpu_node = 1}}}``. Empty (the default):
    ``auto`` counts the live nodes."""


@dataclass
class Recipe:
    """A whole sweep recipe."""

    experiment: ExperimentSection
    train: dict[str, Any]
    """``[train]``: TrainConfig keys shared by every trial."""
    stage1: dict[str, Any]
    """``[stage1]``: TrainConfig keys for stage 1 only (e.g. ``epochs``)."""
    stage2: dict[str, Any]
    """``[stage2]``: TrainConfig keys for stage 2 only, plus ``bounds``."""
    stage2_extra: Stage2Section
    lr_find: LrFindSection
    grid: dict[str, list[Any]]
    """``[grid]``: stage-2 axes, ``{"policy": [...]}`` by default."""
    stage1_grid: dict[str, list[Any]]
    """``[stage1_grid]``: stage-1 axes (none by default)."""
    comparison: ComparisonSection
    resources: ResourcesSection
    source: str = ""
    """The file it came from (for messages)."""

    @property
    def cohort_names(self) -> list[str]:
        value = self.experiment.cohorts
        if value == "all":
            return list(cohorts.COHORTS)
        return [cohorts.resolve_cohort(c) for c in value]

    @property
    def experiment_uri(self) -> str:
        """Where the experiment lives: ``storage_path/name``, a local directory or an
        object-store URI (``s3://bucket/prefix/name``)."""
        base = str(self.experiment.storage_path)
        if storage.is_uri(base):
            return storage.join(base, self.experiment.name)
        return str((Path(base).expanduser() / self.experiment.name).resolve())

    @property
    def experiment_dir(self) -> Path:
        """The experiment's local directory: itself, or the local copy of an object-store
        experiment (:mod:`cxr_ray.sweep.remote`)."""
        return storage.local_path(self.experiment_uri)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("stage2_extra")
        out["stage2"] = {**self.stage2, **dataclasses.asdict(self.stage2_extra)}
        return out


_SECTIONS = ("experiment", "train", "stage1", "stage2", "lr_find", "grid", "stage1_grid",
             "comparison", "resources")


def _train_keys() -> dict[str, dataclasses.Field]:
    from cxr_ray.train import TrainConfig  # torch import deferred: config loads fast

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _section(cls, data: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r}; valid: {', '.join(known)}")
    obj = cls(**data)
    for name, f in known.items():
        value = getattr(obj, name)
        default = f.default if f.default is not dataclasses.MISSING else None
        _check_type(value, default, f"{where} {name}")
    return obj


def _check_type(value: Any, default: Any, where: str) -> None:
    """Booleans and numbers must keep their type; union-typed fields (a ``None`` or string
    default, e.g. ``target`` or ``max_concurrent_trials``) are checked where they are used."""
    if default is None or isinstance(default, str):
        return
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise UserError(f"{where}: must be a table ({{name = value, ...}}), got {value!r}")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{where}: must be true or false, got {value!r}")
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: must be a number, got {value!r}")


def _train_table(data: dict[str, Any], where: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    keys = _train_keys()
    for key, value in data.items():
        if key in extra:
            continue
        if key not in keys:
            raise UserError(f"{where}: unknown key {key!r}; valid training keys: "
                            f"{', '.join(sorted(keys))}")
        if key in ("shards", "cohort", "init_from", "lr_bounds"):
            raise UserError(f"{where}: {key!r} is set by the sweep; remove it from the recipe")
        f = keys[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else \
            f.default
        if value is not None and default is not None and not isinstance(default, str):
            _check_type(value, default, f"{where} {key}")
    return data


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe; ``overrides`` maps ``section.key`` to a value."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file; see jobs/demo.toml for an example")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    return parse_recipe(data, str(path))


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a dict (what TOML parsing returns)."""
    for key in data:
        if key not in _SECTIONS:
            raise UserError(f"{source}: unknown section [{key}]; valid: {', '.join(_SECTIONS)}")
        if not isinstance(data[key], dict):
            raise UserError(f"{source}: [{key}] must be a table")

    def where(section: str) -> str:
        return f"{source}: [{section}]"

    experiment = _section(ExperimentSection, data.get("experiment", {}), where("experiment"))
    if not experiment.name or not isinstance(experiment.name, str) or "/" in experiment.name:
        raise UserError(f"{where('experiment')} name: required, a plain name without '/' "
                        f"(got {experiment.name!r})")
    if not experiment.shards:
        raise UserError(f"{where('experiment')} shards: required (a cxr-ray prepare output)")
    for key in ("storage_path", "shards"):
        if storage.is_uri(getattr(experiment, key)):
            storage.check_uri(getattr(experiment, key), f"{where('experiment')} {key}")
    if experiment.cohorts != "all":
        if not isinstance(experiment.cohorts, list) or not experiment.cohorts:
            raise UserError(f"{where('experiment')} cohorts: \"all\" or a non-empty list")
        for name in experiment.cohorts:
            cohorts.resolve_cohort(str(name))
    seeds = experiment.seeds
    if seeds is not None and not (
            (isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1)
            or (isinstance(seeds, list) and seeds and len(set(seeds)) == len(seeds)
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                        for x in seeds))):
        raise UserError(f"{where('experiment')} seeds: a count >= 1 (3 = seeds 0, 1, 2) or a "
                        f"list of distinct seeds >= 0, got {seeds!r}")
    target = experiment.target
    if isinstance(target, str) and target not in ("constant", "stage1") or (
            not isinstance(target, str) and not (isinstance(target, (int, float))
                                                 and 0 < target <= 1)):
        raise UserError(f"{where('experiment')} target: a fraction in (0, 1], \"constant\" or "
                        f"\"stage1\", got {target!r}")

    train = _train_table(dict(data.get("train", {})), where("train"))
    stage1 = _train_table(dict(data.get("stage1", {})), where("stage1"))
    stage2_raw = dict(data.get("stage2", {}))
    extra = _section(Stage2Section, {k: stage2_raw.pop(k) for k in ("bounds", "by_cohort", "stop_at")
                                     if k in stage2_raw}, where("stage2"))
    by_cohort = {}
    for name, table in extra.by_cohort.items():
        if not isinstance(table, dict):
            raise UserError(f"{where('stage2')} by_cohort {name}: must be a table of training "
                            f"keys, e.g. {{ epochs = 32 }}; got {table!r}")
        by_cohort[cohorts.resolve_cohort(str(name))] = _train_table(
            dict(table), f"{where('stage2')} by_cohort {name}")
    extra.by_cohort = by_cohort
    stop = extra.stop_at
    if stop is not None and not (
            (isinstance(stop, (int, float)) and not isinstance(stop, bool) and 0 < stop <= 1)
            or (isinstance(stop, str) and re.fullmatch(r"stage1\+(0(\.\d+)?|1(\.0+)?)", stop))):
        raise UserError(f"{where('stage2')} stop_at: an accuracy in (0, 1] or \"stage1+MARGIN\" "
                        f"(e.g. \"stage1+0.02\"), got {stop!r}")
    if extra.bounds not in ("lr_find", "recipe", "paper"):
        raise UserError(f"{where('stage2')} bounds: 'lr_find', 'recipe' or 'paper', got "
                        f"{extra.bounds!r}")
    stage2 = _train_table(stage2_raw, where("stage2"))
    lr = _section(LrFindSection, data.get("lr_find", {}), where("lr_find"))
    if lr.rule not in lr_finder.RULES:
        raise UserError(f"{where('lr_find')} rule: {lr.rule!r} is not one of "
                        f"{', '.join(lr_finder.RULES)}")
    if not (0 < lr.min_lr < lr.max_lr) or lr.num_steps < 5:
        raise UserError(f"{where('lr_find')}: need 0 < min_lr < max_lr and num_steps >= 5")
    try:
        lr_finder.LrRangeConfig(**{k: v for k, v in dataclasses.asdict(lr).items()
                                   if k != "enabled"}).validate()
    except (UserError, TypeError) as exc:
        raise UserError(f"{where('lr_find')}: {exc}") from None
    if extra.bounds == "lr_find" and not lr.enabled:
        raise UserError(f"{where('stage2')} bounds = 'lr_find' needs [lr_find] enabled = true")

    grid = _grid(data.get("grid", {"policy": list(DEFAULT_POLICIES)}), where("grid"))
    grid.setdefault("policy", list(DEFAULT_POLICIES))
    for policy in grid["policy"]:
        if policy not in schedules.POLICIES:
            raise UserError(f"{where('grid')} policy: unknown policy {policy!r}; valid: "
                            f"{', '.join(schedules.POLICIES)}")
    stage1_grid = _grid(data.get("stage1_grid", {}), where("stage1_grid"))
    if "policy" in stage1_grid:
        raise UserError(f"{where('stage1_grid')}: policy is a stage-2 axis; stage 1 uses the "
                        "study's stage-1 optimizer (set [stage1] policy to change it)")
    comparison = _section(ComparisonSection, data.get("comparison", {}), where("comparison"))
    comparison.cohorts = [cohorts.resolve_cohort(str(c)) for c in comparison.cohorts]
    comparison.grid = _grid(comparison.grid, where("comparison") + " grid")
    if "policy" in comparison.grid:
        raise UserError(f"{where('comparison')} grid: policy is a stage-2 axis ([grid])")
    comparison.train = _train_table(dict(comparison.train), where("comparison") + " train")
    if comparison.cohorts and not comparison.grid:
        raise UserError(f"{where('comparison')}: cohorts given but no grid axes to compare")
    resources = _section(ResourcesSection, data.get("resources", {}), where("resources"))
    mct = resources.max_concurrent_trials
    if mct != "auto" and not (isinstance(mct, int) and not isinstance(mct, bool) and mct >= 1):
        raise UserError(f"{where('resources')} max_concurrent_trials: \"auto\" or an integer "
                        f">= 1, got {mct!r}")
    if not (0 < resources.trial_cpus <= 1) or not math.isfinite(resources.trial_cpus):
        raise UserError(f"{where('resources')} trial_cpus: a number in (0, 1], got "
                        f"{resources.trial_cpus!r}")
    _autoscale(resources.autoscale, f"{where('resources')} autoscale")
    return Recipe(experiment=experiment, train=train, stage1=stage1, stage2=stage2,
                  stage2_extra=extra, lr_find=lr, grid=grid, stage1_grid=stage1_grid,
                  comparison=comparison, resources=resources, source=source)


def _grid(table: dict[str, Any], where: str) -> dict[str, list[Any]]:
    grid = {}
    for key, values in table.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where} {key}: an axis is a non-empty list, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise UserError(f"{where} {key}: repeated values in {values!r}")
        if key != "policy":
            _train_table({key: v for v in values[:1]}, where)
            for v in values:
                _train_table({key: v}, where)
        grid[key] = list(values)
    return grid


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _autoscale(table: Any, where: str) -> None:
    """``[resources] autoscale``: node types ``{max_workers = N, resources = {NAME = n}}``
    and an optional global ``max_workers``."""
    example = "{gpu = {max_workers = 8, resources = {CPU = 4, GPU = 1, gpu_node = 1}}}"
    if not isinstance(table, dict):
        raise UserError(f"{where}: must be a table of node types, e.g. {example}; got {table!r}")
    if "max_workers" in table and not _count(table["max_workers"]):
        raise UserError(f"{where} max_workers: an integer >= 0 (the global cap on worker "
                        f"nodes), got {table['max_workers']!r}")
    types = {name: spec for name, spec in table.items() if name != "max_workers"}
    if table and not types:
        raise UserError(f"{where}: max_workers alone; name the node types too, e.g. {example}")
    for name, spec in types.items():
        at = f"{where} {name}"
        if not isinstance(spec, dict):
            raise UserError(f"{at}: a node type is a table, e.g. {{max_workers = 8, resources = "
                            f"{{CPU = 4, GPU = 1, gpu_node = 1}}}}; got {spec!r}")
        for key in spec:
            if key not in ("max_workers", "resources"):
                raise UserError(f"{at}: unknown key {key!r}; valid: max_workers, resources")
        if not _count(spec.get("max_workers")):
            raise UserError(f"{at} max_workers: required, an integer >= 0 (as in the cluster's "
                            f"YAML), got {spec.get('max_workers')!r}")
        res = spec.get("resources")
        if not isinstance(res, dict) or not res:
            raise UserError(f"{at} resources: required, a table such as {{CPU = 4, GPU = 1}} "
                            f"(as in the cluster's YAML), got {res!r}")
        for key, amount in res.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or \
                    not math.isfinite(amount) or amount < 0:
                raise UserError(f"{at} resources {key}: a number >= 0, got {amount!r}")

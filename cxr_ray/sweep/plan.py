"""A sweep recipe turned into trials, without Ray: the study's two-stage protocol.

1. **stage 1**: one trial per cohort (× any ``[stage1_grid]`` axis, e.g. backbone ×
   optimizer), trained with the study's stage-1 optimizer (docs/study.md §5: SGD with time
   decay; Hernia Adam); the same trial then runs the **LR range test** from that model, whose
   suggestion becomes the cohort's CLR bounds (§7);
2. **stage 2**: cohort × policy (× any ``[grid]`` axis), every trial starting from its
   cohort's stage-1 checkpoint (fresh optimizer and policy), CLR / one-cycle bounds from the
   LR range test, the recipe or the study's Table 8 (§6);
3. ``[comparison]`` trials (e.g. Table 6's backbone × optimizer), then the report.

Run names carry the stage, cohort, policy and axis values (``stage2/Fibrosis__triangular``),
and the training seed when the recipe lists several (``stage2/Fibrosis__triangular__seed1``:
each seed trains its own stage 1, LR range test and stage 2 on the same splits), so
``tensorboard --logdir EXP`` lists every trial side by side.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_ray import paths, storage
from cxr_ray.errors import UserError
from cxr_ray.sweep.recipe import BOUNDED_POLICIES, Recipe

#: Training keys that change the architecture: a stage-2 axis on one must be a stage-1 axis
#: too, so every stage-2 trial has a stage-1 model of its kind to start from.
ARCHITECTURE_KEYS = ("model", "width", "image_size", "dropout")


def launcher_of(train: dict[str, Any]) -> str:
    """``process`` or ``ray_train`` for a sweep trial's training keys: ``auto`` runs a
    single-rank trial inside its own Tune trial (no Ray Train start-up per trial) and a
    distributed one as a ``TorchTrainer``."""
    launcher = train.get("launcher", "auto")
    if launcher == "auto":
        return "process" if int(train.get("workers", 1) or 1) == 1 else "ray_train"
    return launcher


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
    stop_at: float | str | None = None
    """Stage 2: stop at this validation accuracy (a number, or ``"stage1+MARGIN"``)."""
    seed: int = 0
    """Training seed (initialisation, data order, augmentation); never the splits."""

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
    shared = {**recipe.train, "shards": _shards_location(recipe.experiment.shards)}
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
    seeds = (recipe.experiment.seed_list if recipe.experiment.seeds is not None
             else [int(recipe.train.get("seed", 0))])
    for cohort, seed in ((c, s) for c in recipe.cohort_names for s in seeds):
        tail = f"__seed{seed}" if len(seeds) > 1 else ""
        for axes in s1_axes:
            spec = TrialSpec(stage="stage1", cohort=cohort,
                             run_name=cohort + _axis_suffix(axes) + tail,
                             train={**shared, **recipe.stage1, **axes, "cohort": cohort,
                                    "seed": seed},
                             axes=axes, lr_find=None, seed=seed)
            stage1.append(spec)
        for policy_axes in _combinations(s2_grid):
            # The stage-1 run of this seed whose axes agree with this trial's on every
            # shared key.
            source = next(s for s in stage1 if s.cohort == cohort and s.seed == seed and all(
                s.axes.get(k, v) == v for k, v in policy_axes.items()))
            if lr_cfg is not None and source.lr_find is None:
                source.lr_find = lr_cfg
            for policy in recipe.grid["policy"]:
                bounded = policy in BOUNDED_POLICIES
                lr_source = recipe.stage2_extra.bounds if bounded else "preset"
                train = {**shared, **recipe.stage2,
                         **recipe.stage2_extra.by_cohort.get(cohort, {}), **policy_axes,
                         "cohort": cohort, "policy": policy, "seed": seed}
                if bounded and lr_source == "paper":
                    train.setdefault("preset", "paper")
                stage2.append(TrialSpec(
                    stage="stage2", cohort=cohort, policy=policy, axes=policy_axes,
                    run_name=f"{cohort}__{policy}{_axis_suffix(policy_axes)}{tail}",
                    train=train, lr_source=lr_source, stage1_run=source.run_name,
                    stop_at=recipe.stage2_extra.stop_at, seed=seed))
    comparison = [
        TrialSpec(stage="comparison", cohort=cohort, run_name=cohort + _axis_suffix(axes),
                  train={**shared, **recipe.stage1, **recipe.comparison.train, **axes,
                         "cohort": cohort}, axes=axes)
        for cohort in recipe.comparison.cohorts
        for axes in _combinations(recipe.comparison.grid)]
    return stage1, stage2, comparison


def check_recipe(experiment: Path, recipe: Recipe) -> None:
    stored = experiment / paths.RECIPE_FILE
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
        paths.write_json(stored, current)


def _shards_location(shards: str | Path) -> str:
    """A shard set's location as trials open it: a URI as written, a path made absolute."""
    return str(shards) if storage.is_uri(shards) else str(Path(shards).expanduser().resolve())


def data_record(shards: str | Path) -> dict[str, Any]:
    """What made an experiment's data: the shard set's inputs fingerprint, its metadata file
    and that file's sha256, the split mode, split seed and fractions (from its manifest)."""
    from cxr_ray.data import shards as shard_io

    manifest = shard_io.open_shards(shards).manifest
    source = manifest.get("source") or {}
    return {"shards": _shards_location(shards),
            "inputs_fingerprint": manifest.get("inputs_fingerprint"),
            "metadata": source.get("metadata"), "metadata_sha256": source.get("metadata_sha256"),
            "split_seed": source.get("split_seed"), "size": manifest.get("size"),
            "cohorts": (manifest.get("settings") or {}).get("cohorts")}


def check_data(experiment: Path, recipe: Recipe) -> dict[str, Any]:
    """Record the experiment's data (``EXP/data.json``) on its first run; refuse a resume on
    a shard set made from other inputs or splits (its trials would not be comparable)."""
    now = data_record(recipe.experiment.shards)
    stored = paths.read_json(experiment / paths.DATA_FILE)
    if stored is None:
        paths.write_json(experiment / paths.DATA_FILE, now)
        return now
    keys = ("inputs_fingerprint", "metadata_sha256", "split_seed", "size", "cohorts")
    changed = [k for k in keys if stored.get(k) != now.get(k)]
    if changed:
        raise UserError(f"{experiment} was started on other data ({', '.join(changed)} of "
                        f"{now['shards']} differ from {paths.DATA_FILE}); use a new experiment "
                        "name, or the shard set it was started on")
    return stored


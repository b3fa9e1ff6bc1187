"""Which model each cohort's predictions come from.

For every cohort of an experiment: its stage-2 trials when it has any (else its stage-1
trial; ``[comparison]`` trials never), the one whose validation-selected epoch has the best
validation accuracy (over policies and seeds; ties: the first in policy, seed order). Its
model is that epoch's checkpoint and its operating threshold that epoch's validation-chosen
threshold (Youden's J on the validation split): nothing here looks at test numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from cxr_ray import paths
from cxr_ray.data.cohorts import ONE_CLASS, resolve_cohort
from cxr_ray.errors import UserError
from cxr_ray.sweep.results import Run, find_runs, selected
from cxr_ray.train import checkpoint as ck


@dataclass(frozen=True)
class CohortModel:
    """One cohort's chosen model."""

    cohort: str
    stage: str
    policy: str
    seed: int
    epoch: int
    val_accuracy: float
    threshold: float
    checkpoint: str
    """Absolute path of the ``checkpoint.pt``."""
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipe_hash(experiment: Path) -> str:
    """First 12 hex digits of the sha256 of the experiment's stored recipe (``recipe.json``,
    canonical JSON): which recipe trained the models."""
    stored = paths.read_json(Path(experiment) / paths.RECIPE_FILE)
    if not stored:
        raise UserError(f"{experiment}: no {paths.RECIPE_FILE}; pass the directory of a "
                        "cxr-ray sweep experiment (e.g. demo-run/experiments/demo)")
    stored.pop("source", None)
    text = json.dumps(stored, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _candidates(runs: list[Run], cohort: str) -> list[Run]:
    mine = [r for r in runs if r.trial.get("cohort") == cohort
            and r.trial.get("status", "finished") == "finished"]
    stage2 = [r for r in mine if r.trial.get("stage") == "stage2"]
    return stage2 or [r for r in mine if r.trial.get("stage") == "stage1"]


def select_models(experiment: str | Path, cohorts: list[str] | None = None, *,
                  kept_checkpoints: Callable[[Path], dict[int, Path]] = ck.kept_checkpoints
                  ) -> dict[str, CohortModel]:
    """``{cohort: CohortModel}`` for ``cohorts`` (None: every cohort the experiment trained).
    ``kept_checkpoints(run_dir)``: the run's checkpoints by epoch (an object-store experiment
    lists its committed ones before fetching the chosen)."""
    experiment = Path(experiment)
    runs = find_runs(experiment)
    if not runs:
        raise UserError(f"{experiment}: no finished trials (trial.json); run cxr-ray sweep "
                        "first, or pass the experiment directory")
    trained = list(dict.fromkeys(r.trial["cohort"] for r in runs
                                 if r.trial.get("stage") in ("stage1", "stage2")))
    wanted = trained if cohorts is None else [resolve_cohort(c) for c in cohorts]
    out = {}
    for cohort in wanted:
        options = sorted(_candidates(runs, cohort),
                         key=lambda r: (str(r.trial.get("policy") or ""),
                                        int(r.trial.get("seed") or 0)))
        if not options:
            raise UserError(f"{experiment}: cohort {cohort} has no finished stage-1 or "
                            f"stage-2 trial; trained: {', '.join(trained) or 'none'}")
        scored = []
        for r in options:
            rec = selected(r)
            acc = rec.get("val_accuracy")
            if acc is not None and math.isfinite(acc):
                scored.append((acc, r, rec))
        if not scored:
            raise UserError(f"{experiment}: no validation accuracy recorded for {cohort}'s "
                            "trials; the experiment predates validation splits, re-run it")
        best_acc = max(s[0] for s in scored)
        acc, run, rec = next(s for s in scored if s[0] == best_acc)
        kept = kept_checkpoints(run.path)
        epoch = int(rec["epoch"])
        if epoch not in kept:
            raise UserError(f"{run.path}: the validation-selected epoch {epoch} has no kept "
                            f"checkpoint (kept: {sorted(kept) or 'none'}); keep_checkpoints "
                            "must keep the best one")
        threshold = rec.get("val_threshold")
        out[cohort] = CohortModel(
            cohort=cohort, stage=str(run.trial.get("stage")),
            policy=str(run.trial.get("policy") or ""), seed=int(run.trial.get("seed") or 0),
            epoch=epoch, val_accuracy=float(acc),
            threshold=float(threshold) if threshold is not None else 0.5,
            checkpoint=str(Path(kept[epoch]).resolve()),
            image_size=int(run.plan.get("image_size") or 0))
    sizes = {m.image_size for m in out.values()}
    if len(sizes) > 1:
        raise UserError(f"{experiment}: the chosen models were trained at different image "
                        f"sizes {sorted(sizes)}; predict one size at a time (--cohorts)")
    return out


def is_anomaly_model(cohort: str) -> bool:
    """The one-class cohort's probability is the anomaly score."""
    return cohort == ONE_CLASS

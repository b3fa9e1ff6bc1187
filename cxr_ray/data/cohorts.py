"""The study's 15 cohorts and their patient-wise train/test splits.

A cohort is the image set one classifier is trained and tested on:

* 14 **binary** cohorts, one per disease: every image carrying the disease anywhere in
  its labels is positive (1); ``No Finding`` images sampled to the same count (``ratio``,
  default) or to the study's Table 2 counts (``paper``) are negative (0).
* the **one-class** (anomaly) cohort ``OneClass``: 2,800 ``No Finding`` images (inliers,
  0) and 200 images of each disease (anomalies, 1), disjoint across diseases.

Splits (docs/study.md §2): three, **by patient** — no patient has images on two sides —
seeded and reproducible. ``test`` is the study's 1:4 test:train split (or the official NIH
``test_list.txt``); ``val`` is carved from the training side, whole patients, 1/8 of its
images by default (so 70/10/20). The study had no validation split and selected on its test
numbers; here checkpoints, thresholds and targets are chosen on ``val`` and ``test`` is only
reported. Everything here is pure pandas/numpy: no Ray, no torch.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_ray.data import nih
from cxr_ray.errors import UserError

log = logging.getLogger(__name__)

ONE_CLASS = "OneClass"
#: The 15 cohort names: the CSV's spelling of each disease, plus ``OneClass``.
COHORTS: tuple[str, ...] = (*nih.DISEASES, ONE_CLASS)

#: The study's Table 2: ``No Finding`` negatives per binary cohort (``--negatives paper``).
PAPER_NEGATIVES: dict[str, int] = {
    "Atelectasis": 12000, "Cardiomegaly": 2800, "Consolidation": 4700, "Edema": 2300,
    "Emphysema": 2600, "Effusion": 13500, "Fibrosis": 1700, "Infiltration": 20000,
    "Mass": 6000, "Nodule": 6500, "Pneumothorax": 5500, "Pneumonia": 1500,
    "Pleural_Thickening": 3500, "Hernia": 250,
}
OFFICIAL_LISTS = ("train_val_list.txt", "test_list.txt")
#: The three splits, in the order of a cohort table's ``split`` column values.
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CohortConfig:
    """How cohorts are drawn and split."""

    negatives: str = "ratio"
    """``ratio``: as many No Finding negatives as positives (1:1); ``paper``: Table 2 counts."""
    seed: int = 0
    """Seed for negative sampling, the one-class draw and the patient-wise splits (the
    experiment's split seed: training seeds never change the splits)."""
    test_fraction: float = 0.2
    """Fraction of a cohort's images in the test split (the study's 1:4 test:train)."""
    val_fraction: float = 0.125
    """Fraction of the training side's images (whole patients) held out as validation."""
    split: str = "patient"
    """``patient``: seeded patient-wise split; ``official``: NIH split lists from ``split_dir``."""
    split_dir: Path | None = None
    """Directory with ``train_val_list.txt`` and ``test_list.txt`` (``split="official"``)."""
    one_class_inliers: int = 2800
    """``No Finding`` inliers in the one-class cohort."""
    one_class_per_disease: int = 200
    """Anomalies drawn per disease in the one-class cohort."""

    def __post_init__(self) -> None:
        if self.negatives not in ("ratio", "paper"):
            raise UserError(f"negatives={self.negatives!r}: use 'ratio' (1:1) or 'paper' (Table 2)")
        if self.split not in ("patient", "official"):
            raise UserError(f"split={self.split!r}: use 'patient' or 'official'")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"test_fraction={self.test_fraction}: must be between 0 and 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction={self.val_fraction}: must be between 0 and 1 "
                            "(model selection needs a validation split)")


def resolve_cohort(name: str) -> str:
    """Canonical cohort name for ``name`` (case, space/underscore tolerant) or a UserError."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    for cohort in COHORTS:
        if cohort.lower() == key or (cohort == ONE_CLASS and key in ("one_class", "oneclass")):
            return cohort
    raise UserError(f"unknown cohort {name!r}; valid cohorts: {', '.join(COHORTS)}")


def _rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator that depends on the seed and a name only (stable across cohorts/order)."""
    return np.random.default_rng([seed, *(zlib.crc32(p.encode()) for p in parts)])


def _sample(index: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n >= len(index):
        return index
    return np.sort(rng.choice(index, size=n, replace=False))


def select(meta: pd.DataFrame, cohort: str, config: CohortConfig) -> pd.DataFrame:
    """Images of one cohort with their 0/1 ``label`` (no split yet), in metadata order."""
    cohort = resolve_cohort(cohort)
    no_finding = np.flatnonzero(meta[nih.NO_FINDING].to_numpy())
    if cohort == ONE_CLASS:
        rng = _rng(config.seed, cohort)
        taken = np.zeros(len(meta), dtype=bool)
        anomalies = []
        # Rarest disease first, so the rare classes are not starved by overlap.
        for disease in sorted(nih.DISEASES, key=lambda d: int(meta[d].sum())):
            pool = np.flatnonzero(meta[disease].to_numpy() & ~taken)
            chosen = _sample(pool, config.one_class_per_disease, rng)
            taken[chosen] = True
            anomalies.append(chosen)
        pos = np.sort(np.concatenate(anomalies))
        neg = _sample(no_finding, config.one_class_inliers, rng)
    else:
        pos = np.flatnonzero(meta[cohort].to_numpy())
        want = len(pos) if config.negatives == "ratio" else PAPER_NEGATIVES[cohort]
        if want > len(no_finding):
            log.warning("%s: %d No Finding negatives wanted, %d available; using all",
                        cohort, want, len(no_finding))
        neg = _sample(no_finding, want, _rng(config.seed, cohort))
    rows = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos), np.int8), np.zeros(len(neg), np.int8)])
    order = np.argsort(rows, kind="stable")
    return pd.DataFrame({
        "image_index": meta[nih.IMAGE].to_numpy()[rows[order]],
        "patient_id": meta[nih.PATIENT].to_numpy()[rows[order]],
        "label": labels[order],
    })


def patient_split(frame: pd.DataFrame, test_fraction: float, seed: int, name: str,
                  part: str = "split") -> np.ndarray:
    """Boolean ``is_test`` per row: whole patients, about ``test_fraction`` of the images.

    Patients are visited in a seeded random order and put in the test split while that
    keeps the test image count at or below the target, so the fraction is met closely
    even when a few patients have many images. ``part`` names the draw (``split`` for
    test, ``val`` for validation), so the two draws are independent.
    """
    patients, counts = np.unique(frame["patient_id"].to_numpy(), return_counts=True)
    order = _rng(seed, part, name).permutation(len(patients))
    target = test_fraction * len(frame)
    in_test = np.zeros(len(patients), dtype=bool)
    total = 0
    for i in order:
        if total + counts[i] <= target:
            in_test[i] = True
            total += counts[i]
    test_patients = patients[in_test]
    return np.isin(frame["patient_id"].to_numpy(), test_patients)


def read_official_lists(split_dir: Path | None, meta: pd.DataFrame) -> set[str]:
    """The official test image names, checked against the metadata."""
    if split_dir is None:
        raise UserError("--split official needs --split-dir DIR with "
                        f"{' and '.join(OFFICIAL_LISTS)} (or --metadata in that directory)")
    lists = {}
    for name in OFFICIAL_LISTS:
        path = Path(split_dir) / name
        if not path.is_file():
            raise UserError(f"{path}: no such file; --split official needs "
                            f"{' and '.join(OFFICIAL_LISTS)} in {split_dir}")
        lists[name] = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    known = set(meta[nih.IMAGE])
    for name, names in lists.items():
        absent = [n for n in names if n not in known]
        if absent:
            raise UserError(
                f"{Path(split_dir) / name}: {len(absent)} image(s) not in the metadata, e.g. "
                f"{absent[0]!r}; use split lists that match this metadata file")
    both = set(lists[OFFICIAL_LISTS[0]]) & set(lists[OFFICIAL_LISTS[1]])
    if both:
        raise UserError(f"{split_dir}: {len(both)} image(s) are in both split lists, e.g. "
                        f"{sorted(both)[0]!r}; an image belongs to one split")
    return set(lists[OFFICIAL_LISTS[1]])


def build(meta: pd.DataFrame, cohort: str, config: CohortConfig,
          official_test: set[str] | None = None) -> pd.DataFrame:
    """One cohort: ``image_index, patient_id, label, split`` (``train``/``val``/``test``)."""
    cohort = resolve_cohort(cohort)
    frame = select(meta, cohort, config)
    if config.split == "official":
        if official_test is None:
            official_test = read_official_lists(config.split_dir, meta)
        is_test = frame["image_index"].isin(official_test).to_numpy()
    else:
        is_test = patient_split(frame, config.test_fraction, config.seed, cohort)
    split = np.where(is_test, "test", "train").astype(object)
    train = np.flatnonzero(~is_test)  # validation: whole patients of the training side
    is_val = patient_split(frame.iloc[train], config.val_fraction, config.seed, cohort, "val")
    split[train[is_val]] = "val"
    frame["split"] = split
    frame.insert(0, "cohort", cohort)
    check_disjoint(frame)
    return frame


def check_disjoint(frame: pd.DataFrame) -> None:
    """Raise unless every patient of a cohort table is on one side of the splits only."""
    sides = frame.groupby("patient_id")["split"].nunique()
    leaked = sides[sides > 1]
    if len(leaked):
        patient = leaked.index[0]
        where = sorted(frame.loc[frame["patient_id"] == patient, "split"].unique())
        name = frame["cohort"].iloc[0] if "cohort" in frame else "cohort"
        raise UserError(f"{name}: {len(leaked)} patient(s) have images in more than one split, "
                        f"e.g. patient {patient} in {'/'.join(where)}; with --split official "
                        "the split lists must keep each patient on one side")


def build_all(meta: pd.DataFrame, config: CohortConfig,
              names: tuple[str, ...] = COHORTS) -> dict[str, pd.DataFrame]:
    """All requested cohorts (default: the 15), keyed by canonical name."""
    official = read_official_lists(config.split_dir, meta) if config.split == "official" else None
    return {resolve_cohort(n): build(meta, n, config, official) for n in names}


def summarize(cohorts: dict[str, pd.DataFrame]) -> dict[str, dict[str, int]]:
    """Per cohort: positives, negatives, and the images and patients of each split."""
    out = {}
    for name, frame in cohorts.items():
        row = {"positives": int((frame["label"] == 1).sum()),
               "negatives": int((frame["label"] == 0).sum())}
        parts = {split: frame[frame["split"] == split] for split in SPLITS}
        row.update({split: len(part) for split, part in parts.items()})
        row.update({f"{split}_patients": int(part["patient_id"].nunique())
                    for split, part in parts.items()})
        out[name] = row
    return out


def format_summary(summary: dict[str, dict[str, int]]) -> str:
    cols = ("positives", "negatives", *SPLITS, *(f"{s}_patients" for s in SPLITS))
    heads = ("positives", "negatives", *SPLITS, *(f"{s} pat." for s in SPLITS))
    lines = [f"{'cohort':<20}" + "".join(f"{h:>11}" for h in heads)]
    for name, row in summary.items():
        lines.append(f"{name:<20}" + "".join(f"{row[c]:>11}" for c in cols))
    return "\n".join(lines)

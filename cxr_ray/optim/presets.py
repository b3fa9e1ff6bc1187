"""The study's numbers as data (docs/study.md §2, §5, §6, §7), so reports can print them side by side.

Sources: the paper's Tables 3–8 and its text (docs/study.md restates them). Cohort names
use the metadata CSV's spelling (``Pleural_Thickening``) plus ``OneClass`` for the anomaly
cohort; :func:`canonical_cohort` accepts any case and ``_``/space/``-`` variant.

Nothing here trains anything; :func:`stage1_recipe` and :func:`stage1_policy` turn Table 4 rows
into the inputs of :func:`cxr_ray.optim.optimizers.build_optimizer` and
:class:`cxr_ray.optim.schedules.PolicyConfig`; ``cxr_ray.train.config`` reads :data:`TABLE8_CLR`
for the CLR policies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from cxr_ray.data.cohorts import COHORTS, ONE_CLASS
from cxr_ray.errors import UserError
from cxr_ray.optim.schedules import PolicyConfig

# ONE_CLASS and COHORTS (the 15 names) are cxr_ray.data.cohorts', re-used.


def canonical_cohort(name: str) -> str:
    """``"pleural thickening"`` → ``"Pleural_Thickening"``, ``"one-class"`` → ``"OneClass"``."""
    key = re.sub(r"[\s_\-]+", "", str(name)).lower()
    for cohort in COHORTS:
        if re.sub(r"_", "", cohort).lower() == key:
            return cohort
    raise UserError(f"unknown cohort {name!r}; valid: {', '.join(COHORTS)}")


# --------------------------------------------------------------------------- Table 3
class BatchRow(NamedTuple):
    """Table 3: images in the cohort, batch size, training and test batches per epoch."""

    total_images: int | None
    batch_size: int
    train_batches: int | None
    test_batches: int | None


#: Table 3 (the one-class row is from §A3.2: batch 16; 2,800 + 14×200 = 5,600 images).
TABLE3_BATCHES: dict[str, BatchRow] = {
    "Atelectasis": BatchRow(23599, 16, 1178, 295),
    "Cardiomegaly": BatchRow(5576, 32, 140, 35),
    "Consolidation": BatchRow(9367, 32, 235, 59),
    "Edema": BatchRow(4603, 32, 116, 29),
    "Emphysema": BatchRow(5116, 32, 128, 32),
    "Effusion": BatchRow(26817, 32, 671, 168),
    "Fibrosis": BatchRow(3386, 32, 85, 22),
    "Infiltration": BatchRow(39894, 16, 1995, 499),
    "Mass": BatchRow(11782, 32, 295, 74),
    "Nodule": BatchRow(12831, 32, 321, 81),
    "Pneumothorax": BatchRow(10802, 32, 271, 68),
    "Pneumonia": BatchRow(2931, 16, 147, 37),
    "Pleural_Thickening": BatchRow(6885, 32, 173, 44),
    "Hernia": BatchRow(447, 4, 96, 24),
    ONE_CLASS: BatchRow(5600, 16, None, None),
}


def batch_size(cohort: str) -> int:
    """The study's batch size for a cohort (Table 3): 32, or 16 / 4 for the listed ones."""
    return TABLE3_BATCHES[canonical_cohort(cohort)].batch_size


# --------------------------------------------------------------------------- Table 4
class Stage1Recipe(NamedTuple):
    """Stage-1 optimizer settings (Table 4): ``optimizer, lr0, decay = stage1_recipe(c)``."""

    optimizer: str
    lr0: float
    decay: float


#: Momentum of every Table 4 row (SGD momentum; Adam's beta1 for Hernia).
TABLE4_MOMENTUM = 0.9

#: Table 4. ``OneClass`` is not in the table: **decided** SGD 0.01 / 0.001, the setting of the
#: other batch-16 cohorts (Atelectasis, Infiltration) and of most rows.
TABLE4_STAGE1: dict[str, Stage1Recipe] = {
    "Atelectasis": Stage1Recipe("sgd", 0.01, 0.001),
    "Cardiomegaly": Stage1Recipe("sgd", 0.1, 0.0005),
    "Consolidation": Stage1Recipe("sgd", 0.05, 0.0005),
    "Edema": Stage1Recipe("sgd", 0.01, 0.0005),
    "Emphysema": Stage1Recipe("sgd", 0.01, 0.0005),
    "Effusion": Stage1Recipe("sgd", 0.01, 0.001),
    "Fibrosis": Stage1Recipe("sgd", 0.001, 0.00005),
    "Infiltration": Stage1Recipe("sgd", 0.01, 0.001),
    "Mass": Stage1Recipe("sgd", 0.01, 0.001),
    "Nodule": Stage1Recipe("sgd", 0.01, 0.001),
    "Pneumothorax": Stage1Recipe("sgd", 0.01, 0.0005),
    "Pneumonia": Stage1Recipe("sgd", 0.01, 0.0001),
    "Pleural_Thickening": Stage1Recipe("sgd", 0.05, 0.0005),
    "Hernia": Stage1Recipe("adam", 0.01, 0.0001),
    ONE_CLASS: Stage1Recipe("sgd", 0.01, 0.001),
}


def stage1_recipe(cohort: str) -> Stage1Recipe:
    """Table 4 for one cohort: ``(optimizer name, lr0, decay)``; Hernia is Adam 0.01 / 0.0001."""
    return TABLE4_STAGE1[canonical_cohort(cohort)]


def stage1_policy(cohort: str) -> PolicyConfig:
    """The stage-1 lr policy of a cohort: Keras time decay ``lr0 / (1 + decay*t)``."""
    r = stage1_recipe(cohort)
    return PolicyConfig(name="time_decay", base_lr=r.lr0, decay=r.decay)


# --------------------------------------------------------------------------- Table 5
class ReportedAccuracy(NamedTuple):
    """A reported accuracy (%) and the epochs it took."""

    accuracy: float
    epochs: int


#: Table 5: stage-1 accuracies (Pneumonia's row is "with CLR"; Hernia is Adam).
TABLE5_STAGE1_ACCURACY: dict[str, ReportedAccuracy] = {
    "Atelectasis": ReportedAccuracy(75.10, 10),
    "Cardiomegaly": ReportedAccuracy(75.78, 12),
    "Consolidation": ReportedAccuracy(73.32, 10),
    "Edema": ReportedAccuracy(93.37, 12),
    "Emphysema": ReportedAccuracy(85.60, 10),
    "Effusion": ReportedAccuracy(86.53, 10),
    "Fibrosis": ReportedAccuracy(66.58, 10),
    "Infiltration": ReportedAccuracy(64.60, 10),
    "Mass": ReportedAccuracy(70.11, 10),
    "Nodule": ReportedAccuracy(68.23, 10),
    "Pneumothorax": ReportedAccuracy(70.12, 10),
    "Pneumonia": ReportedAccuracy(88.43, 30),
    "Pleural_Thickening": ReportedAccuracy(71.67, 10),
    "Hernia": ReportedAccuracy(90.81, 30),
}


# --------------------------------------------------------------------------- Table 6
class BackboneRow(NamedTuple):
    """Table 6 (Atelectasis): hours per epoch, epochs trained, accuracy (%)."""

    hours_per_epoch: float
    epochs: int
    accuracy: float


#: Table 6: backbone comparison on the Atelectasis cohort (model registry names).
TABLE6_BACKBONES: dict[str, BackboneRow] = {
    "mobilenet_v1": BackboneRow(2.5, 10, 75.10),
    "densenet121": BackboneRow(5.0, 10, 78.07),
    "alexnet": BackboneRow(1.5, 30, 75.50),
}


# --------------------------------------------------------------------------- Tables 7 and 8
@dataclass(frozen=True)
class ClrRow:
    """Tables 7 and 8: one cohort's stage-2 CLR run."""

    policy: str
    """Policy name as in :data:`cxr_ray.optim.schedules.POLICIES`."""
    step_size_epochs: float
    """Half cycle in epochs (multiply by steps per epoch for ``PolicyConfig.step_size``)."""
    epochs: int
    """Epochs trained with CLR."""
    max_lr: float
    """Upper bound (from the LR range test)."""
    base_lr: float
    """Lower bound (max/4 in most rows)."""
    accuracy_before: float | None
    """Stage-1 accuracy (%) before CLR; ``None`` where the study gives none (Pneumonia)."""
    epochs_before: int | None
    """Epochs of the stage-1 run."""
    accuracy_after: float
    """Accuracy (%) after the CLR run."""


#: Table 8 settings with Table 7's accuracies.
#: The study's training resolution (MobileNetV1's 224² input): Table 8's bounds hold there.
STUDY_IMAGE_SIZE = 224

TABLE8_CLR: dict[str, ClrRow] = {
    "Atelectasis": ClrRow("triangular", 2, 32, 0.1, 0.025, 75.10, 10, 79.59),
    "Infiltration": ClrRow("modified_triangular2", 2, 10, 0.02, 0.005, 64.6, 10, 76.15),
    "Fibrosis": ClrRow("modified_triangular2", 2, 32, 0.002, 0.0005, 66.58, 10, 88.96),
    "Pneumothorax": ClrRow("triangular", 2, 36, 0.03, 0.0075, 70.12, 10, 79.83),
    "Pneumonia": ClrRow("triangular", 2, 30, 0.01, 0.0001, None, None, 88.43),
}

#: §A7: the one-class model after CLR (triangular, 0.025–0.1, step size 2, 32 epochs).
ONE_CLASS_CLR = ClrRow("triangular", 2, 32, 0.1, 0.025, None, None, 83.01)


# --------------------------------------------------------------------------- headlines
class CrossingPoint(NamedTuple):
    """'Policy P reached accuracy A (%) at epoch E' (Figures 7 and 9)."""

    policy: str
    accuracy: float
    epoch: int


#: §A7 headline comparisons: target accuracy and when each policy reached it / what it ended at.
HEADLINES: dict[str, dict[str, object]] = {
    "Pneumothorax": {
        "target_accuracy": 79.26,
        "crossed": [CrossingPoint("constant", 79.26, 47),
                    CrossingPoint("triangular", 79.26, 36),
                    CrossingPoint("modified_triangular2", 79.26, 38)],
        "final": [CrossingPoint("triangular", 79.83, 36),
                  CrossingPoint("modified_triangular2", 80.92, 41)],
    },
    "Fibrosis": {
        "target_accuracy": 85.0,
        "crossed": [CrossingPoint("triangular", 85.0, 30),
                    CrossingPoint("modified_triangular2", 85.0, 25)],
        "final": [CrossingPoint("constant", 85.04, 32),
                  CrossingPoint("triangular", 86.96, 32),
                  CrossingPoint("modified_triangular2", 88.15, 32)],
    },
}

#: §A5–A6: the Pneumothorax LR range test gave max 0.03 (minimum loss) and base 0.0075 (max/4);
#: the text also quotes 541 batches per epoch and a step size of 1082 (Table 3 says 271 batches
#: of 32 per epoch; the two disagree, the text's figures suggest a batch of 16).
LR_FINDER_PNEUMOTHORAX = {"min_lr": 1e-7, "max_lr_range": 1.0, "suggested_max_lr": 0.03,
                          "suggested_base_lr": 0.0075, "text_batches_per_epoch": 541,
                          "text_step_size": 1082}

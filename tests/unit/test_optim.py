"""Optimizer factory, the study's Table 4 preset and the other tables kept as data."""

from __future__ import annotations

import pytest
import torch

from cxr_ray.data.nih import DISEASES
from cxr_ray.optim import presets, schedules
from cxr_ray.errors import UserError
from cxr_ray.optim.optimizers import build_optimizer
from cxr_ray.optim.presets import (
    COHORTS,
    TABLE3_BATCHES,
    TABLE8_CLR,
    batch_size,
    canonical_cohort,
    stage1_policy,
    stage1_recipe,
)
from cxr_ray.optim.schedules import PolicyConfig, lr_at


def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


def test_build_optimizer_defaults():
    sgd = build_optimizer(_params(), "sgd", lr=0.01)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["lr"] == 0.01
    adam = build_optimizer(_params(), "Adam", lr=0.01)
    assert isinstance(adam, torch.optim.Adam)
    assert adam.param_groups[0]["betas"] == (0.9, 0.999) and adam.param_groups[0]["eps"] == 1e-7
    rms = build_optimizer(_params(), "rmsprop", lr=0.001)
    assert isinstance(rms, torch.optim.RMSprop)
    g = rms.param_groups[0]
    assert (g["alpha"], g["eps"], g["momentum"]) == (0.9, 1e-7, 0.0)  # Keras defaults
    assert build_optimizer(_params(), "rmsprop", lr=0.001, momentum=0.9).param_groups[0][
        "momentum"] == 0.9
    assert build_optimizer(_params(), "adam", lr=0.01, momentum=0.8).param_groups[0][
        "betas"] == (0.8, 0.999)


def test_build_optimizer_errors():
    with pytest.raises(UserError, match="unknown optimizer 'adagrad'; valid: sgd, adam, rmsprop"):
        build_optimizer(_params(), "adagrad", lr=0.1)
    with pytest.raises(UserError, match="lr must be > 0"):
        build_optimizer(_params(), "sgd", lr=0.0)


# docs/study.md §5 / Table 4, written out again here on purpose
TABLE4 = {
    "Atelectasis": (0.01, 0.001), "Cardiomegaly": (0.1, 0.0005), "Consolidation": (0.05, 0.0005),
    "Edema": (0.01, 0.0005), "Emphysema": (0.01, 0.0005), "Effusion": (0.01, 0.001),
    "Fibrosis": (0.001, 0.00005), "Infiltration": (0.01, 0.001), "Mass": (0.01, 0.001),
    "Nodule": (0.01, 0.001), "Pneumothorax": (0.01, 0.0005), "Pneumonia": (0.01, 0.0001),
    "Pleural_Thickening": (0.05, 0.0005),
}


def test_table4_preset():
    for disease, (lr0, decay) in TABLE4.items():
        assert stage1_recipe(disease) == ("sgd", lr0, decay)
    assert stage1_recipe("Hernia") == ("adam", 0.01, 0.0001)
    opt_name, lr0, decay = stage1_recipe("OneClass")  # decided default, documented
    assert (opt_name, lr0, decay) == ("sgd", 0.01, 0.001)
    assert set(presets.TABLE4_STAGE1) == set(COHORTS) and len(DISEASES) == 14


def test_cohort_names_are_forgiving_but_checked():
    assert canonical_cohort("pleural thickening") == "Pleural_Thickening"
    assert canonical_cohort("one-class") == "OneClass"
    assert canonical_cohort("HERNIA") == "Hernia"
    with pytest.raises(UserError, match="unknown cohort 'Covid'; valid: Atelectasis"):
        stage1_recipe("Covid")


def test_stage1_policy_is_table4_time_decay():
    pneumothorax = stage1_policy("Pneumothorax")
    assert lr_at(pneumothorax, 1000) == pytest.approx(0.01 / (1 + 0.0005 * 1000))
    hernia = stage1_policy("Hernia")  # Keras applies decay to Adam too
    assert lr_at(hernia, 100) == pytest.approx(0.01 / (1 + 0.0001 * 100))


def test_table3_batch_sizes():
    sixteen = {"Atelectasis", "Infiltration", "Pneumonia", "OneClass"}
    for cohort in COHORTS:
        expected = 4 if cohort == "Hernia" else 16 if cohort in sixteen else 32
        assert batch_size(cohort) == expected, cohort


def test_table8_clr_rows():
    assert set(TABLE8_CLR) == {"Atelectasis", "Infiltration", "Fibrosis", "Pneumothorax",
                               "Pneumonia"}  # no CLR run for the other cohorts (e.g. Edema)
    ptx = TABLE8_CLR["Pneumothorax"]
    assert (ptx.policy, ptx.base_lr, ptx.max_lr, ptx.step_size_epochs) == (
        "triangular", 0.0075, 0.03, 2)
    # step size 2 epochs of Table 3's 271 batches: 542 optimizer steps, the peak at step 542
    step_size = round(ptx.step_size_epochs * TABLE3_BATCHES["Pneumothorax"].train_batches)
    assert step_size == 542
    cfg = PolicyConfig(ptx.policy, base_lr=ptx.base_lr, max_lr=ptx.max_lr, step_size=step_size)
    assert lr_at(cfg, 542) == pytest.approx(0.03)
    fib = TABLE8_CLR["Fibrosis"]
    assert (fib.policy, fib.step_size_epochs) == ("modified_triangular2", 2)
    assert round(fib.step_size_epochs * TABLE3_BATCHES["Fibrosis"].train_batches) == 170
    # the study's rule base = max/4 holds for four of the five rows (not Pneumonia's)
    for cohort in ("Atelectasis", "Infiltration", "Fibrosis", "Pneumothorax"):
        row = TABLE8_CLR[cohort]
        assert row.base_lr == pytest.approx(row.max_lr / 4)
    assert all(row.policy in schedules.POLICIES for row in TABLE8_CLR.values())


def test_reported_numbers_are_there():
    assert presets.TABLE5_STAGE1_ACCURACY["Pneumothorax"] == (70.12, 10)
    assert presets.TABLE6_BACKBONES["densenet121"].accuracy == 78.07
    assert presets.HEADLINES["Pneumothorax"]["target_accuracy"] == 79.26

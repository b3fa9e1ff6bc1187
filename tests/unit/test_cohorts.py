"""Cohorts: sizes and composition, patient-wise splits that never leak, official lists."""

from __future__ import annotations

import pandas as pd
import pytest

from cxr_ray.data import cohorts, nih
from cxr_ray.data.cohorts import CohortConfig, PAPER_NEGATIVES
from cxr_ray.errors import UserError


@pytest.fixture(scope="module")
def ratio(real_meta):
    return cohorts.build_all(real_meta, CohortConfig())


def test_fifteen_cohorts_named_by_the_csv_spelling(ratio):
    assert list(ratio) == [*nih.DISEASES, "OneClass"]
    assert "Pleural_Thickening" in ratio and len(ratio) == 15


def test_binary_cohorts_ratio_1_to_1(real_meta, ratio):
    for disease in nih.DISEASES:
        frame = ratio[disease]
        pos = frame[frame.label == 1]
        neg = frame[frame.label == 0]
        assert len(pos) == int(real_meta[disease].sum())           # every image carrying it
        assert len(neg) == len(pos)                                 # 1:1
        by_name = real_meta.set_index(nih.IMAGE)
        assert by_name.loc[pos.image_index, disease].all()
        assert by_name.loc[neg.image_index, nih.NO_FINDING].all()  # negatives are No Finding
        assert frame.image_index.is_unique


def test_paper_preset_uses_table_2_negatives(real_meta):
    built = cohorts.build_all(real_meta, CohortConfig(negatives="paper"))
    summary = cohorts.summarize(built)
    for disease, n in PAPER_NEGATIVES.items():
        assert summary[disease]["negatives"] == n
    # The study's train/test sizes (docs/study.md §2) within a few images of rounding; our
    # validation split is carved from the study's training side.
    for disease, (train, test) in {"Atelectasis": (18847, 4712), "Infiltration": (31915, 7979),
                                   "Hernia": (381, 96), "Pneumonia": (2344, 587)}.items():
        assert abs(summary[disease]["train"] + summary[disease]["val"] - train) <= 2
        assert abs(summary[disease]["test"] - test) <= 2


def test_one_class_cohort(real_meta, ratio):
    frame = ratio["OneClass"]
    assert (frame.label == 0).sum() == 2800 and (frame.label == 1).sum() == 14 * 200
    by_name = real_meta.set_index(nih.IMAGE)
    inliers = by_name.loc[frame.image_index[frame.label == 0]]
    assert inliers[nih.NO_FINDING].all()
    anomalies = by_name.loc[frame.image_index[frame.label == 1]]
    assert not anomalies[nih.NO_FINDING].any()
    # 200 drawn per disease, disjoint: every disease is present at least 200 times.
    assert (anomalies[list(nih.DISEASES)].sum() >= 200).all()
    assert frame.image_index.is_unique


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_no_patient_on_both_sides_of_any_split(real_meta, seed):
    built = cohorts.build_all(real_meta, CohortConfig(seed=seed))
    for name, frame in built.items():
        sides = {s: set(frame.patient_id[frame.split == s]) for s in cohorts.SPLITS}
        assert not sides["train"] & sides["test"], name
        assert not sides["train"] & sides["val"], name
        assert not sides["val"] & sides["test"], name
        assert set(frame.split) == set(cohorts.SPLITS), name
        frac = (frame.split == "test").mean()
        assert 0.19 <= frac <= 0.201, (name, frac)
        val = (frame.split == "val").sum() / (frame.split != "test").sum()
        assert 0.115 <= val <= 0.126, (name, val)  # 1/8 of the training side


def test_validation_leaves_the_test_split_as_it_was(real_meta, ratio):
    """Carving validation from the training side never moves a test image."""
    for name, frame in ratio.items():
        patients = frame.patient_id.to_numpy()
        is_test = cohorts.patient_split(frame, 0.2, 0, name)
        assert ((frame.split == "test").to_numpy() == is_test).all(), name
        assert len(set(patients[is_test])) == frame.patient_id[frame.split == "test"].nunique()


def test_a_leak_is_a_one_line_error():
    frame = pd.DataFrame({"cohort": "Mass", "image_index": ["a", "b", "c"],
                          "patient_id": [7, 7, 8], "label": [1, 0, 1],
                          "split": ["train", "test", "val"]})
    with pytest.raises(UserError, match="Mass: 1 patient.*patient 7 in test/train"):
        cohorts.check_disjoint(frame)


def test_same_seed_same_split_other_seed_different(real_meta, ratio):
    again = cohorts.build_all(real_meta, CohortConfig(seed=0), names=("Fibrosis", "OneClass"))
    other = cohorts.build_all(real_meta, CohortConfig(seed=1), names=("Fibrosis", "OneClass"))
    for name in ("Fibrosis", "OneClass"):
        pd.testing.assert_frame_equal(again[name], ratio[name])
        assert not set(other[name].image_index[other[name].split == "test"]) == set(
            ratio[name].image_index[ratio[name].split == "test"])


def _write_lists(folder, train, test):
    (folder / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (folder / "test_list.txt").write_text("\n".join(test) + "\n")


def test_official_split_mode(real_meta, tmp_path):
    # Official-style lists: whole patients, patient id < 25000 in train/val, the rest test.
    names = real_meta[nih.IMAGE]
    is_test = real_meta[nih.PATIENT].to_numpy() >= 25000
    _write_lists(tmp_path, names[~is_test], names[is_test])
    built = cohorts.build_all(real_meta, CohortConfig(split="official", split_dir=tmp_path))
    for frame in built.values():
        split = frame.split.to_numpy()
        assert ((split == "test") == (frame.patient_id >= 25000)).all()
        # validation: whole patients of the official train_val list, about 1/8 of its images
        train_side = split != "test"
        assert 0.09 < (split[train_side] == "val").mean() < 0.16


def test_official_split_errors(real_meta, tmp_path):
    with pytest.raises(UserError, match="needs --split-dir"):
        cohorts.build_all(real_meta, CohortConfig(split="official"))
    with pytest.raises(UserError, match="train_val_list.txt: no such file"):
        cohorts.build_all(real_meta, CohortConfig(split="official", split_dir=tmp_path))
    _write_lists(tmp_path, ["00000001_000.png", "99999999_000.png"], ["00000002_000.png"])
    with pytest.raises(UserError, match=r"train_val_list.txt: 1 image\(s\) not in the metadata, "
                                        r"e.g. '99999999_000.png'"):
        cohorts.build_all(real_meta, CohortConfig(split="official", split_dir=tmp_path))


def test_cohort_names_resolve_or_fail_clearly():
    assert cohorts.resolve_cohort("pleural thickening") == "Pleural_Thickening"
    assert cohorts.resolve_cohort("one_class") == "OneClass"
    assert cohorts.resolve_cohort("Hernia") == "Hernia"
    with pytest.raises(UserError, match=r"unknown cohort 'Covid'; valid cohorts: Atelectasis, "):
        cohorts.resolve_cohort("Covid")

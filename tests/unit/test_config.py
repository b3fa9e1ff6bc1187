"""Recipes: both shipped recipes load; a broken recipe fails with an error naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_ray.sweep import plan as sweep, recipe as config
from cxr_ray.errors import UserError

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_demo_recipe_is_all_15_cohorts_by_all_policies():
    recipe = config.load_recipe(JOBS / "demo.toml")
    stage1, stage2, comparison = sweep.plan_trials(recipe)
    assert len(stage1) == 15 and len(stage2) == 15 * 7 and not comparison
    assert {s.policy for s in stage2} == set(config.DEFAULT_POLICIES)
    assert all(s.lr_find for s in stage1)  # every stage-1 model gets its LR range test
    bounded = [s for s in stage2 if s.policy in config.BOUNDED_POLICIES]
    assert {s.lr_source for s in bounded} == {"lr_find"}
    assert {s.lr_source for s in stage2 if s not in bounded} == {"preset"}
    # stage-2 trials start from their own cohort's stage-1 run; names say stage/cohort/policy
    assert all(s.stage1_run == s.cohort for s in stage2)
    assert stage2[0].run_name == "Atelectasis__constant"


def test_demo_stage2_runs_four_full_cycles_so_the_triangular2_variants_part():
    """At any cohort size, the demo's stage 2 holds four full CLR cycles (the step size is
    rounded down to whole steps), and modified triangular2 leaves triangular2 in the fourth."""
    import math

    from cxr_ray.optim import schedules

    recipe = config.load_recipe(JOBS / "demo.toml")
    epochs, half = recipe.stage2["epochs"], recipe.stage2["step_size_epochs"]
    for spe in range(4, 120):  # steps per epoch: Hernia's few batches to OneClass's many
        step = max(1, math.floor(half * spe + 1e-9))
        total = epochs * spe
        assert total >= 4 * 2 * step, spe
        lrs = {name: schedules.policy_lrs(schedules.PolicyConfig(
            name=name, base_lr=0.001, max_lr=0.01, step_size=step).validate(), total)
            for name in ("triangular2", "modified_triangular2")}
        three = 3 * 2 * step
        assert lrs["triangular2"][:three] == pytest.approx(lrs["modified_triangular2"][:three])
        assert lrs["triangular2"][three:] != pytest.approx(lrs["modified_triangular2"][three:])


def test_paper_recipe_has_the_backbone_by_optimizer_comparison():
    recipe = config.load_recipe(JOBS / "paper.toml")
    stage1, stage2, comparison = sweep.plan_trials(recipe)
    assert recipe.train["image_size"] == 224 and recipe.train["model"] == "mobilenet_v1"
    assert recipe.stage2["epochs"] == 36 and recipe.stage2["step_size_epochs"] == 2
    assert len(comparison) == 9 and {c.cohort for c in comparison} == {"Atelectasis"}
    assert {(c.axes["model"], c.axes["optimizer"]) for c in comparison} == {
        (m, o) for m in ("mobilenet_v1", "alexnet", "densenet121")
        for o in ("sgd", "adam", "rmsprop")}


def test_any_training_key_can_be_a_grid_axis():
    recipe = config.parse_recipe({
        "experiment": {"name": "x", "shards": "s", "cohorts": ["Mass", "hernia"]},
        "grid": {"policy": ["triangular"], "batch_size": [8, 16]},
        "stage1_grid": {"model": ["mobilenet_v1", "densenet121"]},
        "stage2": {"bounds": "recipe", "base_lr": 0.001, "max_lr": 0.01},
    })
    stage1, stage2, _ = sweep.plan_trials(recipe)
    assert [s.run_name for s in stage1] == ["Mass__model-mobilenet_v1", "Mass__model-densenet121",
                                            "Hernia__model-mobilenet_v1",
                                            "Hernia__model-densenet121"]
    assert sorted(s.run_name for s in stage2 if s.cohort == "Mass") == [
        "Mass__triangular__batch_size-16", "Mass__triangular__batch_size-8"]
    assert {s.train["batch_size"] for s in stage2} == {8, 16}


def test_each_seed_trains_its_own_stage1_lr_test_and_stage2():
    recipe = config.parse_recipe({
        "experiment": {"name": "x", "shards": "s", "cohorts": ["Mass"], "seeds": 3},
        "grid": {"policy": ["constant", "triangular"]}})
    stage1, stage2, _ = sweep.plan_trials(recipe)
    assert [(s.run_name, s.seed, s.train["seed"]) for s in stage1] == [
        ("Mass__seed0", 0, 0), ("Mass__seed1", 1, 1), ("Mass__seed2", 2, 2)]
    assert all(s.lr_find for s in stage1)
    assert len(stage2) == 6
    for spec in stage2:  # from its own seed's stage-1 model, trained with that seed
        assert spec.stage1_run == f"Mass__seed{spec.seed}" == spec.run_name.replace(
            f"__{spec.policy}", "")
        assert spec.train["seed"] == spec.seed
    listed = config.parse_recipe({"experiment": {"name": "x", "shards": "s", "seeds": [4, 9]}})
    assert {s.seed for s in sweep.plan_trials(listed)[0]} == {4, 9}
    # one seed (the default): no suffix, the [train] seed
    one = config.parse_recipe({"experiment": {"name": "x", "shards": "s", "cohorts": ["Mass"]},
                               "train": {"seed": 5}})
    assert [(s.run_name, s.seed) for s in sweep.plan_trials(one)[0]] == [("Mass", 5)]
    for bad in (0, [1, 1], [-1], "3", True):
        with pytest.raises(UserError, match="seeds"):
            config.parse_recipe({"experiment": {"name": "x", "shards": "s", "seeds": bad}})


@pytest.mark.parametrize("recipe, expect", [
    ({"experiment": {"shards": "s"}}, r"\[experiment\] name: required"),
    ({"experiment": {"name": "x"}}, r"\[experiment\] shards: required"),
    ({"experiment": {"name": "x", "shards": "s"}, "stage2": {"epochs": "four"}},
     r"\[stage2\] epochs: must be a number, got 'four'"),
    ({"experiment": {"name": "x", "shards": "s"}, "train": {"learning_rate": 0.1}},
     r"\[train\]: unknown key 'learning_rate'"),
    ({"experiment": {"name": "x", "shards": "s"}, "grid": {"policy": ["cosine"]}},
     r"\[grid\] policy: unknown policy 'cosine'"),
    ({"experiment": {"name": "x", "shards": "s", "cohorts": ["Covid"]}}, r"unknown cohort 'Covid'"),
    ({"experiment": {"name": "x", "shards": "s"}, "lr_find": {"rule": "magic"}},
     r"\[lr_find\] rule: 'magic' is not one of"),
    ({"experiment": {"name": "x", "shards": "s"}, "lr_find": {"repeats": 0}},
     r"\[lr_find\]: repeats must be >= 1, got 0"),
    ({"experiment": {"name": "x", "shards": "s"}, "lr_find": {"fallback": "table8"}},
     r"\[lr_find\]: fallback must be one of stage1, paper, measured, error, got 'table8'"),
    ({"experiment": {"name": "x", "shards": "s"}, "lr_find": {"loss": "test"}},
     r"\[lr_find\]: loss must be one of train, val"),
    ({"experiment": {"name": "x", "shards": "s"}, "sweeep": {}}, r"unknown section \[sweeep\]"),
    ({"experiment": {"name": "x", "shards": "s"}, "grid": {"model": ["alexnet"]}},
     r"\[grid\] model changes the model"),
    ({"experiment": {"name": "x", "shards": "s"}, "resources": {"max_concurrent_trials": 0}},
     r"max_concurrent_trials"),
    ({"experiment": {"name": "x", "shards": "s", "target": 80}}, r"target: a fraction"),
    ({"experiment": {"name": "x", "shards": "s"}, "train": {"cohort": "Mass"}},
     r"'cohort' is set by the sweep"),
])
def test_broken_recipes_name_the_key(recipe, expect):
    with pytest.raises(UserError, match=expect):
        parsed = config.parse_recipe(recipe, "bad.toml")
        sweep.plan_trials(parsed)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        config.load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiment\nname = 1")
    with pytest.raises(UserError, match="bad.toml: not valid TOML"):
        config.load_recipe(bad)


def test_stage2_by_cohort_overrides_follow_table8():
    recipe = config.load_recipe(JOBS / "paper.toml")
    _, stage2, _ = sweep.plan_trials(recipe)
    epochs = {(s.cohort, s.train["epochs"]) for s in stage2}
    assert ("Atelectasis", 32) in epochs and ("Pneumothorax", 36) in epochs
    assert ("Infiltration", 10) in epochs and ("OneClass", 32) in epochs
    assert {e for c, e in epochs if c == "Fibrosis"} == {32}
    with pytest.raises(UserError, match=r"by_cohort Atelectasis: unknown key 'epoch'"):
        config.load_recipe(JOBS / "paper.toml",
                           {"stage2.by_cohort": {"Atelectasis": {"epoch": 3}}})
    with pytest.raises(UserError, match="Atelectassis"):
        config.load_recipe(JOBS / "paper.toml",
                           {"stage2.by_cohort": {"Atelectassis": {"epochs": 3}}})


def test_object_store_uris_are_accepted_and_bad_ones_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path))
    recipe = config.load_recipe(JOBS / "demo.toml", {
        "experiment.storage_path": "s3://bucket/x?endpoint_override=127.0.0.1:9&scheme=http",
        "experiment.shards": "s3://bucket/shards"})
    assert recipe.experiment_uri == \
        "s3://bucket/x/demo?endpoint_override=127.0.0.1:9&scheme=http"
    assert recipe.experiment_dir.is_relative_to(tmp_path)  # its local copy
    for bad in ("s3:///nobucket", "ftp://host/x"):
        with pytest.raises(UserError, match=r"\[experiment\] storage_path '.*': not a storage "
                                            r"URI cxr-ray can open"):
            config.load_recipe(JOBS / "demo.toml", {"experiment.storage_path": bad})


def test_stop_at_is_a_number_or_stage1_plus_a_margin(tmp_path):
    import json

    from cxr_ray.sweep.trial import trial_config

    base = config.load_recipe(JOBS / "demo.toml").to_dict()
    data = {k: v for k, v in base.items() if k != "source"}
    for bad in ("stage2", "stage1-0.1", 2.0, True):
        data["stage2"] = {**base["stage2"], "stop_at": bad}
        with pytest.raises(UserError, match="stop_at"):
            config.parse_recipe(data, "r.toml")
    data["stage2"] = {**base["stage2"], "stop_at": "stage1+0.05"}
    recipe = config.parse_recipe(data, "r.toml")
    _, stage2, _ = sweep.plan_trials(recipe)
    assert {s.stop_at for s in stage2} == {"stage1+0.05"}
    # resolved in the trial from the finished stage-1 run: its best validation accuracy plus
    # the margin (never its test accuracy)
    spec = stage2[0]
    stage1 = tmp_path / "stage1" / spec.stage1_run
    stage1.mkdir(parents=True)
    (stage1 / "summary.json").write_text(json.dumps({"history": [
        {"epoch": 1, "val_accuracy": 0.70, "test_accuracy": 0.99},
        {"epoch": 2, "val_accuracy": 0.81, "test_accuracy": 0.5},
        {"epoch": 3, "val_accuracy": None}]}))
    (tmp_path / "lr_find" / spec.stage1_run).mkdir(parents=True)
    spec.train["shards"] = str(tmp_path)  # not opened here
    assert trial_config(spec, tmp_path).stop_at == pytest.approx(0.86)


def test_the_experiment_records_its_data_and_refuses_other_data(tmp_path, local_shards):
    recipe = config.parse_recipe({"experiment": {"name": "x", "shards": str(local_shards),
                                                 "storage_path": str(tmp_path)}})
    exp = recipe.experiment_dir
    exp.mkdir(parents=True)
    first = sweep.check_data(exp, recipe)
    stored = json.loads((exp / "data.json").read_text())
    assert stored == first and len(stored["metadata_sha256"]) == 64
    assert stored["split_seed"] == 0 and stored["cohorts"]["val_fraction"] == 0.125
    assert sweep.check_data(exp, recipe) == first  # a resume on the same data
    (exp / "data.json").write_text(json.dumps({**stored, "split_seed": 3}))
    with pytest.raises(UserError, match="other data \\(split_seed of .* differ"):
        sweep.check_data(exp, recipe)

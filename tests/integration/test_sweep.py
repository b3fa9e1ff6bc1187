"""cxr-ray sweep end to end: 2 cohorts × 2 policies on tiny images in the session's Ray.

Stage 1 trains each cohort as 2-rank DDP under Ray Train (and runs its LR range test in the
same fit); stage 2 trains in the Tune trials' own processes. One sweep is shared by the
module. Its driver is a real ``cxr-ray sweep`` process, killed (SIGKILL, like a lost
head-node shell) once a stage-2 trial has finished and another is part-way through its
epochs; the same command then resumes it in this process. The tests check the finished
experiment: every trial ran exactly once, the interrupted in-trial run resumed from its own
checkpoint with its lr schedule continuous, stage 2 started from the stage-1 weights, the
report has every trial and table, TensorBoard lists one run per trial, and the driver printed
cxr-ray's lines, none of Tune's.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cxr_ray import cli, paths, train
from cxr_ray.data import synth
from cxr_ray.data.prepare import PrepareConfig
from cxr_ray.optim import schedules
from cxr_ray.ray_backend import ingest
from cxr_ray.ray_backend import tune as sweep_runner
from cxr_ray.sweep import plan as sweep
from cxr_ray.sweep import recipe as config
from cxr_ray.train import loop

pytestmark = pytest.mark.slow

COHORTS = ("Cardiomegaly", "Effusion")
POLICIES = ("constant", "triangular")
RECIPE = """
[experiment]
name = "tiny"
storage_path = "{storage}"
shards = "{shards}"
cohorts = ["Cardiomegaly", "Effusion"]
target = "constant"

[train]
model = "mobilenet_v1"
width = 0.25
pretrained = false
image_size = 32
batch_size = 16
workers = 1
cpus_per_worker = 0.5
threads = 1
checkpoint_metric = "val_accuracy"
keep_checkpoints = 1

[stage1]
preset = "paper"
epochs = 2
workers = 2              # 2-rank DDP under Ray Train, as in the demo

[lr_find]
num_steps = 12
repeats = 2              # the median of two batch orders, with their spread
min_lr = 1e-5
max_lr = 1.0

[stage2]
epochs = 3
step_size_epochs = 1
throttle_s = 0.4         # slow enough for the test to kill the driver mid-run

[grid]
policy = ["constant", "triangular"]

[resources]
max_concurrent_trials = "auto"
"""


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``predicate`` until true; fail (with the process's output) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the sweep exited ({proc.returncode}) before {what}:\n{out[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory, ray_local) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    synth.write_dataset(root / "data", per_class=40, size=64, seed=0, workers=2)
    ingest.prepare(PrepareConfig(data=root / "data", out=root / "shards", size=32))
    path = root / "tiny.toml"
    path.write_text(RECIPE.format(storage=root / "experiments", shards=root / "shards"))
    return path


@pytest.fixture(scope="module")
def experiment(tiny_recipe, ray_local) -> dict:
    """The sweep, killed once a stage-2 trial has finished and another is part-way through,
    then resumed; what each step saw."""
    recipe = config.load_recipe(tiny_recipe)
    exp = recipe.experiment_dir
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr_ray.cli", "sweep", "--config", str(tiny_recipe)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    def part_way() -> list[Path]:
        return [run for run in (exp / "stage2").glob("*") if not (run / paths.TRIAL_FILE).exists()
                and 1 <= len(paths.read_jsonl(run / paths.HISTORY_FILE)) < 3]

    try:
        _wait_for(lambda: any((exp / "stage2").glob(f"*/{paths.TRIAL_FILE}")) and part_way(),
                  900, "a finished stage-2 trial and one part-way through", proc)
        interrupted = part_way()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started
        proc.wait()
    driver_log = proc.stdout.read()
    finished = {p.parent for p in exp.glob(f"*/*/{paths.TRIAL_FILE}")}
    before = {run: (run / paths.SUMMARY_FILE).stat().st_mtime_ns for run in finished}
    report_path = sweep_runner.run_sweep(config.load_recipe(tiny_recipe), resume=True,
                                         address=ray_local)
    return {"dir": exp, "finished_before_kill": before, "report": report_path,
            "recipe": recipe, "driver_log": driver_log, "interrupted": interrupted}


def _rows(exp: Path) -> list[dict]:
    with open(exp / "report" / "results.csv") as fh:
        return list(csv.DictReader(fh))


def test_every_trial_ran_exactly_once_across_the_kill(experiment):
    exp = experiment["dir"]
    stage1, stage2, _ = sweep.plan_trials(experiment["recipe"])
    assert len(stage1) == 2 and len(stage2) == 4
    runs = [exp / s.stage / s.run_name for s in stage1 + stage2]
    for run in runs:
        assert (run / paths.TRIAL_FILE).is_file(), run
        history = paths.read_jsonl(run / paths.HISTORY_FILE)
        assert [r["epoch"] for r in history] == [1, 2, 3][:len(history)], run
        assert len(history) == (2 if run.parent.name == "stage1" else 3), run
    # the driver logs one line per finished trial
    assert "stage1 2/2 finished" in experiment["driver_log"], experiment["driver_log"][-2000:]
    before = experiment["finished_before_kill"]
    assert any(run.parent.name == "stage2" for run in before)  # killed in stage 2
    for run, mtime in before.items():  # a finished trial is not trained again on resume
        assert (run / paths.SUMMARY_FILE).stat().st_mtime_ns == mtime, run
        assert len(paths.read_jsonl(run / paths.ATTEMPTS_FILE)) == 1, run
    for cohort in COHORTS:  # one LR range test per cohort, from its stage-1 model, same fit
        data = json.loads((exp / "lr_find" / cohort / "lr_find.json").read_text())
        assert data["cohort"] == cohort and 0 < data["base_lr"] < data["max_lr"]
        assert Path(data["start_checkpoint"]).parent.parent == exp / "stage1" / cohort
        assert data["workers"] == 2  # the loss averaged over both DDP ranks
        assert len(data["curves"]) == 2  # repeats: two batch orders from the same start
        lo, hi = data["spread"]["paper"]
        assert lo <= data["measured_max_lr"] <= hi
        if data["bounds_source"] == "lr_find":
            assert data["trusted"] and data["max_lr"] == data["measured_max_lr"]
        else:  # the recipe's default fallback: the stage-1 lr x [1/4, 1], and why
            stage1_lr = json.loads((exp / "stage1" / cohort / paths.CONFIG_FILE).read_text()
                                   )["policy"]["base_lr"]
            assert data["problems"] and data["max_lr"] == pytest.approx(stage1_lr)
            assert data["bounds_source"].startswith("fallback: the stage-1 lr")
        attempts = paths.read_jsonl(exp / "stage1" / cohort / paths.ATTEMPTS_FILE)
        assert [a["launcher"] for a in attempts] == ["ray_train"]
    trials = [json.loads((r / paths.TRIAL_FILE).read_text()) for r in runs]
    assert {t["launcher"] for t in trials if t["stage"] == "stage2"} == {"process"}
    assert sum(t["fits"] for t in trials) == 2  # one Ray Train fit per stage-1 cohort


def test_an_interrupted_in_trial_run_resumed_from_its_own_checkpoint(experiment):
    assert experiment["interrupted"], "the driver was not killed mid-run"
    for run in experiment["interrupted"]:
        attempts = paths.read_jsonl(run / paths.ATTEMPTS_FILE)
        assert [a["launcher"] for a in attempts] == ["process"] * len(attempts)
        assert len(attempts) >= 2 and attempts[-1]["resumed_from_epoch"] >= 1, attempts
        plan = json.loads((run / paths.CONFIG_FILE).read_text())
        policy = schedules.PolicyConfig.from_dict(plan["policy"])
        with open(run / paths.STEPS_FILE) as fh:
            rows = list(csv.DictReader(fh))
        total = 3 * plan["steps_per_epoch"]
        assert [int(r["step"]) for r in rows] == list(range(total))  # no step twice or lost
        assert all(float(r["lr"]) == pytest.approx(schedules.lr_at(policy, int(r["step"])),
                                                   rel=1e-12) for r in rows)


def test_the_driver_prints_cxr_ray_lines_not_tune_tables(experiment):
    log = experiment["driver_log"]
    assert "stage1: 2 trials" in log and "stage1 2/2 finished" in log, log[-3000:]
    assert "stage2 1/4 finished" in log, log[-3000:]
    finished = re.findall(r"stage1 \d/2 finished (\S+): val accuracy (\d\.\d{3})"
                          r"(?: \(best (\d\.\d{3}), epoch (\d+)\))?", log)
    assert sorted(c for c, *_ in finished) == sorted(COHORTS), log[-3000:]
    for cohort, last, best, epoch in finished:  # the last epoch's, and a better earlier one
        history = paths.read_jsonl(experiment["dir"] / "stage1" / cohort / paths.HISTORY_FILE)
        accs = [r["val_accuracy"] for r in history]
        assert last == f"{accs[-1]:.3f}"
        top = max(range(len(accs)), key=lambda i: (accs[i], i))
        assert (best, epoch) == ((f"{accs[top]:.3f}", str(top + 1)) if accs[top] > accs[-1]
                                 else ("", ""))
    for noise in ("tensorboard --logdir /tmp", "Trial status", "View detailed results",
                  "╭", "Current time:", "Logical resource usage"):
        assert noise not in log, noise


def test_stage2_starts_from_the_stage1_weights_with_the_found_bounds(experiment):
    exp = experiment["dir"]
    for cohort in COHORTS:
        s1 = train.load_checkpoint(train.find_checkpoint(exp / "stage1" / cohort))["model_state"]
        bounds = json.loads((exp / "lr_find" / cohort / "lr_find.json").read_text())
        for policy in POLICIES:
            run = exp / "stage2" / f"{cohort}__{policy}"
            plan = train.RunPlan.from_dict(json.loads((run / paths.CONFIG_FILE).read_text()))
            assert Path(plan.init_from).parent.parent == exp / "stage1" / cohort
            start = loop.initial_model(plan).state_dict()  # what every worker starts from
            assert all(torch.equal(start[k], s1[k]) for k in s1)
            if policy == "triangular":
                assert plan.policy["base_lr"] == pytest.approx(bounds["base_lr"])
                assert plan.policy["max_lr"] == pytest.approx(bounds["max_lr"])
            # and it trained from there: the final weights moved, but point nearer stage 1's
            # than a fresh initialisation of the same model does. (Directions, not distances:
            # BatchNorm makes the convolutions scale-invariant, and a large lr grows their
            # norms without changing what they compute.)
            end = train.load_checkpoint(train.find_checkpoint(run))["model_state"]
            fresh = loop.initial_model(train.RunPlan.from_dict(
                {**plan.to_dict(), "init_from": None})).state_dict()
            convs = [k for k, v in s1.items() if k.endswith("weight") and v.dim() == 4]

            def cosine(a, b):
                return sum(float(torch.nn.functional.cosine_similarity(
                    a[k].flatten(), b[k].flatten(), dim=0)) for k in convs) / len(convs)

            assert any(not torch.equal(end[k], s1[k]) for k in convs), run
            assert cosine(end, s1) > cosine(fresh, s1), run


def test_report_has_every_trial_table_and_plot(experiment):
    exp = experiment["dir"]
    rows = _rows(exp)
    assert {(r["stage"], r["cohort"], r["policy"]) for r in rows} == {
        ("stage1", c, "time_decay") for c in COHORTS} | {
        ("stage2", c, p) for c in COHORTS for p in POLICIES}
    for r in rows:
        # the validation-selected epoch's test accuracy, inside its patient-bootstrap CI
        acc, low, high = (float(r[k]) for k in ("test_accuracy", "test_accuracy_ci_low",
                                                "test_accuracy_ci_high"))
        assert 0 <= low <= acc <= high <= 1 and float(r["compute_seconds"]) > 0
        assert int(r["epochs"]) == (2 if r["stage"] == "stage1" else 3)
        assert 1 <= int(r["selected_epoch"]) <= int(r["epochs"])
        assert 0 < float(r["threshold"]) < 1 and int(r["val_images"]) > 0
        assert int(r["images_processed"]) > 0
    text = experiment["report"].read_text()
    for heading in ("Table 5", "Table 7", "Table 8", "Best policy", "Where the time went",
                    "The study's question", "paired on the same test images",
                    "Which split each number comes from", "sign test", "with split seed 0"):
        assert heading in text, heading
    assert "LR range test max_lr (spread)" in text and "2 repeats)" in text  # Table 8
    paired = list(csv.DictReader((experiment["report"].parent / "paired.csv").open()))
    assert {(r["cohort"], r["policy"]) for r in paired} == {
        (c, p) for c in COHORTS for p in POLICIES if p != "constant"}
    for cohort in COHORTS:
        assert f"curves_{cohort}.png" in text and f"lr_find_{cohort}.png" in text
    for link in [ln.split("](")[1].split(")")[0] for ln in text.splitlines() if "](" in ln]:
        if link.endswith(".png"):
            assert (experiment["report"].parent / link).stat().st_size > 1000, link


def test_tensorboard_lists_every_trial_by_stage_cohort_policy(experiment):
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem

    exp = experiment["dir"]
    mux = pem.EventMultiplexer().AddRunsFromDirectory(str(exp))
    mux.Reload()
    runs = set(mux.Runs())
    expected = {f"stage1/{c}/tensorboard" for c in COHORTS} | {
        f"lr_find/{c}/tensorboard" for c in COHORTS} | {
        f"stage2/{c}__{p}/tensorboard" for c in COHORTS for p in POLICIES}
    assert runs == expected  # one run per trial (and per range test), nothing of Tune's
    for run in expected - {f"lr_find/{c}/tensorboard" for c in COHORTS}:
        tags = str(mux.Runs()[run])
        assert "test/accuracy" in tags and "train/lr" in tags, run


def test_report_command_rebuilds_the_report(experiment, capsys):
    exp = experiment["dir"]
    (exp / "report" / "report.md").unlink()
    assert cli.main(["report", "--experiment", str(exp)]) == 0
    assert (exp / "report" / "report.md").is_file()
    assert "report.md" in capsys.readouterr().out


def test_sweep_errors_are_one_line(tiny_recipe, tmp_path, capsys):
    # a changed recipe for an existing experiment is refused, naming what changed
    changed = tmp_path / "changed.toml"
    changed.write_text(tiny_recipe.read_text().replace("epochs = 3\nstep_size", "epochs = 4\nstep_size"))
    assert cli.main(["sweep", "--config", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "different recipe" in err and "stage2" in err and len(err.strip().splitlines()) == 1
    # --resume of an experiment that never started
    fresh = tmp_path / "fresh.toml"
    fresh.write_text(tiny_recipe.read_text().replace('name = "tiny"', 'name = "never"'))
    assert cli.main(["sweep", "--config", str(fresh), "--resume"]) == 2
    assert "holds no sweep to resume" in capsys.readouterr().err
    # an unknown cohort
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_recipe.read_text().replace('"Effusion"]', '"Efusion"]'))
    assert cli.main(["sweep", "--config", str(bad)]) == 2
    assert "Efusion" in capsys.readouterr().err

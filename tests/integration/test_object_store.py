"""An experiment that lives in an object store, end to end, against an S3-compatible server
(moto) on 127.0.0.1: ``prepare --out s3://…``, a tiny sweep with ``storage_path = "s3://…"``
(stage 1 as 2-rank Ray Train fits with their LR range tests, stage 2 in the Tune trials)
whose driver is killed (SIGKILL) once a stage-2 trial has finished and another is part-way,
the resume from another machine's point of view (an empty local cache), then ``report`` and
``predict`` on the ``s3://`` experiment.

Every command is a real ``cxr-ray`` process with its own local Ray (its workers inherit the
S3 endpoint and credentials from its environment). The tests read the store, not any local
copy: what a trial committed is what counts.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxr_ray import paths, storage
from cxr_ray.data import synth

pytestmark = pytest.mark.slow

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
workers = 2              # 2-rank DDP under Ray Train: rank 0 commits the run to the store

[lr_find]
num_steps = 12
min_lr = 1e-5
max_lr = 1.0

[stage2]
epochs = 3
step_size_epochs = 1
throttle_s = 1.0         # slow enough for the test to kill the driver mid-run

[grid]
policy = ["constant", "triangular"]

[resources]
max_concurrent_trials = 2
"""


def _cli(args: list[str], env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, "-m", "cxr_ray.cli", *args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, f"cxr-ray {' '.join(args)} failed:\n{proc.stdout[-4000:]}"
    return proc.stdout


def _processes_with(marker: str) -> list[int]:
    """PIDs of the processes whose environment holds ``marker`` (a run's own cache path)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _signal_all(marker: str, sig: int) -> list[int]:
    """Send ``sig`` to every process marked with ``marker``; → their PIDs."""
    pids = _processes_with(marker)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    return pids


def _kill_all(marker: str, timeout: float = 60) -> None:
    """SIGKILL every process left of the killed sweep (its Ray workers would otherwise run
    on until they notice their raylet is gone, and could finish the trial the test means
    to resume) and wait until none is left."""
    deadline = time.monotonic() + timeout
    while pids := _signal_all(marker, signal.SIGKILL):
        if time.monotonic() > deadline:
            pytest.fail(f"processes of the killed sweep still running: {pids}")
        time.sleep(0.2)


def _committed(run: storage.Location) -> dict:
    return (run / storage.SYNC_FILE).read_json() or {"files": {}}


def _checkpointed(run: storage.Location) -> int:
    """Epochs done by the latest checkpoint the run's last commit holds (where it resumes)."""
    epochs = [paths.checkpoint_epoch(Path(f.split("/")[0])) for f in _committed(run)["files"]]
    return max((e for e in epochs if e is not None), default=0)


def _history(run: storage.Location) -> list[dict]:
    """The run's history as its last commit left it (what a resume starts from)."""
    if paths.HISTORY_FILE not in _committed(run)["files"]:
        return []
    text = (run / paths.HISTORY_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    """prepare → sweep (killed, resumed elsewhere) → report → predict, all on s3://."""
    root = tmp_path_factory.mktemp("object_store")
    prefix = f"s3://cxr/e2e-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3_server, PYTHONUNBUFFERED="1", CXR_RAY_CACHE=str(root / "cache-head"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.items():
            mp.setenv(key, value)
        synth.write_dataset(root / "data", per_class=40, size=64, seed=0, workers=2)
        _cli(["prepare", "--data", str(root / "data"), "--out", f"{prefix}/shards",
              "--size", "32"], env)
        recipe = root / "tiny.toml"
        recipe.write_text(RECIPE.format(storage=f"{prefix}/experiments",
                                        shards=f"{prefix}/shards"))
        exp = storage.locate(f"{prefix}/experiments/tiny")

        def runs(stage: str) -> list[storage.Location]:
            names = {rel.split("/")[1] for rel in exp.files() if rel.startswith(f"{stage}/")}
            return [exp / stage / name for name in sorted(names)]

        def finished(stage: str) -> list[storage.Location]:
            return [r for r in runs(stage) if paths.TRIAL_FILE in _committed(r)["files"]]

        def part_way() -> list[storage.Location]:
            done = {r.path for r in finished("stage2")}
            return [r for r in runs("stage2") if r.path not in done
                    and 1 <= _checkpointed(r) < 3]

        proc = subprocess.Popen(
            [sys.executable, "-m", "cxr_ray.cli", "sweep", "--config", str(recipe)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the sweep exited ({proc.returncode}) before it could be "
                                f"killed mid-stage-2:\n{proc.stdout.read()[-4000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("timed out waiting for a finished and a part-way stage-2 trial")
                if finished("stage2") and part_way():
                    # Look again with the sweep frozen, so the state that decides the kill
                    # is the state killed (a trial a few epochs from its end could finish
                    # between a look and the kill). Only then: Ray does not take well to
                    # being frozen while it starts workers.
                    _signal_all(env["CXR_RAY_CACHE"], signal.SIGSTOP)
                    if finished("stage2") and part_way():
                        break
                    _signal_all(env["CXR_RAY_CACHE"], signal.SIGCONT)
                time.sleep(0.5)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray
            proc.wait()
        _kill_all(env["CXR_RAY_CACHE"])  # its trial processes too
        interrupted = [r.name for r in part_way()]  # as the kill left them
        before = {f"{r.path}": _committed(r)["files"][paths.SUMMARY_FILE]
                  for r in finished("stage1") + finished("stage2")}
        # The resume runs as if on a new head node: nothing in its local cache.
        env["CXR_RAY_CACHE"] = str(root / "cache-resume")
        resume_log = _cli(["sweep", "--config", str(recipe), "--resume"], env)
        env["CXR_RAY_CACHE"] = str(root / "cache-reader")
        report_log = _cli(["report", "--experiment", exp_uri(prefix)], env)
        preds = root / "preds.csv"
        predict_log = _cli(["predict", "--experiment", exp_uri(prefix), "--images",
                            str(root / "data" / "images"), "--out", str(preds),
                            "--heatmaps", str(root / "heatmaps"), "--heatmap-cohorts",
                            "Effusion"], env)
        yield {"exp": exp, "runs": runs, "before": before, "interrupted": interrupted,
               "resume_log": resume_log, "report_log": report_log, "preds": preds,
               "predict_log": predict_log, "root": root, "prefix": prefix}


def exp_uri(prefix: str) -> str:
    return f"{prefix}/experiments/tiny"


def test_the_shard_set_and_every_trial_are_committed_to_the_store(s3_run):
    exp = s3_run["exp"]
    shards = storage.locate(f"{s3_run['prefix']}/shards")
    manifest = json.loads((shards / "manifest.json").read_bytes())
    assert manifest["written"] == manifest["rows"] == 664
    assert not [k for k in shards.files() if ".staging-" in k]
    stage1, stage2 = s3_run["runs"]("stage1"), s3_run["runs"]("stage2")
    assert [r.name for r in stage1] == ["Cardiomegaly", "Effusion"]
    assert len(stage2) == 4
    for run in stage1 + stage2:
        files = _committed(run)["files"]
        assert paths.TRIAL_FILE in files and paths.SUMMARY_FILE in files, run
        epochs = 2 if run in stage1 else 3
        assert [r["epoch"] for r in _history(run)] == list(range(1, epochs + 1)), run
        kept = [f for f in files if f.startswith(paths.CHECKPOINT_PREFIX)]
        assert kept and all((run / f).is_file() for f in kept), run
        assert any(f.startswith(f"{paths.TB_DIR}/") for f in files), run  # TensorBoard synced
    for cohort in ("Cardiomegaly", "Effusion"):
        found = (exp / paths.LR_FIND_DIR / cohort / paths.LR_FIND_FILE).read_json()
        assert found["cohort"] == cohort and 0 < found["base_lr"] <= found["max_lr"]
        assert found["workers"] == 2  # measured in the Ray Train fit, committed by rank 0
        trial = (exp / "stage1" / cohort / paths.TRIAL_FILE).read_json()
        assert trial["launcher"] == "ray_train" and trial["fits"] == 1
        # Ray Train's own storage is the run's .ray_train/ folder; cxr-ray's files are the run's
        assert any(rel.startswith(f"stage1/{cohort}/.ray_train/") for rel in exp.files())
        assert not [f for f in _committed(exp / "stage1" / cohort)["files"]
                    if f.startswith(".ray_train/")]
    assert (exp / paths.RECIPE_FILE).read_json()["experiment"]["storage_path"].startswith("s3://")
    assert any(rel.startswith("tune/stage2/") for rel in exp.files())  # Tune's own state


def test_finished_trials_were_not_rerun_and_the_interrupted_one_resumed(s3_run):
    exp, before = s3_run["exp"], s3_run["before"]
    assert any("/stage2/" in p for p in before), "killed before any stage-2 trial finished"
    for path, record in before.items():
        run = storage.Location(exp.fs, path, path)
        assert _committed(run)["files"][paths.SUMMARY_FILE] == record, path  # untouched
        attempts = (run / paths.ATTEMPTS_FILE).read_text().splitlines()
        assert len(attempts) == 1, path
    assert s3_run["interrupted"], "the driver was not killed mid-run"
    for name in s3_run["interrupted"]:
        run = exp / "stage2" / name
        attempts = [json.loads(x) for x in (run / paths.ATTEMPTS_FILE).read_text().splitlines()]
        assert len(attempts) >= 2 and attempts[-1]["resumed_from_epoch"] >= 1, attempts
        steps = list(csv.DictReader(io.StringIO((run / paths.STEPS_FILE).read_text())))
        plan = (run / paths.CONFIG_FILE).read_json()
        assert [int(r["step"]) for r in steps] == list(range(3 * plan["steps_per_epoch"]))
    assert "stage1: resuming the Tune experiment" in s3_run["resume_log"] or \
        "stage2: resuming the Tune experiment" in s3_run["resume_log"], s3_run["resume_log"][-3000:]


def test_report_is_written_back_to_the_store(s3_run):
    exp = s3_run["exp"]
    text = (exp / paths.REPORT_DIR / "report.md").read_text()
    assert "Cardiomegaly" in text and "Effusion" in text
    rows = list(csv.DictReader(io.StringIO((exp / paths.REPORT_DIR / "results.csv").read_text())))
    assert len(rows) == 6  # 2 stage-1 + 4 stage-2 trials
    assert f"report: {exp_uri(s3_run['prefix'])}/report/report.md" in s3_run["report_log"]


def test_predict_reads_the_models_from_the_store(s3_run):
    with open(s3_run["preds"]) as fh:
        rows = list(csv.DictReader(fh))
    images = sorted((s3_run["root"] / "data" / "images").glob("*.png"))
    assert len(rows) == len(images) == 664
    assert {r["experiment"] for r in rows} == {exp_uri(s3_run["prefix"])}
    assert all(r["Effusion_checkpoint"].startswith("stage2/") for r in rows)
    assert all(0.0 <= float(r["Effusion"]) <= 1.0 for r in rows)
    heatmaps = list((s3_run["root"] / "heatmaps").glob("*__Effusion.png"))
    assert len(heatmaps) == len(images)

"""cxr-ray train / lr-find under Ray Train (DDP) end to end on a tiny model, tiny images and
the session's local Ray; and the two launchers against each other.

One prepared shard set (synthetic, 32 px) and one trained 2-worker run are shared by the
module; the kill/resume, stage-2 and lr-find tests start their own (short) runs. The bad-input
tests need no Ray: every user error is raised before Ray Train starts.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from cxr_ray import cli, metrics, models, paths, train
from cxr_ray.data import augment, decode, synth
from cxr_ray.data import shards as pipeline
from cxr_ray.data.prepare import PrepareConfig
from cxr_ray.ray_backend import ingest, train_launcher
from cxr_ray.train import checkpoint as ck
from cxr_ray.optim import schedules
from cxr_ray.errors import UserError

COHORT = "Cardiomegaly"  # the synthetic set's most visible finding
TINY = dict(cohort=COHORT, model="mobilenet_v1", width=0.25, pretrained=False, workers=2,
            batch_size=16, cpus_per_worker=0.5, threads=1)
STAGE1 = dict(epochs=8, optimizer="adam", policy="triangular", base_lr=0.001, max_lr=0.004,
              step_size_epochs=1.5, augment=False, keep_checkpoints=2)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    """A shard set at 32 px: 150 synthetic images per class (Cardiomegaly: 253 train / 63 test)."""
    root = tmp_path_factory.mktemp("train")
    synth.write_dataset(root / "data", per_class=150, size=64, seed=0, workers=2)
    ingest.prepare(PrepareConfig(data=root / "data", out=root / "shards", size=32))
    return root / "shards"


def _config(shards: Path, **kw) -> train.TrainConfig:
    return train.TrainConfig(shards=str(shards), **{**TINY, **kw})


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory, ray_local):
    """Stage 1: 2 workers, 8 epochs of Adam with a triangular policy, no augmentation (so
    that it learns in few steps: 16 per epoch)."""
    config = _config(shards, **STAGE1)
    runs = tmp_path_factory.mktemp("runs")
    return train_launcher.fit(config, storage_path=runs, name="stage1")


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _steps(run: Path) -> list[dict]:
    with open(run / "steps.csv") as fh:
        return list(csv.DictReader(fh))


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard run, as TensorBoard shows it (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_schedule_continuous(run: Path, plan: dict) -> None:
    """steps.csv holds steps 0..N-1 once each, with the policy's lr at every step."""
    rows = _steps(run)
    total = plan["epochs"] * plan["steps_per_epoch"]
    assert [int(r["step"]) for r in rows] == list(range(total))
    policy = schedules.PolicyConfig.from_dict(plan["policy"])
    for r in rows:
        assert float(r["lr"]) == pytest.approx(schedules.lr_at(policy, int(r["step"])), rel=1e-12)
    assert [int(r["epoch"]) for r in rows] == [i // plan["steps_per_epoch"] + 1
                                                for i in range(total)]


def _test_split(shards: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The cohort's test split read directly (no Ray): model input and labels."""
    sh = pipeline.open_shards(shards)
    table = pipeline.cohort_table(sh, COHORT, "test")
    data = pads.dataset(str(sh.images_dir)).to_table(
        columns=["image_id", "pixels"], filter=pads.field("image_id").isin(table["image_id"]))
    images = decode.pixels_to_numpy(data.column("pixels"), sh.size)
    label_of = dict(zip(table["image_id"], table["label"]))
    labels = np.array([label_of[i] for i in data.column("image_id").to_pylist()], np.float64)
    return augment.to_model_input(images.copy()), labels


# --------------------------------------------------------------------------- the trained run
@pytest.mark.slow
def test_two_workers_learn_and_cover_the_whole_test_split(trained, shards):
    history = trained.history
    assert [r["epoch"] for r in history] == list(range(1, 9))
    n_test = len(pipeline.cohort_table(shards, COHORT, "test"))
    n_train = len(pipeline.cohort_table(shards, COHORT, "train"))
    for r in history:
        assert r["test_images"] == n_test  # every test image once, from both workers
        assert r["train_images"] == (n_train // 2) * 2  # equal shards: one image left out
        assert r["images_per_s"] > 0 and r["epoch_seconds"] > 0
    chance = max(np.mean(pipeline.cohort_table(shards, COHORT, "test")["label"]), 0.5)
    assert history[-1]["test_accuracy"] >= chance + 0.2, history[-1]  # seen: 0.94
    assert history[-1]["test_auc"] >= 0.85, history[-1]
    assert trained.compute_seconds == pytest.approx(sum(r["epoch_seconds"] for r in history))
    assert trained.images == sum(r["train_images"] for r in history)


@pytest.mark.slow
def test_metrics_equal_a_direct_evaluation_of_the_saved_model(trained, shards):
    run = Path(trained.run_dir)
    ckpt = train.load_checkpoint(Path(trained.last_checkpoint) / paths.CHECKPOINT_FILE)
    assert ckpt["epoch"] == 8 and ckpt["step"] == 8 * trained.plan["steps_per_epoch"]
    model = models.build_model(models.ModelConfig(**ckpt["model"]))
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    x, y = _test_split(shards)
    with torch.no_grad():
        logits = model(x).double().numpy()
    direct = metrics.binary_metrics(1 / (1 + np.exp(-logits)), y)
    last = _history(run)[-1]
    for key in ("accuracy", "auc", "sensitivity", "specificity"):
        assert last[f"test_{key}"] == pytest.approx(direct[key], abs=1e-9), key
    assert last["test_loss"] == pytest.approx(metrics.bce_with_logits(logits, y), rel=1e-5)


@pytest.mark.slow
def test_lr_of_every_step_is_the_policy_formula_and_tensorboard_has_it(trained):
    run = Path(trained.run_dir)
    plan = trained.plan
    assert plan["policy"]["name"] == "triangular"
    assert plan["policy"]["step_size"] == round(1.5 * plan["steps_per_epoch"])
    _assert_schedule_continuous(run, plan)

    steps = _scalars(run / "tensorboard")  # one TensorBoard run per training run
    policy = schedules.PolicyConfig.from_dict(plan["policy"])
    lrs = steps["train/lr"]
    assert [s for s, _ in lrs] == list(range(8 * plan["steps_per_epoch"]))
    assert all(v == pytest.approx(schedules.lr_at(policy, s), rel=1e-6) for s, v in lrs)
    assert len(steps["train/loss"]) == len(lrs)
    epochs = steps
    history = trained.history
    ends = [r["step"] - 1 for r in history]  # epoch metrics sit at the epoch's last step
    assert [v for _, v in epochs["train/epoch"]] == list(range(1, 9))
    for tag, key in (("test/accuracy", "test_accuracy"), ("test/auc", "test_auc"),
                     ("test/loss", "test_loss"), ("train/accuracy", "train_accuracy"),
                     ("test/sensitivity", "test_sensitivity"),
                     ("val/accuracy", "val_accuracy"), ("val/threshold", "val_threshold"),
                     ("test/accuracy_at_threshold", "test_accuracy_at_threshold"),
                     ("perf/images_per_s", "images_per_s")):
        assert [s for s, _ in epochs[tag]] == ends, tag
        assert [v for _, v in epochs[tag]] == pytest.approx([r[key] for r in history], rel=1e-5)
    # The run's hyperparameters (HParams plugin) sit next to the epoch scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["cohort"].string_value == COHORT and hp["policy"].string_value == "triangular"
    assert hp["max_lr"].number_value == pytest.approx(0.004)


@pytest.mark.slow
def test_checkpoints_best_and_latest_in_the_documented_format(trained):
    run = Path(trained.run_dir)
    kept = sorted(p.name for p in run.glob("checkpoint_epoch_*"))
    assert len(kept) <= 3 and "checkpoint_epoch_0008" in kept  # best 2 + the latest
    best_epoch = int(Path(trained.best_checkpoint).name.rsplit("_", 1)[1])
    aucs = {r["epoch"]: r["val_auc"] for r in trained.history}  # selected on validation
    assert trained.checkpoint_metric == "val_auc"
    assert trained.best_metric == aucs[best_epoch] == max(aucs[int(k[-4:])] for k in kept)
    assert trained.selected_epoch == best_epoch
    ckpt = torch.load(run / kept[-1] / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == "cxr-ray-checkpoint" and ckpt["model_name"] == "mobilenet_v1"
    assert set(ckpt) >= {"model", "cohort", "image_size", "model_state", "optimizer",
                         "epoch", "step", "history", "steps", "plan"}
    assert "scheduler" not in ckpt and ckpt["format_version"] == 2  # the loop owns the step
    assert len(ckpt["steps"]["lr"]) == ckpt["step"] and len(ckpt["history"]) == 8
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_checkpoint"] == trained.best_checkpoint


@pytest.mark.slow
def test_rerun_of_a_finished_run_resumes_without_training(trained, shards):
    again = train_launcher.fit(_config(shards, **STAGE1),
                               storage_path=Path(trained.run_dir).parent, name="stage1")
    assert again.resumed_from_epoch == 8 and again.history == trained.history
    assert again.images == 0


# --------------------------------------------------------------------------- failures
def _snapshot_epoch(run: Path) -> int:
    """Epochs in history.jsonl: rank 0 writes it after ray.train.report has persisted the
    epoch's checkpoint."""
    return len(paths.read_jsonl(run / paths.HISTORY_FILE))


def _fit_in_thread(config: train.TrainConfig, runs: Path, name: str) -> dict:
    box: dict = {}

    def run() -> None:
        try:
            box["summary"] = train_launcher.fit(config, storage_path=runs, name=name)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


def _kill_a_worker_after(run: Path, epoch: int, box: dict, timeout: float = 180) -> None:
    """Once the checkpoint of ``epoch`` is written, SIGKILL rank 0 of the current attempt
    (its pid is in attempts.jsonl: only this run's worker, whatever else runs here)."""
    deadline = time.monotonic() + timeout
    while _snapshot_epoch(run) < epoch:
        assert box["thread"].is_alive(), box.get("error")
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} in {timeout} s"
        time.sleep(0.1)
    os.kill(paths.read_jsonl(run / paths.ATTEMPTS_FILE)[-1]["pid"], signal.SIGKILL)  # rank 0


@pytest.mark.slow
def test_killed_worker_interrupts_then_rerun_and_restart_resume_exactly(shards, tmp_path,
                                                                         ray_local):
    run = tmp_path / "kill"
    base = dict(epochs=4, policy="triangular2", base_lr=0.01, max_lr=0.05, step_size_epochs=1,
                throttle_s=0.15)
    # 1. No retries: the run stops after a worker dies and says how to resume.
    box = _fit_in_thread(_config(shards, max_failures=0, **base), tmp_path, "kill")
    _kill_a_worker_after(run, 1, box)
    box["thread"].join(300)
    assert isinstance(box.get("error"), UserError) and "re-run" in str(box["error"])
    done = len(_history(run))
    assert 1 <= done <= 2  # killed during epoch 2 (or 3): at least one epoch left to run
    # 2. The same command again resumes; a worker killed during it is replaced by Ray Train
    #    (FailureConfig) and the run restarts from its latest checkpoint.
    box = _fit_in_thread(_config(shards, max_failures=1, **base), tmp_path, "kill")
    _kill_a_worker_after(run, done + 1, box)
    box["thread"].join(300)
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert summary.resumed_from_epoch == done
    assert [r["epoch"] for r in summary.history] == [1, 2, 3, 4]
    attempts = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 3 and attempts[0]["resumed_from_epoch"] == 0
    assert attempts[1]["resumed_from_epoch"] == done
    assert attempts[2]["resumed_from_epoch"] >= done + 1
    _assert_schedule_continuous(run, summary.plan)
    tb = _scalars(run / "tensorboard")
    assert [s for s, _ in tb["train/lr"]] == list(range(4 * summary.plan["steps_per_epoch"]))
    assert [v for _, v in tb["train/epoch"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_lr_find_then_stage2_with_the_found_bounds(trained, shards, tmp_path):
    out = tmp_path / "lr"
    found = train_launcher.lr_find(
        _config(shards, epochs=1, optimizer="sgd", init_from=trained.run_dir),
        train.LrFindSpec(out=str(out), settings={"num_steps": 30, "min_lr": 1e-5,
                                                 "max_lr": 0.005}))
    data = json.loads((out / "lr_find.json").read_text())
    assert data["max_lr"] == found["max_lr"] and data["base_lr"] == pytest.approx(
        data["max_lr"] / 4)
    assert 1e-5 <= data["max_lr"] <= 0.005 * (1 + 1e-9) and 3 <= len(data["lrs"]) <= 30
    assert data["init_from"] == trained.best_checkpoint + "/checkpoint.pt"
    assert (out / "lr_find.png").stat().st_size > 0
    assert len(_scalars(out / "tensorboard")["lr_find/loss"]) == len(data["lrs"])

    stage2 = train_launcher.fit(_config(shards, epochs=1, optimizer="sgd", policy="triangular", lr_bounds=str(
        out / "lr_find.json"), init_from=trained.run_dir, augment=False),
        storage_path=tmp_path, name="stage2")
    plan = stage2.plan
    assert plan["policy"]["base_lr"] == data["base_lr"] and plan["policy"]["max_lr"] == data[
        "max_lr"]
    assert plan["init_from"] == data["init_from"]
    first = _steps(Path(stage2.run_dir))[0]
    assert float(first["lr"]) == pytest.approx(data["base_lr"])  # fresh policy at step 0
    # The workers started from the stage-1 weights: after 16 small steps the backbone is
    # still within a few % of them (a fresh init is ~140 % away), with a fresh optimizer.
    before = torch.load(data["init_from"], weights_only=True)["model_state"]
    after = train.load_checkpoint(Path(stage2.last_checkpoint) / "checkpoint.pt")
    assert after["step"] == plan["steps_per_epoch"]
    fresh = models.create_model("mobilenet_v1", width=0.25, pretrained=False).state_dict()
    keys = [k for k in before if k.endswith("weight") and before[k].dim() == 4]

    def distance(a):
        return sum((a[k] - before[k]).norm() for k in keys) / sum(before[k].norm() for k in keys)

    assert distance(after["model_state"]) < 0.1 < 0.5 < distance(fresh)


# --------------------------------------------------------------------------- bad input
def _cli_error(capsys, *args: str) -> str:
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    return err


@pytest.fixture(scope="module")
def fake_run(shards, tmp_path_factory):
    """A stage-1 'run directory' holding one checkpoint of a (width 0.25) mobilenet_v1."""
    run = tmp_path_factory.mktemp("fake") / "run"
    (run / "checkpoint_epoch_0001").mkdir(parents=True)
    torch.save({"format": ck.CHECKPOINT_FORMAT, "format_version": ck.CHECKPOINT_VERSION,
                "model_name": "mobilenet_v1", "model": {"width": 0.25}, "cohort": COHORT,
                "model_state": {}}, run / "checkpoint_epoch_0001" / "checkpoint.pt")
    return run


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(capsys, shards, fake_run, tmp_path):
    base = ["train", "--shards", str(shards), "--out", str(tmp_path / "r"), "--cohort", COHORT,
            "--width", "0.25"]
    err = _cli_error(capsys, *base[:-4], "--cohort", "Pneumothoraxx")
    assert "Pneumothoraxx" in err and "Cardiomegaly" in err  # lists the valid names
    err = _cli_error(capsys, *base, "--model", "resnet50")
    assert "resnet50" in err and "densenet121" in err
    err = _cli_error(capsys, *base, "--policy", "cosine")
    assert "cosine" in err and "modified_triangular2" in err
    err = _cli_error(capsys, *base, "--optimizer", "lamb")
    assert "lamb" in err and "rmsprop" in err
    err = _cli_error(capsys, "train", "--shards", str(tmp_path / "nope"), "--cohort", COHORT,
                     "--out", str(tmp_path / "r"))
    assert "cxr-ray prepare" in err
    err = _cli_error(capsys, *base, "--image-size", "64")
    assert "prepared for 32" in err and "64" in err
    err = _cli_error(capsys, *base, "--model", "alexnet", "--width", "1")
    assert "alexnet" in err and "63" in err  # 32 px shards are too small for AlexNet
    err = _cli_error(capsys, *base, "--policy", "triangular")
    assert "--max-lr" in err and "lr-find" in err
    err = _cli_error(capsys, *base, "--workers", "3", "--batch-size", "16")
    assert "divisible" in err
    err = _cli_error(capsys, *base, "--epochs", "0")
    assert "epochs" in err
    # Stage 2 from a checkpoint of another model, of another width, or from no checkpoint.
    err = _cli_error(capsys, *base[:-2], "--model", "densenet121", "--init-from", str(fake_run))
    assert "is a mobilenet_v1 model; this run trains densenet121" in err
    err = _cli_error(capsys, *base[:-2], "--width", "0.5", "--init-from", str(fake_run))
    assert "width" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    err = _cli_error(capsys, *base, "--init-from", str(tmp_path / "junk.pt"))
    assert "junk.pt" in err
    err = _cli_error(capsys, *base, "--lr-bounds", str(tmp_path / "junk.pt"))
    assert "base_lr" in err
    # A run directory of another run is refused, not resumed.
    run = tmp_path / "other"
    run.mkdir()
    plan = train.plan_run(_config(shards, epochs=1, policy="constant", base_lr=0.1), run)
    (run / "config.json").write_text(json.dumps(plan.to_dict()))
    err = _cli_error(capsys, "train", "--shards", str(shards), "--cohort", COHORT, "--out",
                     str(run), "--width", "0.25", "--policy", "constant", "--base-lr", "0.2")
    assert "other settings" in err and "0.1" in err and "0.2" in err


# --------------------------------------------------------------------------- two launchers
@pytest.mark.slow
def test_both_launchers_write_the_same_run(shards, tmp_path, ray_local):
    """One seed trained under Ray Train (one worker) and in this process: the same lr and
    loss at every step, the same epochs, TensorBoard tags and checkpoint layout."""
    import dataclasses

    config = _config(shards, workers=1, epochs=2, optimizer="adam", policy="triangular",
                     base_lr=0.001, max_lr=0.004, step_size_epochs=1, cpus_per_worker=1,
                     keep_checkpoints=1)
    ray_run = train_launcher.fit(config, storage_path=tmp_path, name="ray_train")
    own = train.fit_in_process(dataclasses.replace(config, launcher="process"),
                               storage_path=tmp_path, name="process")
    a, b = _steps(Path(ray_run.run_dir)), _steps(Path(own.run_dir))
    assert len(a) == len(b) == 2 * ray_run.plan["steps_per_epoch"]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [float(r["loss"]) for r in a] == pytest.approx([float(r["loss"]) for r in b],
                                                          rel=1e-5)
    for x, y in zip(ray_run.history, own.history):
        for key in ("step", "train_loss", "test_loss", "test_accuracy", "test_auc"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key
    assert set(_scalars(Path(ray_run.run_dir) / "tensorboard")) == set(
        _scalars(Path(own.run_dir) / "tensorboard"))
    kept = [sorted(p.name for p in Path(s.run_dir).glob("checkpoint_epoch_*"))
            for s in (ray_run, own)]
    assert kept[0] == kept[1] and "checkpoint_epoch_0002" in kept[0]
    launchers = [paths.read_jsonl(Path(s.run_dir) / paths.ATTEMPTS_FILE)[0]["launcher"]
                 for s in (ray_run, own)]
    assert launchers == ["ray_train", "process"]
    assert (ray_run.launcher, own.launcher) == ("ray_train", "process")

"""The Ray-free training package (``cxr_ray.train``) on small real inputs, on the CPU.

One shard set made without Ray (``local_shards``: 40 synthetic images per class at 32 px;
Cardiomegaly has 69 train / 17 test images) and one in-process run shared by the module
(``run``: 2 epochs, then resumed with ``epochs = 3`` in the same directory). Expected values
are worked out by hand where the inputs allow it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cxr_ray import metrics, models, paths
from cxr_ray.data import shards as shard_io
from cxr_ray.errors import UserError
from cxr_ray.optim import schedules
from cxr_ray.train import (LrFindSpec, RunPlan, TrainConfig, fit_in_process,
                           lr_find_in_process, plan_run, steps_per_epoch)
from cxr_ray.train import checkpoint as ck
from cxr_ray.train import loop
from cxr_ray.train.config import cpu_split
from cxr_ray.train.feed import ArrayFeed, rank_rows
from cxr_ray.train.run import ALLOW_NO_CUDA_ENV, device_for

COHORT = "Cardiomegaly"
TINY = dict(cohort=COHORT, model="mobilenet_v1", width=0.25, pretrained=False,
            batch_size=16, threads=1)
#: triangular between 1e-3 and 4e-3 with a half cycle of one epoch (5 steps at 69 images).
RUN = dict(epochs=2, optimizer="adam", policy="triangular", base_lr=0.001, max_lr=0.004,
           step_size_epochs=1, keep_checkpoints=1, checkpoint_metric="val_loss",
           launcher="process")
LOOP = "cxr_ray.train.loop"


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    before = torch.get_num_threads()  # setup() sets the plan's threads (1) process-wide
    yield
    torch.set_num_threads(before)


def _config(shards: Path, **kw) -> TrainConfig:
    return TrainConfig(shards=str(shards), **{**TINY, **kw})


def _cpu_ctx() -> loop.RankContext:
    return loop.RankContext(rank=0, world_size=1, device=torch.device("cpu"),
                            launcher="process", prepare_model=lambda m: m,
                            last_checkpoint=lambda: None, save=lambda m, c: None)


def _steps(run: Path) -> list[dict]:
    with open(run / paths.STEPS_FILE) as fh:
        return list(csv.DictReader(fh))


def _kept(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob(f"{paths.CHECKPOINT_PREFIX}*"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(local_shards, tmp_path_factory):
    """Two epochs in process, a snapshot of the run directory, then the same run resumed
    with ``epochs = 3``."""
    runs = tmp_path_factory.mktemp("runs")
    first = fit_in_process(_config(local_shards, **RUN), storage_path=runs, name="r",
                           threads=1)
    run_dir = Path(first.run_dir)
    snap = {"steps": _steps(run_dir), "history": paths.read_jsonl(run_dir / paths.HISTORY_FILE),
            "kept": _kept(run_dir)}
    second = fit_in_process(_config(local_shards, **{**RUN, "epochs": 3}), storage_path=runs,
                            name="r", threads=1)
    return {"dir": run_dir, "first": first, "second": second, "snap": snap}


# --------------------------------------------------------------------------- one step
@pytest.mark.parametrize("gpu_paths", [True, False], ids=["bf16+channels_last", "cpu-default"])
def test_train_step_on_cpu_with_bf16_and_channels_last(local_shards, gpu_paths):
    """The GPU code paths that run on a CPU: bf16 autocast and channels_last (forced on);
    with both left at None a CPU run uses neither."""
    flag = True if gpu_paths else None
    plan = plan_run(_config(local_shards, amp=flag, channels_last=flag, optimizer="sgd",
                            policy="constant", base_lr=0.01))
    ctx = _cpu_ctx()
    model, optimizer, _ = loop.setup(plan, ctx)
    assert optimizer.param_groups[0]["lr"] == 0.01
    sh = shard_io.open_shards(local_shards)
    feed = ArrayFeed(shard_io.read_split(sh, COHORT, "train"), seed=plan.seed, shuffle=True)
    batch = next(iter(feed.batches(plan.worker_batch, 0)))
    x, y = loop.model_input(batch, feed, plan, 0, ctx.device, train=True)
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)
    assert x.is_contiguous(memory_format=torch.channels_last)

    weights4d = [p for p in model.parameters() if p.dim() == 4]
    first_conv = weights4d[0]  # (8, 1, 3, 3): channels_last strides (9, 1, 3, 1)
    assert first_conv.shape == (8, 1, 3, 3)
    assert first_conv.stride() == ((9, 1, 3, 1) if gpu_paths else (9, 9, 3, 1))

    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    before = [p.detach().clone() for p in model.parameters()]
    loss, bce, logits = loop.train_step(model, optimizer, x, y, amp=loop.autocast(plan, ctx.device))
    for h in hooks:
        h.remove()

    assert math.isfinite(float(loss)) and math.isfinite(float(bce))
    assert float(loss) >= float(bce)  # + the head's L1/L2 penalties
    assert logits.shape == (16,) and logits.dtype == torch.float32
    spatial = [o for o in seen if o.shape[1] > 1 and o.shape[2] > 1]  # formats differ there
    assert spatial
    if gpu_paths:
        assert all(o.dtype == torch.bfloat16 for o in seen)
        assert all(o.is_contiguous(memory_format=torch.channels_last)
                   and not o.is_contiguous() for o in spatial)
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights4d)
        assert first_conv.stride() == (9, 1, 3, 1)  # still channels_last after the step
    else:
        assert all(o.dtype == torch.float32 and o.is_contiguous() for o in seen)
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())]
    with_grad = [p.grad is not None and bool(p.grad.abs().sum() > 0)
                 for p in model.parameters()]
    assert changed[0] and changed[-1]
    assert all(c for c, g in zip(changed, with_grad) if g)  # SGD moved every param with a grad


# --------------------------------------------------------------------------- the run
def test_epoch_has_the_planned_steps_and_every_lr_is_the_policy_formula(run, local_shards):
    first = run["first"]
    n_train = shard_io.open_shards(local_shards).manifest["cohorts"][COHORT]["train"]
    assert n_train == 61  # 3 batches of 16 + one of 13 (the validation split holds 8 more)
    plan = first.plan
    assert plan["steps_per_epoch"] == 4 == n_train // 16 + 1
    assert plan["policy"]["step_size"] == 4
    assert [r["step"] for r in run["snap"]["history"]] == [4, 8]
    assert [r["train_images"] for r in run["snap"]["history"]] == [61, 61]

    rows = run["snap"]["steps"]
    assert [int(r["step"]) for r in rows] == list(range(8))
    assert [int(r["epoch"]) for r in rows] == [1] * 4 + [2] * 4
    policy = schedules.PolicyConfig.from_dict(plan["policy"])
    assert [float(r["lr"]) for r in rows] == [schedules.lr_at(policy, i) for i in range(8)]
    # by hand: 1e-3 + 3e-3 * (1 - |t/4 - 1|) over the first cycle of 8 steps
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(0.001) and lrs[4] == pytest.approx(0.004)
    assert lrs[2] == pytest.approx(0.0025) and lrs[7] == pytest.approx(0.00175)
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert run["snap"]["history"][1]["lr_last"] == pytest.approx(lrs[7])


def test_rerun_with_more_epochs_resumes_from_its_own_checkpoint(run):
    second, run_dir = run["second"], run["dir"]
    assert second.resumed_from_epoch == 2 and second.epochs == 3
    assert second.images == 61  # only epoch 3 trained in the second call
    attempts = paths.read_jsonl(run_dir / paths.ATTEMPTS_FILE)
    assert [(a["resumed_from_epoch"], a["step"], a["launcher"]) for a in attempts] == [
        (0, 0, "process"), (2, 8, "process")]

    rows = _steps(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(12))  # each step once
    assert [int(r["epoch"]) for r in rows] == [1] * 4 + [2] * 4 + [3] * 4
    policy = schedules.PolicyConfig.from_dict(second.plan["policy"])
    assert [float(r["lr"]) for r in rows] == [schedules.lr_at(policy, i) for i in range(12)]
    assert float(rows[8]["lr"]) == pytest.approx(0.001)  # step 8: the second cycle starts
    assert float(rows[10]["lr"]) == pytest.approx(0.0025)
    assert rows[:8] == run["snap"]["steps"]  # the first attempt's steps kept as they were
    history = paths.read_jsonl(run_dir / paths.HISTORY_FILE)
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 4), (2, 8), (3, 12)]
    assert history[:2] == run["snap"]["history"]

    ckpt = ck.load_checkpoint(run_dir / paths.checkpoint_dir_name(3) / paths.CHECKPOINT_FILE)
    assert ckpt["format_version"] == ck.CHECKPOINT_VERSION == 2
    assert (ckpt["epoch"], ckpt["step"]) == (3, 12) and "scheduler" not in ckpt
    assert ckpt["steps"]["lr"] == [float(r["lr"]) for r in rows]
    # Adam's own step count: 12 only if epoch 3 continued the restored optimizer state
    adam_steps = {float(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert adam_steps == {12.0}


def test_checkpoints_are_pruned_to_the_best_and_the_latest(run):
    run_dir, second = run["dir"], run["second"]
    history = paths.read_jsonl(run_dir / paths.HISTORY_FILE)

    def best(epochs):  # lowest val_loss, the later epoch on a tie
        return max((r for r in history if r["epoch"] in epochs),
                   key=lambda r: (-r["val_loss"], r["epoch"]))["epoch"]

    name = paths.checkpoint_dir_name
    assert run["snap"]["kept"] == sorted({name(best({1, 2})), name(2)})
    assert _kept(run_dir) == sorted({name(best({1, 2, 3})), name(3)})
    assert len(_kept(run_dir)) < 3  # keep_checkpoints = 1: at least one folder pruned
    assert not list(run_dir.glob(".checkpoint_epoch_*"))  # no temporary folders left
    b = best({1, 2, 3})
    assert second.checkpoint_metric == "val_loss"
    assert second.best_checkpoint == str(run_dir / name(b))
    assert second.best_metric == history[b - 1]["val_loss"]
    assert second.last_checkpoint == str(run_dir / name(3))
    assert second.selected_epoch == b
    # the per-image scores of the selected epoch and of the latest, nothing else
    kept = sorted(p.name for p in (run_dir / paths.PREDICTIONS_DIR).iterdir())
    assert kept == sorted({paths.predictions_file(run_dir, e).name for e in (b, 3)})
    with np.load(paths.predictions_file(run_dir, b)) as pred:
        rec = history[b - 1]
        for split in ("val", "test"):
            assert len(pred[f"{split}_score"]) == rec[f"{split}_images"]
            assert (pred[f"{split}_patient_id"] > 0).all()
            assert metrics.accuracy(pred[f"{split}_score"], pred[f"{split}_label"]) == \
                pytest.approx(rec[f"{split}_accuracy"])
        assert not set(pred["val_patient_id"]) & set(pred["test_patient_id"])
        assert metrics.accuracy(pred["test_score"], pred["test_label"], rec["val_threshold"]) \
            == pytest.approx(rec["test_accuracy_at_threshold"])
    summary = paths.read_json(run_dir / paths.SUMMARY_FILE)
    assert summary["best_checkpoint"] == second.best_checkpoint
    assert summary["resumed_from_epoch"] == 2


# --------------------------------------------------------------------------- evaluation
class _MeanScore(nn.Module):
    """logit = 10 * (mean pixel in [0, 1] - 0.5): -5 for a black image, +5 for a white one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * (x.mean(dim=(1, 2, 3)) - 0.5)


def _plan(**kw) -> RunPlan:
    base = dict(
        cohort=COHORT, shards="", image_size=8, optimizer={}, policy={}, epochs=1,
        model={"name": "mobilenet_v1", "width": 0.25, "in_chans": 1, "dropout": 0.5,
               "weights": None, "pretrained": False},
        batch_size=4, worker_batch=4, workers=1, steps_per_epoch=1, train_images=4,
        test_images=4, val_images=4, seed=123, augment=True, amp=None, threads=1, gpu=False,
        channels_last=None, augment_on="trainer", init_from=None, log_every=1)
    return RunPlan(**{**base, **kw})


def test_evaluate_counts_a_repeated_image_once_and_warns(caplog):
    # images 1..4 black, white, black, white; labels 0, 1, 1, 1; image 3 appears twice
    pixels = np.array([0, 255, 0, 255, 0], np.uint8)
    images = np.broadcast_to(pixels[:, None, None], (5, 8, 8)).copy()
    ids = np.array([1, 2, 3, 4, 3], np.int64)
    labels = np.array([0, 1, 1, 1, 1], np.float32)
    feed = ArrayFeed((images, ids, labels), shuffle=False)
    with caplog.at_level(logging.WARNING, logger=LOOP):
        scores = loop.evaluate(_plan(test_images=5), _cpu_ctx(), _MeanScore(), feed, expect=5)
    out = {**scores.metrics(), "loss": scores.loss}
    assert scores.image_id.tolist() == [1, 2, 3, 4]  # one row per image, by id
    # z = -5, 5, -5, 5: predictions 0, 1, 0, 1 against 0, 1, 1, 1
    assert out["images"] == 4 and out["positives"] == 3
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["sensitivity"] == pytest.approx(2 / 3) and out["specificity"] == 1.0
    assert out["auc"] == pytest.approx(2.5 / 3)  # positives 5, -5, 5 vs negative -5 (a tie)
    assert out["loss"] == pytest.approx(math.log1p(math.exp(-5)) + 5 / 4)
    assert "evaluated 4 distinct images, expected 5" in caplog.text


def test_evaluate_of_a_real_split_with_a_duplicate_equals_the_split(local_shards, caplog):
    sh = shard_io.open_shards(local_shards)
    images, ids, labels = shard_io.read_split(sh, COHORT, "test")
    assert len(ids) == 17
    plan = plan_run(_config(local_shards, optimizer="sgd", policy="constant", base_lr=0.01))
    torch.manual_seed(0)
    model = loop.initial_model(plan)
    ctx = _cpu_ctx()
    clean = loop.evaluate(plan, ctx, model, ArrayFeed((images, ids, labels), shuffle=False),
                          expect=17)
    assert "distinct" not in caplog.text
    dup = tuple(np.concatenate([a, a[5:6]]) for a in (images, ids, labels))
    with caplog.at_level(logging.WARNING, logger=LOOP):
        twice = loop.evaluate(plan, ctx, model, ArrayFeed(dup, shuffle=False), expect=18)
    assert len(clean.image_id) == len(twice.image_id) == 17
    assert twice.metrics() == pytest.approx(clean.metrics()) and twice.loss == clean.loss
    assert "evaluated 17 distinct images, expected 18" in caplog.text


# --------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_rows_train_equal_disjoint_seeded_by_epoch(world):
    n, seed = 23, 7
    shares = [rank_rows(n, rank=r, world=world, seed=seed, epoch=0, shuffle=True)
              for r in range(world)]
    assert [len(s) for s in shares] == [n // world] * world  # 23, 11+11, 7+7+7
    together = np.concatenate(shares)
    assert len(set(together.tolist())) == len(together)  # disjoint
    assert set(together.tolist()) <= set(range(n))
    if world == 1:
        assert sorted(together.tolist()) == list(range(n))
        assert together.tolist() != list(range(n))  # shuffled
    again = [rank_rows(n, rank=r, world=world, seed=seed, epoch=0, shuffle=True)
             for r in range(world)]
    assert all(np.array_equal(a, b) for a, b in zip(shares, again))  # a pure function
    next_epoch = np.concatenate([rank_rows(n, rank=r, world=world, seed=seed, epoch=1,
                                           shuffle=True) for r in range(world)])
    other_seed = np.concatenate([rank_rows(n, rank=r, world=world, seed=seed + 1, epoch=0,
                                           shuffle=True) for r in range(world)])
    assert not np.array_equal(together, next_epoch)
    assert not np.array_equal(together, other_seed)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_rows_test_cover_every_row_once(world):
    n = 23
    shares = [rank_rows(n, rank=r, world=world, seed=7, epoch=4, shuffle=False)
              for r in range(world)]
    for r, share in enumerate(shares):
        assert share.tolist() == list(range(r, n, world))
    assert sorted(np.concatenate(shares).tolist()) == list(range(n))


def test_array_feed_batches_a_rank_share():
    n = 10
    arrays = (np.zeros((n, 4, 4), np.uint8), np.arange(100, 100 + n), np.zeros(n, np.float32))
    feed = ArrayFeed(arrays, rank=1, world=3, shuffle=False)
    batches = list(feed.batches(2))
    assert [b["image_id"].tolist() for b in batches] == [[101, 104], [107]]
    train = ArrayFeed(arrays, rank=0, world=3, seed=1, shuffle=True)
    got = np.concatenate([b["image_id"].numpy() for b in train.batches(2, epoch=5)])
    want = rank_rows(n, rank=0, world=3, seed=1, epoch=5, shuffle=True) + 100
    assert got.tolist() == want.tolist() and len(got) == 3


# --------------------------------------------------------------------------- planning
def test_plan_uses_the_study_tables(local_shards):
    plan = plan_run(TrainConfig(shards=str(local_shards), cohort="hernia", workers=2,
                                pretrained=False, epochs=3))
    assert plan.cohort == "Hernia" and plan.batch_size == 4 and plan.worker_batch == 2
    assert plan.optimizer["name"] == "adam" and plan.optimizer["momentum"] == 0.9
    assert plan.policy["name"] == "time_decay" and plan.policy["base_lr"] == 0.01
    assert plan.policy["decay"] == 0.0001
    assert plan.channels_last is None and plan.augment_on == "trainer"
    ptx = plan_run(TrainConfig(shards=str(local_shards), cohort="Pneumothorax",
                               policy="triangular", pretrained=False))
    assert (ptx.policy["base_lr"], ptx.policy["max_lr"]) == (0.0075, 0.03)  # Table 8
    assert ptx.policy["step_size"] == 2 * ptx.steps_per_epoch and ptx.batch_size == 32
    assert ptx.steps_per_epoch == 2  # 61 images: one batch of 32 + one of 29
    assert steps_per_epoch(253, 2, 8) == 16  # 126 rows per worker: 15 batches of 8 + 6
    assert steps_per_epoch(17, 1, 8) == 2  # the last batch of 1 is dropped


def test_train_config_round_trips_and_names_bad_keys():
    shards = Path("unused")
    config = _config(shards, workers=2, cpus_per_worker=0.5, epochs=3, policy="triangular2",
                     base_lr=0.01, max_lr=0.04)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="epoch"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(UserError, match="keep_checkpoints"):
        _config(shards, keep_checkpoints=0).validate()
    with pytest.raises(UserError, match="checkpoint_metric"):
        _config(shards, checkpoint_metric="f1").validate()


def test_initial_model_takes_the_stage1_weights(tmp_path):
    model = models.create_model("mobilenet_v1", width=0.25, pretrained=False)
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": ck.CHECKPOINT_FORMAT, "format_version": ck.CHECKPOINT_VERSION,
                "model_name": "mobilenet_v1", "model": {"width": 0.25},
                "model_state": model.state_dict()}, path)
    plan = _plan(image_size=32, test_images=1, init_from=str(path))
    loaded = loop.initial_model(plan).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("kw, match", [
    (dict(launcher="process", workers=2), r"launcher: 'process' runs one rank; workers = 2"),
    (dict(gpu=True, workers=2, gpus_per_worker=0.5),
     r"gpus_per_worker: 0\.5 with workers = 2: DDP ranks need a whole GPU each"),
    (dict(augment_on="gpu"), r"augment_on: 'gpu' is not one of trainer, ray_data"),
])
def test_validate_one_line_errors(kw, match):
    with pytest.raises(UserError, match=match) as err:
        _config(Path("unused"), **kw).validate()
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- resources
@pytest.mark.parametrize("kw, workers, gpu, total, want", [
    ({}, 2, False, 2.0, (0.5, 1)),  # 2 ranks on 2 CPUs: one CPU stays free for Ray Data
    ({}, 1, False, 2.0, (1.0, 2)),  # one rank has the machine's threads
    ({}, 2, False, 4.0, (1.0, 2)),  # room to spare: one CPU each, the CPUs' threads shared
    ({}, 2, False, 1.0, (0.1, 1)),  # more ranks than CPUs: a tenth each, at least
    ({}, 4, True, 2.0, (1.0, 1)),  # GPU ranks: one CPU each, however few CPUs
    ({"cpus_per_worker": 0.5}, 2, False, 4.0, (0.5, 1)),  # threads within the reservation
    ({"cpus_per_worker": 2.0}, 2, False, 4.0, (2.0, 2)),
    ({"threads": 3}, 2, False, 2.0, (0.5, 3)),  # threads given: used as is
    ({"cpus_per_worker": 0.5, "threads": 4}, 2, False, 2.0, (0.5, 4)),
])
def test_cpu_split(kw, workers, gpu, total, want):
    assert cpu_split(TrainConfig(**kw), workers, gpu, total) == want


def test_cpu_split_too_many_workers_names_the_numbers():
    with pytest.raises(UserError, match="3 workers × 1 CPUs exceed the cluster's 2 CPUs"):
        cpu_split(TrainConfig(cpus_per_worker=1.0), 3, False, 2.0)


def test_device_for_without_cuda(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(ALLOW_NO_CUDA_ENV, raising=False)
    assert device_for(False) == torch.device("cpu")
    with pytest.raises(UserError, match="gpu = true but CUDA sees no GPU") as err:
        device_for(True)
    assert "\n" not in str(err.value)
    monkeypatch.setenv(ALLOW_NO_CUDA_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="cxr_ray.train.run"):
        assert device_for(True) == torch.device("cpu")
    assert ALLOW_NO_CUDA_ENV in caplog.text


# --------------------------------------------------------------------------- LR range test
def test_lr_find_in_process_from_a_checkpoint(run, local_shards, tmp_path):
    run_dir = Path(run["second"].best_checkpoint)
    start = run_dir / paths.CHECKPOINT_FILE
    digest, mtime = _sha(start), start.stat().st_mtime_ns
    listing = sorted(str(p.relative_to(run["dir"])) for p in run["dir"].rglob("*"))
    out = tmp_path / "lr"
    spec = LrFindSpec(out=str(out), settings={"min_lr": 1e-5, "max_lr": 1.0, "num_steps": 20})
    result = lr_find_in_process(_config(local_shards, optimizer="sgd", init_from=str(run_dir)),
                                spec)

    data = json.loads((out / paths.LR_FIND_FILE).read_text())
    assert data == result
    assert data["base_lr"] == pytest.approx(data["max_lr"] / 4)
    assert data["init_from"] == str(start.resolve())
    n = len(data["lrs"])
    assert 3 <= n <= 20
    assert data["lrs"] == pytest.approx([1e-5 * 1e5 ** (i / 19) for i in range(n)], rel=1e-9)
    assert (out / paths.LR_FIND_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert spec.done
    assert _sha(start) == digest and start.stat().st_mtime_ns == mtime  # untouched
    assert sorted(str(p.relative_to(run["dir"])) for p in run["dir"].rglob("*")) == listing


def test_lr_find_repeats_in_val_mode_and_falls_back_to_the_stage1_lr(run, local_shards,
                                                                     tmp_path):
    """repeats = 2 in the val loss mode: two curves with their own batch order, measured on
    held-out batches after each step; a curve that cannot be read hands on the lr the start
    model was trained with x [1/4, 1], and says so; ``error`` refuses instead."""
    run_dir = Path(run["second"].best_checkpoint)
    config = _config(local_shards, optimizer="sgd", init_from=str(run_dir))
    settings = {"min_lr": 1e-5, "max_lr": 1.0, "num_steps": 12, "repeats": 2, "loss": "val",
                "val_batches": 2}
    out = tmp_path / "val"
    data = lr_find_in_process(config, LrFindSpec(out=str(out), settings=settings))
    assert len(data["curves"]) == 2 and [c["repeat"] for c in data["curves"]] == [0, 1]
    assert data["config"]["loss"] == "val" and data["config"]["repeats"] == 2
    lo, hi = data["spread"]["paper"]
    assert lo <= data["measured_max_lr"] <= hi
    # held-out batches: both repeats measure the same images after one step of lr 1e-5 from
    # the same start (only BatchNorm's running statistics moved, by one different batch):
    # closer than the two repeats' first training batches are to each other
    first = [c["losses"][0] for c in data["curves"]]
    train = lr_find_in_process(config, LrFindSpec(out=str(tmp_path / "train"), settings={
        **settings, "loss": "train"}))
    batches = [c["losses"][0] for c in train["curves"]]
    assert abs(first[0] - first[1]) < abs(batches[0] - batches[1])

    # the fallbacks, on a ramp too short to turn (12 steps up to 1e-4: the loss still falls
    # or stays flat)
    flat = {**settings, "loss": "train", "max_lr": 1e-4, "fallback": "stage1"}
    data = lr_find_in_process(config, LrFindSpec(out=str(tmp_path / "fb"), settings=flat,
                                                 trained_lr=0.02))
    assert data["problems"] and not data["trusted"]
    assert data["max_lr"] == 0.02 and data["base_lr"] == pytest.approx(0.005)
    assert data["bounds_source"].startswith("fallback: the stage-1 lr 0.02 × [0.25, 1] (")
    with pytest.raises(UserError, match=r"LR range test of .*: .*; set \[lr_find\] fallback"):
        lr_find_in_process(config, LrFindSpec(out=str(tmp_path / "err"), settings={
            **flat, "fallback": "error"}))
    paper = lr_find_in_process(config, LrFindSpec(out=str(tmp_path / "paper"), settings={
        **flat, "fallback": "paper"}, trained_lr=0.02))  # a tiny model: not the study's
    assert paper["max_lr"] == 0.02 and "; not Table 8: " in paper["bounds_source"]
    kept = lr_find_in_process(config, LrFindSpec(out=str(tmp_path / "kept"), settings={
        **flat, "fallback": "measured"}))
    assert kept["max_lr"] == kept["measured_max_lr"]
    assert kept["bounds_source"].startswith("lr_find (untrusted, kept")


# --------------------------------------------------------------------------- stop at a target
def test_a_run_stops_at_its_target_and_a_rerun_trains_no_more(local_shards, tmp_path):
    config = _config(local_shards, **{**RUN, "epochs": 3, "stop_at": 0.01})  # reached at once
    first = fit_in_process(config, storage_path=tmp_path, name="stop", threads=1)
    assert [r["epoch"] for r in first.history] == [1] and first.stopped_at_target
    again = fit_in_process(config, storage_path=tmp_path, name="stop", threads=1)
    assert again.history == first.history and again.images == 0
    assert len(paths.read_jsonl(tmp_path / "stop" / paths.ATTEMPTS_FILE)) == 1
    with pytest.raises(UserError, match="stop_at"):
        _config(local_shards, stop_at=1.5).validate()

"""``augment_on = "ray_data"`` (:mod:`cxr_ray.ray_backend.data_feed`) against the trainer path
on the session's local Ray: the same rows per rank and epoch as ``ArrayFeed``, the same
augmented image as ``train_transform`` for the same (seed, epoch, image id), new images every
epoch, reproducible batches, and Ray Data's tasks kept inside a Tune-style placement group.

The four (rank, epoch) streams of a 2-rank run are executed once and shared by the module.
"""

from __future__ import annotations

import pytest
import torch

from cxr_ray.data import synth
from cxr_ray.data import shards as shard_io
from cxr_ray.data.augment import AugmentConfig, to_model_input
from cxr_ray.data.prepare import PrepareConfig
from cxr_ray.ray_backend import data_feed, ingest
from cxr_ray.train.config import TrainConfig, plan_run
from cxr_ray.train.feed import ArrayFeed, rank_rows

pytestmark = pytest.mark.slow

WORLD, EPOCHS, BATCH = 2, (0, 1), 8


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def plan(tmp_path_factory, ray_local):
    """A 32 px synthetic shard set (Cardiomegaly: 34 train / 9 test) and its ray_data plan."""
    root = tmp_path_factory.mktemp("data_feed")
    synth.write_dataset(root / "data", per_class=20, size=64, seed=0, workers=2)
    ingest.prepare(PrepareConfig(data=root / "data", out=root / "shards", size=32))
    plan = plan_run(TrainConfig(shards=str(root / "shards"), cohort="Cardiomegaly",
                                model="mobilenet_v1", width=0.25, pretrained=False,
                                batch_size=BATCH, augment_on="ray_data"))
    assert plan.augment and plan.augment_on == "ray_data"
    return plan


@pytest.fixture(scope="module")
def train_split(plan):
    """The train split as the trainer path reads it (uint8 images, ids, labels)."""
    return shard_io.read_split(shard_io.open_shards(plan.shards), plan.cohort, "train")


@pytest.fixture(scope="module")
def streamed(plan):
    """{(rank, epoch): the Ray Data train feed's batches} for a 2-rank run."""
    out = {}
    for rank in range(WORLD):
        train_feed, evals = data_feed.feeds(plan, rank, WORLD)
        assert train_feed.augmented and set(evals) == {"val", "test"}
        assert not any(feed.augmented for feed in evals.values())
        for epoch in EPOCHS:
            out[rank, epoch] = list(train_feed.batches(BATCH, epoch))
    return out


def _cat(batches: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.cat([b[key] for b in batches])


def _by_id(batches: list[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    return dict(zip(_cat(batches, "image_id").tolist(), _cat(batches, "image")))


def _array_batches(split, rank: int, epoch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    feed = ArrayFeed(split, rank=rank, world=WORLD, seed=seed, shuffle=True)
    return list(feed.batches(BATCH, epoch))


# --------------------------------------------------------------------------- tests
def test_each_rank_gets_exactly_its_rows(plan, train_split, streamed):
    """Per rank and epoch: the ids (and labels) ArrayFeed / rank_rows give it, each once."""
    _, ids, _ = train_split
    for epoch in EPOCHS:
        seen = []
        for rank in range(WORLD):
            batches = streamed[rank, epoch]
            got = _cat(batches, "image_id").numpy()
            expected = ids[rank_rows(len(ids), rank=rank, world=WORLD, seed=plan.seed,
                                     epoch=epoch, shuffle=True)]
            array = _array_batches(train_split, rank, epoch, plan.seed)
            assert len(set(got.tolist())) == len(got), "an image came twice"
            assert sorted(got.tolist()) == sorted(expected.tolist())
            assert sorted(got.tolist()) == sorted(_cat(array, "image_id").tolist())
            labels = dict(zip(_cat(array, "image_id").tolist(), _cat(array, "label").tolist()))
            assert {i: labels[i] for i in got.tolist()} == dict(
                zip(got.tolist(), _cat(batches, "label").tolist()))
            # batch layout: model input, at most BATCH rows, only the last one short
            sizes = [len(b["label"]) for b in batches]
            assert all(s == BATCH for s in sizes[:-1]) and 0 < sizes[-1] <= BATCH
            for b in batches:
                assert b["image"].dtype == torch.float32 and b["label"].dtype == torch.float32
                assert b["image"].shape[1:] == (1, plan.image_size, plan.image_size)
                assert b["image_id"].dtype == torch.int64
            seen += got.tolist()
        assert len(seen) == len(set(seen)) == (len(ids) // WORLD) * WORLD  # ranks disjoint


def test_augmented_image_equals_trainer_path(plan, train_split, streamed):
    """THE key property: for the same (seed, epoch, image id), Ray Data's augmented image is
    the trainer's ``train_transform`` of the same uint8 image (augmentation on)."""
    images, ids, _ = train_split
    compared = 0
    for (rank, epoch), batches in streamed.items():
        ours = _by_id(batches)
        for batch in _array_batches(train_split, rank, epoch, plan.seed):
            x, _ = shard_io.train_transform(batch, epoch=epoch, seed=plan.seed,
                                            cfg=AugmentConfig())
            for image_id, expected in zip(batch["image_id"].tolist(), x):
                torch.testing.assert_close(ours[image_id], expected, atol=1e-5, rtol=0)
                compared += 1
    assert compared == len(EPOCHS) * (len(ids) // WORLD) * WORLD
    # and the augmentation is real: not the plain model input of the stored image
    first = _by_id(streamed[0, 0])
    plain = dict(zip(ids.tolist(), to_model_input(images)))
    assert all(not torch.allclose(first[i], plain[i], atol=1e-3) for i in first)


def test_every_epoch_augments_anew(streamed):
    """The same image, epoch 0 vs epoch 1: a different augmentation."""
    epoch = [{}, {}]
    for (rank, e), batches in streamed.items():
        epoch[e].update(_by_id(batches))
    common = sorted(set(epoch[0]) & set(epoch[1]))
    assert len(common) >= 10
    changed = [i for i in common if not torch.allclose(epoch[0][i], epoch[1][i], atol=1e-3)]
    assert len(changed) > len(common) // 2, f"only {len(changed)} of {len(common)} changed"


def test_batches_are_shuffled_and_reproducible(plan, streamed):
    """The shards are ordered by patient: the batches are not (local shuffle seeded by
    (seed, epoch)), and the same epoch streams the same batches again."""
    first = _cat(streamed[0, 0], "image_id").tolist()
    assert first != sorted(first)
    train_feed, _ = data_feed.feeds(plan, 0, WORLD)
    again = [b["image_id"].tolist() for b in train_feed.batches(BATCH, 0)]
    assert again == [b["image_id"].tolist() for b in streamed[0, 0]]


def test_stays_in_the_trials_placement_group(plan, ray_local):
    """A Tune trial's actor (bundle 0 of its group, child tasks captured) with a data bundle:
    Ray Data's tasks run in that bundle, even when the group holds every CPU of the cluster
    (the session's Ray has 2), and are limited to its CPUs."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote
    class Trial:
        def run(self, plan) -> tuple[float | None, int, int]:
            train_feed, _ = data_feed.feeds(plan, 0, 1)
            rows = sum(len(b["label"]) for b in train_feed.batches(BATCH, 0))
            return train_feed.data_cpus, rows, len(train_feed)

    group = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(group.ready(), timeout=60)
    trial = Trial.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0,
        placement_group_capture_child_tasks=True)).remote()
    try:
        data_cpus, rows, expected = ray.get(trial.run.remote(plan), timeout=240)
    finally:
        ray.kill(trial)
        remove_placement_group(group)
    assert data_cpus == 1.0
    assert rows == expected == plan.train_images

"""``augment_on = "ray_data"``: a rank's training rows streamed from the Parquet shards and
augmented by Ray Data tasks, so the trainer's own CPU (or GPU) only trains.

:func:`feeds` is the :data:`cxr_ray.train.run.MakeFeeds` of this data path (the Tune trial and
the Ray Train workers call it in the rank's process):

* train (:class:`RayDataFeed`, ``augmented``): every epoch a new Ray Dataset of exactly the
  rows :func:`~cxr_ray.train.feed.rank_rows` gives the rank for that epoch — the rows
  :class:`~cxr_ray.train.feed.ArrayFeed` over :func:`~cxr_ray.data.shards.read_split` would
  give it — read from the image shards with the id filter pushed into the Parquet scan,
  decoded to uint8 with the cohort labels joined (:func:`_stream_batch`), and augmented in
  ``map_batches`` by :class:`~cxr_ray.data.augment.AugmentBatch` for that epoch (float32
  model input): the same image as :func:`~cxr_ray.data.shards.train_transform` on the trainer
  for the same (seed, epoch, image id). The shards are ordered by patient, so the file order
  is shuffled and the batches come out of a local shuffle buffer, both seeded by (seed, epoch),
  with Ray Data's ``preserve_order`` on: an epoch's batches are reproducible;
* test (:class:`~cxr_ray.train.feed.ArrayFeed`): the small, never augmented test split read
  once in the rank's process.

Where its Ray Data tasks run: in a Tune trial, in the trial's placement group (its extra
``data_cpus`` bundle, :func:`cxr_ray.ray_backend.tune.trial_resources`), each dataset limited
by ``execution_options.resource_limits`` to the group's CPUs that the trial's own process
does not hold (``data_cpus`` is not in :class:`~cxr_ray.train.config.RunPlan`; the group
carries it); under Ray Train, spread over the cluster's CPUs with Ray Data's default limits.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from ray.data import DataContext, FileShuffleConfig
from ray.data.expressions import col
from ray.util.annotations import RayDeprecationWarning
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cxr_ray.data import decode
from cxr_ray.data import shards as shard_io
from cxr_ray.data.augment import AugmentBatch, AugmentConfig
from cxr_ray.errors import UserError
from cxr_ray.train.config import RunPlan
from cxr_ray.train.feed import ArrayFeed, Feed, rank_rows

#: Rows of the local shuffle buffer, in batches: the shards are ordered by patient, so the
#: buffer (behind the per-epoch file shuffle) is what mixes patients and labels in a batch.
#: Its rows are float32 model input (200 KB an image at 224², 100 MB for 16 batches of 32).
SHUFFLE_BATCHES = 16


def feeds(plan: RunPlan, rank: int, world: int) -> tuple[Feed, dict[str, Feed]]:
    """The train feed and the ``{"val", "test"}`` feeds of ``rank`` of ``world`` (a
    ``MakeFeeds``): the evaluation splits are small and never augmented, so they are
    read into the rank's memory."""
    sh = shard_io.open_shards(plan.shards, expect_size=plan.image_size)
    evals = {split: ArrayFeed(shard_io.read_split(sh, plan.cohort, split), rank=rank,
                              world=world, seed=plan.seed, shuffle=False)
             for split in ("val", "test")}
    return RayDataFeed(plan, rank=rank, world=world, shards=sh), evals


def split_index(sh: shard_io.Shards, cohort: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(image ids, labels)`` of a cohort split in the row order of
    :func:`~cxr_ray.data.shards.read_split` (the shards' scan order, which
    :func:`~cxr_ray.train.feed.rank_rows` indexes), read from the id column only."""
    data, labels = shard_io.scan_split(sh, cohort, split, ["image_id"])
    return data.column("image_id").to_numpy().astype(np.int64), labels


def _stream_batch(batch: pa.Table, *, ids: np.ndarray, labels: np.ndarray,
                  size: int) -> dict[str, np.ndarray]:
    """``map_batches``: pixels → uint8 (n, size, size) ``image``; the label joined by id
    (``ids`` sorted, ``labels`` in their order)."""
    image_ids = batch.column("image_id").to_numpy()
    if len(image_ids) == 0:
        return {"image": np.zeros((0, size, size), np.uint8),
                "image_id": np.zeros(0, np.int64), "label": np.zeros(0, np.float32)}
    where = np.minimum(np.searchsorted(ids, image_ids), len(ids) - 1)
    if not np.array_equal(ids[where], image_ids):
        raise RuntimeError("the rank's stream received an image that is not among its rows")
    return {"image": decode.pixels_to_numpy(batch.column("pixels"), size).copy(),
            "image_id": image_ids.astype(np.int64), "label": labels[where]}


def trial_group() -> tuple[PlacementGroup, float] | None:
    """``(placement group, CPUs of it this process does not hold)`` when this process's
    placement group captures the tasks it starts (a Tune trial: the CPUs are its
    ``data_cpus`` bundle); None otherwise (Ray Train workers, a driver)."""
    context = ray.get_runtime_context()
    group = get_current_placement_group()
    if group is None or not context.should_capture_child_tasks_in_placement_group:
        return None
    total = sum(float(bundle.get("CPU", 0.0)) for bundle in group.bundle_specs)
    return group, total - float(context.get_assigned_resources().get("CPU", 0.0))


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 32-bit seed for one of the epoch's random streams (0: files, 1: shuffle buffer)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _read_parquet(path: str, *, seed: int, group: PlacementGroup | None,
                  filesystem: Any = None) -> "ray.data.Dataset":
    """``ray.data.read_parquet(path)`` with the files in a seeded order, through Ray Data's
    V1 Parquet reader, and with ``group`` every task of the dataset scheduled in that
    placement group.

    ``read_parquet`` takes both settings from the current ``DataContext`` (and copies it for
    the dataset), so they are set on it for this one call and restored after it:

    * ``use_datasource_v2 = False``: the V2 reader starts 32 footer-reader actors (32 Python
      worker processes) every time a dataset is executed, i.e. every epoch here: 3-6 s an
      epoch against 0.3 s for V1 on 2 CPUs (both push the column selection and the id
      filter into the scan);
    * ``scheduling_strategy``: Ray Data schedules its tasks "SPREAD", which Ray does not
      capture into the caller's placement group, so in a Tune trial whose group holds the
      last free CPUs they would wait forever. The field is deprecated in Ray 2.60 (removal
      announced for 2027) and has no replacement for placement groups yet.
    """
    current = DataContext.get_current()
    saved = (current.use_datasource_v2, current.scheduling_strategy,
             current.scheduling_strategy_large_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        try:
            current.use_datasource_v2 = False
            if group is not None:
                strategy = PlacementGroupSchedulingStrategy(
                    group, placement_group_capture_child_tasks=True)
                current.scheduling_strategy = strategy
                current.scheduling_strategy_large_args = strategy
            return ray.data.read_parquet(
                path, filesystem=filesystem, shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=False))
        finally:
            if group is not None:
                current.scheduling_strategy, current.scheduling_strategy_large_args = saved[1:]
            current.use_datasource_v2 = saved[0]


class RayDataFeed:
    """The training rows of one rank, streamed and augmented by Ray Data (module docstring)."""

    augmented = True

    def __init__(self, plan: RunPlan, *, rank: int, world: int,
                 shards: shard_io.Shards | None = None) -> None:
        self.plan, self.rank, self.world = plan, rank, world
        self.shards = shards or shard_io.open_shards(plan.shards, expect_size=plan.image_size)
        self.ids, self.labels = split_index(self.shards, plan.cohort, "train")
        order = np.argsort(self.ids)
        self._sorted_ids, self._sorted_labels = self.ids[order], self.labels[order]
        self.cfg = AugmentConfig() if plan.augment else AugmentConfig.none()
        trial = trial_group()
        self.group, self.data_cpus = trial if trial else (None, None)
        if self.data_cpus is not None and self.data_cpus < 1:
            raise UserError(f"augment_on = 'ray_data' in a trial with {self.data_cpus:g} CPUs "
                            "for Ray Data (data_cpus): its tasks take one CPU each and would "
                            "never start; set data_cpus >= 1")

    def __len__(self) -> int:
        return len(self.ids) // self.world

    def rows(self, epoch: int) -> np.ndarray:
        """Image ids of this rank in ``epoch`` (ArrayFeed's rows, in its order)."""
        idx = rank_rows(len(self.ids), rank=self.rank, world=self.world, seed=self.plan.seed,
                        epoch=epoch, shuffle=True)
        return self.ids[idx]

    def dataset(self, epoch: int) -> "ray.data.Dataset":
        """The epoch's Ray Dataset: ``image`` float32 (1, H, W), ``image_id``, ``label``."""
        wanted = np.sort(self.rows(epoch))
        labels = self._sorted_labels[np.searchsorted(self._sorted_ids, wanted)]
        images = self.shards.images_dir
        ds = (_read_parquet(images.path, filesystem=images.fs, group=self.group,
                            seed=_epoch_seed(self.plan.seed, epoch, 0))
              .select_columns(["image_id", "pixels"])
              .filter(expr=col("image_id").is_in(wanted.tolist())))  # pushed into the scan
        ds = ds.map_batches(_stream_batch, batch_format="pyarrow",
                            fn_kwargs={"ids": wanted, "labels": labels,
                                       "size": self.shards.size})
        ds = ds.map_batches(AugmentBatch(self.cfg, seed=self.plan.seed, epoch=epoch,
                                         output_dtype="float32"), batch_format="numpy")
        context = ds.context  # this dataset's own copy of the DataContext
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.execution_options.preserve_order = True  # reproducible batches
        if self.data_cpus is not None:
            limits = context.execution_options.resource_limits
            context.execution_options.resource_limits = limits.copy(cpu=self.data_cpus)
        return ds

    def batches(self, batch_size: int, epoch: int, *,
                pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """The rank's rows of ``epoch``, augmented, in batches of ``batch_size`` (the last
        one shorter): ``image`` float32 (n, 1, H, W), ``image_id`` int64, ``label`` float32."""
        n = len(self)
        for batch in self.dataset(epoch).iter_torch_batches(
                batch_size=batch_size, device="cpu",
                local_shuffle_buffer_size=max(1, min(n, SHUFFLE_BATCHES * batch_size)),
                local_shuffle_seed=_epoch_seed(self.plan.seed, epoch, 1)):
            if pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch

"""What a rank trains and evaluates on: its share of a cohort split, batch by batch.

:func:`rank_rows` is the one sharding rule of both launchers and both data paths:

* train (``shuffle``): every epoch a permutation of the whole split seeded by (seed, epoch),
  cut into ``world`` equal parts (``DistributedSampler`` semantics: the same number of rows
  on every rank, so every rank takes the same number of DDP steps; up to world-1 rows left
  out, a different few each epoch);
* test: rows ``rank::world``, so the ranks together cover the split exactly once (their
  scores are gathered and de-duplicated by image id).

:class:`ArrayFeed` serves a split held in memory (read once per run from the Parquet shards:
by the driver into Ray's object store for Ray Train workers, or by the trial process itself).
A feed yields dicts of CPU tensors: ``image`` (uint8 ``(n, H, W)``, or, when the feed says
``augmented``, model-ready float ``(n, 1, H, W)``), ``image_id`` and ``label``.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Protocol

import numpy as np
import torch


class Feed(Protocol):
    """A rank's share of one split (see the module docstring)."""

    augmented: bool
    """True when ``image`` is already augmented model input (``augment_on = "ray_data"``)."""

    def batches(self, batch_size: int, epoch: int, *,
                pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]: ...


def rank_rows(n: int, *, rank: int, world: int, seed: int, epoch: int,
              shuffle: bool) -> np.ndarray:
    """Row indices of ``rank`` in ``epoch`` (the rule in the module docstring)."""
    if not shuffle:
        return np.arange(rank, n, world)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per = n // world
    return order[rank * per:(rank + 1) * per]


class ArrayFeed:
    """A rank's share of a split held as arrays ``(images uint8 (n,H,W), ids, labels)``."""

    augmented = False

    def __init__(self, arrays: tuple[np.ndarray, np.ndarray, np.ndarray], *, rank: int = 0,
                 world: int = 1, seed: int = 0, shuffle: bool) -> None:
        self.images, self.ids, self.labels = arrays
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, batch_size: int, epoch: int = 0, *,
                pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        idx = rank_rows(len(self.ids), rank=self.rank, world=self.world, seed=self.seed,
                        epoch=epoch, shuffle=self.shuffle)
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size]
            if not self.shuffle:
                rows = np.sort(rows)
            batch = {"image": torch.from_numpy(self.images[rows]),
                     "image_id": torch.from_numpy(self.ids[rows]),
                     "label": torch.from_numpy(self.labels[rows])}
            if pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch


class Timed:
    """An iterator wrapper that adds up the seconds spent waiting for the next item."""

    def __init__(self, iterable: Any) -> None:
        self._it, self.wait = iter(iterable), 0.0

    def __iter__(self) -> "Timed":
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.wait += time.perf_counter() - t0

"""``cxr-ray prepare`` on Ray: the decode of every listed image as Ray Data tasks.

Launch::

    cxr-ray prepare --data DATA --out SHARDS --size 224
    ray job submit --working-dir . -- cxr-ray prepare --data /mnt/shared/nih --out /mnt/shared/shards

Planning, checking and publishing are plain Python (:mod:`cxr_ray.data.prepare`); this module
only runs the decode: the job list cut into blocks, ``map_batches`` with
:func:`cxr_ray.data.decode.decode_batch` (which never raises for a bad file: it returns a
status and a reason per row), and Parquet written partitioned on that status.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import ray
import ray.data

from cxr_ray import storage
from cxr_ray.data import decode
from cxr_ray.data import prepare as prep
from cxr_ray.ray_backend.session import ray_session

log = logging.getLogger(__name__)


def prepare(config: prep.PrepareConfig) -> prep.PrepareResult:
    """Decode every image the metadata lists into ``config.out`` (starts or joins Ray only
    when there is work to do; an initialised Ray, e.g. a test's, is used as is)."""
    def decode_and_write(plan: prep.PreparePlan, parts: Path) -> dict[str, float]:
        with ray_session(config.address):
            return _decode_and_write(plan, parts)

    return prep.prepare(config, decode_and_write)


def _decode_and_write(plan: prep.PreparePlan, parts: Path) -> dict[str, float]:
    """Ray Data: decode every row once and write Parquet partitioned on status.

    Returns the CPUs used and the seconds the Ray Data execution took."""
    size = plan.config.size
    rows = len(plan.jobs)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    shard_rows = plan.config.shard_rows or max(1, prep.TARGET_SHARD_BYTES // (size * size))
    # At least four blocks per CPU: tasks of a few seconds balance the load to the end even
    # when some cores are slower or busy (measured: 4 → 8 → 16 blocks for 1,152 images on
    # 2 busy cores gave 40 → 50 → 54 images/s); the data decides above that.
    n_blocks = min(rows, max(math.ceil(rows / shard_rows), 4 * cpus))
    bounds = np.linspace(0, rows, n_blocks + 1).round().astype(int)
    chunks = [plan.jobs.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    # Ray Data bundles input blocks until a bundle holds `batch_size` rows: keep it at most
    # the smallest block, so that every block is its own task (and its own shard).
    smallest = min(len(c) for c in chunks)
    batch_size = max(1, min(smallest, prep.TARGET_BATCH_BYTES // (size * size)))
    log.info("decoding %d images into %d shards at %d² on %d CPUs", rows, len(chunks), size, cpus)
    started = time.perf_counter()
    ds = ray.data.from_pandas(chunks)
    ds = ds.map_batches(decode.decode_batch, batch_format="pyarrow", batch_size=batch_size,
                        fn_kwargs={"size": size, "throttle_s": plan.config.throttle_s})
    where = {"path": parts.path, "filesystem": parts.fs} \
        if isinstance(parts, storage.Location) else {"path": str(parts)}
    ds.write_parquet(
        **where, partition_cols=["status"], compression=prep.COMPRESSION,
        row_group_size=batch_size, use_dictionary=["source_mode"],
        write_statistics=["image_id", "patient_id"],
    )
    return {"cpus": cpus, "decode_seconds": time.perf_counter() - started}

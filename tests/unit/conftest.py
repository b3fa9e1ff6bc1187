"""Unit-test fixtures: a real shard set made without Ray.

Unit tests never need Ray: ``make test`` runs them first with ``CXR_RAY_BLOCK_RAY=1``, under
which ``import ray`` fails (as on a machine without Ray), so a stray import cannot hide.

``cxr_ray.data.prepare.prepare`` plans, checks and publishes a shard set in plain Python and
takes the decode as a function; Ray Data's (``cxr_ray.ray_backend.ingest``) is replaced here by
:func:`_decode_in_process`, which decodes the job list in this process with the same
``decode_batch`` and writes the same hive layout (``status=ok/``, ``status=quarantined/``)
that ``Dataset.write_parquet(partition_cols=["status"])`` writes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

if os.environ.get("CXR_RAY_BLOCK_RAY") == "1":
    sys.modules["ray"] = None  # type: ignore[assignment]  # `import ray` raises ImportError

from cxr_ray.data import decode, synth  # noqa: E402
from cxr_ray.data.prepare import COMPRESSION, PrepareConfig, PreparePlan, prepare  # noqa: E402


def _decode_in_process(plan: PreparePlan, parts: Path) -> dict[str, float]:
    """``prepare``'s ``decode_and_write`` without Ray: every job decoded here, written as
    Parquet partitioned on ``status`` into ``parts``."""
    started = time.perf_counter()
    jobs = pa.Table.from_pandas(plan.jobs, preserve_index=False)
    table = decode.decode_batch(jobs, size=plan.config.size)
    pq.write_to_dataset(table, str(parts), partition_cols=["status"], compression=COMPRESSION)
    return {"cpus": 1, "decode_seconds": time.perf_counter() - started}


@pytest.fixture(scope="session")
def local_shards(tmp_path_factory) -> Path:
    """A complete shard set at 32 px from 40 synthetic images per class (seed 0), no Ray."""
    root = tmp_path_factory.mktemp("local_shards")
    synth.write_dataset(root / "data", per_class=40, size=64, seed=0, workers=2)
    result = prepare(PrepareConfig(data=root / "data", out=root / "shards", size=32),
                     decode_and_write=_decode_in_process)
    assert result.manifest["written"] == result.manifest["rows"] > 0
    return root / "shards"

"""Unit-test fixtures: a real shard set made without Ray.

Unit tests never need Ray: ``make test`` runs them first with ``CXR_RAY_BLOCK_RAY=1``, under
which ``import ray`` fails (as on a machine without Ray), so a stray import cannot hide.

``cxr_ray.data.prepare.prepare`` plans, checks and publishes a shard set in plain Python and
takes the decode as a function; Ray Data's (``cxr_ray.ray_backend.ingest``) is replaced here by
:func:`cxr_ray.data.prepare.decode_in_process`, which decodes the job list in this process
with the same ``decode_batch`` and writes the same hive layout (``status=ok/``, ``status=quarantined/``)
that ``Dataset.write_parquet(partition_cols=["status"])`` writes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("CXR_RAY_BLOCK_RAY") == "1":
    sys.modules["ray"] = None  # type: ignore[assignment]  # `import ray` raises ImportError

from cxr_ray.data import synth  # noqa: E402
from cxr_ray.data.prepare import PrepareConfig, decode_in_process, prepare  # noqa: E402


@pytest.fixture(scope="session")
def local_shards(tmp_path_factory) -> Path:
    """A complete shard set at 32 px from 40 synthetic images per class (seed 0), no Ray."""
    root = tmp_path_factory.mktemp("local_shards")
    synth.write_dataset(root / "data", per_class=40, size=64, seed=0, workers=2)
    result = prepare(PrepareConfig(data=root / "data", out=root / "shards", size=32),
                     decode_and_write=decode_in_process)
    assert result.manifest["written"] == result.manifest["rows"] > 0
    return root / "shards"

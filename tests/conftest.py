"""Shared fixtures: the real NIH metadata (loaded once) and one tiny synthetic data set."""

from __future__ import annotations

import pytest

from cxr_ray.data import nih, synth


@pytest.fixture(scope="session")
def real_meta():
    """The real Data_Entry_2017_v2020 table shipped in torchxrayvision (112,120 rows)."""
    return nih.load_metadata()


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A small NIH-layout synthetic data set: 3 images per class at 64², seed 0."""
    out = tmp_path_factory.mktemp("synth")
    synth.write_dataset(out, per_class=3, size=64, seed=0, workers=2)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, no dashboard); yields its GCS address.

    Idempotent: a Ray already initialised in this process is reused (and left running);
    one started here is shut down at the end of the session.  Subprocesses can join it
    with ``--address`` / ``RAY_ADDRESS`` set to the yielded address.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()

"""Shared fixtures: the real NIH metadata (loaded once), tiny synthetic data sets, a shard set
and a small trained experiment (both made without Ray, in this process), a local Ray.

Imports of cxr_ray modules beyond the data vocabulary happen inside the fixtures, after
tests/unit/conftest.py has made ``import ray`` fail for the unit tests."""

from __future__ import annotations

from pathlib import Path

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
def s3_server(tmp_path_factory):
    """An S3-compatible server (moto's server mode) on 127.0.0.1 for the session, with one
    bucket ``cxr``; yields the environment a client needs (endpoint, dummy credentials).
    Stopped at the end of the session, also when a test fails."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    exe = Path(sys.executable).with_name("moto_server")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing",
                          secret_key="testing", region="us-east-1",
                          allow_bucket_creation=True).create_dir("cxr")
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """:func:`s3_server`'s environment set in this process for one test."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


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


@pytest.fixture(scope="session")
def local_shards(tmp_path_factory) -> Path:
    """A complete shard set at 32 px from 40 synthetic images per class (seed 0), no Ray:
    ``prepare`` with :func:`cxr_ray.data.prepare.decode_in_process` for Ray Data's decode
    (the same ``decode_batch``, the same hive layout)."""
    from cxr_ray.data.prepare import PrepareConfig, decode_in_process, prepare

    root = tmp_path_factory.mktemp("local_shards")
    synth.write_dataset(root / "data", per_class=40, size=64, seed=0, workers=2)
    result = prepare(PrepareConfig(data=root / "data", out=root / "shards", size=32),
                     decode_and_write=decode_in_process)
    assert result.manifest["written"] == result.manifest["rows"] > 0
    return root / "shards"


#: The cohorts of :func:`small_experiment`.
EXPERIMENT_COHORTS = ("Effusion", "OneClass")


@pytest.fixture(scope="session")
def small_experiment(local_shards, tmp_path_factory) -> Path:
    """A real sweep experiment, trained in this process: a tiny recipe's stage 1 and stage 2
    (Effusion and OneClass; constant and triangular) through the sweep's own trial function
    with the in-process launcher. About 15 s."""
    from cxr_ray.sweep import plan as sweep_plan
    from cxr_ray.sweep.recipe import parse_recipe
    from cxr_ray.sweep.trial import run_trial
    from cxr_ray.train.run import fit_in_process

    exp = tmp_path_factory.mktemp("experiments") / "small"
    recipe = parse_recipe({
        "experiment": {"name": "small", "storage_path": str(exp.parent),
                       "shards": str(local_shards), "cohorts": list(EXPERIMENT_COHORTS)},
        "train": {"model": "mobilenet_v1", "width": 0.25, "pretrained": False,
                  "batch_size": 16, "threads": 1, "augment": False, "keep_checkpoints": 1,
                  "checkpoint_metric": "val_accuracy", "launcher": "process"},
        "stage1": {"epochs": 2}, "lr_find": {"enabled": False},
        "stage2": {"epochs": 1, "bounds": "recipe", "base_lr": 0.001, "max_lr": 0.004,
                   "step_size_epochs": 0.5},
        "grid": {"policy": ["constant", "triangular"]}})
    sweep_plan.check_recipe(exp, recipe)
    stage1, stage2, _ = sweep_plan.plan_trials(recipe)

    def fit(config, *, storage_path, name, lr_find, **hooks):
        return fit_in_process(config, storage_path=storage_path, name=name, lr_find=lr_find,
                              **hooks)

    for spec in stage1 + stage2:
        run_trial(spec, exp, fit, launcher="process")
    return exp

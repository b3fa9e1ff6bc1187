"""Trials sharing GPUs, without a GPU: a Ray started with two declared GPUs schedules eight
single-rank trials at once at a quarter GPU each; a trial given a GPU that CUDA cannot see
stops with one line, unless the test-only switch lets it train on the CPU.

The sweeps run in a subprocess with a Ray of their own (declared GPUs; the switch, where
wanted, in the job's runtime environment so that every trial actor sees it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cxr_ray import paths
from cxr_ray.data import synth
from cxr_ray.data.prepare import PrepareConfig
from cxr_ray.ray_backend import ingest
from cxr_ray.train.run import ALLOW_NO_CUDA_ENV

pytestmark = pytest.mark.slow

RECIPE = """
[experiment]
name = "{name}"
storage_path = "{storage}"
shards = "{shards}"
cohorts = ["Cardiomegaly"]

[train]
model = "mobilenet_v1"
width = 0.25
pretrained = false
image_size = 32
batch_size = 16
workers = 1
gpu = true
gpus_per_worker = 0.25
cpus_per_worker = 0.25
threads = 1
keep_checkpoints = 1
augment = false

[stage1]
epochs = 1

[lr_find]
enabled = false

[stage2]
epochs = 2
bounds = "recipe"
base_lr = 0.001
throttle_s = {throttle}

[grid]
policy = ["constant"]
seed = {seeds}
"""

SCRIPT = textwrap.dedent("""
    import json, logging, sys, ray
    from cxr_ray.ray_backend import tune
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from cxr_ray.sweep.recipe import load_recipe
    env = json.loads(sys.argv[2])
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": env})
    try:
        tune.run_sweep(load_recipe(sys.argv[1]))
        print("SWEEP OK")
    except RuntimeError as exc:
        print("SWEEP FAILED:", exc)
""")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("gpu")
    synth.write_dataset(root / "data", per_class=20, size=64, seed=0, workers=2)
    ingest.prepare(PrepareConfig(data=root / "data", out=root / "shards", size=32))
    return root


def _sweep(root: Path, name: str, env: dict, seeds: list[int], throttle: float) -> str:
    recipe = root / f"{name}.toml"
    recipe.write_text(RECIPE.format(name=name, storage=root / "exp", shards=root / "shards",
                                    throttle=throttle, seeds=seeds))
    clean = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(recipe), json.dumps(env)],
                          env=clean, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_gpu_cuda_cannot_see_stops_the_trial_with_one_line(shards):
    out = _sweep(shards, "nocuda", {}, [0], 0.0)
    assert "SWEEP FAILED" in out, out[-3000:]
    assert "gpu = true but CUDA sees no GPU" in out, out[-3000:]


def test_eight_quarter_gpu_trials_run_at_once_on_two_declared_gpus(shards):
    # 5 s per step: each trial trains for 20 s or more, longer than eight trial processes
    # take to start on a busy 2-core machine, so all eight overlap if they were scheduled so
    out = _sweep(shards, "shared", {ALLOW_NO_CUDA_ENV: "1"}, list(range(8)), 5.0)
    assert "SWEEP OK" in out, out[-3000:]
    assert "stage2: 8 trials, 8 at a time" in out, out[-3000:]
    runs = sorted((shards / "exp" / "shared" / "stage2").glob("Cardiomegaly__constant__seed-*"))
    assert len(runs) == 8
    spans, gpus = [], []
    for run in runs:
        attempt = paths.read_jsonl(run / paths.ATTEMPTS_FILE)[0]
        history = paths.read_jsonl(run / paths.HISTORY_FILE)
        spans.append((attempt["time"], history[-1]["time"]))
        gpus.append(attempt["cuda_visible_devices"])
    # Ray gave every trial one of the two declared GPUs, four trials each
    assert sorted(gpus) == ["0"] * 4 + ["1"] * 4, gpus
    # all eight were training at the same moment
    latest_start = max(start for start, _ in spans)
    assert all(end > latest_start for _, end in spans), spans

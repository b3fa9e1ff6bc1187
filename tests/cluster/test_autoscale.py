"""Autoscaling on one machine: a sweep on cluster-local.yaml's fake GPU nodes.

The module starts its own Ray head on Ray's ``fake_multinode`` provider (127.0.0.1, its own
``--temp-dir``, free ports, its own auth token, zero worker nodes) next to whatever Ray the
test session runs, and a sweep (a ``cxr-ray sweep`` process that alone sees the address)
whose training workers ask for ``gpu_node``. A watcher process records the cluster's nodes
and the nodes of the training workers every second. The tests check: the sweep's "auto"
concurrency came from the recipe's ``[resources] autoscale``, which mirrors cluster-local.yaml
(not from the zero workers it started with); fake GPU nodes were added; every training worker
ran on one; the sweep finished with its report; the nodes went away after the idle timeout;
``cxr-ray status`` read the experiment while it ran and after. Teardown kills every process of
that head (its session, its temp dir), also when a test fails. ``CXR_KEEP_AUTOSCALE_LOGS=DIR``
keeps a copy of the head's Ray logs in DIR.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cxr_ray import cli, paths
from cxr_ray.data import synth

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster-local.yaml"
GPU_RESOURCE = "gpu_node"
RAY = str(Path(sys.executable).with_name("ray"))

# One cohort, stage 1 then 2 stage-2 policies, 1 epoch each, 32 px. No LR range test
# (tests/test_sweep.py covers the protocol): CLR bounds from the recipe.
RECIPE = """
[experiment]
name = "autoscale"
storage_path = "{storage}"
shards = "{shards}"
cohorts = ["Effusion"]

[train]
model = "mobilenet_v1"
width = 0.25
pretrained = false
image_size = 32
batch_size = 16
workers = 1
launcher = "ray_train"   # Ray Train workers are what must land on the fake GPU nodes
cpus_per_worker = 0.5
threads = 1
checkpoint_metric = "val_accuracy"
keep_checkpoints = 1
worker_resources = {{gpu_node = 0.01}}

[stage1]
epochs = 1

[lr_find]
enabled = false

[stage2]
epochs = 1
step_size_epochs = 1
bounds = "recipe"
base_lr = 0.001
max_lr = 0.01

[grid]
policy = ["constant", "triangular"]

[resources]
max_concurrent_trials = "auto"
# cluster-local.yaml's worker node types, stated (test_the_recipe_mirrors_cluster_local_yaml)
autoscale = {{max_workers = 2, gpu = {{max_workers = 2, resources = {{CPU = 1, gpu_node = 1}}}}}}
"""

# Runs as its own Ray driver (the test process may hold another Ray): every second, one JSON
# line with the nodes (alive or not, their resources) and every training worker's node.
WATCHER = r"""
import json, sys, time
import ray
import ray._private.state as state

deadline = time.time() + 120
while True:
    try:
        ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(1)
with open(sys.argv[2], "a") as out:
    while True:
        nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]}
                 for n in ray.nodes()]
        workers = [{"node": a["Address"]["NodeID"], "state": a["State"]}
                   for a in state.actors().values() if a["ActorClassName"] == "RayTrainWorker"]
        out.write(json.dumps({"t": time.time(), "nodes": nodes, "workers": workers}) + "\n")
        out.flush()
        time.sleep(1)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _our_pids(sid: int, marker: str) -> list[int]:
    """Processes in session ``sid`` or whose command line names ``marker`` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            in_session = os.getsid(pid) == sid
        except OSError:
            continue
        if cmdline and (in_session or marker in cmdline):  # empty cmdline: a zombie
            pids.append(pid)
    return pids


def _kill_all(sid: int, marker: str, timeout: float = 20.0) -> list[int]:
    """SIGKILL the head's session and anything naming its temp dir (the fake nodes' raylets
    and workers); returns what survived ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _our_pids(sid, marker)
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.5)


class Watch:
    """The watcher's records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written
                pass
        return out

    @staticmethod
    def gpu_nodes(record: dict) -> set[str]:
        return {n["id"] for n in record["nodes"] if n["alive"] and GPU_RESOURCE in n["resources"]}


def _wait_for(predicate, timeout: float, what: str, *procs: subprocess.Popen) -> None:
    """Poll ``predicate``; fail after ``timeout`` s or when one of ``procs`` exits (with the
    tail of its log)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                log = Path(getattr(proc, "log_path", "/nonexistent"))
                tail = log.read_text()[-3000:] if log.is_file() else ""
                pytest.fail(f"{proc.args[:4]} exited ({proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def fake_cluster():
    """The fake-multinode head (zero workers) and its watcher; everything killed after."""
    from cxr_ray.ray_backend.session import LOCAL_ENV as FAST_CONTROL_ENV

    # A short path: Ray's Unix sockets live below the temp dir (107-byte limit).
    tmp = Path(tempfile.mkdtemp(prefix="cxras-", dir="/tmp"))
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = _free_port()
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    # Our own token for the head, its fake nodes and our clients (not ~/.ray/auth_token).
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "PYTHONUNBUFFERED": "1", **FAST_CONTROL_ENV})
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    head_log, watcher_log = open(tmp / "head.log", "w"), open(tmp / "watcher.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--temp-dir={tmp}", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}",
         f"--metrics-export-port={_free_port()}",
         f"--autoscaling-config={tmp / 'cluster.yaml'}", "--disable-usage-stats"],
        env=head_env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    watch = Watch(tmp / "watch.jsonl")
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, address, str(watch.path)],
                               env=env, stdout=watcher_log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    head.log_path, watcher.log_path = tmp / "head.log", tmp / "watcher.log"
    cluster = {"tmp": tmp, "address": address, "env": env, "watch": watch, "head": head,
               "started": time.time()}
    cluster["procs"] = [watcher]
    try:
        yield cluster
    finally:
        for proc in cluster["procs"]:  # the watcher, the sweep: each its own process group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        left = _kill_all(head.pid, str(tmp))
        head.wait()
        head_log.close()
        watcher_log.close()
        if left:
            print(f"test_autoscale: processes {left} outlived the teardown", file=sys.stderr)
        logs = tmp / "session_latest" / "logs"
        keep = os.environ.get("CXR_KEEP_AUTOSCALE_LOGS")
        if keep and logs.is_dir():
            shutil.copytree(logs, Path(keep) / "logs", dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(fake_cluster, ray_local, tmp_path_factory) -> Path:
    """The tiny shard set, prepared on the session's local Ray while the head starts (not on
    the fake cluster: Ray Data's own autoscaling would start fake GPU nodes for decoding)."""
    from cxr_ray.data.prepare import PrepareConfig
    from cxr_ray.ray_backend import ingest

    root = tmp_path_factory.mktemp("autoscale-data")
    synth.write_dataset(root / "data", per_class=20, size=64, seed=0, workers=2)
    ingest.prepare(PrepareConfig(data=root / "data", out=root / "shards", size=32))
    return root / "shards"


@pytest.fixture(scope="module")
def run(fake_cluster, shards, tmp_path_factory) -> dict:
    """The sweep on the fake cluster; what was seen along the way."""
    c, watch = fake_cluster, fake_cluster["watch"]
    _wait_for(lambda: watch.records(), 120, "the watcher's first record", *c["procs"],
              c["head"])
    first = watch.records()[0]
    root = tmp_path_factory.mktemp("autoscale")
    recipe = root / "autoscale.toml"
    recipe.write_text(RECIPE.format(storage=root / "experiments", shards=shards))
    exp = root / "experiments" / "autoscale"
    t0 = time.time()
    with open(root / "sweep.log", "w") as log:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "cxr_ray.cli", "sweep", "--config", str(recipe),
             "--address", c["address"]],
            env=c["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sweep.log_path = root / "sweep.log"
    c["procs"].append(sweep)
    # While it runs: once stage 1 is done, `cxr-ray status` reads the experiment directory.
    _wait_for(lambda: (exp / "stage1" / "Effusion" / paths.TRIAL_FILE).is_file(), 600,
              "stage 1 to finish", sweep)
    status_running = _status_json(exp)
    try:
        sweep.wait(timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("the sweep did not finish in 600 s: "
                    f"{(root / 'sweep.log').read_text()[-3000:]}")
    sweep_end = time.time()
    output = (root / "sweep.log").read_text()
    assert sweep.returncode == 0, output[-4000:]
    # The fake GPU nodes go once idle (idle_timeout_minutes of cluster-local.yaml).
    _wait_for(lambda: not Watch.gpu_nodes(watch.records()[-1]), 180,
              "the idle fake GPU nodes to be removed")
    removed = time.time()
    records = watch.records()
    added = next((r["t"] for r in records if Watch.gpu_nodes(r)), None)
    return {"exp": exp, "output": output, "records": records, "first": first,
            "status_running": status_running, "status_after": _status_json(exp),
            "seconds": {"head_start_to_sweep": t0 - c["started"], "sweep": sweep_end - t0,
                        "sweep_start_to_first_gpu_node": added and added - t0,
                        "sweep_end_to_no_gpu_node": removed - sweep_end}}


def _status_json(exp: Path) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["status", "--experiment", str(exp), "--json"]) == 0
    return json.loads(buf.getvalue())


def test_the_recipe_mirrors_cluster_local_yaml():
    """The node types the recipe states are cluster-local.yaml's worker types (Ray has no
    documented API that returns the autoscaler config)."""
    import tomllib

    stated = tomllib.loads(RECIPE.format(storage="s", shards="s"))["resources"]["autoscale"]
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    workers = {name: {"max_workers": t["max_workers"], "resources": t["resources"]}
               for name, t in config["available_node_types"].items()
               if name != config["head_node_type"]}
    assert stated == {"max_workers": config["max_workers"], **workers}


def test_auto_concurrency_is_what_the_autoscaler_can_scale_to(run):
    assert not Watch.gpu_nodes(run["first"])  # it started with zero worker nodes
    # 2 fake GPU nodes at most, one 0.5-CPU trainer counted on each: 2 trials at once,
    # counted from the stated node types, not from the live nodes (zero GPU nodes: 1; the
    # old rule counted the head's CPUs, where no trainer can run).
    found = re.findall(r"max_concurrent_trials auto: (\d+) .*nodes from (.*)", run["output"])
    assert found, run["output"][-3000:]
    for n, source in found:
        assert int(n) == 2 and "[resources] autoscale" in source, (n, source)


def test_fake_gpu_nodes_were_added_and_ran_every_trainer(run):
    records = run["records"]
    gpu_nodes = set().union(*(Watch.gpu_nodes(r) for r in records))
    assert gpu_nodes  # (idle nodes go between the stages and come back: any number over time)
    assert max(len(Watch.gpu_nodes(r)) for r in records) <= 2  # max_workers
    workers = records[-1]["workers"]
    # a stage-1 fit and two stage-2 fits (a retried group start adds workers, never elsewhere)
    assert len(workers) >= 3, workers
    assert {w["node"] for w in workers} <= gpu_nodes, (workers, gpu_nodes)
    # and they were seen training there
    assert any(w["state"] == "ALIVE" and w["node"] in Watch.gpu_nodes(r)
               for r in records for w in r["workers"])
    print(f"autoscale timings: {run['seconds']}; fake GPU nodes used: {len(gpu_nodes)}")


def test_sweep_finished_with_its_report(run):
    exp = run["exp"]
    rows = (exp / "report" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header + stage 1 + two stage-2 trials
    assert (exp / "report" / "report.md").is_file()
    assert "report:" in run["output"]


def test_idle_nodes_were_removed(run):
    last = run["records"][-1]
    assert not Watch.gpu_nodes(last)
    alive = [n for n in last["nodes"] if n["alive"]]
    assert len(alive) == 1 and "node:__internal_head__" in alive[0]["resources"]


def test_status_reads_the_experiment_while_it_runs_and_after(run):
    during, after = run["status_running"], run["status_after"]
    s1 = {t["run"]: t["state"] for t in during["stages"]["stage1"]["trials"]}
    assert s1 == {"Effusion": "finished"}
    s2 = {t["run"]: t["state"] for t in during["stages"]["stage2"]["trials"]}
    assert set(s2) == {"Effusion__constant", "Effusion__triangular"}
    assert set(s2.values()) <= {"pending", "running", "finished"}
    for stage in ("stage1", "stage2"):
        assert {t["state"] for t in after["stages"][stage]["trials"]} == {"finished"}
    assert after["best"]["Effusion"]["policy"] in ("constant", "triangular")

"""max_concurrent_trials = "auto": the capacity rule, without Ray (cxr_ray.sweep.capacity)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from cxr_ray.sweep import capacity, recipe as config, driver as sweep
from cxr_ray.sweep.capacity import NodeGroup

ROOT = Path(__file__).resolve().parents[1]
GPU_TRAIN = {"workers": 1, "gpu": True, "worker_resources": {"gpu_node": 0.01}}


def _trials(groups, train, trial_cpus=0.01, cap=None):
    request, workers = capacity.worker_request(train, trial_cpus)
    return capacity.trials_at_once(groups, request, workers, data_reserve=sweep.DATA_RESERVE,
                                   max_worker_nodes=cap)


def test_worker_request_counts_the_trial_sliver_gpu_and_custom_resources():
    request, workers = capacity.worker_request(
        {"workers": 2, "cpus_per_worker": 0.5, "worker_resources": {"gpu_node": 0.01}}, 0.01)
    assert workers == 2 and request == pytest.approx({"CPU": 0.505, "gpu_node": 0.01})
    request, workers = capacity.worker_request({"gpu": True}, 0.01)
    assert workers == 1 and request == pytest.approx({"CPU": 1.01, "GPU": 1.0})


def test_one_machine_keeps_the_old_rule():
    # before: (CPUs - DATA_RESERVE) // (workers * cpus_per_worker + trial_cpus), at least 1
    for cpus, cpw, workers in itertools.product((1, 2, 3, 4, 8, 16), (0.25, 0.5, 1.0, 2.0),
                                                (1, 2, 3)):
        head = [NodeGroup("head", {"CPU": float(cpus)}, 1, head=True)]
        old = max(1, int((cpus - sweep.DATA_RESERVE) // (workers * cpw + 0.01)))
        assert _trials(head, {"workers": workers, "cpus_per_worker": cpw}) == old, \
            (cpus, cpw, workers)
    # the demo: 0.5-CPU workers on 2 CPUs, two trials at once
    assert _trials([NodeGroup("head", {"CPU": 2.0}, 1, head=True)],
                   {"workers": 1, "cpus_per_worker": 0.5}) == 2
    # with gpu: one trial per `workers` GPUs
    box = [NodeGroup("head", {"CPU": 32.0, "GPU": 4.0}, 1, head=True)]
    assert _trials(box, {"gpu": True}) == 4
    assert _trials(box, {"gpu": True, "workers": 2}) == 2


def test_custom_resource_counts_only_the_nodes_that_offer_it():
    head = NodeGroup("head", {"CPU": 16.0}, 1, head=True)
    gpu = NodeGroup("gpu", {"CPU": 4.0, "GPU": 1.0, "gpu_node": 1.0}, 8)
    assert capacity.workers_per_node(head.resources, {"CPU": 1.0, "gpu_node": 0.01}) == 0
    assert _trials([head, gpu], GPU_TRAIN) == 8
    assert _trials([head], GPU_TRAIN) == 1  # nothing fits (zero GPU nodes live): still 1
    # CPU training on gpu_node nodes: CPUs decide (0.5 + 0.01 per worker on 4 CPUs: 7 each)
    cpu_train = {"cpus_per_worker": 0.5, "worker_resources": {"gpu_node": 0.01}}
    assert _trials([head, gpu], cpu_train) == 8 * 7


def test_autoscaler_config_counts_max_workers_of_every_type():
    aws = {"max_workers": 8, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 16}},
        "gpu": {"min_workers": 0, "max_workers": 8,
                "resources": {"CPU": 4, "GPU": 1, "gpu_node": 1}}}}
    groups, cap = capacity.groups_from_autoscaler_config(aws, live_head=None)
    assert cap == 8 and {(g.name, g.count, g.head) for g in groups} == {
        ("head", 1, True), ("gpu", 8, False)}
    # cluster.yaml with jobs/cluster.toml's [train]: one GPU trial per GPU node it may start
    assert _trials(groups, GPU_TRAIN, cap=cap) == 8
    # a head type without resources takes the live head's; a worker type without is skipped
    bare = {"max_workers": 4, "head_node_type": "h", "available_node_types": {
        "h": {}, "w": {"max_workers": 3}, "g": {"resources": {"CPU": 2, "gpu_node": 1}}}}
    groups, cap = capacity.groups_from_autoscaler_config(bare, live_head={"CPU": 2.0})
    assert {(g.name, g.count) for g in groups} == {("h", 1), ("g", 4)}
    assert next(g for g in groups if g.head).resources == {"CPU": 2.0}


def test_global_max_workers_caps_the_nodes_best_types_first():
    small = NodeGroup("small", {"CPU": 4.0, "GPU": 1.0}, 4)
    big = NodeGroup("big", {"CPU": 32.0, "GPU": 4.0}, 4)
    head = NodeGroup("head", {"CPU": 8.0}, 1, head=True)
    assert _trials([head, small, big], {"gpu": True}) == 4 + 16
    assert _trials([head, small, big], {"gpu": True}, cap=5) == 4 * 4 + 1
    assert _trials([head, small, big], {"gpu": True}, cap=0) == 1


def test_local_twin_runs_two_trials_on_two_fake_gpu_nodes():
    data = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    assert data["provider"]["type"] == "fake_multinode"
    head = data["available_node_types"][data["head_node_type"]]["resources"]
    assert "gpu_node" not in head and "GPU" not in head
    groups, cap = capacity.groups_from_autoscaler_config(data, live_head=None)
    gpu = [g for g in groups if "gpu_node" in g.resources]
    assert gpu and all(g.count >= 1 for g in gpu)
    for cpw in (0.5, 0.6):  # tests/test_autoscale.py's recipe and jobs/demo.toml's
        train = {"cpus_per_worker": cpw, "worker_resources": {"gpu_node": 0.01}}
        assert _trials(groups, train, cap=cap) == 2


def test_cluster_config_of_the_gcs_unlimited_groups_and_live_nodes():
    groups = capacity.groups_from_cluster_config(
        [("gpu", {"CPU": 4, "GPU": 1}, 3), ("none", {"CPU": 4}, 0), ("any", {"GPU": 1}, -1)],
        live_head={"CPU": 8.0})
    assert {(g.name, g.count) for g in groups} == {
        ("gpu", 3), ("any", capacity.UNBOUNDED_NODES), ("head", 1)}
    live = capacity.groups_from_live_nodes([
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 2.0, "node:__internal_head__": 1}},
        {"NodeID": "b", "Alive": False, "Resources": {}},
        {"NodeID": "c", "Alive": True, "Resources": {"CPU": 1.0, "gpu_node": 1.0}}])
    assert [(g.name, g.head) for g in live] == [("a", True), ("c", False)]


def test_autoscaling_config_is_read_from_this_clusters_monitor_only():
    cmd = ["/venv/bin/python3", "-u", "/venv/lib/ray/autoscaler/_private/monitor.py",
           "--logs-dir=/tmp/x/logs", "--gcs-address=192.0.2.2:6413",
           "--autoscaling-config=/tmp/x/cluster.yaml", "--monitor-ip=192.0.2.2"]
    assert capacity.autoscaling_config_from_cmdline(cmd, "6413") == "/tmp/x/cluster.yaml"
    assert capacity.autoscaling_config_from_cmdline(cmd, "6379") is None  # another cluster's
    assert capacity.autoscaling_config_from_cmdline(["/bin/bash", "-c", "x"], "6413") is None
    no_config = [a for a in cmd if not a.startswith("--autoscaling-config")]
    assert capacity.autoscaling_config_from_cmdline(no_config, "6413") is None


def test_concurrency_uses_the_recipe_number_or_the_capacity(monkeypatch):
    data = {"experiment": {"name": "x", "shards": "/nonexistent"},
            "train": {"cpus_per_worker": 0.5, "worker_resources": {"gpu_node": 0.01}},
            "resources": {"max_concurrent_trials": 3}}
    groups = [NodeGroup("head", {"CPU": 2.0}, 1, head=True),
              NodeGroup("gpu", {"CPU": 1.0, "gpu_node": 1.0}, 5)]
    monkeypatch.setattr(capacity, "cluster_node_groups", lambda: (groups, 4, "a test"))
    assert sweep.concurrency(config.parse_recipe(data)) == 3
    data["resources"]["max_concurrent_trials"] = "auto"
    assert sweep.concurrency(config.parse_recipe(data)) == 4  # 4 nodes (the cap) x 1

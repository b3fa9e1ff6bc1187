"""max_concurrent_trials = "auto": the capacity rule (cxr_ray.sweep.capacity, no Ray), the
recipe's ``[resources] autoscale`` and cxr_ray.ray_backend.cluster on a faked ``ray.nodes()``
(no Ray cluster)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from cxr_ray.errors import UserError
from cxr_ray.sweep import capacity, recipe as config
from cxr_ray.sweep.capacity import NodeGroup

ROOT = Path(__file__).resolve().parents[2]
GPU_TRAIN = {"workers": 1, "gpu": True, "worker_resources": {"gpu_node": 0.01}}
#: cluster.yaml's GPU node type and global cap, as jobs/cluster.toml states them.
STATED = {"max_workers": 8,
          "gpu": {"max_workers": 8, "resources": {"CPU": 4, "GPU": 1, "gpu_node": 1}}}
#: ray.nodes() of a cluster that runs its head only (and remembers a dead GPU node).
NODES = [{"NodeID": "h", "Alive": True,
          "Resources": {"CPU": 16.0, "memory": 1e9, capacity.HEAD_RESOURCE: 1.0}},
         {"NodeID": "d", "Alive": False,
          "Resources": {"CPU": 4.0, "GPU": 1.0, "gpu_node": 1.0}}]


def _trials(groups, train, trial_cpus=0.01, cap=None):
    request, workers = capacity.worker_request(train, trial_cpus)
    return capacity.trials_at_once(groups, request, workers, data_reserve=0.0,
                                   max_worker_nodes=cap)


def test_worker_request_counts_the_trial_sliver_gpu_and_custom_resources():
    request, workers = capacity.worker_request(
        {"workers": 2, "cpus_per_worker": 0.5, "worker_resources": {"gpu_node": 0.01}}, 0.01)
    assert workers == 2 and request == pytest.approx({"CPU": 0.505, "gpu_node": 0.01})
    # one rank: the trial runs its loop itself, so it is the rank (no sliver on top)
    request, workers = capacity.worker_request({"gpu": True}, 0.01)
    assert workers == 1 and request == pytest.approx({"CPU": 1.0, "GPU": 1.0})
    request, _ = capacity.worker_request({"gpu": True, "gpus_per_worker": 0.25}, 0.01)
    assert request == pytest.approx({"CPU": 1.0, "GPU": 0.25})
    request, _ = capacity.worker_request({"launcher": "ray_train", "gpu": True}, 0.01)
    assert request == pytest.approx({"CPU": 1.01, "GPU": 1.0})  # + the waiting trial
    request, _ = capacity.worker_request({"augment_on": "ray_data", "data_cpus": 2}, 0.01)
    assert request == pytest.approx({"CPU": 3.0})  # its Ray Data tasks' bundle counted


def test_one_machine_rule():
    # CPUs // (workers * cpus_per_worker (+ the trial's sliver for Ray Train trials)), >= 1
    for cpus, cpw, workers in itertools.product((1, 2, 3, 4, 8, 16), (0.25, 0.5, 1.0, 2.0),
                                                (1, 2, 3)):
        head = [NodeGroup("head", {"CPU": float(cpus)}, 1, head=True)]
        sliver = 0.01 if workers > 1 else 0.0
        rule = max(1, int(cpus // (workers * cpw + sliver)))
        assert _trials(head, {"workers": workers, "cpus_per_worker": cpw}) == rule, \
            (cpus, cpw, workers)
    # the demo's stage 2: 1-CPU trials on 2 CPUs, two trials at once
    assert _trials([NodeGroup("head", {"CPU": 2.0}, 1, head=True)],
                   {"workers": 1, "cpus_per_worker": 1.0}) == 2
    # with gpu: one trial per `workers` GPUs, or four per GPU at a quarter each
    box = [NodeGroup("head", {"CPU": 32.0, "GPU": 4.0}, 1, head=True)]
    assert _trials(box, {"gpu": True}) == 4
    assert _trials(box, {"gpu": True, "workers": 2}) == 2
    assert _trials(box, {"gpu": True, "gpus_per_worker": 0.25}) == 16
    two = [NodeGroup("head", {"CPU": 2.0, "GPU": 2.0}, 1, head=True)]
    assert _trials(two, {"gpu": True, "gpus_per_worker": 0.25, "cpus_per_worker": 0.25}) == 8


def test_custom_resource_counts_only_the_nodes_that_offer_it():
    head = NodeGroup("head", {"CPU": 16.0}, 1, head=True)
    gpu = NodeGroup("gpu", {"CPU": 4.0, "GPU": 1.0, "gpu_node": 1.0}, 8)
    assert capacity.workers_per_node(head.resources, {"CPU": 1.0, "gpu_node": 0.01}) == 0
    assert _trials([head, gpu], GPU_TRAIN) == 8
    assert _trials([head], GPU_TRAIN) == 1  # nothing fits (zero GPU nodes live): still 1
    # CPU training on gpu_node nodes: CPUs decide (0.5 + 0.01 per worker on 4 CPUs: 7 each)
    cpu_train = {"cpus_per_worker": 0.5, "worker_resources": {"gpu_node": 0.01}}
    assert _trials([head, gpu], cpu_train) == 8 * 8


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
    # tests/cluster/test_autoscale.py's recipe (Ray Train trials), and in-trial ranks
    for cpw, launcher in ((0.5, "ray_train"), (0.6, "auto"), (1.0, "auto")):
        train = {"cpus_per_worker": cpw, "worker_resources": {"gpu_node": 0.01},
                 "launcher": launcher}
        assert _trials(groups, train, cap=cap) == 2


def test_live_nodes_and_the_live_head():
    live = capacity.groups_from_live_nodes([
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 2.0, "node:__internal_head__": 1}},
        {"NodeID": "b", "Alive": False, "Resources": {}},
        {"NodeID": "c", "Alive": True, "Resources": {"CPU": 1.0, "gpu_node": 1.0}}])
    assert [(g.name, g.head) for g in live] == [("a", True), ("c", False)]
    assert capacity.head_resources(NODES) == NODES[0]["Resources"]
    assert capacity.head_resources(NODES[1:]) is None


def test_stated_node_types_count_at_full_scale_with_the_live_head():
    head = {"CPU": 16.0}
    groups, cap = capacity.groups_from_stated(STATED, head)
    assert cap == 8 and {(g.name, g.count, g.head) for g in groups} == {
        ("gpu", 8, False), ("head", 1, True)}
    assert next(g for g in groups if g.head).resources == head
    assert _trials(groups, GPU_TRAIN, cap=cap) == 8  # jobs/cluster.toml: one trial per GPU node
    # the global max_workers caps the stated types, the best first; without it, no cap
    two = {"max_workers": 3, "small": {"max_workers": 4, "resources": {"CPU": 4, "GPU": 1}},
           "big": {"max_workers": 4, "resources": {"CPU": 32, "GPU": 4}}}
    groups, cap = capacity.groups_from_stated(two, head)
    assert cap == 3 and _trials(groups, {"gpu": True}, cap=cap) == 3 * 4
    groups, cap = capacity.groups_from_stated({"gpu": STATED["gpu"]}, None)
    assert cap is None and [(g.name, g.count) for g in groups] == [("gpu", 8)]


@pytest.mark.parametrize("autoscale, message", [
    ("gpu", "autoscale: must be a table of node types"),
    ({"max_workers": 8}, "autoscale: max_workers alone"),
    ({"max_workers": -1, "gpu": STATED["gpu"]}, "autoscale max_workers: an integer >= 0"),
    ({"max_workers": True, "gpu": STATED["gpu"]}, "autoscale max_workers: an integer >= 0"),
    ({"gpu": 8}, "autoscale gpu: a node type is a table"),
    ({"gpu": {"resources": {"GPU": 1}}}, "autoscale gpu max_workers: required"),
    ({"gpu": {"max_workers": 2.5, "resources": {"GPU": 1}}}, "autoscale gpu max_workers"),
    ({"gpu": {"max_workers": 2}}, "autoscale gpu resources: required"),
    ({"gpu": {"max_workers": 2, "resources": {}}}, "autoscale gpu resources: required"),
    ({"gpu": {"max_workers": 2, "resources": {"GPU": "one"}}},
     "autoscale gpu resources GPU: a number >= 0"),
    ({"gpu": {"max_workers": 2, "resources": {"GPU": 1}, "min_workers": 0}},
     "autoscale gpu: unknown key 'min_workers'"),
])
def test_autoscale_errors_name_the_file_and_key(autoscale, message):
    data = {"experiment": {"name": "x", "shards": "/nonexistent"},
            "resources": {"autoscale": autoscale}}
    with pytest.raises(UserError) as err:
        config.parse_recipe(data, "jobs/x.toml")
    text = str(err.value)
    assert text.startswith("jobs/x.toml: [resources] autoscale") and message in text, text
    assert "\n" not in text


def test_autoscale_defaults_to_nothing_stated():
    data = {"experiment": {"name": "x", "shards": "/nonexistent"}}
    assert config.parse_recipe(data).resources.autoscale == {}
    data["resources"] = {"autoscale": STATED}
    assert config.parse_recipe(data).resources.autoscale == STATED


def test_ranks_that_fit_say_when_a_trial_cannot_start():
    # the demo's stage 1 on 2 cores: 2 Ray Train ranks of 1 CPU plus the waiting trial's
    # sliver do not fit (the sweep refuses that on a local Ray); jobs/demo.toml's 0.95 CPU
    # each does, and 0.45 would run two such trials at once
    head = [NodeGroup("head", {"CPU": 2.0}, 1, head=True)]
    train = {"workers": 2, "cpus_per_worker": 1.0}
    request, workers = capacity.worker_request(train, 0.01)
    assert capacity.ranks_that_fit(head, request) == 1 < workers
    request, workers = capacity.worker_request({**train, "cpus_per_worker": 0.95}, 0.01)
    assert capacity.ranks_that_fit(head, request) == 2 == workers
    request, workers = capacity.worker_request({**train, "cpus_per_worker": 0.45}, 0.01)
    assert capacity.trials_at_once(head, request, workers) == 2

"""max_concurrent_trials = "auto" against Ray's view of the cluster (``ray.nodes()`` faked):
the recipe's stated node types, else the live nodes."""

from __future__ import annotations

from cxr_ray.ray_backend import tune as sweep
from cxr_ray.sweep import capacity, recipe as config

STATED = {"max_workers": 8,
          "gpu": {"max_workers": 8, "resources": {"CPU": 4, "GPU": 1, "gpu_node": 1}}}

NODES = [{"NodeID": "h", "Alive": True,
          "Resources": {"CPU": 16.0, "memory": 1e9, capacity.HEAD_RESOURCE: 1.0}},
         {"NodeID": "d", "Alive": False,
          "Resources": {"CPU": 4.0, "GPU": 1.0, "gpu_node": 1.0}}]



GPU_TRAIN = {"workers": 1, "gpu": True, "worker_resources": {"gpu_node": 0.01}}


def _trials(groups, train, trial_cpus=0.01, cap=None):
    request, workers = capacity.worker_request(train, trial_cpus)
    return capacity.trials_at_once(groups, request, workers, data_reserve=0.0,
                                   max_worker_nodes=cap)



def test_node_groups_use_the_stated_types_else_the_live_nodes(monkeypatch):
    import ray

    from cxr_ray.ray_backend import cluster

    monkeypatch.setattr(ray, "nodes", lambda: NODES)
    groups, cap, source = cluster.node_groups(STATED)
    assert cap == 8 and source == cluster.STATED and "[resources] autoscale" in source
    assert {(g.name, g.count, g.head) for g in groups} == {("gpu", 8, False), ("head", 1, True)}
    assert next(g for g in groups if g.head).resources == NODES[0]["Resources"]
    assert _trials(groups, GPU_TRAIN, cap=cap) == 8
    for stated in (None, {}):  # nothing stated: the live nodes (the dead one not counted)
        groups, cap, source = cluster.node_groups(stated)
        assert cap is None and source == cluster.LIVE
        assert [(g.name, g.head) for g in groups] == [("h", True)]
        assert _trials(groups, GPU_TRAIN) == 1  # no GPU node alive: still one trial


def test_concurrency_uses_the_recipe_number_or_the_capacity(monkeypatch):
    import ray

    data = {"experiment": {"name": "x", "shards": "/nonexistent"},
            "train": {"cpus_per_worker": 0.5, "worker_resources": {"gpu_node": 0.01}},
            "resources": {"max_concurrent_trials": 3}}
    monkeypatch.setattr(ray, "nodes", lambda: [
        {"NodeID": "h", "Alive": True, "Resources": {"CPU": 2.0, capacity.HEAD_RESOURCE: 1.0}}])
    assert sweep.concurrency(config.parse_recipe(data), config.parse_recipe(data).train) == 3
    data["resources"]["max_concurrent_trials"] = "auto"
    assert sweep.concurrency(config.parse_recipe(data), config.parse_recipe(data).train) == 1  # live: no gpu_node node
    # cluster-local.yaml's GPU nodes, stated (1 CPU each)
    data["resources"]["autoscale"] = {
        "max_workers": 4, "gpu": {"max_workers": 5, "resources": {"CPU": 1, "gpu_node": 1}}}
    recipe = config.parse_recipe(data)
    assert sweep.concurrency(recipe, recipe.train) == 8  # 4 nodes (the cap) x 2 in-trial ranks
    ray_train = {**recipe.train, "launcher": "ray_train"}  # 0.5 + 0.01 CPU: one per node
    assert sweep.concurrency(recipe, ray_train) == 4



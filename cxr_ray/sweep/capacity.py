"""How many sweep trials the cluster can train at once (``max_concurrent_trials = "auto"``).

A sweep trial trains with ``workers`` Ray Train workers, each asking for
``{"CPU": cpus_per_worker, "GPU": 1 (with gpu), **worker_resources}``, and the trial itself
holds ``trial_cpus`` of a CPU.  ``"auto"`` is the number of such trials whose workers fit on
the cluster **at its largest**:

1. **The nodes.** On an autoscaling cluster, the node types the recipe states in ``[resources]
   autoscale`` (mirroring the autoscaler config): every type counts ``max_workers`` times
   (at most the stated global ``max_workers`` nodes in all, the types that hold the most
   workers first), plus the live head once: an autoscaling cluster that starts with zero
   workers still runs as many trials as it can scale to, and Tune's queued trials are what
   make the autoscaler add nodes.  Otherwise: the live nodes (``ray.nodes()``).  Ray has no
   documented API that returns the autoscaler's node types (ray-project/ray#52033), hence
   the recipe states them; :mod:`cxr_ray.ray_backend.cluster` reads the live nodes.
2. **Workers per node.** ``floor(min over the requested resources r of node[r] / worker[r])``,
   where a worker's CPU counts its trial's sliver too (``cpus_per_worker + trial_cpus /
   workers``: the trial may land on the same node). A node without a requested resource
   holds none: with ``worker_resources = {gpu_node = 0.01}`` only nodes that advertise
   ``gpu_node`` count, never the CPU-only head. For CPU-only training the head keeps
   ``data_reserve`` CPUs free for Ray Data.
3. **Trials at once** = all nodes' workers // ``workers`` (a trial's workers may span
   nodes), at least 1.

On one machine without an autoscaler this is the old rule: ``(CPUs - 0.5) // (workers ×
cpus_per_worker + trial_cpus)``; with ``gpu``, one trial per ``workers`` GPUs.

Pure functions only: no Ray here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable

log = logging.getLogger(__name__)

#: The resource only the head node advertises (in ``ray.nodes()``' ``Resources``).
HEAD_RESOURCE = "node:__internal_head__"


@dataclass
class NodeGroup:
    """``count`` nodes of one kind, each with ``resources``."""

    name: str
    resources: dict[str, float]
    count: int
    head: bool = False


def worker_request(train: dict[str, Any], trial_cpus: float) -> tuple[dict[str, float], int]:
    """One training rank's resources and ranks per trial, from a trial's training keys.

    A trial that runs its loop in its own process (:func:`cxr_ray.sweep.plan.launcher_of`)
    *is* its rank: it asks ``cpus_per_worker`` (plus ``data_cpus`` for Ray Data
    augmentation) and ``gpus_per_worker``. A Ray Train trial's workers ask the same, and the
    trial itself holds ``trial_cpus`` of a CPU besides (counted against its workers: it may
    land on the same node)."""
    from cxr_ray.sweep.plan import launcher_of

    workers = int(train.get("workers", 1) or 1)
    cpus = float(train.get("cpus_per_worker") or 1.0)
    if launcher_of(train) == "ray_train":
        cpus += trial_cpus / workers
    if train.get("augment_on") == "ray_data":
        cpus += float(train.get("data_cpus", 1.0)) / workers
    request = {"CPU": cpus}
    if train.get("gpu"):
        request["GPU"] = float(train.get("gpus_per_worker", 1.0))
    request.update({k: float(v) for k, v in (train.get("worker_resources") or {}).items()})
    return request, workers


def workers_per_node(resources: dict[str, float], request: dict[str, float]) -> int:
    """How many workers asking ``request`` fit on a node offering ``resources``."""
    fits = [math.floor(resources.get(name, 0.0) / amount + 1e-9)
            for name, amount in request.items() if amount > 0]
    return max(0, min(fits)) if fits else 0


def trials_at_once(groups: Iterable[NodeGroup], request: dict[str, float], workers: int, *,
                   data_reserve: float = 0.0, max_worker_nodes: int | None = None) -> int:
    """Trials whose workers fit on ``groups`` at once (the rule of the module docstring),
    at least 1 (an autoscaler may add the nodes a queued trial asks for)."""
    fit = ranks_that_fit(groups, request, data_reserve=data_reserve,
                         max_worker_nodes=max_worker_nodes)
    return max(1, fit // max(1, workers))


def ranks_that_fit(groups: Iterable[NodeGroup], request: dict[str, float], *,
                   data_reserve: float = 0.0, max_worker_nodes: int | None = None) -> int:
    """Ranks asking ``request`` that fit on ``groups`` at once.

    ``data_reserve`` CPUs of the head stay free when the request has no GPU;
    ``max_worker_nodes`` caps the non-head nodes (the autoscaler's global ``max_workers``).
    """
    total, worker_nodes = 0, []
    for g in groups:
        resources = dict(g.resources)
        if g.head and not request.get("GPU"):
            resources["CPU"] = resources.get("CPU", 0.0) - data_reserve
        fit = workers_per_node(resources, request)
        if g.head:
            total += fit * g.count
        else:
            worker_nodes += [fit] * g.count
    worker_nodes.sort(reverse=True)
    if max_worker_nodes is not None:
        worker_nodes = worker_nodes[:max(0, max_worker_nodes)]
    return total + sum(worker_nodes)


# --------------------------------------------------------------------------- node groups
def groups_from_autoscaler_config(config: dict[str, Any], live_head: dict[str, float] | None
                                  ) -> tuple[list[NodeGroup], int | None]:
    """Node groups at full scale from an autoscaler YAML (``cluster.yaml``; what
    :func:`groups_from_stated` builds), and the global worker cap. The head type takes the
    live head's resources where it declares none; a worker type without ``resources`` is
    skipped, with a warning."""
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    cap = config.get("max_workers")
    groups = []
    for name, spec in types.items():
        spec = spec or {}
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name == head_type:
            groups.append(NodeGroup(name, resources or dict(live_head or {}), 1, head=True))
            continue
        count = int(spec.get("max_workers", cap if cap is not None else 0) or 0)
        if cap is not None:
            count = min(count, int(cap))
        if not resources:
            log.warning("autoscaler node type %s declares no resources; not counted", name)
            continue
        groups.append(NodeGroup(name, resources, count))
    if head_type not in types and live_head:
        groups.append(NodeGroup("head", dict(live_head), 1, head=True))
    return groups, (int(cap) if cap is not None else None)


def groups_from_live_nodes(nodes: list[dict[str, Any]]) -> list[NodeGroup]:
    """One group per alive node of ``ray.nodes()``."""
    return [NodeGroup(n.get("NodeID", "?"), dict(n.get("Resources") or {}), 1,
                      head=HEAD_RESOURCE in (n.get("Resources") or {}))
            for n in nodes if n.get("Alive")]


def head_resources(nodes: list[dict[str, Any]]) -> dict[str, float] | None:
    """The alive head's resources in ``ray.nodes()`` (None without one)."""
    return next((dict(n["Resources"]) for n in nodes if n.get("Alive") and
                 HEAD_RESOURCE in (n.get("Resources") or {})), None)


def groups_from_stated(stated: dict[str, Any], head: dict[str, float] | None
                       ) -> tuple[list[NodeGroup], int | None]:
    """Node groups at full scale from a recipe's ``[resources] autoscale`` (worker node types
    as in an autoscaler config's ``available_node_types``, plus an optional global
    ``max_workers``) and the live head's resources; and the global worker cap."""
    types = {name: spec for name, spec in stated.items() if name != "max_workers"}
    config = {"available_node_types": types, "max_workers": stated.get("max_workers")}
    return groups_from_autoscaler_config(config, head)

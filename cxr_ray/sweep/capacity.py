"""How many sweep trials the cluster can train at once (``max_concurrent_trials = "auto"``).

A sweep trial trains with ``workers`` Ray Train workers, each asking for
``{"CPU": cpus_per_worker, "GPU": 1 (with gpu), **worker_resources}``, and the trial itself
holds ``trial_cpus`` of a CPU.  ``"auto"`` is the number of such trials whose workers fit on
the cluster **at its largest**:

1. **The nodes.** On a cluster with an autoscaler, every worker node type counts
   ``max_workers`` times (at most the config's global ``max_workers`` nodes in all, the types
   that hold the most workers first) and the head once, with the ``resources`` the
   autoscaler config declares (the head's live resources where it declares none): an
   autoscaling cluster that starts with zero workers still runs as many trials as it can
   scale to, and Tune's queued trials are what make the autoscaler add nodes.  Without an
   autoscaler config we can read: the live nodes (``ray.nodes()``).
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

Where the autoscaler config comes from, first found wins (:func:`cluster_node_groups`):

* the cluster config in the GCS (``ray._private.state``; KubeRay and autoscalers that report
  one; Ray Train and Ray Data read the same record);
* the YAML of this cluster's autoscaler (the v1 ``monitor.py`` of ``ray up`` and of
  ``ray start --head --autoscaling-config=FILE``): its pid is in the autoscaler status the
  monitor writes to the GCS, its ``--autoscaling-config`` on its command line, readable
  when the driver runs on the head (``ray job submit`` drivers do);
* ``~/ray_bootstrap_config.yaml``, the config ``ray up`` leaves on the head (Tune looks for
  the same file to tell that it runs on a launched cluster).

Everything but :func:`cluster_node_groups` is a pure function.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

#: Node count assumed for a node group whose maximum is unlimited (``max_count = -1``).
UNBOUNDED_NODES = 64
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass
class NodeGroup:
    """``count`` nodes of one kind, each with ``resources``."""

    name: str
    resources: dict[str, float]
    count: int
    head: bool = False


def worker_request(train: dict[str, Any], trial_cpus: float) -> tuple[dict[str, float], int]:
    """One training worker's resources (its trial's sliver included) and workers per trial,
    from a recipe's ``[train]`` table."""
    workers = int(train.get("workers", 1) or 1)
    cpus = float(train.get("cpus_per_worker") or 1.0)
    request = {"CPU": cpus + trial_cpus / workers}
    if train.get("gpu"):
        request["GPU"] = 1.0
    request.update({k: float(v) for k, v in (train.get("worker_resources") or {}).items()})
    return request, workers


def workers_per_node(resources: dict[str, float], request: dict[str, float]) -> int:
    """How many workers asking ``request`` fit on a node offering ``resources``."""
    fits = [math.floor(resources.get(name, 0.0) / amount + 1e-9)
            for name, amount in request.items() if amount > 0]
    return max(0, min(fits)) if fits else 0


def trials_at_once(groups: Iterable[NodeGroup], request: dict[str, float], workers: int, *,
                   data_reserve: float = 0.0, max_worker_nodes: int | None = None) -> int:
    """Trials whose workers fit on ``groups`` at once (the rule of the module docstring).

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
    total += sum(worker_nodes)
    return max(1, total // max(1, workers))


# --------------------------------------------------------------------------- node groups
def groups_from_autoscaler_config(config: dict[str, Any], live_head: dict[str, float] | None
                                  ) -> tuple[list[NodeGroup], int | None]:
    """Node groups at full scale from an autoscaler YAML (``cluster.yaml``, the bootstrap
    config), and the global worker cap. A worker type without ``resources`` is skipped (the
    launcher fills them in for AWS/GCP in the bootstrap config it copies to the head)."""
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


def groups_from_cluster_config(node_groups: Iterable[tuple[str, dict[str, float], int]],
                               live_head: dict[str, float] | None) -> list[NodeGroup]:
    """Node groups from the GCS cluster config: ``(name, resources, max_count)`` per group
    (-1: unlimited, counted as :data:`UNBOUNDED_NODES`), plus the live head."""
    groups = [NodeGroup(name, dict(res), UNBOUNDED_NODES if count < 0 else int(count))
              for name, res, count in node_groups if count != 0 and res]
    if live_head:
        groups.append(NodeGroup("head", dict(live_head), 1, head=True))
    return groups


def groups_from_live_nodes(nodes: list[dict[str, Any]]) -> list[NodeGroup]:
    """One group per alive node of ``ray.nodes()``."""
    return [NodeGroup(n.get("NodeID", "?"), dict(n.get("Resources") or {}), 1,
                      head="node:__internal_head__" in (n.get("Resources") or {}))
            for n in nodes if n.get("Alive")]


def autoscaling_config_from_cmdline(cmdline: list[str], gcs_port: str) -> str | None:
    """``--autoscaling-config`` of an autoscaler ``monitor.py`` command line serving the GCS
    at port ``gcs_port`` (None for any other process)."""
    if not any(arg.endswith("monitor.py") for arg in cmdline):
        return None
    gcs = next((a.split("=", 1)[1] for a in cmdline if a.startswith("--gcs-address=")), "")
    if gcs.rpartition(":")[2] != str(gcs_port):
        return None
    return next((a.split("=", 1)[1] for a in cmdline if a.startswith("--autoscaling-config=")),
                None)


# --------------------------------------------------------------------------- Ray glue
def cluster_node_groups() -> tuple[list[NodeGroup], int | None, str]:
    """The connected cluster's node groups at full scale, the global worker-node cap, and
    where they came from (for the log). Needs ``ray.init`` first."""
    import ray  # Ray-specific from here on

    nodes = ray.nodes()
    head = next((dict(n["Resources"]) for n in nodes if n.get("Alive") and
                 "node:__internal_head__" in (n.get("Resources") or {})), None)
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - private API: any failure means "no such record"
        config = None
    if config is not None and config.node_group_configs:
        groups = groups_from_cluster_config(
            ((g.name, dict(g.resources), g.max_count) for g in config.node_group_configs), head)
        return groups, None, "the cluster config in the GCS"
    path = _monitor_config_path() or _existing(BOOTSTRAP_CONFIG)
    if path is not None:
        try:
            import yaml

            data = yaml.safe_load(Path(path).read_text())
            groups, cap = groups_from_autoscaler_config(data, head)
            return groups, cap, f"the autoscaler config {path}"
        except (OSError, ValueError, AttributeError, yaml.YAMLError) as exc:
            log.warning("cannot read the autoscaler config %s (%s); using the live nodes",
                        path, exc)
    return groups_from_live_nodes(nodes), None, "the live nodes"


def _existing(path: str) -> str | None:
    p = Path(path).expanduser()
    return str(p) if p.is_file() else None


def _monitor_config_path() -> str | None:
    """The ``--autoscaling-config`` of this cluster's autoscaler, if it runs on this machine."""
    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        pid = int(json.loads(status)["monitor_pid"]) if status else None
        port = ray.get_runtime_context().gcs_address.rpartition(":")[2]
    except Exception:  # noqa: BLE001 - private API / no autoscaler: no config to read
        return None
    if pid is None:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:  # not on this machine (or not Linux)
        return None
    path = autoscaling_config_from_cmdline(cmdline, port)
    return _existing(path) if path else None

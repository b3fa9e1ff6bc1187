"""The connected Ray cluster's nodes at full scale, for ``max_concurrent_trials = "auto"``.

:func:`node_groups` returns what :func:`cxr_ray.sweep.capacity.trials_at_once` counts on:

1. the autoscaling cluster the recipe states (``[resources] autoscale``: its worker node types
   and global ``max_workers``, mirroring the autoscaler config), plus the live head;
2. otherwise the live nodes (``ray.nodes()``).

Ray 2.60 has no documented API that returns the autoscaler's node types and their
``max_workers`` (``ray.autoscaler.sdk`` takes a cluster config, it never returns the running
one), so there is no step in between. Needs ``ray.init`` first.
"""

from __future__ import annotations

from typing import Any

import ray

from cxr_ray.sweep import capacity
from cxr_ray.sweep.capacity import NodeGroup

#: ``source`` of :func:`node_groups` for each rule (the sweep logs it).
STATED = "the recipe's [resources] autoscale and the live head"
LIVE = "the live nodes"


def node_groups(stated: dict[str, Any] | None = None
                ) -> tuple[list[NodeGroup], int | None, str]:
    """The cluster's node groups at full scale, the global cap on worker nodes (None: no
    cap), and where they came from (for the log line).

    ``stated``: a recipe's ``[resources] autoscale`` (``{gpu = {max_workers = 8, resources =
    {...}}, max_workers = 8}``); empty or None: the live nodes.
    """
    nodes = ray.nodes()  # DeveloperAPI: the cluster's nodes, alive or not, with resources
    if stated:
        groups, cap = capacity.groups_from_stated(stated, capacity.head_resources(nodes))
        return groups, cap, STATED
    # No documented Ray API returns the autoscaler config (ray-project/ray#52033).
    return capacity.groups_from_live_nodes(nodes), None, LIVE

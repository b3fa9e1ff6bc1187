"""One Ray session for every command: use the initialised Ray, else join the cluster at
``--address``/``RAY_ADDRESS``, else start a local Ray for the duration of the command.

A local Ray started here has no dashboard and keeps its workers' logs in its session log
directory (``log_to_driver=False``): the driver prints one line per epoch or trial in
cxr-ray's words instead, and Ray Train's placement-group cleaner would otherwise print a
State-API warning every second without a dashboard.

Ray Train's controller reads its polling intervals from its own environment. A local Ray
started here gets :data:`LOCAL_ENV` as the job's ``runtime_env``, so every actor of the job
(Tune trials, Train controllers) sees them; on a cluster, ``jobs/runtime_env.yaml`` sets them
for ``ray job submit``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import ray

from cxr_ray.errors import UserError

log = logging.getLogger(__name__)

#: Environment of a local Ray started by cxr-ray (measured on 2 cores: the defaults, a 2 s
#: health check and a 5 s preemption poll, add seconds to every short fit; one machine has
#: nothing to preempt, and the watcher is one more Python process, ~2.5 CPU-s per fit).
LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
             "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
             "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                num_gpus: float | None = None) -> Iterator[None]:
    """Use the initialised Ray, else connect to ``address``/``RAY_ADDRESS``, else start a
    local Ray (``num_cpus``/``num_gpus`` default to the machine's); disconnect from or shut
    down what was started here."""
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        try:
            ray.init(address=address)
        except (ConnectionError, TimeoutError) as exc:
            raise UserError(f"cannot connect to the Ray cluster at {address} ({exc}); check "
                            "--address / RAY_ADDRESS, or leave both unset for a local Ray"
                            ) from None
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 num_cpus=num_cpus, num_gpus=num_gpus,
                 runtime_env={"env_vars": dict(LOCAL_ENV)})
    _STARTED_HERE.append(not address)
    try:
        yield
    finally:
        _STARTED_HERE.pop()
        ray.shutdown()


_STARTED_HERE: list[bool] = []


def local_ray_started_here() -> bool:
    """True inside a :func:`ray_session` that started a local Ray (no autoscaler: what the
    machine holds is all there will be)."""
    return bool(_STARTED_HERE and _STARTED_HERE[-1])


def cluster_cpus() -> float:
    """CPUs of the connected cluster now."""
    return float(ray.cluster_resources().get("CPU", 0))

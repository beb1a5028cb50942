"""Where the Ray engine runs: a cluster's address, or a local instance on 127.0.0.1 only.

A local instance (no ``--ray-address``) is started without the dashboard and with the node's
address set to 127.0.0.1, so that Ray's servers (GCS, raylet, object manager, workers'
gRPC, runtime-env agent) listen on the loopback address only: nothing is reachable from
another host. Ray turns 127.0.0.1 into the host's address unless it is told that this node
forms no cluster (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by Ray's processes as they
start, and by this process's already imported Ray through the constant it set).
"""

from __future__ import annotations

import os
from typing import Any

import ray

from ..errors import ConfigError

LOOPBACK = "127.0.0.1"
_NO_CLUSTER_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` or start a local loopback-only instance; returns True
    when this call started Ray (the caller shuts it down after). A process already connected
    keeps its connection."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address is not None:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"--ray-address {address}: no Ray cluster answered there ({exc}). Give the "
                "head's address (ray://HOST:10001, or HOST:6379 on a cluster node), or leave "
                "out --ray-address for a local instance."
            ) from None
        return True
    _no_cluster()
    ray.init(
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        num_cpus=num_cpus,
        **quiet,
    )
    return True


def _no_cluster() -> None:
    """Keep the local instance's addresses on the loopback (see the module docstring)."""
    os.environ[_NO_CLUSTER_VARIABLE] = "0"  # inherited by the processes Ray starts
    from ray._private import ray_constants  # Ray keeps it there; no public switch exists

    ray_constants.ENABLE_RAY_CLUSTER = False


def cluster_cpus() -> int:
    """The CPUs of the connected cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))

"""Connecting to Ray: an existing cluster (job submission, ``RAY_ADDRESS``, config) or a new local one."""

from __future__ import annotations

import os

import ray

from .config import Config


def gpus(requested: float | None) -> float:
    """GPUs per worker or actor: as configured, else one when the cluster has any."""
    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def connect(config: Config) -> None:
    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # a private local cluster: everything bound to loopback
    ray.init(num_cpus=config.cluster.num_cpus, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             include_dashboard=True)

"""Connecting to Ray: an existing cluster (job submission, ``RAY_ADDRESS``, config) or a new local one."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import ray

from .config import Config


def gpus(requested: float | None) -> float:
    """GPUs per worker or actor: as configured, else one when the cluster has any."""
    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def private_token_file() -> Path | None:
    """The token file a local Ray cluster uses (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``), readable by
    its owner only: created with mode 0600 before Ray would create it world-readable, or tightened when it
    exists and is ours. None when the token comes from ``RAY_AUTH_TOKEN`` (no file)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_hex(32))
    elif path.stat().st_uid == os.getuid() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)
    return path


def connect(config: Config) -> None:
    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    private_token_file()
    # a private local cluster: everything bound to loopback
    ray.init(num_cpus=config.cluster.num_cpus, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             include_dashboard=True)

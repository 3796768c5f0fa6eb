"""Connecting to Ray: an existing cluster (job submission, ``RAY_ADDRESS``, config) or a new local one."""

from __future__ import annotations

import os
import secrets
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import ray
from ray._private import ray_constants

from .config import Config


def gpus(requested: float | None) -> float:
    """GPUs per worker or actor: as configured, else one when the cluster has any."""
    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def on_a_gpu(gpus_per_task: float | None, function, *args):
    """``function(*args)``, as a Ray task holding ``gpus_per_task`` GPUs (one where the cluster has GPUs) when it
    needs any, else (or without a Ray cluster) in this process. Model loading, evaluation and diagnostics run
    where the GPUs are: on KubeRay the driver runs on the head pod, which has none. The task reserves no CPU, as
    the driver's own work does not: one waiting for a CPU that running trials hold would never start."""
    count = gpus(gpus_per_task) if ray.is_initialized() else 0  # no cluster (a notebook, a test): here
    if not count:
        return function(*args)
    return ray.get(ray.remote(num_cpus=0, num_gpus=count)(function).remote(*args))


class ResourcesUnavailable(RuntimeError):
    """A stage's workers did not find their CPUs (and GPUs) free on the cluster within ``cluster.wait_minutes``."""


def wait_for_resources(what: str, needed: dict[str, float], wait_minutes: float | None, log=print,
                       poll_s: float = 2.0, quiet_s: float = 10.0, say_every_s: float = 60.0) -> None:
    """Return once the cluster has ``needed`` free (a stage's workers together: Ray Train otherwise retries its
    worker group without end). Meanwhile an autoscaling cluster is asked for them, and after ``quiet_s`` (actors
    of the stage before may still be releasing theirs) a line says every ``say_every_s`` what is waited for and
    what is free; after ``wait_minutes`` (None: no limit) raise ``ResourcesUnavailable`` saying both."""
    needed = {name: amount for name, amount in needed.items() if amount > 0}
    if not needed or not ray.is_initialized():  # Ray Train's local mode (no workers): nothing to wait for
        return
    wants = ", ".join(f"{amount:g} {name}" for name, amount in needed.items())
    started, said, asked = time.monotonic(), None, False
    while True:
        free = ray.available_resources()
        if all(free.get(name, 0.0) >= amount - 1e-9 for name, amount in needed.items()):
            return
        waited = time.monotonic() - started
        speaks = waited >= quiet_s and (said is None or time.monotonic() - said >= say_every_s)
        gives_up = wait_minutes is not None and waited >= wait_minutes * 60
        if speaks or gives_up:
            has = ", ".join(f"{free.get(name, 0.0):g} {name}" for name in needed)
            total = ", ".join(f"{ray.cluster_resources().get(name, 0.0):g} {name}" for name in needed)
        if gives_up:
            raise ResourcesUnavailable(f"{what}: needs {wants} free on the Ray cluster (it has {total}, {has} free) "
                                       f"and waited {waited / 60:.1f} minutes for them (cluster.wait_minutes); free "
                                       "them, add nodes, or lower the stage's num_workers")
        if not asked:
            asked = True
            try:  # an autoscaling cluster (KubeRay) adds nodes for them; elsewhere this asks nothing of anyone
                from ray.autoscaler.sdk import request_resources  # inside the try: not in every Ray install
                request_resources(bundles=[needed])
            except Exception as error:  # noqa: BLE001 - no autoscaler to ask: waiting is all there is
                log(f"[{what}] the cluster's autoscaler could not be asked for {needed} ({type(error).__name__})")
        if speaks:
            said = time.monotonic()
            limit = f"up to {wait_minutes:g} minutes (cluster.wait_minutes)" if wait_minutes is not None else \
                "without limit"
            log(f"[{what}] waiting for {wants} on the Ray cluster (it has {total}, {has} free now), {limit}")
        time.sleep(poll_s)


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


# Ray Train settings for a cluster on one machine (KubeRay clusters keep Ray's defaults). Read from the driver's
# environment when a trainer starts; scripts/demo.sh gives its head the same values.
LOCAL_TRAIN_SETTINGS = {
    # nothing preempts a local machine; the watcher would be one more actor per stage, and its start logs an
    # error line in every job
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # how often the controller polls its workers (Ray's default 2 s): a stage's start and end wait on several
    # polls, ~7 of a tiny stage's 23 s on the 2-core machine (16 s at 0.5)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def use_local_train_settings() -> None:
    for name, value in LOCAL_TRAIN_SETTINGS.items():
        os.environ.setdefault(name, value)


def connect(config: Config) -> None:
    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=own_address(address))
        return
    start_local(config.cluster.num_cpus)


def own_address(address: str) -> dict | None:
    """The job's runtime env that tells each of its Ray processes the cluster's address. Ray Train's placement-group
    cleaner asks the State API whether its stage's controller lives without giving one: Ray then picks the newest
    cluster started on this machine (``/tmp/ray/ray_current_cluster``), which is not this one where the head has its
    own ``--temp-dir`` or another cluster started since, does not find the controller there, and removes the live
    stage's placement group. A Ray Client address (``ray://``) is left alone: its processes run on the server's side."""
    if address.startswith("ray://"):
        return None
    from ray._private.services import canonicalize_bootstrap_address_or_die
    return {"env_vars": {"RAY_ADDRESS": canonicalize_bootstrap_address_or_die(address)}}


def answers_state_queries() -> bool:
    """Whether the State API that the connected cluster advertises knows this cluster. Without its dashboard (a
    minimal Ray, ``include_dashboard=False``) Ray still advertises a dashboard address, the default port's: what
    answers there is a dashboard process without the State API, or another cluster's dashboard."""
    from ray.util.state import get_node
    context = ray.get_runtime_context()
    try:
        return get_node(context.get_node_id(), address=context.gcs_address, timeout=10) is not None
    except Exception:  # noqa: BLE001 - any failure to answer is "no"
        return False


def start_local(num_cpus: int | None, include_dashboard: bool | None = None, **options) -> None:
    """A private Ray cluster on this machine (``options``: more ``ray.init`` arguments)."""
    private_token_file()
    # A private local cluster, every server bound to loopback. Ray turns ``_node_ip_address="127.0.0.1"`` into the
    # host's address so that other nodes could join, and its GCS, raylet, workers and agents then listen on all
    # interfaces; it keeps loopback only where it believes multi-node clusters are off (its Windows/macOS default,
    # ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). Ray reads that setting at import, so it is switched off for this
    # start only: the node address chosen here is what every Ray process is given.
    # The GCS port is chosen here so that every worker can be told its own cluster's address (``own_address``
    # says why). tests/cluster/test_network.py checks both. The dashboard starts where ray[default] is installed (not on
    # a minimal Ray, e.g. the GPU bundle).
    gcs_port = free_port()
    use_local_train_settings()
    # in a session of its own: it outlives a killed driver and then ends the cluster (``reaper``)
    subprocess.Popen([sys.executable, "-m", "lori_ray.reaper", str(os.getpid()), os.path.dirname(ray.__file__)],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    with mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False), \
            mock.patch.dict(os.environ, {ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE: str(gcs_port)}):
        # address "local": a new cluster, never one whose address a `ray start` left in /tmp/ray/ray_current_cluster
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 include_dashboard=include_dashboard,
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}}, **options)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

"""What a local run exposes on the network: every listening socket of a local cluster, measured with psutil."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from unit.test_network import is_loopback  # checked there

from lori_ray.cluster import answers_state_queries, connect, free_port
from lori_ray.config import Config


def listening_sockets(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket listening in ``root_pid``'s process tree."""
    import psutil
    tree = {root_pid} | {p.pid for p in psutil.Process(root_pid).children(recursive=True)}
    found = []
    for connection in psutil.net_connections(kind="inet"):
        if connection.status == psutil.CONN_LISTEN and connection.pid in tree:
            try:
                found.append((connection.laddr.ip, connection.laddr.port, psutil.Process(connection.pid).name()))
            except psutil.NoSuchProcess:
                pass
    return found


@ray.remote
class Probe:
    def cluster_found_without_an_address(self):
        """The class names of the actors on the cluster that Ray's State API finds without being given one."""
        from ray.util.state import list_actors
        return [actor.class_name for actor in list_actors()]


def record_sockets(config):
    """Ray Train loop: once every rank's torch.distributed (gloo) group is up, rank 0 lists the sockets."""
    import torch.distributed as dist
    dist.barrier()
    if dist.get_rank() == 0:
        Path(config["out"]).write_text(json.dumps({"sockets": listening_sockets(config["driver"]),
                                                   "store_port": int(os.environ["MASTER_PORT"])}))
    dist.barrier()


@pytest.fixture
def another_local_cluster(tmp_path, job_env, ray_nodes, short_temp_dir):
    """A second Ray head on this machine, as when two runs or a run and a test share it."""
    token = tmp_path / "other_token"
    token.write_text(os.urandom(32).hex())
    env = {**job_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    # stopped after the test; a short --temp-dir: Ray's unix sockets live there
    ray_nodes(env, "--head", "--port", str(free_port()), "--num-cpus", "1", "--include-dashboard", "false",
              "--temp-dir", str(short_temp_dir("other")))


def test_a_local_cluster_listens_on_loopback_only_and_its_workers_find_it(tmp_path, monkeypatch,
                                                                          another_local_cluster, short_temp_dir):
    """GCS, raylet, dashboard, its agents, the driver, an actor, and a Ray Train worker group with its gloo
    process group: every socket they listen on is bound to loopback, except torch.distributed's rendezvous store
    while a stage trains (torch binds its server to the wildcard address; docs/security.md says so). With
    another local cluster on the machine, a worker that looks its cluster up without an address (as Ray Train's
    placement-group cleaner does) still finds its own; and an address file that a killed `ray start` left in Ray's
    temp dir does not make it attach to that cluster instead of starting its own."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the process's token file, as Ray caches the first it reads
    default_temp = short_temp_dir("stale")  # Ray's default temp dir for this test
    monkeypatch.setenv("RAY_TMPDIR", str(default_temp))
    (default_temp / "ray").mkdir(parents=True, exist_ok=True)
    (default_temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
    out = tmp_path / "sockets.json"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    connect(Config(cluster={"num_cpus": 2}))
    try:
        assert any(name.endswith("Probe") for name in ray.get(Probe.remote().cluster_found_without_an_address.remote()))
        assert answers_state_queries()  # so its stages keep Ray Train's placement-group cleaner (driver.StageTrainer)
        TorchTrainer(record_sockets, train_loop_config={"out": str(out), "driver": os.getpid()},
                     scaling_config=ScalingConfig(num_workers=2),
                     run_config=RunConfig(storage_path=str(tmp_path / "train"))).fit()
        during_training = json.loads(out.read_text())
        after_training = listening_sockets(os.getpid())
        from ray.util.state import list_actors
        actors = {actor.class_name for actor in list_actors(address=ray.get_runtime_context().gcs_address)}
        assert "RayTrainWorker" in actors and "PreemptionWatcher" not in actors, actors  # nothing preempts a local run
    finally:
        ray.shutdown()
    sockets = [tuple(s) for s in during_training["sockets"]] + after_training
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::RayTrainWorker") for n in names), names
    exposed = {(port, name) for address, port, name in sockets if not is_loopback(address)}
    assert exposed <= {(during_training["store_port"], "ray::RayTrainWorker")}, f"beyond loopback: {exposed}"
    assert not any(not is_loopback(address) for address, _, _ in after_training), after_training

FIND_OWN_CLUSTER_JOB = '''
import json, sys, ray
from lori_ray.cluster import connect
from lori_ray.config import Config
connect(Config(cluster={"address": sys.argv[1]}))

@ray.remote
def cluster_found_without_an_address():
    from ray.util.state import list_actors
    return [actor.class_name for actor in list_actors()]

@ray.remote
class Marker:
    pass

marker = Marker.remote()
print("FOUND " + json.dumps(ray.get(cluster_found_without_an_address.remote(), timeout=120)))
'''


def test_a_run_on_a_started_cluster_tells_its_processes_that_cluster(tmp_path, job_env, ray_nodes, short_temp_dir):
    """A run given a cluster's address (``cluster.address``, ``RAY_ADDRESS``, a submitted job) on a head with its own
    ``--temp-dir``, while a cluster started later on the machine is the one Ray finds without an address: a process of
    the run that looks its cluster up without one (as Ray Train's placement-group cleaner does) finds the run's."""
    import subprocess
    token = tmp_path / "token"
    token.write_text(os.urandom(32).hex())
    # Ray's default temp dir moved (RAY_TMPDIR, short: Ray's unix sockets live there) so that the address file the
    # second head writes there stays out of the machine's /tmp/ray
    env = {**job_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_TMPDIR": str(short_temp_dir("default"))}
    port = free_port()
    ray_nodes(env, "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
              "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
              "--temp-dir", str(short_temp_dir("run")))
    # started later, in the default temp dir: the cluster Ray's own lookup picks
    ray_nodes(env, "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()), "--num-cpus", "0",
              "--include-dashboard", "false")
    result = subprocess.run([sys.executable, "-c", FIND_OWN_CLUSTER_JOB, f"127.0.0.1:{port}"], env=env,
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(text for text in result.stdout.splitlines() if text.startswith("FOUND "))
    assert "Marker" in json.loads(line[len("FOUND "):]), line


PROBE_JOB = '''
import json, sys, psutil, ray
ray.init()
ray.get(ray.remote(lambda: 0).remote())  # a task worker
head = [p for p in psutil.process_iter(["cmdline"]) if any(sys.argv[-1] in a for a in p.info["cmdline"] or [])]
tree = {p.pid for root in head for p in [root, *root.children(recursive=True)]}
print("SOCKETS " + json.dumps([(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
                               for c in psutil.net_connections(kind="inet")
                               if c.status == psutil.CONN_LISTEN and c.pid in tree]))
'''


def test_the_demo_head_listens_on_loopback_only(tmp_path):
    """`scripts/demo.sh` (what `make demo` runs): its head, the submitted job's driver and a task worker."""
    import random
    import socket
    import subprocess

    def free(port):
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    # the script derives the agent's port as dashboard + 44100 and the client server's as GCS + 1, and Ray
    # keeps 10002-19999 for its workers
    port = next(p for p in random.sample(range(20000, 21400, 4), 200) if all(free(p + i) for i in range(4)))
    job = tmp_path / "probe.py"
    job.write_text(PROBE_JOB)
    root = Path(__file__).resolve().parents[2]
    temp_dir = f"lori-ray-{os.getuid()}-{port}"  # the head's --temp-dir, on every one of its processes' command line
    try:
        result = subprocess.run(["bash", "scripts/demo.sh", temp_dir], cwd=root, capture_output=True, text=True,
                                timeout=300, env={**os.environ, "JOB": str(job), "RAY_DEMO_PORT": str(port),
                                                  "RAY_DEMO_DASHBOARD_PORT": str(port + 2)}, check=False)
    finally:
        shutil.rmtree(f"/tmp/{temp_dir}", ignore_errors=True)  # the stopped head's logs, kept by the demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(text for text in result.stdout.splitlines() if text.startswith("SOCKETS "))
    sockets = [tuple(s) for s in json.loads(line[len("SOCKETS "):])]
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet", "python"} <= names, names
    assert all(is_loopback(address) for address, _, _ in sockets), sockets

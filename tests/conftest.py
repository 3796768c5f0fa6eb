"""Fixtures shared across test modules, and the suite's hooks: the `cluster` mark of everything under
tests/cluster/ and the exit without the interpreter's teardown."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "cluster"


def pytest_configure(config):
    """Tests that start Ray themselves run it as ``lori_ray.cluster.connect`` runs a local cluster."""
    from lori_ray.cluster import use_local_train_settings
    use_local_train_settings()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m "not cluster"` leaves them out
def pytest_collection_modifyitems(config, items):
    """Every test under ``tests/cluster/`` is marked ``cluster``: it starts a Ray cluster or runs a pipeline."""
    for item in items:
        if CLUSTER in item.path.parents:
            item.add_marker(pytest.mark.cluster)


def short_temp(name: str) -> Path:
    """``/tmp/lr-<pid>-<name>``: the ``short_temp_dir`` fixture's paths (``name`` "*": all of this process's)."""
    return Path(f"/tmp/lr-{os.getpid()}-{name}")


def pytest_sessionfinish(session, exitstatus):
    """After every fixture's teardown, the Ray nodes stopped: the ``short_temp_dir``s of this test process go."""
    for directory in Path("/tmp").glob(short_temp("*").name):
        shutil.rmtree(directory, ignore_errors=True)
    session.config._lori_exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Exit with the session's status through ``os._exit`` once pytest has reported everything (trylast: after
    every other plugin's unconfigure), skipping the interpreter's teardown on purpose. Why: at that teardown the
    background threads that Ray's driver and torch leave running crashed the interpreter once after every test had
    passed, a segfault that turned "288 passed" into a failed `make test`. Nothing needs the teardown by then: the
    report and the cache are written, and stdout and stderr are flushed here."""
    status = getattr(config, "_lori_exit_status", None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


# Helpers are fixtures, never imported (`from conftest import` is refused by tests/unit/test_lint.py). Most are
# factories, session-scoped so module- and session-scoped fixtures can use them too; each call does what the
# helper did (job_env reads os.environ as it is at the call).

@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(path) -> path``: a random-weight tiny Llama with the arithmetic tokenizer, saved as an HF
    directory at ``path``."""
    from lori_ray.models import build_model
    from lori_ray.tokens import arithmetic_tokenizer

    def save(path: Path) -> Path:
        tokenizer = arithmetic_tokenizer()
        build_model("llama", "tiny", len(tokenizer), 64, {"pad_token_id": tokenizer.pad_token_id}).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path
    return save


@pytest.fixture(scope="session")
def tiny_stage(tiny_model):
    """``tiny_stage(directory, name, examples=32, **train) -> Stage``: a training stage of a tiny model (written
    under ``directory``) on ``examples`` teacher sequences, the tiny preset's training settings with ``train``
    overriding them."""
    def stage(directory: Path, name: str, examples: int = 32, **train):
        from safetensors.torch import save_file

        from lori_ray.config import load_config
        from lori_ray.data import generate_multiplication
        from lori_ray.tokens import Layout, arithmetic_tokenizer, collate
        from lori_ray.worker import Stage
        layout = Layout(arithmetic_tokenizer())
        data = directory / "data.safetensors"
        save_file(collate([layout.teacher(e) for e in generate_multiplication(examples, 2, 2)], layout.pad), data)
        settings = load_config(ROOT / "configs/tiny.yaml").teacher.train.model_copy(update=train)
        return Stage(name=name, model_dir=str(tiny_model(directory / "model")), data_path=str(data), train=settings)
    return stage


@pytest.fixture(scope="session")
def wait_for():
    """``wait_for(condition, timeout, what)``: the first truthy value of ``condition()``; TimeoutError(what) once
    ``timeout`` seconds have passed."""
    def wait(condition, timeout: float, what: str):
        deadline = time.time() + timeout
        while not (value := condition()):
            if time.time() > deadline:
                raise TimeoutError(what)
            time.sleep(0.2)
        return value
    return wait


@pytest.fixture(scope="session")
def job_env():
    """``job_env() -> dict``: the test process's environment for a job subprocess, minus what would point it at
    another cluster or tracking server. A function, not the dict: read when the job starts, a new dict each time."""
    def env() -> dict[str, str]:
        found = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        found["RAY_USAGE_STATS_ENABLED"] = "0"
        return found
    return env


def start_ray_node(env: dict[str, str], *args: str) -> int:
    """``ray start *args`` in a session of its own (the node's daemons inherit its id): that session's id."""
    process = subprocess.Popen([Path(sys.executable).with_name("ray"), "start", "--disable-usage-stats", *args],
                               env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        stop_sessions([process.pid])
        raise
    if process.returncode != 0:  # a failed start may have left daemons in its session too
        stop_sessions([process.pid])
        raise AssertionError(output)
    return process.pid


def stop_sessions(sessions: list[int]) -> None:
    """Stop exactly the processes of these sessions, never another Ray cluster on the machine."""
    for signal in ("-TERM", "-KILL"):
        for session in sessions:
            subprocess.run(["pkill", signal, "-s", str(session)], check=False)


@pytest.fixture(scope="session")
def short_temp_dir():
    """``short_temp_dir(name) -> Path``: ``/tmp/lr-<pid>-<name>``, a Ray temp dir short enough for the unix sockets
    Ray puts under it (a pytest tmp_path is not), removed when this test process's session ends. One name, one
    directory: tests and fixtures take different names."""
    return short_temp


@pytest.fixture
def ray_nodes():
    """``ray_nodes(env, *args) -> session id``: ``ray start *args`` in a session of its own. At teardown exactly the
    nodes it started are stopped."""
    sessions = []

    def start(env: dict[str, str], *args: str) -> int:
        sessions.append(start_ray_node(env, *args))
        return sessions[-1]
    yield start
    stop_sessions(sessions)


class RayHead:
    """A running head for jobs to connect to: ``env()`` for the job's process (the cluster's token), ``override``
    for its command line (``cluster.address=...``)."""

    def __init__(self, env, address: str):
        self.env, self.address = env, address
        self.override = f"cluster.address={address}"


@pytest.fixture(scope="session")
def ray_head(job_env, short_temp_dir) -> RayHead:
    """One Ray head for this test process (each xdist worker has its own): 2 CPUs, loopback only, token auth, a
    temp dir of its own. The tests whose jobs run pipelines on a cluster, rather than test a cluster's life (its
    start, its end with a killed driver, its network), connect to it instead of each starting a local cluster:
    that start is ~18 CPU-s of daemons, dashboard and agents on the 2-core machine, paid once here. Every job is
    its own Ray job, whose actors and placement groups Ray releases when its driver exits. A watcher stops the
    head if this process dies without its teardown."""
    base = short_temp_dir("head")
    base.mkdir(exist_ok=True)
    token = base / "token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)

    def env() -> dict[str, str]:
        # RAY_TMPDIR: the head writes its address file there, not in the machine's /tmp/ray, where another
        # test's process looking for "the newest cluster" would find it. Multi-node off, as scripts/demo.sh has
        # it: every server of the head on 127.0.0.1, and the address the jobs' processes are given stays that.
        return {**job_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_TMPDIR": str(base / "default"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    from lori_ray.cluster import free_port
    port = free_port()
    # ports of its own: the client server's and the dashboard agent's defaults are one per machine, and the other
    # xdist worker's head or a test's local cluster may hold them
    session = start_ray_node(env(), "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--num-gpus", "0", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                             "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(base / "ray"))
    watch = f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 2; done; pkill -KILL -s {session}"
    watcher = subprocess.Popen(["bash", "-c", watch], start_new_session=True)
    yield RayHead(env, f"127.0.0.1:{port}")
    stop_sessions([session])
    watcher.kill()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id, request) -> tuple[Path, str]:
    """`jobs/distill.py` on the tiny preset, once per test run: (run directory, stdout). Tests that only need a
    trained tiny teacher take ``<run directory>/teacher`` as their ``teacher.path``. Under pytest-xdist (`make test`
    runs two workers) the first worker to ask runs it in the directory the workers share and the others read it,
    behind a file lock: one pipeline's CPU, not one per worker."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # the run's base directory, above each worker's own
    output, stdout = shared / "tiny-run", shared / "tiny-run.stdout"
    with FileLock(str(shared / "tiny-run.lock")):
        if not stdout.is_file():
            head = request.getfixturevalue("ray_head")  # only the worker that runs it needs a head for it
            result = subprocess.run([sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml",
                                     f"output_dir={output}", head.override],
                                    cwd=ROOT, env=head.env(), capture_output=True, text=True, timeout=900,
                                    check=False)
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
            stdout.write_text(result.stdout)
    return output / "tiny", stdout.read_text()


@pytest.fixture(scope="session")
def answering():
    """``with answering(status) as server``: a local HTTP server at ``server.uri`` answering every request with
    ``status``, an MLflow server as the probe sees it."""
    return Answering


class Answering:
    """A local HTTP server answering every request with ``status``: an MLflow server as the probe sees it."""

    def __init__(self, status: int):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


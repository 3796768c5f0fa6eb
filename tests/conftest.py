"""Fixtures shared across test modules, and the suite's hooks: the `cluster` mark of everything under
tests/cluster/ and the exit without the interpreter's teardown."""

import os
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


def pytest_sessionfinish(session, exitstatus):
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


@pytest.fixture
def ray_nodes():
    """``ray_nodes(env, *args) -> session id``: ``ray start *args`` in a session of its own (the node's daemons
    inherit its id). At teardown exactly the nodes it started are stopped, never another Ray cluster on the
    machine."""
    sessions = []

    def start(env: dict[str, str], *args: str) -> int:
        process = subprocess.Popen([Path(sys.executable).with_name("ray"), "start", "--disable-usage-stats", *args],
                                   env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        output, _ = process.communicate(timeout=120)
        sessions.append(process.pid)  # a failed start may have left daemons in its session too
        assert process.returncode == 0, output
        return process.pid
    yield start
    for signal in ("-TERM", "-KILL"):
        for session in sessions:
            subprocess.run(["pkill", signal, "-s", str(session)], check=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id, job_env) -> tuple[Path, str]:
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
            result = subprocess.run([sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml",
                                     f"output_dir={output}", "cluster.num_cpus=2"],
                                    cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=900, check=False)
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


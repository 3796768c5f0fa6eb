"""Fixtures shared across test modules."""

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
    """Leave with the session's status once pytest has reported everything, without the interpreter's teardown:
    the background threads of Ray's driver and torch crashed it once after every test had passed (a segfault
    that turned "288 passed" into a failed `make test`)."""
    status = getattr(config, "_lori_exit_status", None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def tiny_model_dir(path: Path) -> Path:
    """A random-weight tiny Llama with the arithmetic tokenizer, saved as an HF directory at ``path``."""
    from lori_ray.models import build_model
    from lori_ray.tokens import arithmetic_tokenizer
    tokenizer = arithmetic_tokenizer()
    build_model("llama", "tiny", len(tokenizer), 64, {"pad_token_id": tokenizer.pad_token_id}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_stage(directory: Path, name: str, examples: int = 32, **train):
    """A training stage of a tiny model (written under ``directory``) on ``examples`` teacher sequences, the tiny
    preset's training settings with ``train`` overriding them."""
    from safetensors.torch import save_file

    from lori_ray.config import load_config
    from lori_ray.data import generate_multiplication
    from lori_ray.tokens import Layout, arithmetic_tokenizer, collate
    from lori_ray.train import Stage
    layout = Layout(arithmetic_tokenizer())
    data = directory / "data.safetensors"
    save_file(collate([layout.teacher(e) for e in generate_multiplication(examples, 2, 2)], layout.pad), data)
    settings = load_config(ROOT / "configs/tiny.yaml").teacher.train.model_copy(update=train)
    return Stage(name=name, model_dir=str(tiny_model_dir(directory / "model")), data_path=str(data), train=settings)


def wait_for(condition, timeout: float, what: str):
    """The first truthy value of ``condition()``."""
    deadline = time.time() + timeout
    while not (value := condition()):
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)
    return value


def job_env() -> dict[str, str]:
    """The test process's environment for a job subprocess, minus what would point it at another cluster or
    tracking server."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def ray_start(env: dict[str, str], *args: str) -> int:
    """``ray start *args`` in a session of its own (the node's daemons inherit its id); returns the session id,
    for ``stop_ray_sessions``."""
    process = subprocess.Popen([Path(sys.executable).with_name("ray"), "start", "--disable-usage-stats", *args],
                               env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    return process.pid


def stop_ray_sessions(sessions: list[int]) -> None:
    """Stop exactly the nodes ``ray_start`` started, never another Ray cluster on the machine."""
    for signal in ("-TERM", "-KILL"):
        for session in sessions:
            subprocess.run(["pkill", signal, "-s", str(session)], check=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    """`jobs/distill.py` on the tiny preset, once per session: (run directory, stdout). Tests that only need a
    trained tiny teacher take ``<run directory>/teacher`` as their ``teacher.path``."""
    output = tmp_path_factory.mktemp("runs")
    result = subprocess.run([sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml",
                             f"output_dir={output}", "cluster.num_cpus=2"],
                            cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return output / "tiny", result.stdout


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


"""Two Ray nodes on loopback (a head and a second `ray start` node, each with its own temp dir):
the pipeline runs across both and everything it keeps lives under the shared output_dir."""

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from lori_ray.cluster import free_port
from lori_ray.data import generate_multiplication
from lori_ray.tokens import Layout, arithmetic_tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture  # the module's one test: as long as a module-scoped one, and ray_nodes is per test
def cluster(tmp_path_factory, job_env, ray_nodes, short_temp_dir):
    base = tmp_path_factory.mktemp("nodes")
    token = base / "token"
    token.write_text(secrets.token_hex(32))
    env = {**job_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port, dashboard = free_port(), free_port()
    temp = {name: short_temp_dir(f"multinode-{name}") for name in ("head", "node")}
    ray_nodes(env, "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
              "--num-gpus", "0", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
              "--temp-dir", str(temp["head"]), "--resources", '{"head": 1}')
    ray_nodes(env, "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
              "--num-gpus", "0", "--temp-dir", str(temp["node"]))
    return env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", temp  # ray_nodes stops both after the test


def test_pipeline_spans_two_nodes_and_keeps_everything_under_output_dir(cluster, tmp_path):
    """A Qwen2 preset (the other pipeline runs of the suite are Llama's): its teacher and student keep the task's
    tokenizer through every stage's save."""
    env, address, dashboard, temp = cluster
    output = tmp_path / "shared"
    result = subprocess.run([sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml", "model.family=qwen2",
                             f"output_dir={output}", f"cluster.address={address}",
                             "teacher.train.checkpoint_every=3", "student.train.checkpoint_every=3"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    # where the teacher actors and train workers ran, from the cluster's state API (a client with the token)
    query = ("import json; from ray.util.state import list_actors; "
             f"print(json.dumps([[a.class_name, a.node_id] for a in list_actors('{dashboard}', limit=1000)]))")
    state = subprocess.run([sys.executable, "-c", query], env=env, capture_output=True, text=True, timeout=120,
                           check=False)
    assert state.returncode == 0, state.stdout[-3000:] + state.stderr[-3000:]
    actors = json.loads(state.stdout.strip().splitlines()[-1])
    nodes = {node for name, node in actors if name in ("TeacherWorker", "RayTrainWorker")}
    assert len(nodes) == 2, f"teacher actors and train workers ran on both nodes: {actors}"

    run_dir = output / "tiny"
    for stage in ("teacher", "student"):
        periodic, final = sorted((run_dir / "ray" / f"tiny-{stage}").glob("step-*"))
        # every rank's ZeRO shard reached the shared (periodic) checkpoint, wherever the rank ran
        assert len(list((periodic / "ds" / "state").glob("*optim_states.pt"))) == 2
        assert (final / "hf" / "model.safetensors").is_file()
        assert (run_dir / stage / "model.safetensors").is_file()
    assert list((output / "trajectories").glob("*/manifest.json"))
    example = generate_multiplication(1, 2, 2, seed=5)[0]
    for stage in ("teacher", "student"):
        model = json.loads((run_dir / stage / "config.json").read_text())["model_type"]
        tokenizer = load_tokenizer(str(run_dir / stage))
        assert model == "qwen2"
        assert Layout(tokenizer).teacher(example) == Layout(arithmetic_tokenizer()).teacher(example)
    for directory in temp.values():  # nothing of ours stayed in a node's local temp dir
        assert not [p for p in directory.rglob("*") if p.suffix in (".safetensors", ".pt", ".db")]

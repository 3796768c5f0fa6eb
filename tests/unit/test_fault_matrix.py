"""The fault matrix's row that needs no cluster (docs/failure-handling.md): an object store that does not answer is
refused before Ray starts. The rows that kill a driver or a server mid-run are in
``tests/cluster/test_fault_matrix.py``."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lori_ray.cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
# the cluster tests' command (tests/cluster/test_fault_matrix.py): one rank, one actor
SMALL = ["cluster.num_cpus=2", "teacher.train.num_workers=1", "student.train.num_workers=1", "trajectory.num_actors=1"]


def command(output: Path, *overrides: str) -> list[str]:
    return [sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml", f"output_dir={output}", *SMALL,
            *overrides]


@pytest.mark.parametrize("field", ["cluster.storage_path", "trajectory.store_dir"])
def test_an_object_store_that_does_not_answer_is_refused_before_ray_starts(tmp_path, field, job_env):
    dead = f"s3://lori-ray/runs?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    env = {**job_env(), "AWS_ACCESS_KEY_ID": "alice", "AWS_SECRET_ACCESS_KEY": "SECRET-KEY",
           "AWS_EC2_METADATA_DISABLED": "true"}
    started = time.monotonic()
    result = subprocess.run(command(tmp_path, f"{field}={dead}"), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(rf"{field}: cannot write to s3://lori-ray/runs\?endpoint_override=127.0.0.1:\d+&scheme=http "
                     r"\(.*Could not connect.*\)", result.stderr), result.stderr
    assert "Traceback" not in result.stderr and "SECRET-KEY" not in result.stdout + result.stderr
    assert not (tmp_path / "tiny").exists()  # refused before anything was written or Ray started
    assert time.monotonic() - started < 90


"""Where the driver's model work runs: on a GPU node when the cluster has GPUs (a KubeRay head pod has none)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# a cluster that declares one GPU and no CPUs, like a KubeRay GPU pod beside a head started with num-cpus 0
PROBE = """
import json, os, ray
from lori_ray.cluster import on_a_gpu

def where():
    return os.getpid(), ray.get_gpu_ids()

ray.init(num_cpus=0, num_gpus=1, include_dashboard=False, configure_logging=False)
print(json.dumps({"driver": os.getpid(), "default": on_a_gpu(None, where), "none": on_a_gpu(0, where)}))
"""


def test_model_work_runs_as_a_task_holding_a_gpu_when_the_cluster_has_gpus(job_env):
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                            timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    task_pid, task_gpus = found["default"]
    assert task_pid != found["driver"] and task_gpus == [0]  # a Ray task with the cluster's GPU, not the driver
    assert found["none"][0] == found["driver"]  # gpus_per_actor=0: in the driver, as on a CPU cluster

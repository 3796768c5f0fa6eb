"""A RED student through the real pipeline: pruned to half width, explicit CoT, CE + logit KD, on two
DeepSpeed ZeRO-2 workers; the result is a plain HF model and the eRank diagnostics reach MLflow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def test_pruned_student_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    result = subprocess.run(
        [sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}", "name=red",
         "cluster.num_cpus=2", "student.method=explicit", "student.kind=pruned", "student.width=32",
         "student.depth=1", "student.init=activation", "loss.kd=1.0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| student (explicit) |" in result.stdout
    run_dir = tmp_path / "red"

    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 1

    erank = json.loads((run_dir / "erank.json").read_text())
    assert set(erank) == {"teacher", "student init", "student trained"}
    assert len(erank["teacher"]) == 3 and len(erank["student trained"]) == 2  # embeddings + layers
    assert all(1.0 <= v <= 64 for values in erank.values() for v in values)

    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lori-ray"], output_format="list")
    stages = {r.info.run_name: r for r in runs}
    client = mlflow.MlflowClient()
    assert client.get_metric_history(stages["student"].info.run_id, "kd")
    assert "erank_student_trained_layer_1" in stages["erank"].data.metrics
    assert {"erank.png", "erank.json"} <= {a.path for a in client.list_artifacts(stages["erank"].info.run_id)}

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from lori_ray.trajectories import TrajectoryStore

ROOT = Path(__file__).resolve().parents[2]


def run_tune(output: Path, teacher: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # the demo search with shorter stages and two trials, from the session's trained tiny teacher (same task and
    # shape; teacher SFT is the distillation job's code path): the mechanics, not the accuracy, are under test
    fast = ["model.size=tiny", "data.train_size=544", f"teacher.path={teacher}", "student.train.steps=12",
            "student.train.log_every=4", "tune.num_samples=2",
            # a random search over four fields (the preset's is a grid over the alignment site)
            ('tune.space={"subspace.rank": {"choice": [2, 4, 8]}, "loss.first_order": {"loguniform": [0.1, 10.0]}, '
            '"loss.second_order": {"loguniform": [0.01, 1.0]}, "student.latent_slots": {"choice": [1, 2]}}'),
            "student.train.num_workers=1",  # one worker each: both trials at once
            "trajectory.num_actors=1"]
    return subprocess.run([sys.executable, "jobs/tune.py", "--config", "configs/tune-demo.yaml",
                           f"output_dir={output}", "cluster.num_cpus=2", *fast],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)


@pytest.fixture(scope="module")
def search(tmp_path_factory, tiny_run, job_env):
    output, teacher = tmp_path_factory.mktemp("tune"), tiny_run[0] / "teacher"
    result = run_tune(output, teacher, job_env())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return output, result.stdout, teacher


def extractions(output: Path) -> tuple[int, int]:
    (manifest,) = (output / "trajectories").glob("*/manifest.json")
    store = TrajectoryStore(manifest.parent)
    return len(store.extractions()), store.manifest["shards"]


def test_every_trial_is_an_mlflow_run_with_params_and_metrics(search):
    output, stdout, _ = search
    mlflow.set_tracking_uri(f"sqlite:///{output / 'tune-demo' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lori-ray"], output_format="list")
    parent = next(r for r in runs if r.info.run_name == "tune-demo")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
              and "subspace.rank" in r.data.params]
    assert len(trials) == 2
    for run in trials:
        assert {"loss.first_order", "loss.second_order", "student.latent_slots"} <= set(run.data.params)
        assert 0.0 <= run.data.metrics["val_accuracy"] <= 1.0
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "ce")
        assert len(history) >= 1
    assert "best_held_out_accuracy" in parent.data.metrics
    # the best trial's held-out score on its own run too (the parallel-coordinates view)
    scored = [run for run in trials if "held_out_accuracy" in run.data.metrics]
    assert len(scored) == 1 and scored[0].data.metrics["held_out_accuracy"] == parent.data.metrics[
        "best_held_out_accuracy"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"tune_summary.md", "accuracy_vs_rank.png", "best_trial.json"} <= artifacts
    assert "| trial | subspace.rank | loss.first_order |" in stdout
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/best_trial.json"))
    assert 0.0 <= summary["held_out_accuracy"] <= 1.0 and summary["trials"] == 2


def test_the_best_student_is_published_and_answers_through_predict(search):
    output, stdout, _ = search
    student = output / "tune-demo" / "best-student"
    assert f"[tune] its student: {student}" in stdout
    contract = json.loads((student / "lori-model.json").read_text())
    assert contract["role"] == "student" and contract["latent_slots"] in (1, 2)
    assert (student / "README.md").exists()
    answer = subprocess.run([sys.executable, "-m", "lori_ray.predict", str(student), "12 * 34"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.startswith("12 * 34 = ")  # a tiny student's answer, right or wrong


def test_teacher_ran_once_for_all_trials_and_a_rerun_resumes(search, job_env):
    output, _, teacher = search
    passes, shards = extractions(output)
    assert passes == shards  # one extraction per shard: a single teacher pass for both trials
    again = run_tune(output, teacher, job_env())
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "resuming the search" in again.stdout
    assert extractions(output)[0] == shards

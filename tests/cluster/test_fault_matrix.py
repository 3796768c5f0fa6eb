"""The fault matrix (docs/failure-handling.md), on the tiny preset: what the run does and what is left on disk when
the driver is killed (SIGKILL) in each stage and the same command is run again, and when the MLflow server goes away
mid-run (the run goes on). The jobs run on the session's Ray head, as submitted jobs do on a running cluster: a driver
that starts a local cluster takes it down with it (``test_faults.py::test_a_local_cluster_ends_…``), which leaves
the same files on disk. An object store that does not answer (refused before
Ray starts) is in ``tests/unit/test_fault_matrix.py``; killed train workers and teacher actors in ``test_faults.py``."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from lori_ray.cluster import free_port
from lori_ray.fingerprint import FINGERPRINT_FILE

ROOT = Path(__file__).resolve().parents[2]
# one rank, one actor: the two cores stay free for the kill and the rerun
SMALL = ["cluster.num_cpus=2", "teacher.train.num_workers=1", "student.train.num_workers=1", "trajectory.num_actors=1"]


def command(output: Path, head, *overrides: str) -> list[str]:
    return [sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml", f"output_dir={output}", *SMALL,
            head.override, *overrides]


def published(directory: Path) -> bool:
    return (directory / FINGERPRINT_FILE).is_file()


def store_finished(output: Path) -> bool:
    """A complete trajectory store under ``output`` (its manifest is written last)."""
    return bool(list((output / "trajectories").glob("*/manifest.json")))


def files_under(directory: Path) -> list[str]:
    """What is on disk under ``directory``, Ray's checkpoint folders left out: for a failure's message."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if "ray" not in p.parts)


def step_at_least(stage: str, step: int):
    """A driver line saying ``stage`` has passed ``step`` (its step lines come from the train worker)."""
    pattern = re.compile(rf"\[{stage}\] step (\d+)/")
    return lambda line: bool((found := pattern.search(line)) and int(found.group(1)) >= step)


# The stages, in the order one run meets them: (the driver line it is killed at, what is left on disk then, what the
# rerun says). Made long enough for each kill to land inside its stage: 100 steps with a checkpoint every 10, 4
# trajectory shards.
TRAINING = ["teacher.train.steps=100", "teacher.train.checkpoint_every=10", "student.train.steps=100",
            "student.train.checkpoint_every=10", "teacher.train.log_every=5", "student.train.log_every=5"]
STAGES = {
    # past step 30: the checkpoints of steps 10 and 20 are complete, a later one may be half written
    "teacher": (step_at_least("tiny-teacher", 30),
                lambda run: not (run / "teacher").exists() and list((run / "ray" / "tiny-teacher").glob("step-*")),
                r"\[tiny-teacher\] resumed from step ([1-9]\d*)0 "),
    # one shard of four stored: the rerun extracts the other three, the teacher is not trained again
    "trajectories": (lambda line: "[teacher] extracted shard 1/4" in line,
                     lambda run: published(run / "teacher")
                     and not store_finished(run.parent),
                     r"\[teacher\] finished model found .* skipping[\s\S]*shards extracted before, continuing"),
    "student": (step_at_least("tiny-student", 30),
                lambda run: published(run / "teacher") and not (run / "student").exists()
                and store_finished(run.parent),
                r"\[tiny-student\] resumed from step ([1-9]\d*)0 "),
    # the student published, its evaluation under way
    "evaluate": (lambda line: line.startswith("[student] done in"),
                 lambda run: published(run / "student") and not (run / "results.md").exists(),
                 r"\[student\] finished model found .* skipping"),
}


def run_until(arguments: list[str], env: dict[str, str], kill_at) -> str:
    """Run the job in its own session and SIGKILL it (the driver and whatever it started, like a lost job) at the
    first line ``kill_at`` accepts; what it printed. Fails if it ends before that line."""
    job = subprocess.Popen(arguments, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines, killed = [], False
    try:
        for line in job.stdout:
            lines.append(line)
            if kill_at(line):
                os.killpg(job.pid, signal.SIGKILL)
                killed = True
                break
    finally:
        if not killed:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert killed, "the run ended before the line it was to be killed at:\n" + "".join(lines)[-3000:]
    return "".join(lines)


def test_a_driver_killed_in_each_stage_leaves_finished_work_and_the_same_command_continues(tmp_path, ray_head):
    """One run killed in every stage in turn: each rerun of the same command first continues the stage it was killed
    in (the assertion names it), then is killed in the next; the last rerun finishes, with one MLflow parent run
    holding every stage and nothing left RUNNING by the dead drivers."""
    run, env = tmp_path / "tiny", ray_head.env()
    arguments = command(tmp_path, ray_head, *TRAINING, "data.train_size=2080")  # 2,048 + 32 validation
    killed_in = None
    for stage, (kill_at, left_on_disk, _) in STAGES.items():
        output = run_until(arguments, env, kill_at)
        if killed_in:
            assert re.search(STAGES[killed_in][2], output), f"killed in {killed_in}, the rerun did not continue " \
                                                            f"it:\n{output[-3000:]}"
        assert left_on_disk(run), f"killed in {stage}: {files_under(tmp_path)}"
        assert not list(run.glob(".*.partial")), f"killed in {stage}: a half-published model is left"
        killed_in = stage

    again = subprocess.run(arguments, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(STAGES[killed_in][2], again.stdout), again.stdout[-3000:]
    assert (run / "results.md").is_file() and published(run / "student")
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lori-ray").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and not [r for r in runs if r.info.status == "RUNNING"]
    stages = {r.data.tags["mlflow.runName"] for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"teacher", "trajectories", "student", "evaluate"} <= stages, stages


def test_the_mlflow_server_going_away_mid_run_does_not_stop_the_run(tmp_path, tiny_run, ray_head, job_env, wait_for):
    """Killed once the student trains: its steps stop being logged without holding training up, the driver's
    tracking calls after the first failure are skipped, and the run publishes its models and results."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              env=job_env(), stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    # MLflow's default retries (about four minutes for the first failing request) are the same, only longer
    env = {**ray_head.env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    try:
        import requests
        wait_for(lambda: not requests_refused(port) and requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok,
                 300, "the MLflow server: " + str(tmp_path / "server.log"))
        from mlflow.tracking import MlflowClient
        MlflowClient(f"http://127.0.0.1:{port}").search_experiments()  # its store created before the run's requests
        job = subprocess.Popen(command(tmp_path, ray_head, f"tracking.uri=http://127.0.0.1:{port}",
                                       "student.train.steps=60", f"teacher.path={tiny_run[0] / 'teacher'}",
                                       "student.train.log_every=5"),
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in job.stdout:
            lines.append(line)
            if "[tiny-student] step 5/60" in line and server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        job.wait(timeout=900)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    output = "".join(lines)
    assert server.poll() is not None and job.returncode == 0, output[-5000:]
    assert "[tiny-student] step 60/60 " in output and (tmp_path / "tiny" / "results.md").is_file()
    assert published(tmp_path / "tiny" / "student")
    assert "[tracking] WARNING: MLflow stopped answering" in output
    assert re.search(r"\[tracking\] MLflow stopped answering during this run .*; \d+ later tracking calls were "
                     r"skipped; the models and results are in the run directory", output)


def requests_refused(port: int) -> bool:
    import socket
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_checkpoint_storage_lost_mid_stage_is_one_error_and_the_rerun_keeps_the_finished_stages(tmp_path, tiny_run,
                                                                                              ray_head):
    """The storage path turns into a file while the student trains (a lost mount, a deleted bucket): the run ends
    with one line naming cluster.storage_path and the stage, the finished trajectory store stays, and once the storage
    is back the same command reuses it and finishes. From the session's tiny teacher: the stages before the student
    are what is kept, which one trained them does not matter."""
    checkpoints = tmp_path / "checkpoints"
    overrides = [f"teacher.path={tiny_run[0] / 'teacher'}", f"cluster.storage_path={checkpoints}",
                 "student.train.steps=100", "student.train.checkpoint_every=10", "student.train.log_every=5"]
    job = subprocess.Popen(command(tmp_path, ray_head, *overrides), cwd=ROOT, env=ray_head.env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lost, lines = False, []
    for line in job.stdout:
        lines.append(line)
        if not lost and step_at_least("tiny-student", 30)(line):
            shutil.rmtree(checkpoints)
            checkpoints.write_text("the storage is gone")
            lost = True
    stderr = job.stderr.read()
    job.wait(timeout=900)
    assert lost and job.returncode == 1, "".join(lines)[-3000:] + stderr[-3000:]
    # one line from the driver and no traceback of its own (Ray's controller logs its own, "(pid=...)"-prefixed)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.match(rf"error: \[tiny-student\] cluster.storage_path {checkpoints}/tiny-student "
                                         r"stopped taking checkpoints mid-stage \(.*\); the stages published before "
                                         r"are kept", errors[0]), stderr[-3000:]
    assert not [line for line in stderr.splitlines() if line.startswith("Traceback")]
    assert store_finished(tmp_path) and not (tmp_path / "tiny" / "student").exists()

    checkpoints.unlink()  # the storage is back, empty
    again = subprocess.run(command(tmp_path, ray_head, *overrides), cwd=ROOT, env=ray_head.env(), capture_output=True,
                           text=True, timeout=900, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "found, skipping extraction" in again.stdout and "[teacher] extracted" not in again.stdout
    assert (tmp_path / "tiny" / "results.md").is_file() and published(tmp_path / "tiny" / "student")

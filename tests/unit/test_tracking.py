"""MLflow as the runs happened: one parent run per logical run across driver deaths, stale stage runs
closed, no step logged twice after a restart, no credentials in params."""

import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lori_ray.tracking import RUN_KEY_TAG, StepLogger, pipeline_run


def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_restarted_worker_does_not_log_its_replayed_steps_twice(tmp_path):
    uri = store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    before = StepLogger(uri, run_id)
    for step in (5, 10, 15):  # logged, then the worker dies; the checkpoint was at step 10
        before.log({"loss": 1.0 / step}, step)
    before.close()
    after = StepLogger(uri, run_id)
    after.log({"restarts": 1, "resumed_from_step": 10}, 10, replayed_too=True)
    for step in (15, 20):
        after.log({"loss": 0.5 / step}, step)
    after.close()
    assert [m.step for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == [5, 10, 15, 20]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "restarts")] == [(10, 1.0)]
    assert client.get_metric_history(run_id, "loss")[2].value == 1.0 / 15  # the first record of step 15 stays


def test_a_rerun_after_a_dead_driver_continues_its_parent_run_and_closes_what_it_left_running(tmp_path):
    uri = store(tmp_path)
    params = {"seed": 0, "tracking": {"uri": "http://alice:hunter2@mlflow.internal:5000"}}
    with pipeline_run(uri, "lori-ray", "demo", params, "name: demo\n", "/runs/demo") as first:
        with mlflow.start_run(run_name="teacher", nested=True):
            pass
        stale = mlflow.start_run(run_name="student", nested=True).info.run_id  # the driver dies here:
        mlflow.end_run("RUNNING")  # nothing ends the runs (status stays RUNNING)
    client = MlflowClient(uri)
    client.set_terminated(first.info.run_id, "RUNNING")

    with pipeline_run(uri, "lori-ray", "demo", {**params, "eval": {"batch_size": 8}}, "name: demo\n",
                      "/runs/demo") as again:
        pass
    assert again.info.run_id == first.info.run_id  # one parent run for the logical run
    assert client.get_run(stale).info.status == "KILLED"
    found = client.get_experiment_by_name("lori-ray")
    assert found.tags["mlflow.experimentKind"] == "custom_model_development"  # opens in the model-training view
    experiment = found.experiment_id
    parents = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags[RUN_KEY_TAG] == "/runs/demo"
    assert len(parents[0].data.tags["mlflow.source.git.commit"]) == 40  # the checkout the tests run from
    logged = client.get_run(first.info.run_id).data.params
    assert logged["tracking.uri"] == "http://alice:***@mlflow.internal:5000" and logged["eval.batch_size"] == "8"
    with pipeline_run(uri, "lori-ray", "demo", params, "name: demo\n", "/runs/other") as other:
        pass
    assert other.info.run_id != first.info.run_id  # another run directory is another logical run



def test_a_rerun_refused_by_a_finished_stage_leaves_its_parent_run_as_it_was(tmp_path):
    from lori_ray.fingerprint import StageChanged
    uri = store(tmp_path)
    with pipeline_run(uri, "lori-ray", "demo", {"seed": 0}, "name: demo\n", "/runs/demo") as first:
        pass
    client = MlflowClient(uri)
    assert client.get_run(first.info.run_id).info.status == "FINISHED"
    with pytest.raises(StageChanged), pipeline_run(uri, "lori-ray", "demo", {"seed": 0}, "name: demo\n", "/runs/demo"):
        raise StageChanged("stage teacher: trained on other inputs")
    assert client.get_run(first.info.run_id).info.status == "FINISHED"  # not FAILED
    with pytest.raises(RuntimeError), pipeline_run(uri, "lori-ray", "demo", {"seed": 0}, "name: demo\n", "/runs/demo"):
        raise RuntimeError("a run that failed")
    assert client.get_run(first.info.run_id).info.status == "FAILED"  # a real failure still is one


@pytest.mark.parametrize("text, shown", [
    ("http://alice:PASSWORD@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
    ("https://TOKEN@hub.example/org/model", "https://***@hub.example/org/model"),
    ("file:///data/store?secret_key=S&region=eu", "file:///data/store?secret_key=***&region=eu"),
    ("s3://bucket/prefix?access_key=A&token=T", "s3://bucket/prefix?access_key=***&token=***"),
    ("https://acct.blob.core.windows.net/c?sv=2022-11-02&se=2026-12-05&sig=abc%2Bdef",
     "https://acct.blob.core.windows.net/c?sv=2022-11-02&se=2026-12-05&sig=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA/2026&X-Amz-Security-Token=T&X-Amz-Signature=beef",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://storage.googleapis.com/b/o?X-Goog-Signature=abc", "https://storage.googleapis.com/b/o?X-Goog-Signature=***"),
    ("Authorization: Bearer eyJhbGciOi.J9-x_y", "Authorization: Bearer ***"),
    ("s3://bucket/prefix and /plain/path and http://host:5000", "s3://bucket/prefix and /plain/path and http://host:5000"),
])
def test_redact_hides_every_kind_of_credential_and_nothing_else(text, shown):
    from lori_ray.storage import redact
    assert redact(text) == shown
    assert redact(shown) == shown  # idempotent


def test_mlflow_gets_the_credentials_from_its_environment_not_the_uri(monkeypatch):
    from lori_ray.tracking import without_credentials
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert without_credentials("http://alice:p%40ss@127.0.0.1:5000/x") == "http://127.0.0.1:5000/x"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "p@ss")
    assert without_credentials("sqlite:////runs/mlflow.db") == "sqlite:////runs/mlflow.db"


def test_after_the_first_tracking_failure_the_driver_skips_tracking_and_the_run_goes_on(monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    from lori_ray import tracking
    outage = tracking.TrackingOutage()
    monkeypatch.setattr(tracking, "tracked", outage)
    calls = []

    def log_metric(*args):
        calls.append(args)
        raise MlflowException("API request to http://alice:hunter2@mlflow.internal/api failed: Max retries exceeded")

    assert outage(log_metric, "a", 1) is None and outage(log_metric, "b", 2) is None
    assert calls == [("a", 1)]  # the second call waited for nothing
    assert "MLflow stopped answering (log_metric: API request to http://alice:***@mlflow.internal" in \
        capsys.readouterr().err
    with tracking.stage_run("student", {"lr": 1e-3}) as run:  # a stage starts all the same, without its run
        assert run is None
    assert outage.summary().startswith("[tracking] MLflow stopped answering during this run (log_metric: ")
    assert "2 later tracking calls were skipped" in outage.summary()  # the second log_metric, the stage's run
    with pytest.raises(TypeError):  # a programming error is not an outage
        tracking.TrackingOutage()(lambda: None, "unexpected")


def test_the_tracking_probe_tells_a_server_that_answers_from_one_that_is_down_or_refuses_the_credentials(answering):
    from lori_ray.cluster import free_port
    from lori_ray.tracking import server_unanswering
    assert server_unanswering(f"sqlite:///{os.devnull}") is None  # a local store: nothing to probe
    assert server_unanswering(f"http://127.0.0.1:{free_port()}", timeout_s=5) == "ConnectionError"
    with answering(200) as up:
        assert server_unanswering(up.uri) is None
    with answering(404) as other:  # an answer all the same: the server is there
        assert server_unanswering(other.uri) is None
    with answering(401) as refusing:
        assert server_unanswering(refusing.uri.replace("//", "//alice:hunter2@")).startswith(
            "HTTP 401: the credentials are refused")


def test_a_tracking_store_failing_as_the_run_opens_is_one_error_before_any_work(monkeypatch):
    from lori_ray.cluster import free_port
    from lori_ray.tracking import TrackingUnavailable
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri sets it: undone after
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    entered = []
    refused = pytest.raises(TrackingUnavailable, match=r"the MLflow tracking store at http://127.0.0.1:\d+ did not "
                                                        r"answer as the run started \(.*\); nothing was trained")
    with refused, pipeline_run(f"http://alice:hunter2@127.0.0.1:{free_port()}", "lori-ray", "demo", {}, "", "/x"):
        entered.append(True)
    mlflow.set_tracking_uri(None)  # the dead server is not the next test's default
    assert not entered and mlflow.active_run() is None


def test_per_run_constants_are_params_of_the_stage_run_not_step_metrics(tmp_path):
    uri = store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    logger = StepLogger(uri, run_id)
    logger.log_params({"workers": 2, "threads_per_worker": 1})
    logger.log({"loss": 0.5}, 10)
    logger.close()
    logger = StepLogger(uri, run_id)  # a restarted worker: the same params again are accepted
    logger.log_params({"workers": 2, "threads_per_worker": 1})
    logger.close()
    run = client.get_run(run_id)
    assert run.data.params == {"workers": "2", "threads_per_worker": "1"} and logger.failed == 0
    assert set(run.data.metrics) == {"loss"}


def test_a_logged_models_requirements_install_on_a_gpu_machine():
    """The local version label of a CPU or CUDA wheel (``+cpu``, ``+cu130``) pins an index pip does not search by
    default; the public version installs everywhere."""
    from lori_ray.tracking import pip_requirements
    assert pip_requirements({"torch": "2.13.0+cpu", "transformers": "5.25.0", "numpy": "2.3.1+cu130"}) == [
        "torch==2.13.0", "transformers==5.25.0", "numpy==2.3.1"]

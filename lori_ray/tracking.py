"""MLflow tracking: one parent run per pipeline, a nested run per stage, step metrics from rank 0."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from unittest import mock
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
import requests
from mlflow.entities import LoggedModelOutput, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from transformers import AutoModelForCausalLM, AutoTokenizer

from .fingerprint import StageChanged
from .storage import redact


def quiet_mlflow() -> None:
    """MLflow announces creating and migrating its sqlite store at INFO on every run; ``LORI_VERBOSE=1`` keeps it.
    Called where a process starts tracking (``pipeline_run``, ``StepLogger``, ``stage_history``)."""
    if os.environ.get("LORI_VERBOSE") != "1":
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


class TrackingOutage:
    """The driver's MLflow calls once the tracking server has stopped answering: the first failure is reported
    and every later call is skipped, so a run whose server went away mid-run still trains, evaluates and writes
    its results to disk (``results.md``, ``report.json``) instead of waiting out MLflow's retries (about four
    minutes a request with its defaults) at every call, or dying between two stages. A programming error (a
    ``TypeError``, ...) is not an outage and still raises."""

    def __init__(self):
        self.error: str | None = None
        self.skipped: list[str] = []

    def __call__(self, call, *args, **kwargs):
        """``call(*args, **kwargs)``, or None when tracking is out (now or since an earlier failure)."""
        name = getattr(call, "__name__", str(call))
        if self.error is not None:
            self.skipped.append(name)
            return None
        try:
            return call(*args, **kwargs)
        except OUTAGES as error:
            self.error = f"{name}: {redact(str(error).strip().splitlines()[0] if str(error).strip() else repr(error))}"
            print(f"[tracking] WARNING: MLflow stopped answering ({self.error}); the run goes on without tracking, "
                  "its results are written to the run directory", file=sys.stderr, flush=True)
            return None

    def summary(self) -> str | None:
        """One line for the end of a run that lost its tracking, else None."""
        if self.error is None:
            return None
        return (f"[tracking] MLflow stopped answering during this run ({self.error}); {len(self.skipped)} later "
                "tracking calls were skipped; the models and results are in the run directory (results.md, "
                "report.json)")


class TrackingUnavailable(RuntimeError):
    """The tracking store failed as a run opened its parent run: nothing has been trained yet."""


OUTAGES = (MlflowException, requests.RequestException, ConnectionError, TimeoutError)
tracked = TrackingOutage()  # one per process: an outage is the server's, whichever run or thread meets it


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"a.b": "value"}`` params (MLflow limits values to 6000 characters)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def redacted(params: dict[str, str]) -> dict[str, str]:
    """Params with the credentials of any URI in them replaced by ***."""
    return {k: redact(v) for k, v in params.items()}


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a sqlite store (under the shared output_dir)
    rather than MLflow's default ``./mlruns`` in the driver's working directory, which is local to
    one node; a tracking server chooses its own artifact root (a bucket, or proxied uploads)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None


EXPERIMENT_KIND = "mlflow.experimentKind"
RUN_KEY_TAG = "lori.run_dir"  # which logical run (its run directory) a parent run belongs to


def previous_parent(client: MlflowClient, experiment_id: str, run_dir: str):
    """The latest parent run of the logical run in ``run_dir``, if an earlier driver started one."""
    runs = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_dir}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def close_stale_children(client: MlflowClient, experiment_id: str, parent_id: str) -> list[str]:
    """Stage runs a dead driver left RUNNING under ``parent_id``, ended as KILLED (their ids)."""
    stale = [r.info.run_id for r in client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'")]
    for run_id in stale:
        client.set_tag(run_id, "lori.ended_by", "a rerun found it RUNNING after its driver died")
        client.set_terminated(run_id, "KILLED")
    return stale


def git_commit() -> str | None:
    """The commit of the lori-ray checkout this code runs from (None when installed without git)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def without_credentials(uri: str) -> str:
    """``uri`` without its ``user:password@``, which MLflow takes from MLFLOW_TRACKING_USERNAME/_PASSWORD instead
    (set here for this process): MLflow prints the tracking URI in its own lines ("View run ... at: ...")."""
    parts = urlsplit(uri)
    if not parts.username and not parts.password:
        return uri
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def server_unanswering(uri: str, timeout_s: float = 10.0) -> str | None:
    """Why the MLflow server at an http(s) ``uri`` cannot be used, or None (a local sqlite or file store needs no
    probe): it does not answer within ``timeout_s``, or answers that the credentials (from the URI or MLflow's
    MLFLOW_TRACKING_USERNAME/_PASSWORD/_TOKEN variables) are refused. One request, no retries: MLflow's own
    client would retry for about four minutes before the run's first line."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return None
    username = unquote(parts.username) if parts.username else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = unquote(parts.password) if parts.password else os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    base = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))).rstrip("/")
    try:
        answer = requests.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                              auth=(username, password or "") if username else None,
                              headers={"Authorization": f"Bearer {token}"} if token and not username else None,
                              timeout=timeout_s)
    except requests.RequestException as error:
        return f"no answer within {timeout_s:g} s" if isinstance(error, requests.Timeout) else type(error).__name__
    if answer.status_code in (401, 403):
        return (f"HTTP {answer.status_code}: the credentials are refused (MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)")
    return None


@contextlib.contextmanager
def pipeline_run(uri: str, experiment: str, name: str, params: dict, config_yaml: str, run_dir: str):
    """The parent run of the logical run in ``run_dir``: a rerun (after a dead driver, or to evaluate again)
    continues it, and ends as KILLED the stage runs its dead driver left RUNNING."""
    quiet_mlflow()
    uri = without_credentials(uri)
    mlflow.set_tracking_uri(uri)
    # the server must answer here, before any work: a run that cannot track at all is refused at its start
    try:
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=artifact_location(uri))
        found = mlflow.set_experiment(experiment)
        experiment_id = found.experiment_id
        client = MlflowClient(uri)
        if EXPERIMENT_KIND not in found.tags:  # MLflow 3 opens an untagged experiment in its GenAI view
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, "custom_model_development")
        previous = previous_parent(client, experiment_id, run_dir)
        if previous:
            close_stale_children(client, experiment_id, previous.info.run_id)
        tags = {RUN_KEY_TAG: run_dir, **({"mlflow.source.git.commit": commit} if (commit := git_commit()) else {})}
        run = mlflow.start_run(run_id=previous.info.run_id if previous else None,
                               run_name=None if previous else name, tags=tags)
    except OUTAGES as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrackingUnavailable(f"the MLflow tracking store at {redact(uri)} did not answer as the run started "
                                  f"({redact(first_line)}); nothing was trained") from error
    try:
        logged = previous.data.params if previous else {}
        # a rerun may change eval, tracking or cluster settings; MLflow keeps a param's first value
        mlflow.log_params({k: v for k, v in redacted(flatten(params)).items() if k not in logged})
        mlflow.log_text(redact(config_yaml), "config.yaml")
        yield run
    except StageChanged:  # a rerun refused by a finished stage leaves its parent run as it was, not FAILED
        end_run(previous.info.status if previous else "FAILED")
        raise
    except BaseException:
        end_run("FAILED")
        raise
    else:
        end_run()
    finally:
        if tracked.summary():
            print(tracked.summary(), file=sys.stderr, flush=True)


def end_run(status: str = "FINISHED") -> None:
    """``mlflow.end_run`` through ``tracked``. While tracking is out the run only leaves MLflow's stack of active
    runs, with no request: MLflow ends whatever is left on it at the process's exit, and would wait out its retries
    there. (MLflow's own ``end_run`` takes the run off the stack before its request, so a failing one does too.)"""
    if tracked.error is None:
        tracked(mlflow.end_run, status)
        return
    from mlflow.tracking import fluent  # MLflow's internals, only on this rare path
    stack = fluent._active_run_stack.get()  # no public way to forget an active run without ending it
    if stack:
        stack.pop()
    tracked.skipped.append("end_run")


class PlainQuestions(mlflow.pyfunc.PythonModel):
    """A model directory a run wrote, served by MLflow: questions as people write them in (a list of strings,
    or a one-column DataFrame), answers out, through ``lori_ray.predict.Predictor``."""

    # the inputs are checked by the signature log_model gives; without this pyfunc wraps predict for type-hint
    # validation and warns, in every process that imports this module (each Ray worker's log), that it has none
    _skip_type_hint_validation = True

    def load_context(self, context):
        from .predict import Predictor  # in the serving process, as MLflow loads the model
        self.predictor = Predictor(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        questions = model_input.iloc[:, 0] if hasattr(model_input, "columns") else model_input
        return self.predictor([str(q) for q in questions])


def pip_requirements(versions: dict[str, str]) -> list[str]:
    """Pins for a logged model's environment, without a local version label: ``torch==2.13.0+cpu`` only installs
    from PyTorch's CPU index, ``torch==2.13.0`` on a GPU machine too (its default build)."""
    return [f"{package}=={found.split('+')[0]}" for package, found in versions.items()]


def stage_run_id(name: str) -> str | None:
    """The latest nested run called ``name`` under the active parent run (a stage this driver skipped because an
    earlier driver of the same logical run finished it has its run from then)."""
    parent = mlflow.active_run()
    if parent is None:
        return None
    runs = MlflowClient().search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                      f"attributes.run_name = '{name}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def log_model(name: str, directory: Path) -> dict[str, str]:
    """``directory`` (with its ``lori-model.json``) as two MLflow models on the active (parent) run, each listed on
    the stage run that trained it (``name``) too; their URIs by flavour:

    - ``pyfunc``: plain questions in, answers out through ``lori_ray.predict.Predictor`` (the latent slots, the
      answer's parsing), carrying this package's code so ``mlflow.pyfunc.load_model`` works where lori-ray is not
      installed; the model as code (mlflow_model.py), nothing pickled;
    - ``transformers``: the HF model and tokenizer as a ``text-generation`` pipeline
      (``mlflow.transformers.load_model``), for serving stacks built on that flavour; prompts as the model card
      shows them (the latent slots are part of the prompt)."""
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))
    requirements = pip_requirements({package: version(package) for package in
                                     ("torch", "transformers", "safetensors", "tokenizers", "numpy", "pandas")})
    # no per-file progress bars in the job log; pyfunc's notes on type hints and on the environment it cannot
    # infer, and the transformers flavour's on the hub card and licence a local model has not, are not for users
    quiet = logging.getLogger("mlflow.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            warnings.simplefilter("ignore")
            served = mlflow.pyfunc.log_model(
                name=name, python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={"model": str(directory)}, code_paths=[str(Path(__file__).parent)], signature=signature,
                pip_requirements=requirements)
            components = {"model": AutoModelForCausalLM.from_pretrained(directory),
                          "tokenizer": AutoTokenizer.from_pretrained(directory)}
            pipeline = mlflow.transformers.log_model(transformers_model=components, name=f"{name}-transformers",
                                                     task="text-generation", pip_requirements=requirements)
    finally:
        quiet.setLevel(level)
    stage = stage_run_id(name)
    if stage:
        MlflowClient().log_outputs(stage, [LoggedModelOutput(served.model_id, 0),
                                           LoggedModelOutput(pipeline.model_id, 0)])
    return {"pyfunc": served.model_uri, "transformers": pipeline.model_uri}


@contextlib.contextmanager
def stage_run(name: str, params: dict | None = None):
    """A nested MLflow run for a stage; None while tracking is out (``tracked``), and the stage runs all the same."""
    run = tracked(mlflow.start_run, run_name=name, nested=True)
    if run is None:
        yield None
        return
    try:
        if params:
            tracked(mlflow.log_params, flatten(params))
        yield run
    except BaseException:
        end_run("FAILED")
        raise
    end_run()


class StepLogger:
    """Logs step metrics to an existing run from a thread of its own: a tracking server that stops answering (MLflow
    retries each request for minutes) never holds up a training step. A failure warns once and training goes on;
    while the server is away at most ``QUEUE_LIMIT`` intervals wait, later ones are dropped and counted. Steps the
    run already holds (logged before a worker died and replayed after its restart) are not logged twice."""

    QUEUE_LIMIT = 10_000

    def __init__(self, uri: str, run_id: str):
        quiet_mlflow()
        self.client = MlflowClient(without_credentials(uri))
        self.run_id = run_id
        self.failed = self.dropped = 0
        self.logged_through: int | None = None  # read by the thread before its first request
        self.queue: queue.Queue = queue.Queue(maxsize=self.QUEUE_LIMIT)
        self.thread = threading.Thread(target=self._send_all, name="lori-step-logger", daemon=True)
        self.thread.start()

    def log(self, metrics: dict[str, float], step: int, replayed_too: bool = False) -> None:
        """Queue ``metrics`` at ``step`` and return at once. ``replayed_too``: log even at a step the run already
        holds (the restart record itself)."""
        try:
            self.queue.put_nowait((dict(metrics), step, replayed_too, int(time.time() * 1000)))
        except queue.Full:
            self.dropped += 1

    def log_params(self, params: dict[str, object]) -> None:
        """Queue the stage's per-run constants (threads per worker, ...): params of its run, not per-step metrics."""
        try:
            self.queue.put_nowait((dict(params), None, True, 0))
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 30.0) -> None:
        """Send what is queued, waiting at most ``timeout_s`` (the thread is a daemon: what is left dies with the
        worker)."""
        try:
            self.queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self.thread.join(timeout_s)

    def _send_all(self) -> None:
        try:
            self.logged_through = max((m.step for m in self.client.get_metric_history(self.run_id, "loss")),
                                      default=-1)
        except Exception:  # noqa: BLE001 - tracking must never stop training
            self.logged_through = -1
        while (item := self.queue.get()) is not None:
            self._send(*item)

    def _send(self, metrics: dict[str, float], step: int | None, replayed_too: bool, timestamp: int) -> None:
        if step is not None and step <= self.logged_through and not replayed_too:
            return
        try:
            if step is None:  # params (a restarted worker logs the same values again, which MLflow accepts)
                self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in metrics.items()])
            else:
                self.client.log_batch(self.run_id, [Metric(k, float(v), timestamp, step) for k, v in metrics.items()])
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            self.failed += 1
            if self.failed == 1:
                warnings.warn(f"MLflow logging to run {self.run_id} failed, training continues "
                              f"(further failures are counted, not shown): {redact(str(error))}",
                              stacklevel=1)  # the logging thread's own loop: no caller of ours to point at
                print(f"[tracking] WARNING: MLflow logging failed: {redact(str(error))}", file=sys.stderr, flush=True)


def stage_history(uri: str, experiment: str, run_name: str, stage: str, metric: str) -> list[tuple[int, float, float]]:
    """``metric`` of the latest ``stage`` run under a pipeline run named ``run_name``, as (step, minutes since
    the stage started, value): a learning curve against steps and against wall-clock."""
    quiet_mlflow()
    client = MlflowClient(without_credentials(uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    parents = {r.info.run_id for r in client.search_runs([found.experiment_id],
                                                         f"tags.mlflow.runName = '{run_name}'")}
    stages = [r for r in client.search_runs([found.experiment_id], f"tags.mlflow.runName = '{stage}'",
                                            order_by=["attributes.start_time DESC"])
              if r.data.tags.get("mlflow.parentRunId") in parents and metric in r.data.metrics]
    if not stages:
        return []
    run = stages[0]
    history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
    return [(m.step, (m.timestamp - run.info.start_time) / 60000, m.value) for m in history]

"""Ray Tune search over the student's hyperparameters (rank, λ1, λ2, K, aligned layers).

The teacher and the trajectory store are prepared once, at ``subspace.max_rank``, before any
trial starts; each trial reads the store (a rank-r trial uses the leading r coordinates), builds
its student tensors and trains them with a ``TorchTrainer`` whose reports reach Tune through
``TuneReportCallback``. MLflow: one parent run for the search, one nested run per trial.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import ray
from matplotlib.figure import Figure
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from . import storage
from .config import Config, with_overrides
from .driver import fit
from .recipe import opened
from .stages import log
from .stages.evaluate import describe_models, evaluate_model
from .stages.student import latent_slots, student_stage
from .stages.teacher_sft import teacher_sft
from .stages.training import make_stage
from .stages.trajectories import trajectory_stage
from .storage import published_directory
from .tracking import tracked, without_credentials
from .trajectories import TrajectoryStore


def search_space(space: dict[str, dict[str, list]]) -> dict:
    """The YAML space (``{key: {choice: [...]}}``) as Tune distributions, keyed by dotted config field."""
    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def max_concurrent_trials(config: Config) -> int:
    """As many trials as the cluster has CPUs for all their workers at once: more would only wait."""
    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // max(config.student.train.num_workers, 1)))


def trial_config(config: Config, params: dict, trial_id: str, teacher_dir: Path) -> Config:
    train = config.student.train
    return with_overrides(config, {
        **params, "name": trial_id, "output_dir": str(config.run_dir / "trials"), "teacher.path": str(teacher_dir),
        "trajectory.store_dir": str(config.store_dir),
        "student.train.eval_every": train.log_every,  # every report carries the metric ASHA compares
    })


def make_trial(config: Config, teacher_dir: Path, splits, store_uri: str):
    def trial(params: dict) -> None:
        trial_id = tune.get_context().get_trial_id()
        settings = trial_config(config, params, trial_id, teacher_dir)
        init, data, fields = student_stage(settings, teacher_dir, splits, TrajectoryStore(store_uri))
        stage = make_stage(settings, "student", init, data, settings.student.train, **fields)
        fit(stage, settings.run_dir / "student", settings.storage_path, callbacks=[TuneReportCallback()],
            wait_minutes=settings.cluster.wait_minutes)
    return trial


def summary_table(rows: list[dict], keys: list[str], metric: str) -> str:
    """One line per trial: its parameters, its last reported metric, whether it ran to the end or was stopped
    early, and its held-out accuracy where it was evaluated."""
    lines = ["| trial | " + " | ".join(keys) + f" | {metric} | finished | held-out |", "|---" * (len(keys) + 4) + "|"]
    for row in rows:
        values = [f"{row['params'].get(k):.4g}" if isinstance(row["params"].get(k), float)
                  else str(row["params"].get(k)) for k in keys]
        held_out = f"{row['held_out']:.3f}" if "held_out" in row else "–"
        lines.append(f"| {row['trial']} | " + " | ".join(values) + f" | {row['metric']:.4f} | "
                     f"{'yes' if row['checkpoint'] else 'stopped'} | {held_out} |")
    return "\n".join(lines)


def accuracy_by_rank_figure(rows: list[dict], default_rank: int, metric: str) -> Figure:
    figure = Figure(figsize=(5, 4))
    axes = figure.subplots()
    axes.scatter([row["params"].get("subspace.rank", default_rank) for row in rows], [row["metric"] for row in rows])
    axes.set(xlabel="subspace rank r", ylabel=metric, title="Tune trials: accuracy vs rank")
    return figure


def trial_checkpoint(config: Config, row: dict) -> Checkpoint:
    """A trial's final checkpoint, on the storage filesystem (an object store: downloaded when opened)."""
    return Checkpoint(row["checkpoint"], storage.resolve(config.storage_path)[0])


def held_out_accuracy(config: Config, row: dict, splits) -> float:
    """Exact match of a finished trial's student on the held-out split (never seen by the search)."""
    settings = with_overrides(config, row["params"])
    with trial_checkpoint(config, row).as_directory() as directory:
        return evaluate_model(settings, Path(directory) / "hf", {"held-out": splits.held_out},
                              slots=latent_slots(settings))["held-out"].accuracy


def log_on_trial_run(uri: str, parent_id: str, trial_id: str, metrics: dict[str, float]) -> None:
    """``metrics`` on the nested MLflow run ``MLflowLoggerCallback`` made for the trial (named for its id)."""
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    for run in runs:
        if run.data.tags.get("trial_name", "").endswith(trial_id):
            for key, value in metrics.items():
                tracked(client.log_metric, run.info.run_id, key, value)


def publish_best(config: Config, best: dict, teacher_dir: Path, splits, table: str) -> Path:
    """The best trial's student as ``<run>/best-student``: an HF directory with its prompt contract and model
    card, what ``lori_ray.predict`` and ``AutoModelForCausalLM`` load."""
    settings = with_overrides(config, best["params"])
    student_dir = config.run_dir / "best-student"
    with trial_checkpoint(config, best).as_directory() as directory, published_directory(student_dir) as staging:
        shutil.copytree(Path(directory) / "hf", staging, dirs_exist_ok=True)
    describe_models(settings.model_copy(update={"teacher": settings.teacher.model_copy(
        update={"path": str(teacher_dir)})}), teacher_dir, student_dir, splits.train, table)
    return student_dir


def run_search(config: Config) -> dict:
    """Teacher and store once, then the Tune search; returns the best trial's summary, with every trial's
    row (parameters, metric, checkpoint, held-out accuracy where ``tune.evaluate`` scored it) under ``rows``."""
    uri, metric = without_credentials(config.tracking_uri()), config.tune.metric
    with opened(config) as (splits, parent):
        teacher_dir = teacher_sft(config, splits)
        store = trajectory_stage(config, teacher_dir, splits.train)

        # a trial only drives its TorchTrainer: no CPU of its own (a bundle may not be empty, hence 1 MiB memory)
        trainable = tune.with_resources(make_trial(config, teacher_dir, splits, store.uri),
                                        {"cpu": 0, "memory": 1 << 20})
        path = config.run_dir / "tune" / "search"
        if tune.Tuner.can_restore(path):
            log(f"[tune] resuming the search in {path}")
            tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
        else:
            scheduler = (ASHAScheduler(grace_period=config.tune.grace_period, time_attr="training_iteration")
                         if config.tune.scheduler == "asha" else FIFOScheduler())
            search_alg = None
            if config.tune.search == "optuna":
                from ray.tune.search.optuna import OptunaSearch  # needs optuna, only for this search
                search_alg = OptunaSearch()
            concurrent = max_concurrent_trials(config)
            log(f"[tune] {config.tune.trials} trials, at most {concurrent} at a time")
            tuner = tune.Tuner(
                trainable, param_space=search_space(config.tune.space),
                tune_config=tune.TuneConfig(metric=metric, mode=config.tune.mode, num_samples=config.tune.num_samples,
                                            scheduler=scheduler, search_alg=search_alg,
                                            max_concurrent_trials=concurrent),
                run_config=tune.RunConfig(
                    name="search", storage_path=str(config.run_dir / "tune"),
                    callbacks=[MLflowLoggerCallback(tracking_uri=uri, experiment_name=config.tracking.experiment,
                                                    tags={"mlflow.parentRunId": parent.info.run_id})]))
        grid = tuner.fit()

        rows = sorted(({"trial": r.metrics.get("trial_id"), "params": r.config,
                        "metric": r.metrics.get(metric, float("nan")), "checkpoint": r.metrics.get("checkpoint_path")}
                       for r in grid if r.metrics),
                      key=lambda row: row["metric"], reverse=config.tune.mode == "max")
        finished = [row for row in rows if row["checkpoint"]]  # trials ASHA stopped early have no final model
        for row in finished if config.tune.evaluate == "all" else finished[:1]:
            row["held_out"] = held_out_accuracy(config, row, splits)
            # on the trial's own run too, beside its parameters: MLflow's parallel-coordinates view reads both
            log_on_trial_run(uri, parent.info.run_id, row["trial"], {"held_out_accuracy": row["held_out"]})
        table = summary_table(rows, list(config.tune.space), metric)
        print("\n" + table, flush=True)
        tracked(mlflow.log_text, table, "tune_summary.md")
        tracked(mlflow.log_figure, accuracy_by_rank_figure(rows, config.subspace.rank, metric), "accuracy_vs_rank.png")
        best = finished[0]
        student_dir = publish_best(config, best, teacher_dir, splits, table)
        summary = {**best, "held_out_accuracy": best["held_out"], "trials": len(rows), "student": str(student_dir)}
        tracked(mlflow.log_dict, summary, "best_trial.json")
        tracked(mlflow.log_metrics, {f"best_{metric}": best["metric"], "best_held_out_accuracy": best["held_out"]})
        tracked(mlflow.set_tag, "best_checkpoint", best["checkpoint"])
        log(f"[tune] best trial {best['trial']}: {metric}={best['metric']:.4f}, held-out accuracy "
            f"{best['held_out']:.4f}, params {json.dumps(best['params'])}")
        log(f"[tune] its student: {student_dir} (python -m lori_ray.predict {student_dir} \"<question>\")")
    return {**summary, "rows": rows}

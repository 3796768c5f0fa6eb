"""The distillation recipe: data → teacher SFT → trajectory store → LoRi student → evaluation.

Each stage is a plain function; finished stages are found on disk and skipped, so rerunning a
run with the same name continues where it stopped.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import mlflow

from . import storage
from .config import Config
from .driver import DRIVER_TURNS
from .evaluate import EvalResult
from .preflight import Splits, load_data, shared_teacher_path
from .stages import log
from .stages.evaluate import (
    REPORT_FILE,
    Report,
    describe_models,
    erank_diagnostics,
    evaluate_model,
    evaluation_inputs,
    save_report,
    saved_report,
)
from .stages.student import distill_student, latent_slots
from .stages.teacher_sft import completed_train, teacher_sft
from .stages.training import forget_stage, restart_later
from .stages.trajectories import trajectory_stage
from .storage import write_local
from .tracking import log_model, pipeline_run, stage_run, tracked

STAGES = ("teacher", "student")


def forget_stages(config: Config, first: str) -> list[Path]:
    """Delete the outputs of stage ``first`` and every later one at once, so they train again."""
    return [removed for name in STAGES[STAGES.index(first):] for removed in forget_stage(config, name)]


def restart_from(config: Config, first: str) -> None:
    """``--restart-from``: stage ``first`` and every later one train again, each one's outputs deleted as it
    starts, so the checks of the stages before it (a teacher trained on other inputs) come first and a refused
    rerun loses nothing."""
    restart_later(config, STAGES[STAGES.index(first):])
    log(f"[{first}] --restart-from {first}: {', '.join(STAGES[STAGES.index(first):])} train again (their outputs "
        f"are removed as each starts)")


@contextmanager
def opened(config: Config) -> Iterator[tuple[Splits, mlflow.ActiveRun]]:
    """What every run does first (``run``, ``tuning.run_search``): its directory with the resolved config, its data
    splits, and its MLflow parent run (the same one again on a rerun), open for the stages."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    write_local(config.run_dir / "config.yaml", storage.redact(config.to_yaml()))  # no credential on disk
    splits = load_data(config)
    log(f"[data] {len(splits.train)} training, {len(splits.val)} validation and {len(splits.held_out)} "
        "held-out examples")
    with pipeline_run(config.tracking_uri(), config.tracking.experiment, config.name,
                      config.model_dump(mode="json"), config.to_yaml(), str(config.run_dir)) as parent:
        log(f"[tracking] MLflow run {parent.info.run_id} at {storage.redact(config.tracking_uri())}")
        yield splits, parent


def run(config: Config, teacher_result: EvalResult | None = None, on_store=None) -> Report:
    """All stages of one distillation run; Ray must already be initialised.

    ``teacher_result``: the teacher's evaluation when the caller already has it (same teacher, same split).
    ``on_store``: called once the teacher and the trajectory store are on disk (runs sharing them may start).
    """
    with opened(config) as (splits, _parent):
        teacher_dir = teacher_sft(config, splits)
        if config.teacher.complete_cots:
            splits = splits._replace(train=completed_train(config, teacher_dir, splits.train))
        store = trajectory_stage(config, teacher_dir, splits.train)
        if on_store:
            on_store()
        init_dir, student_dir = distill_student(config, teacher_dir, splits, store)
        evaluated = {"held-out": splits.held_out, "training": splits.train[:len(splits.held_out)]}
        inputs = evaluation_inputs(config, teacher_dir, student_dir, evaluated)
        saved = saved_report(config, inputs)
        if saved:  # a rerun of a finished run (a benchmark continued after a stop): its results as they were
            log(f"[eval] {config.name}: evaluated before on the same models and problems, results from "
                f"{config.run_dir / REPORT_FILE}")
            return saved
        erank = erank_diagnostics(config, teacher_dir, init_dir, student_dir, splits.train)
        with stage_run("evaluate"):
            teacher_result = teacher_result or evaluate_model(config, teacher_dir, {"held-out": splits.held_out},
                                                              slots=None)["held-out"]
            student = evaluate_model(config, student_dir, evaluated, slots=latent_slots(config))
            student_result, student_train = student["held-out"], student["training"]
            report = Report(teacher_result, student_result,
                            store.subspace().explained_variance(config.subspace.rank).mean().item(),
                            config.subspace.rank, config.student.method, erank, student_train)
            metrics = {**teacher_result.as_metrics("teacher"), **student_result.as_metrics("student"),
                       **student_train.as_metrics("student_train"), "explained_variance": report.explained_variance}
            tracked(mlflow.log_metrics, metrics)
        tracked(mlflow.log_metrics, metrics)  # on the parent run too: one place to compare runs
        tracked(mlflow.log_text, report.table(), "results.md")
        write_local(config.run_dir / "results.md", report.table() + "\n")
        describe_models(config, teacher_dir, student_dir, splits.train, report.table())
        if config.tracking.log_models:
            trained_here = [("student", student_dir)] + ([] if config.teacher.path else [("teacher", teacher_dir)])
            for name, directory in trained_here:
                logged = tracked(log_model, name, directory)
                if logged:
                    log(f"[tracking] {name} logged as an MLflow model: {logged['pyfunc']} (pyfunc: plain questions "
                        f"in, answers out), {logged['transformers']} (transformers: the text-generation pipeline)")
        save_report(config, report, inputs)  # last: a run stopped before this point evaluates (and logs) again
    return report


def run_sharing_teacher(configs: dict, parallel: int = 1) -> dict:
    """``run`` for each config (benchmarks comparing students): the first run trains the teacher (unless
    ``teacher.path`` is set) and builds the trajectory store; every other run reuses both and logs to the first
    one's MLflow store, so one UI compares them all. ``parallel`` > 1: that many runs at once, the others
    starting as soon as the first run's store is built (each Ray Train stage must fit the cluster beside the
    others: fewer workers, or fractional ``cluster.gpus_per_worker``); one at a time, later runs also reuse the
    first one's held-out evaluation of the teacher."""
    tracking_uri = next(iter(configs.values())).tracking_uri()
    # copies: the caller's configs stay as they were given
    configs = {key: with_updates(config, "tracking", uri=config.tracking.uri or tracking_uri)
               for key, config in configs.items()}
    first = next(iter(configs.values()))
    if parallel <= 1:
        reports, teacher_result = {}, None
        for key, config in configs.items():
            if config is not first:
                config = with_updates(config, "teacher", path=shared_teacher_path(first))
            reports[key] = run(config, teacher_result)
            teacher_result = reports[key].teacher
        return reports
    shared_ready = threading.Event()

    def after_first(config: Config) -> Report:
        shared_ready.wait()
        if not Path(shared_teacher_path(first)).is_dir():
            raise RuntimeError(f"{config.name}: not started, the first run ({first.name}) failed before its teacher "
                               f"and trajectory store were built")
        with DRIVER_TURNS.turn():
            return run(with_updates(config, "teacher", path=shared_teacher_path(first)))

    def first_run() -> Report:
        try:
            with DRIVER_TURNS.turn():
                return run(first, on_store=shared_ready.set)
        finally:
            shared_ready.set()

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {key: pool.submit(first_run) if config is first else pool.submit(after_first, config)
                   for key, config in configs.items()}
    reports, failed = {}, {}
    for key, future in futures.items():
        if future.exception() is None:
            reports[key] = future.result()
        else:  # the other runs' results stay: one failed student must not cost the whole benchmark
            failed[key] = future.exception()
            log("".join(traceback.format_exception(failed[key])).rstrip())
    if failed:
        raise RunsFailed(reports, failed)
    return reports


def with_updates(config: Config, section: str, **fields) -> Config:
    """A copy of ``config`` whose ``section`` has ``fields`` changed (``config`` and its sections are left as
    they are)."""
    return config.model_copy(update={section: getattr(config, section).model_copy(update=fields)})


class RunsFailed(RuntimeError):
    """Some of the runs sharing a teacher failed; ``reports`` holds the others'."""

    def __init__(self, reports: dict, failed: dict):
        self.reports, self.failed = reports, failed
        super().__init__("; ".join(f"{configs_name(key)} failed: {type(error).__name__}: {error}"
                                   for key, error in failed.items()))


def configs_name(key) -> str:
    return "-".join(map(str, key)) if isinstance(key, tuple) else str(key)

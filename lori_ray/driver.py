"""The driver side of a training stage: ``fit`` runs a ``worker.Stage`` under Ray Train (its workers run
``worker.train_loop``) and publishes the trained model; ``DRIVER_TURNS`` lets runs that share one driver take
turns at the driver-side work.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from . import storage
from .cluster import answers_state_queries, wait_for_resources
from .fingerprint import stage_inputs, write_fingerprint
from .storage import published_directory
from .worker import Stage, train_loop

MAX_FAILURES = 1  # Ray Train restarts a failed stage once, from its newest complete checkpoint
CHECKPOINTS_KEPT = 2  # per stage in storage: the newest and, should it be incomplete, the one before it
WORKER_ENV = {  # DS_ACCELERATOR is not here: each worker sets it, from the GPUs Ray gave it (``worker``)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # otherwise every worker print reaches the driver twice
    **({"LORI_VERBOSE": "1"} if os.environ.get("LORI_VERBOSE") == "1" else {}),
}


class DriverTurns:
    """The driver-side work of runs sharing one driver (``recipe.run_sharing_teacher``) one run at a time:
    Hugging Face's model loading patches torch globally (its empty-weights context), so threads cannot build
    models side by side. A run gives its turn away while Ray Train runs its stage, the long part."""

    def __init__(self):
        self._lock, self._mine = threading.Lock(), threading.local()

    @contextmanager
    def turn(self):
        with self._lock:
            self._mine.held = True
            try:
                yield
            finally:
                self._mine.held = False

    @contextmanager
    def away(self):
        """Let another run have the turn meanwhile, if this thread holds it."""
        if not getattr(self._mine, "held", False):
            yield
            return
        self._mine.held = False
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._mine.held = True


DRIVER_TURNS = DriverTurns()


class StageTrainer(TorchTrainer):
    """Ray's ``TorchTrainer``, less Ray Train's placement-group cleaner on a cluster without a State API (no
    dashboard: a minimal Ray, ``include_dashboard=False``). The cleaner asks the State API every second whether the
    stage's controller lives and takes no answer for "dead": it removes the running stage's placement group and the
    workers die ("Destroying worker since its placement group was removed"). Whether the group exists by its first
    question is a race, lost under load. The cleaner only matters when a controller dies uncleanly; a local
    cluster's ``reaper`` ends the whole cluster then."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if answers_state_queries():
            return callbacks
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


class StorageLost(RuntimeError):
    """The checkpoint storage stopped answering while a stage trained."""


def fit(stage: Stage, output_dir: str | Path, storage_path: str | Path, callbacks: list | None = None,
        fingerprint: dict[str, str] | None = None, wait_minutes: float | None = None) -> tuple[Path, dict]:
    """Run the stage under Ray Train and publish the trained HF model at ``output_dir`` whole, with the
    ``fingerprint`` of its inputs (``fingerprint.stage_inputs``) inside. The workers' resources are waited for
    first, up to ``wait_minutes`` (``cluster.wait_for_resources``)."""
    root = storage.join(storage.absolute(str(storage_path)), stage.name)
    # the key lives in the driver's memory (or the run directory, see ``checkpoints.run_key``); only the
    # signatures travel
    stage = replace(stage, checkpoint_key=stage.checkpoint_key or secrets.token_hex(32),
                    checkpoint_root=root if storage.scheme(root) == "" else None)
    trainer = StageTrainer(
        train_loop,
        train_loop_config=asdict(stage),
        scaling_config=ScalingConfig(num_workers=stage.train.num_workers, use_gpu=stage.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": stage.train.cpus_per_worker,
                                                           **({"GPU": stage.gpus_per_worker}
                                                              if stage.gpus_per_worker > 0 else {})}),
        run_config=RunConfig(name=stage.name, storage_path=str(storage_path),
                             worker_runtime_env={"env_vars": WORKER_ENV},
                             failure_config=FailureConfig(max_failures=MAX_FAILURES),
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT), callbacks=callbacks),
    )
    workers = stage.train.num_workers
    with DRIVER_TURNS.away():
        wait_for_resources(stage.name, {"CPU": workers * stage.train.cpus_per_worker,
                                        "GPU": workers * stage.gpus_per_worker}, wait_minutes)
        try:
            result = trainer.fit()
        except Exception as error:
            # Ray Train reports a storage that went away mid-stage as a controller or worker error (after its
            # retry); asked again, the storage says whether that is what happened
            if why := storage.unreachable(root, timeout_s=30):
                raise StorageLost(f"[{stage.name}] cluster.storage_path {storage.redact(root)} stopped taking "
                                  f"checkpoints mid-stage ({storage.redact(why)}); the stages published before "
                                  f"are kept. Run the same command again once it is back: the stage resumes "
                                  f"from its newest complete checkpoint there, if one is left") from error
            raise
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name} finished without a checkpoint")
    output_dir = Path(output_dir)
    with result.checkpoint.as_directory() as directory, published_directory(output_dir) as staging:
        shutil.copytree(Path(directory) / "hf", staging, dirs_exist_ok=True)
        write_fingerprint(staging, fingerprint or stage_inputs(stage))
    if not stage.train.num_workers:  # Ray Train's local mode hands back the loop's own temporary directory
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    return output_dir, dict(result.metrics or {})

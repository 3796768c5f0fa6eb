"""The trajectory store: the teacher actors' pass over the training data, its subspace logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow

from ..cluster import gpus
from ..config import Config
from ..data import Example
from ..plots import spectrum_figure, spectrum_summary
from ..progress import bars_wanted
from ..teacher_pool import build_store
from ..tracking import stage_run, tracked
from . import log
from .training import model_shape_of


def trajectory_segments(config: Config) -> str:
    """What one unit of the stored trajectories averages (``Layout.segments``): codi's target is the
    teacher's state at ``####``; every other method reads ``trajectory.segments``."""
    return "separator" if config.student.spec.site(config.loss.align_at) == "separator" else config.trajectory.segments


def trajectory_stage(config: Config, teacher_dir: Path, train: list[Example]):
    """Build (or find) the trajectory store; log the spectrum, eRank and their plot."""
    layers = config.trajectory.layers or list(range(1, model_shape_of(teacher_dir, config)[1] + 1))
    with stage_run("trajectories"):
        store = build_store(teacher_dir, train, layers, config.subspace.max_rank, config.store_dir,
                            config.trajectory.num_actors, config.trajectory.batch_size,
                            trust_remote_code=config.model.trust_remote_code,
                            gpus_per_actor=gpus(config.cluster.gpus_per_actor), log=log,
                            segments=trajectory_segments(config), bars=bars_wanted())
        subspace = store.subspace()
        spectrum = spectrum_summary(subspace, layers)
        tracked(mlflow.log_dict, spectrum, "subspace_spectrum.json")
        tracked(mlflow.log_figure, spectrum_figure(spectrum), "subspace_spectrum.png")
        for rank in range(1, config.subspace.max_rank + 1):
            tracked(mlflow.log_metric, "explained_variance", subspace.explained_variance(rank).mean().item(), step=rank)
        tracked(mlflow.log_metrics, {f"erank_layer_{layer}": value
                                     for layer, value in zip(layers, spectrum["erank"], strict=True)})
    return store

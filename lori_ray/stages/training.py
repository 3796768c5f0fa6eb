"""What the training stages share: tensors on disk, a Ray Train stage that is skipped when finished."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import mlflow
import torch
from safetensors.torch import save_file

from .. import storage
from ..batch import check_keys
from ..checkpoints import run_key
from ..cluster import gpus
from ..config import Config, ConfigError
from ..data import Example
from ..driver import fit
from ..fingerprint import finished, inputs_digest, stage_inputs
from ..models import model_shape
from ..progress import bars_wanted
from ..tokenized import tokenized
from ..tokens import Layout, Sequence, collate
from ..tracking import stage_run, tracked
from ..worker import Stage
from . import log


def write_tensors(sequences, pad_id: int, max_positions: int, path: Path, **extra: torch.Tensor) -> Path:
    longest = max(len(s.input_ids) for s in sequences)
    if longest > max_positions:
        raise ConfigError(f"model.max_positions: {max_positions} is shorter than the longest sequence ({longest})")
    tensors = collate(sequences, pad_id)
    tensors.update(extra)
    check_keys(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def make_stage(config: Config, name: str, model_dir: Path, data_path: Path, train_config, **fields) -> Stage:
    fields.setdefault("seed", config.seed)
    return Stage(name=f"{config.name}-{name}", model_dir=str(model_dir), data_path=str(data_path),
                 train=train_config, tracking_uri=config.tracking_uri(),
                 gpus_per_worker=gpus(config.cluster.gpus_per_worker), progress_bar=bars_wanted(), **fields)


# run directory -> the stages of that run to train again (``--restart-from``), forgotten as each one starts
_RESTARTING: dict[Path, set[str]] = {}


def restart_later(config: Config, names) -> None:
    _RESTARTING.setdefault(config.run_dir, set()).update(names)


def forget_stage(config: Config, name: str) -> list[Path]:
    """Delete stage ``name``'s output and its checkpoints (or it would resume from them); the removed paths."""
    outputs = [config.run_dir / name]
    if not storage.scheme(config.storage_path):
        outputs.append(Path(storage.join(config.storage_path, f"{config.name}-{name}")))
    removed = [directory for directory in outputs if directory.exists()]
    for directory in removed:
        shutil.rmtree(directory)
        log(f"[{name}] --restart-from: removed {directory}")
    return removed


def train_stage(config: Config, name: str, model_dir: Path, data_path: Path, train_config, **stage_fields) -> Path:
    """Train under a nested MLflow run. A stage found on disk is skipped when it was trained on the same inputs
    (``fingerprint.stage_inputs``), refused (StageChanged) when on other ones, trained again when incomplete or
    restarted (``restart_later``)."""
    output = config.run_dir / name
    if name in _RESTARTING.get(config.run_dir, ()):
        _RESTARTING[config.run_dir].discard(name)
        forget_stage(config, name)
    inputs = stage_inputs(make_stage(config, name, model_dir, data_path, train_config, **stage_fields))
    if finished(output, inputs, name):
        log(f"[{name}] finished model found at {output} (same inputs), skipping")
        return output
    if output.exists():
        log(f"[{name}] {output} has no record of its inputs (interrupted, or from an older version): training again")
    with stage_run(name, train_config.model_dump()) as run:
        stage = make_stage(config, name, model_dir, data_path, train_config, run_id=run.info.run_id if run else None,
                           checkpoint_key=run_key(config.run_dir), inputs_digest=inputs_digest(inputs), **stage_fields)
        started = time.time()
        fit(stage, output, config.storage_path, fingerprint=inputs, wait_minutes=config.cluster.wait_minutes)
        tracked(mlflow.log_metric, "stage_seconds", time.time() - started)
    log(f"[{name}] done in {time.time() - started:.0f}s -> {output}")
    return output


def sequences_of(config: Config, layout: Layout, kind: str, examples: list[Example]) -> list[Sequence]:
    """``layout.teacher`` or ``layout.student`` of each example, tokenized once for every run of ``output_dir``."""
    return tokenized(layout, kind, examples, config.tokenized_dir, log)


def validation_tensors(config: Config, layout: Layout, kind: str, examples: list[Example], name: str) -> dict:
    """``val_path`` for a stage, when there is a validation split."""
    if not examples:
        return {}
    path = config.run_dir / "data" / f"{name}-val.safetensors"
    sequences = sequences_of(config, layout, kind, examples)
    return {"val_path": str(write_tensors(sequences, layout.pad, config.model.max_positions, path))}


def calibration_batch(config: Config, layout: Layout, examples: list[Example], student: bool) -> dict:
    """Input tensors of the first ``student.calibration_size`` examples, as the teacher or the student sees them."""
    examples = examples[:config.student.calibration_size]
    build = layout.student if student else layout.teacher
    tensors = collate([build(e) for e in examples], layout.pad)
    return {k: tensors[k] for k in ("input_ids", "attention_mask")}


def model_shape_of(directory: Path, config: Config) -> tuple[int, int]:
    """(hidden size, layers) of a model directory, whatever its family calls them (GPT-2: n_embd, n_layer)."""
    return model_shape(config.model.family, config.model.size, str(directory), config.model.trust_remote_code)

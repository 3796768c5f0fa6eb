"""What a training stage consumed, so a finished stage is reused only on identical inputs.

A stage's fingerprint names each input: its settings (every ``Stage`` field that changes what it computes)
and the content digest of every file it reads (initial model, training and validation tensors, projection,
readout, online teacher). It is written into the stage's output before that output is renamed into place,
so an output without one never counts as finished; a rerun compares fingerprints input by input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

FINGERPRINT_FILE = "lori-stage.json"
# where the stage reports, what it is called, whether it draws a bar and how its checkpoints are signed do not change
# what it computes
_NOT_INPUTS = ("name", "tracking_uri", "run_id", "checkpoint_key", "inputs_digest", "checkpoint_root", "progress_bar")
# a stage's TrainConfig fields likewise: how often it checkpoints (a rerun may change it and still resume); and
# settings added later, which digest only when set (see ``_settings``)
_TRAIN_NOT_INPUTS = ("checkpoint_minutes",)
_TRAIN_ADDED = {"until_val": None, "schedule": "linear", "min_lr": 0.1, "grad_accumulation": 1,
                "lora": None}  # field: its default
_STAGE_ADDED = ("fresh",)  # Stage fields added later, digested only when set
_STAGE_RENAMED = {"phases": "stages"}  # Stage fields renamed since: digested under their first name
_FILE_INPUTS = ("model_dir", "data_path", "val_path", "projection_path", "readout_path", "teacher_dir")


class StageChanged(RuntimeError):
    """A finished stage whose inputs differ from this run's."""


def hash_files(files: list[Path], root: Path | None = None) -> str:
    """sha256 of the files' contents in order, each preceded by its name relative to ``root`` when given."""
    hasher = hashlib.sha256()
    for file in files:
        if root is not None:
            hasher.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                hasher.update(block)
    return hasher.hexdigest()


# written into a model directory after its run (see ``predict.write_model_files``): not what the model is
_MODEL_NOTES = ("README.md", "lori-model.json", FINGERPRINT_FILE)


def digest(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, in sorted order; a model's
    card, prompt contract and fingerprint left out)."""
    path = Path(path)
    if not path.is_dir():
        return hash_files([path])
    return hash_files(sorted(p for p in path.rglob("*") if p.is_file() and p.name not in _MODEL_NOTES), root=path)


def stage_inputs(stage) -> dict[str, str]:
    """``settings`` (a digest of the stage's other fields) and one content digest per input file."""
    fields = asdict(stage)
    inputs = {name: digest(fields[name]) for name in _FILE_INPUTS if fields.get(name)}
    # typed settings (the stage's TrainConfig) digest as their fields, as they did when they travelled as dicts
    settings = {_STAGE_RENAMED.get(k, k): v.model_dump() if hasattr(v, "model_dump") else v for k, v in fields.items()
                if k not in _NOT_INPUTS + _FILE_INPUTS and not (k in _STAGE_ADDED and v is None)}
    if stage.fresh is not None and stage.fresh.targets_path:  # the subspace fresh problems are projected on
        inputs["fresh_targets"] = digest(stage.fresh.targets_path)
    settings["train"] = _train_settings(settings["train"])
    # a student's loss terms are its weights' keys (the objective checks it); its weights digest as they did before
    # the terms were explicit, when they named kd whatever the terms (weight 0 without a teacher)
    if settings.pop("terms", None) is not None:
        settings["weights"] = {"kd": 0.0, **settings["weights"]}
    inputs["settings"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return inputs


def _train_settings(train: dict) -> dict:
    """The training settings less those that do not change what the stage computes (how often it checkpoints),
    and less those added since stages were first fingerprinted while they hold their default: a stage finished
    before such a setting existed is still found finished, and its checkpoints still resume."""
    return {k: v for k, v in train.items()
            if k not in _TRAIN_NOT_INPUTS and not (k in _TRAIN_ADDED and v == _TRAIN_ADDED[k])}


def inputs_digest(inputs: dict[str, str]) -> str:
    """One digest of all of a stage's inputs (what its checkpoints must have been made from)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def write_fingerprint(directory: Path, inputs: dict[str, str]) -> None:
    (Path(directory) / FINGERPRINT_FILE).write_text(json.dumps(inputs, indent=1, sort_keys=True))


def finished(output: Path, inputs: dict[str, str], label: str) -> bool:
    """Whether ``output`` holds this stage finished on the same ``inputs``. An output without a fingerprint
    (interrupted, or from an older version) is not finished; one with other inputs raises StageChanged
    naming them."""
    record = Path(output) / FINGERPRINT_FILE
    if not record.is_file():
        return False
    before = json.loads(record.read_text())
    changed = sorted(key for key in before.keys() | inputs.keys() if before.get(key) != inputs.get(key))
    if changed:
        raise StageChanged(f"stage {label}: {output} was trained on other inputs ({', '.join(changed)} changed); "
                           f"rerun with --restart-from {label} to train it again, or pick another name=")
    return True

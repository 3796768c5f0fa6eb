"""Signed training checkpoints: which one a restarted stage resumes from, and proof that nobody else wrote it.

DeepSpeed's checkpoint files are pickles, and ``cluster.storage_path`` may be a bucket other people can write.
Every rank signs what it saved: ``ds/manifest-rank-<r>.json`` holds the step, the stage's input digest and the
size and HMAC-SHA256 (keyed by a secret that travels only in the stage's config, never to storage) of each
file, and is itself signed. A checkpoint is *complete* when every rank's manifest and every file it lists are there; a
restarted stage resumes from the newest complete checkpoint of its own inputs, whatever Ray recorded (a worker
killed between upload and record would otherwise send it back). A file whose HMAC does not match, or a file
under ``ds/`` that no manifest lists, is refused before anything is unpickled.

A worker reports them (``report_checkpoint``): periodic ones hold every rank's signed DeepSpeed state, the final one
the HF model under ``hf/``; ``resume_checkpoint`` picks the one a (re)started stage continues from.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import ray.train
import torch
import torch.distributed as dist

from .adapters import lora_token_ids
from .adapters import publish as publish_adapted
from .tokens import tokenizer_from

if TYPE_CHECKING:
    from .worker import Stage

MANIFEST = "manifest-rank-{rank}.json"
STEP_DIRECTORY = re.compile(r"^step-(\d+)$")


KEY_FILE = ".checkpoint-key"


def run_key(run_dir: Path) -> str:
    """The run's checkpoint key, kept in its (driver-side) run directory, readable by its owner only: a rerun
    after a dead driver can still verify and resume the checkpoints of the stage it was training."""
    path = Path(run_dir) / KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


class TamperedCheckpoint(RuntimeError):
    """A checkpoint file that its manifest does not vouch for."""


def _mac(key: str, data: bytes) -> str:
    return hmac.new(bytes.fromhex(key), data, hashlib.sha256).hexdigest()


def _file_mac(key: str, path: Path) -> str:
    mac = hmac.new(bytes.fromhex(key), digestmod=hashlib.sha256)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def sign(directory: Path, rank: int, step: int, inputs: str, key: str) -> None:
    """Write rank ``rank``'s manifest over every file it saved under ``directory`` (its own local copy)."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): [p.stat().st_size, _file_mac(key, p)]
             for p in sorted(directory.rglob("*")) if p.is_file()}
    body = {"rank": rank, "step": step, "inputs": inputs, "files": files}
    payload = json.dumps(body, sort_keys=True)
    (directory / MANIFEST.format(rank=rank)).write_text(json.dumps({**body, "mac": _mac(key, payload.encode())}))


def _manifests(directory: Path, world: int, key: str) -> list[dict] | None:
    """Every rank's manifest, its own signature checked; None when one is missing (an incomplete upload)."""
    manifests = []
    for rank in range(world):
        path = directory / MANIFEST.format(rank=rank)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # cut short mid-upload
        mac = record.pop("mac", "")
        if not hmac.compare_digest(mac, _mac(key, json.dumps(record, sort_keys=True).encode())):
            raise TamperedCheckpoint(f"{path}: its signature does not match; refusing to load this checkpoint")
        manifests.append(record)
    return manifests


def verify(directory: Path, world: int, inputs: str, key: str) -> int | None:
    """The step of the complete checkpoint in ``directory`` (its ``ds`` folder) made from ``inputs``, or None
    when it is incomplete or from other inputs. Raises TamperedCheckpoint for a changed or unlisted file."""
    directory = Path(directory)
    manifests = _manifests(directory, world, key)
    if manifests is None or any(m["inputs"] != inputs for m in manifests):
        return None
    listed = {name: entry for m in manifests for name, entry in m["files"].items()}
    for name, (size, mac) in listed.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size < size:
            return None  # still uploading when its writer died
        if not hmac.compare_digest(mac, _file_mac(key, path)):
            raise TamperedCheckpoint(f"{path}: not the file our worker saved (HMAC mismatch); refusing to unpickle it")
    known = listed.keys() | {MANIFEST.format(rank=rank) for rank in range(world)}
    unlisted = [str(p.relative_to(directory)) for p in directory.rglob("*")
                if p.is_file() and str(p.relative_to(directory)) not in known]
    if unlisted:
        raise TamperedCheckpoint(f"{directory}: files no worker saved: {sorted(unlisted)[:5]}; refusing to load")
    steps = {m["step"] for m in manifests}
    return steps.pop() if len(steps) == 1 else None


def newest_complete(root: Path, world: int, inputs: str, key: str) -> tuple[int, Path] | None:
    """(step, checkpoint directory) of the newest complete checkpoint under a stage's storage folder."""
    root = Path(root)
    candidates = sorted(((int(m[1]), p) for p in root.iterdir() if (m := STEP_DIRECTORY.match(p.name)))
                        if root.is_dir() else [], reverse=True)
    for _, path in candidates:
        step = verify(path / "ds", world, inputs, key)
        if step is not None:
            return step, path
    return None


def resume_checkpoint(stage: Stage, world: int, recorded):
    """The checkpoint a (re)started stage resumes from: on a filesystem, the newest complete one of its inputs
    in its folder, whatever Ray recorded (a worker killed between upload and record would otherwise lose it);
    on an object store, the one Ray recorded. Also whether it is verified already (the one found in the folder
    is; Ray's must be, once downloaded). Raises TamperedCheckpoint for one that no worker of ours wrote."""
    if stage.checkpoint_root and Path(stage.checkpoint_root).is_dir():
        found = newest_complete(Path(stage.checkpoint_root), world, stage.inputs_digest, stage.checkpoint_key)
        return (ray.train.Checkpoint.from_directory(str(found[1])), True) if found else (None, False)
    return recorded, False


def report_checkpoint(engine, objective, metrics: dict, stage: Stage, step: int, restarts: int,
                       final: bool) -> None:
    """A periodic checkpoint: every rank saves and signs its DeepSpeed shards (weights and optimizer state, what a
    restart resumes from). The ``final`` one: the HF model and tokenizer under ``hf/``, from rank 0, and no
    DeepSpeed state — nothing resumes after the last step, and for a 1B model that state is ~12 GB written for
    nothing (a restart after it resumes from the newest periodic checkpoint)."""
    rank = ray.train.get_context().get_world_rank()
    directory = None
    if not final:
        directory = tempfile.mkdtemp(prefix="lori-ckpt-")
        engine.save_checkpoint(os.path.join(directory, "ds"), tag="state",
                               client_state={"step": step, "restarts": restarts})
        sign(Path(directory) / "ds", rank, step, stage.inputs_digest, stage.checkpoint_key)
    else:
        if engine.zero_optimization_stage() == 3:
            state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
        else:
            state = engine.module.state_dict()
        refuse_non_finite(state if rank == 0 else None, stage.name, step, metrics, engine.device)
        if rank == 0:
            directory = tempfile.mkdtemp(prefix="lori-ckpt-")
            hf = os.path.join(directory, "hf")
            if stage.train.lora:
                publish_adapted(stage.model_dir, stage.train.lora, lora_token_ids(stage.model_dir),
                                objective.model_state_dict(state), hf)
            else:
                objective.model.save_pretrained(hf, state_dict=objective.model_state_dict(state))
            tokenizer_from(stage.model_dir).save_pretrained(hf)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None,
                     checkpoint_dir_name=f"step-{step:06d}", delete_local_checkpoint_after_upload=True)


def refuse_non_finite(state: dict | None, name: str, step: int, metrics: dict, device="cpu") -> None:
    """Raise on every rank when the model rank 0 is about to publish (``state``; None on the other ranks) has a
    non-finite weight: skipped NaN steps (fewer than ``max_bad_steps``) or a diverged run would otherwise publish
    it as finished, and a rerun would reuse it."""
    bad = [key for key, tensor in (state or {}).items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    flag = torch.tensor([float(len(bad))], device=device)  # on the engine's device: nccl broadcasts CUDA tensors
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(flag, src=0)
    if flag.item():
        terms = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step" and isinstance(v, float))
        raise FloatingPointError(f"[{name}] not published: the model has non-finite weights at step {step} "
                                 f"({', '.join(bad[:3]) or 'on rank 0'}{', ...' if len(bad) > 3 else ''}); last "
                                 f"logged terms: {terms or 'none (no step was applied)'}. Lower the learning rate "
                                 f"or the loss weights.")

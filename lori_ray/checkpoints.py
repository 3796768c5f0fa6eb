"""Signed training checkpoints: which one a restarted stage resumes from, and proof that nobody else wrote it.

DeepSpeed's checkpoint files are pickles, and ``cluster.storage_path`` may be a bucket other people can write.
Every rank signs what it saved: ``ds/manifest-rank-<r>.json`` holds the step, the stage's input digest and the
size and HMAC-SHA256 (keyed by a secret that travels only in the stage's config, never to storage) of each
file, and is itself signed. A checkpoint is *complete* when every rank's manifest and every file it lists are there; a
restarted stage resumes from the newest complete checkpoint of its own inputs, whatever Ray recorded (a worker
killed between upload and record would otherwise send it back). A file whose HMAC does not match, or a file
under ``ds/`` that no manifest lists, is refused before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path

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

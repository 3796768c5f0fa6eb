"""Teacher trajectories (mean hidden state per CoT step, or per answer digit's column, × layer) and their store.

A store is a directory (or object-store prefix, see ``storage``) named by a hash of (teacher
weights, data, layer selection, max rank). Every file is written whole (``storage.write_whole``);
``manifest.json`` is written last, so a store without a manifest is incomplete and never read.
Each shard extraction leaves one small marker under ``extractions/`` (an object store cannot
append to a log): how often the teacher really ran. A stopped pass continues from the shards it wrote.
The method: docs/method.md#teacher-trajectories.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load, save

from . import storage
from .fingerprint import hash_files
from .subspace import Moments, Subspace, Tucker, TuckerMoments, fit_tucker, resample_steps
from .tokens import collate

MANIFEST = "manifest.json"
SUBSPACE = "subspace.safetensors"
EXTRACTIONS = "extractions"


def segment_means(hidden_states: torch.Tensor, segments: list[list[list[int]]]) -> list[torch.Tensor]:
    """Mean hidden state over each segment's token positions (a CoT step, or an answer digit's column).

    hidden_states: [B, L, T, d] (selected layers); segments: per example, the positions of each segment.
    Returns per example a [L, K_i, d] tensor, on the device of ``hidden_states``.
    """
    batch, _, length, _ = hidden_states.shape
    most = max((len(s) for s in segments), default=0)
    weights = torch.zeros(batch, most, length, dtype=hidden_states.dtype)
    for row, example_segments in enumerate(segments):
        for k, positions in enumerate(example_segments):
            weights[row, k, positions] = 1.0 / len(positions)
    means = torch.einsum("bkt,bltd->blkd", weights.to(hidden_states.device), hidden_states)
    return [means[row, :, : len(s)] for row, s in enumerate(segments)]


def teacher_step_means(model, layout, sequences, layers: list[int], segments: str = "steps") -> list[torch.Tensor]:
    """The teacher run teacher-forced on its ``sequences`` (``Layout.teacher``): per example the mean hidden state of
    each segment (``Layout.segments``) at ``layers`` (hidden-state indices), [L, K_i, d] in float32 on the model's
    device. What the trajectory pass stores, and what fresh problems (``fresh``) get in the training step."""
    batch = collate(sequences, layout.pad)
    device = next(model.parameters()).device
    output = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   output_hidden_states=True)
    hidden = torch.stack([output.hidden_states[layer] for layer in layers], dim=1).float()
    return segment_means(hidden, [layout.segments(s, segments) for s in sequences])


def file_fingerprint(path: str | Path) -> str:
    """sha256 of every weight file in a model directory (or of one file)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.gguf")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors or *.gguf) in {path}")
    return hash_files(files)


def store_key(teacher: str, data: str, layers: list[int], max_rank: int, segments: str = "steps") -> str:
    payload = json.dumps({"teacher": teacher, "data": data, "layers": layers, "max_rank": max_rank,
                          "segments": segments})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pack(trajectories: list[torch.Tensor], index: list[int]) -> dict[str, torch.Tensor]:
    """Ragged [L, K_i, d] trajectories → one [sum K_i, L, d] tensor with offsets."""
    lengths = torch.tensor([t.shape[1] for t in trajectories], dtype=torch.long)
    offsets = torch.zeros(len(trajectories) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    steps = torch.cat([t.transpose(0, 1) for t in trajectories]) if trajectories else torch.zeros(0)
    return {"steps": steps, "offsets": offsets, "index": torch.tensor(index, dtype=torch.long)}


def unpack(shard: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    offsets, steps = shard["offsets"].tolist(), shard["steps"]
    return [steps[a:b].transpose(0, 1) for a, b in itertools.pairwise(offsets)]


def stack(trajectories, steps: int | None) -> torch.Tensor:
    """Trajectories [L, K_i, ·] resampled to ``steps`` units → [n, L, steps, ·]; ``steps=None`` keeps them as
    extracted, which needs every K_i equal (digit columns of a fixed-width answer)."""
    trajectories = [t if steps is None else resample_steps(t, steps) for t in trajectories]
    lengths = {t.shape[1] for t in trajectories}
    if len(lengths) > 1:
        raise ValueError(f"trajectories have {sorted(lengths)} units; without resampling they must all be as long "
                         "(trajectory.segments=digits needs answers of one length)")
    return torch.stack(trajectories)


class TrajectoryStore:
    """A store at ``uri``: a path on a shared filesystem or an object-store URI."""

    def __init__(self, uri: str | Path):
        self.uri = storage.absolute(str(uri))
        self.filesystem, self.root = storage.resolve(self.uri)

    def _path(self, *names: str) -> str:
        return "/".join([self.root, *names])

    def _write(self, tensors: dict[str, torch.Tensor], *names: str) -> None:
        storage.write_whole(self.filesystem, self._path(*names), save({k: v.contiguous() for k, v in tensors.items()}))

    def _load(self, *names: str) -> dict[str, torch.Tensor]:
        return load(storage.read_whole(self.filesystem, self._path(*names)))

    @property
    def complete(self) -> bool:
        return storage.is_file(self.filesystem, self._path(MANIFEST))

    @property
    def manifest(self) -> dict:
        if not self.complete:
            raise FileNotFoundError(f"trajectory store {self.uri} is incomplete (no {MANIFEST})")
        return json.loads(storage.read_whole(self.filesystem, self._path(MANIFEST)))

    def write_shard(self, kind: str, number: int, tensors: dict[str, torch.Tensor]) -> None:
        self._write(tensors, kind, f"{number:05d}.safetensors")

    def shard(self, kind: str, number: int) -> dict[str, torch.Tensor]:
        return self._load(kind, f"{number:05d}.safetensors")

    def extracted(self, number: int, index: list[int], layers: int) -> Moments | None:
        """The moments of shard ``number`` if an earlier pass wrote it for these examples, else None: recomputed
        from its step vectors, which is what the pass would have returned, without the teacher."""
        if not storage.is_file(self.filesystem, self._path("hidden", f"{number:05d}.safetensors")):
            return None
        shard = self.shard("hidden", number)
        if shard["index"].tolist() != index:  # another sharding of the data (trajectory shard size changed)
            return None
        moments = Moments.zeros(layers, shard["steps"].shape[-1])
        moments.update(shard["steps"])
        return moments

    def record_extraction(self, number: int, examples: int) -> None:
        """One marker per extracted shard; a retried shard adds another (unique names, no append needed)."""
        record = json.dumps({"shard": number, "examples": examples, "pid": os.getpid()}).encode()
        storage.write_whole(self.filesystem, self._path(EXTRACTIONS, f"{number:05d}-{uuid.uuid4().hex}.json"), record)

    def extractions(self) -> list[dict]:
        """Every shard extraction so far (markers in name order, so a shard's retries are adjacent)."""
        paths = storage.list_files(self.filesystem, self._path(EXTRACTIONS))
        return [json.loads(storage.read_whole(self.filesystem, path)) for path in paths]

    def write_subspace(self, subspace: Subspace) -> None:
        self._write({"mean": subspace.mean, "basis": subspace.basis, "eigenvalues": subspace.eigenvalues}, SUBSPACE)

    def subspace(self) -> Subspace:
        return Subspace(**self._load(SUBSPACE))

    def finish(self, manifest: dict) -> None:
        """Mark the store complete; every writer must be done (a killed one may have left a temporary)."""
        storage.remove_temporaries(self.filesystem, self.root)
        storage.write_whole(self.filesystem, self._path(MANIFEST), json.dumps(manifest, indent=2).encode())

    def _read(self, kind: str) -> tuple[list[int], list[torch.Tensor]]:
        index, trajectories = [], []
        for number in range(self.manifest["shards"]):
            shard = self.shard(kind, number)
            index += shard["index"].tolist()
            trajectories += unpack(shard)
        return index, trajectories

    def coordinates(self, rank: int, steps: int | None) -> tuple[list[int], torch.Tensor]:
        """Example indices and their teacher coordinates resampled to ``steps`` (``None``: as extracted, every
        trajectory as long): [n, L, steps, rank]."""
        if rank > self.manifest["max_rank"]:
            raise ValueError(f"rank {rank} exceeds the store's max_rank {self.manifest['max_rank']}")
        index, trajectories = self._read("coords")
        return index, stack([t[..., :rank] for t in trajectories], steps)

    def tucker(self, steps: int, layer_rank: int, step_rank: int, rank: int) -> tuple[list[int], torch.Tensor, Tucker]:
        """Tucker fit of the full-width trajectories resampled to ``steps`` (moments accumulated shard by
        shard) and every example's core coordinates [n, layer_rank, step_rank, rank]. No teacher pass."""
        index, trajectories = self._read("hidden")
        hidden = stack(trajectories, steps)
        moments = TuckerMoments.zeros(*hidden.shape[1:])
        for chunk in hidden.split(4096):  # bounds the einsum temporaries
            moments.update(chunk)
        tucker = fit_tucker(moments, layer_rank, step_rank, rank)
        return index, tucker.project(hidden), tucker

    def hidden(self, steps: int | None) -> tuple[list[int], torch.Tensor]:
        """Example indices and full-width teacher step states resampled to ``steps``: [n, L, steps, d]."""
        index, trajectories = self._read("hidden")
        return index, stack(trajectories, steps)

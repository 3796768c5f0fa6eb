"""Teacher trajectories (mean hidden state per CoT step × layer) and their on-disk store.

A store is a directory named by a hash of (teacher weights, data, layer selection, max rank).
Shards are written to a temporary name and renamed; ``manifest.json`` is written last, so a
store without a manifest is incomplete and never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .subspace import Subspace, Tucker, TuckerMoments, fit_tucker, resample_steps

MANIFEST = "manifest.json"


def step_means(hidden_states: torch.Tensor, spans: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """Mean hidden state over each step's tokens.

    hidden_states: [B, L, T, d] (selected layers); spans: per example, [start, end) of each step.
    Returns per example a [L, K_i, d] tensor.
    """
    batch, _, length, _ = hidden_states.shape
    most = max((len(s) for s in spans), default=0)
    weights = torch.zeros(batch, most, length, dtype=hidden_states.dtype)
    for row, example_spans in enumerate(spans):
        for k, (start, end) in enumerate(example_spans):
            weights[row, k, start:end] = 1.0 / (end - start)
    means = torch.einsum("bkt,bltd->blkd", weights.to(hidden_states.device), hidden_states)
    return [means[row, :, : len(s)] for row, s in enumerate(spans)]


def file_fingerprint(path: str | Path) -> str:
    """sha256 of every weight file in a model directory (or of one file)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.gguf")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors or *.gguf) in {path}")
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def store_key(teacher: str, data: str, layers: list[int], max_rank: int) -> str:
    payload = json.dumps({"teacher": teacher, "data": data, "layers": layers, "max_rank": max_rank})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, temporary)
    os.replace(temporary, path)


def pack(trajectories: list[torch.Tensor], index: list[int]) -> dict[str, torch.Tensor]:
    """Ragged [L, K_i, d] trajectories → one [sum K_i, L, d] tensor with offsets."""
    lengths = torch.tensor([t.shape[1] for t in trajectories], dtype=torch.long)
    offsets = torch.zeros(len(trajectories) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    steps = torch.cat([t.transpose(0, 1) for t in trajectories]) if trajectories else torch.zeros(0)
    return {"steps": steps, "offsets": offsets, "index": torch.tensor(index, dtype=torch.long)}


def unpack(shard: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    offsets, steps = shard["offsets"].tolist(), shard["steps"]
    return [steps[a:b].transpose(0, 1) for a, b in zip(offsets[:-1], offsets[1:])]


class TrajectoryStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def complete(self) -> bool:
        return (self.path / MANIFEST).is_file()

    @property
    def manifest(self) -> dict:
        if not self.complete:
            raise FileNotFoundError(f"trajectory store {self.path} is incomplete (no {MANIFEST})")
        return json.loads((self.path / MANIFEST).read_text())

    def shard(self, kind: str, number: int) -> Path:
        return self.path / kind / f"{number:05d}.safetensors"

    def write_subspace(self, subspace: Subspace) -> None:
        save_atomic({"mean": subspace.mean, "basis": subspace.basis, "eigenvalues": subspace.eigenvalues},
                    self.path / "subspace.safetensors")

    def subspace(self) -> Subspace:
        return Subspace(**load_file(self.path / "subspace.safetensors"))

    def finish(self, manifest: dict) -> None:
        temporary = self.path / f".{MANIFEST}.tmp"
        temporary.write_text(json.dumps(manifest, indent=2))
        os.replace(temporary, self.path / MANIFEST)

    def _read(self, kind: str) -> tuple[list[int], list[torch.Tensor]]:
        index, trajectories = [], []
        for number in range(self.manifest["shards"]):
            shard = load_file(self.shard(kind, number))
            index += shard["index"].tolist()
            trajectories += unpack(shard)
        return index, trajectories

    def coordinates(self, rank: int, steps: int) -> tuple[list[int], torch.Tensor]:
        """Example indices and their teacher coordinates resampled to ``steps``: [n, L, steps, rank]."""
        if rank > self.manifest["max_rank"]:
            raise ValueError(f"rank {rank} exceeds the store's max_rank {self.manifest['max_rank']}")
        index, trajectories = self._read("coords")
        return index, torch.stack([resample_steps(t[..., :rank], steps) for t in trajectories])

    def tucker(self, steps: int, layer_rank: int, step_rank: int, rank: int) -> tuple[list[int], torch.Tensor, Tucker]:
        """Tucker fit of the full-width trajectories resampled to ``steps`` (moments accumulated shard by
        shard) and every example's core coordinates [n, layer_rank, step_rank, rank]. No teacher pass."""
        index, trajectories = self._read("hidden")
        hidden = torch.stack([resample_steps(t, steps) for t in trajectories])
        moments = TuckerMoments.zeros(*hidden.shape[1:])
        for chunk in hidden.split(4096):  # bounds the einsum temporaries
            moments.update(chunk)
        tucker = fit_tucker(moments, layer_rank, step_rank, rank)
        return index, tucker.project(hidden), tucker

    def hidden(self, steps: int) -> tuple[list[int], torch.Tensor]:
        """Example indices and full-width teacher step states resampled to ``steps``: [n, L, steps, d]."""
        index, trajectories = self._read("hidden")
        return index, torch.stack([resample_steps(t, steps) for t in trajectories])

"""The teacher service: a pool of Ray actors holding the frozen teacher.

Pass 1: each actor runs the teacher teacher-forced on question+CoT+answer, writes the step-mean
hidden states of its shard and returns the shard's streaming moments. The driver merges the
moments and fits the subspace. Pass 2: actors project their shards onto the subspace.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import ray
import torch
from ray.util import ActorPool

from safetensors.torch import load_file

from .data import Example
from .models import load_model
from .subspace import Moments, Subspace, fit_pca
from .tokens import Layout, collate, load_tokenizer
from .trajectories import TrajectoryStore, file_fingerprint, pack, save_atomic, step_means, store_key, unpack


EXTRACTION_LOG = "extraction.log"


class TeacherWorker:
    def __init__(self, model_dir: str, layers: list[int], batch_size: int, trust_remote_code: bool = False):
        torch.set_grad_enabled(False)
        self.layout = Layout(load_tokenizer(model_dir, trust_remote_code))
        # bf16 on a GPU (hidden states are averaged and accumulated in float32/float64 below)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = load_model(model_dir, dtype, trust_remote_code).to(self.device).eval()
        self.layers = layers
        self.batch_size = batch_size

    def extract(self, path: str, index: list[int], examples: list[Example]) -> Moments:
        """Write the shard's step-mean trajectories to ``path``; return their moments."""
        trajectories = []
        moments = Moments.zeros(len(self.layers), self.model.config.hidden_size)
        for start in range(0, len(examples), self.batch_size):
            sequences = [self.layout.teacher(e) for e in examples[start:start + self.batch_size]]
            batch = collate(sequences, self.layout.pad)
            try:
                output = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device), output_hidden_states=True)
            except torch.OutOfMemoryError as error:
                raise RuntimeError(
                    f"teacher out of memory on {self.device} with a batch of {len(sequences)} sequences of up to "
                    f"{batch['input_ids'].shape[1]} tokens: lower trajectory.batch_size (now {self.batch_size}) "
                    f"or give each actor more memory (cluster.gpus_per_actor)") from error
            hidden = torch.stack([output.hidden_states[layer] for layer in self.layers], dim=1).float().cpu()
            for trajectory in step_means(hidden, [s.spans for s in sequences]):
                trajectories.append(trajectory)
                moments.update(trajectory.transpose(0, 1))  # every step is one sample per layer
        save_atomic(pack(trajectories, index), Path(path))
        # one line per extracted shard: how often the teacher really ran (a rerun or a Tune search adds none)
        with open(Path(path).parents[1] / EXTRACTION_LOG, "a") as log:
            log.write(json.dumps({"shard": Path(path).name, "examples": len(index), "pid": os.getpid()}) + "\n")
        return moments

    def project(self, hidden_path: str, coords_path: str, subspace_path: str) -> int:
        subspace = Subspace(**load_file(subspace_path))
        shard = load_file(hidden_path)
        coords = [subspace.project(t.transpose(0, 1)).transpose(0, 1) for t in unpack(shard)]
        save_atomic(pack(coords, shard["index"].tolist()), Path(coords_path))
        return len(coords)


def data_fingerprint(examples: list[Example]) -> str:
    return hashlib.sha256("\n".join(e.to_line() for e in examples).encode()).hexdigest()


def build_store(model_dir: str | Path, examples: list[Example], layers: list[int], max_rank: int,
                store_dir: str | Path, num_actors: int = 2, batch_size: int = 64, shard_size: int = 512,
                trust_remote_code: bool = False, gpus_per_actor: float = 0.0, log=print) -> TrajectoryStore:
    """Extract, fit and project with a pool of teacher actors; reuse the store if it is complete."""
    key = store_key(file_fingerprint(model_dir), data_fingerprint(examples), layers, max_rank)
    store = TrajectoryStore(Path(store_dir) / key)
    if store.complete:
        log(f"[teacher] trajectory store {store.path} found, skipping extraction")
        return store
    # examples without a CoT have no trajectory to align with
    kept = [i for i, e in enumerate(examples) if e.steps]
    shards = [kept[i:i + shard_size] for i in range(0, len(kept), shard_size)]
    for kind in ("hidden", "coords"):
        (store.path / kind).mkdir(parents=True, exist_ok=True)

    worker = ray.remote(num_cpus=1, num_gpus=gpus_per_actor, max_restarts=2, max_task_retries=2)(TeacherWorker)
    actors = [worker.remote(str(model_dir), layers, batch_size, trust_remote_code)
              for _ in range(min(num_actors, len(shards)))]
    pool = ActorPool(actors)
    started, moments = time.time(), None
    try:
        jobs = [(str(store.shard("hidden", n)), shard, [examples[i] for i in shard]) for n, shard in enumerate(shards)]
        for done, shard_moments in enumerate(pool.map_unordered(lambda a, job: a.extract.remote(*job), jobs), 1):
            moments = shard_moments if moments is None else moments.merge(shard_moments)
            log(f"[teacher] extracted shard {done}/{len(shards)} ({moments.count} step vectors, "
                f"{time.time() - started:.1f}s)")
        subspace = fit_pca(moments, max_rank)
        store.write_subspace(subspace)
        subspace_path = str(store.path / "subspace.safetensors")
        jobs = [(str(store.shard("hidden", n)), str(store.shard("coords", n)), subspace_path) for n in range(len(shards))]
        projected = sum(pool.map_unordered(lambda a, job: a.project.remote(*job), jobs))
    finally:
        for actor in actors:
            ray.kill(actor)
    explained = subspace.explained_variance().tolist()
    store.finish({"key": key, "teacher": str(model_dir), "layers": layers, "max_rank": max_rank,
                  "shards": len(shards), "examples": projected, "step_vectors": moments.count,
                  "skipped_without_cot": len(examples) - len(kept), "explained_variance": explained})
    log(f"[teacher] store {store.path}: {projected} trajectories, explained variance at rank {max_rank}: "
        + " ".join(f"L{layer}={v:.3f}" for layer, v in zip(layers, explained)))
    return store

"""The teacher service: a pool of Ray actors holding the frozen teacher.

Pass 1: each actor runs the teacher teacher-forced on question+CoT+answer, writes the step-mean
hidden states of its shard and returns the shard's streaming moments. The driver merges the
moments and fits the subspace. Pass 2: actors project their shards onto the subspace.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from pathlib import Path

import ray
import torch
from ray.util import ActorPool

from . import storage
from .data import COT_SEPARATOR, DataFormatError, Example, normalize_answer, parse_line
from .evaluate import greedy_generate
from .models import load_model
from .progress import progress_bar
from .subspace import Moments, fit_pca
from .tokens import Layout, load_tokenizer
from .trajectories import TrajectoryStore, file_fingerprint, pack, store_key, teacher_step_means, unpack


class TeacherWorker:
    def __init__(self, model_dir: str, layers: list[int], batch_size: int, trust_remote_code: bool = False,
                 segments: str = "steps"):
        self.model_dir = model_dir
        self.layout = Layout(load_tokenizer(model_dir, trust_remote_code))
        self.segments = segments
        # bf16 on a GPU (hidden states are averaged and accumulated in float32/float64 below)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = load_model(model_dir, dtype, trust_remote_code).to(self.device).eval()
        self.layers = layers
        self.batch_size = batch_size

    def complete(self, examples: list[Example], max_new_tokens: int) -> list[Example | None]:
        """The teacher's own CoT for each question, or None where its answer is not the gold one."""
        return written_cots(self.model, self.layout, examples, self.batch_size, max_new_tokens)

    @torch.no_grad()
    def extract(self, store_uri: str, number: int, index: list[int], examples: list[Example]) -> Moments:
        """Write shard ``number``'s trajectories (segment means) to the store; return their moments."""
        trajectories = []
        # accumulated where the teacher runs: float64 outer products of every step vector are a GPU's work
        moments = Moments.zeros(len(self.layers), self.model.config.hidden_size, self.device)
        for start in range(0, len(examples), self.batch_size):
            sequences = [self.layout.teacher(e) for e in examples[start:start + self.batch_size]]
            try:
                means = teacher_step_means(self.model, self.layout, sequences, self.layers, self.segments)
            except torch.OutOfMemoryError as error:
                raise RuntimeError(
                    f"teacher out of memory on {self.device} with a batch of {len(sequences)} sequences of up to "
                    f"{max(len(s.input_ids) for s in sequences)} tokens: lower trajectory.batch_size (now "
                    f"{self.batch_size}) or give each actor more memory (cluster.gpus_per_actor)") from error
            steps = torch.cat([t.transpose(0, 1) for t in means])  # [sum K_i, L, d]: a step is a sample per layer
            moments.update(steps)  # once per batch, on the teacher's device (an einsum per example costs more)
            # one copy back, of the means alone: a batch's hidden states are ~100x larger (copying them was most
            # of an extraction's time on a GPU)
            trajectories += [t.transpose(0, 1) for t in steps.cpu().split([t.shape[1] for t in means])]
        check_finite(moments, number, index, self.layers, self.model_dir)  # before the shard counts as extracted
        store = TrajectoryStore(store_uri)
        store.write_shard("hidden", number, pack(trajectories, index))
        # how often the teacher really ran (a rerun or a Tune search adds no extraction)
        store.record_extraction(number, len(index))
        return moments.to("cpu")

    def project(self, store_uri: str, number: int) -> int:
        store = TrajectoryStore(store_uri)
        subspace, shard = store.subspace(), store.shard("hidden", number)
        coords = [subspace.project(t.transpose(0, 1)).transpose(0, 1) for t in unpack(shard)]
        store.write_shard("coords", number, pack(coords, shard["index"].tolist()))
        return len(coords)


def written_cots(model, layout: Layout, examples: list[Example], batch_size: int,
                 max_new_tokens: int) -> list[Example | None]:
    """Greedy CoTs written by ``model`` for the questions, parsed into steps like a data line (split at the
    example's joiner, which the teacher learnt from the data); an example whose written answer differs from the
    gold one (or that does not parse) gives None."""
    prompts = [layout.question(e) for e in examples]
    outputs, _ = greedy_generate(model, prompts, layout.pad, layout.eos, batch_size, max_new_tokens, static_cache=True)
    written = []
    for example, row in zip(examples, outputs, strict=True):
        text = layout.tokenizer.decode(row, skip_special_tokens=True)
        try:
            cot = parse_line(f"{example.question}{COT_SEPARATOR}{text}", joiner=example.joiner)
        except DataFormatError:
            written.append(None)
            continue
        right = normalize_answer(cot.answer) == normalize_answer(example.answer)
        written.append(Example(example.question, cot.steps, example.answer, example.joiner) if right and cot.steps
                       else None)
    return written


def free() -> str:
    """The cluster's free CPUs (and GPUs), as a log line says them."""
    resources = ray.available_resources()
    return ", ".join(f"{resources.get(name, 0):g} {name}" for name in ("CPU", "GPU")
                     if name == "CPU" or name in resources)


class PlacedPool:
    """Teacher actors as a Ray ``ActorPool`` that holds only the actors Ray has placed. ``ActorPool`` hands a task to
    every actor it is given, and an actor still waiting for its CPU (or GPU) holds that task until it is placed:
    forever on a cluster smaller than the pool (2 actors on a 1-CPU cluster hung at the last shard). Work starts
    once one actor is up; the others join between results as Ray places them."""

    def __init__(self, actors: list, needs: str, log=print, wait_s: float = 30.0):
        self.pool, self.waiting = ActorPool([]), {actor.__ray_ready__.remote(): actor for actor in actors}
        started = time.time()
        while not ray.wait(list(self.waiting), num_returns=1, timeout=wait_s)[0]:
            log(f"[teacher] waiting for Ray to place a teacher actor (each takes {needs}; free now: {free()})")
        # the others started loading the model with the first: as long again, if Ray placed them
        self._join_placed(timeout=time.time() - started + 1.0)
        if self.waiting:
            log(f"[teacher] {len(actors) - len(self.waiting)} of {len(actors)} teacher actors ready (each takes "
                f"{needs}; free now: {free()}); the others join when Ray places them")

    def _join_placed(self, timeout: float = 0.0) -> None:
        """Push the actors that became ready into the pool, where they take queued tasks (an actor that failed
        to start raises here)."""
        if not self.waiting:
            return
        ready, _ = ray.wait(list(self.waiting), num_returns=len(self.waiting), timeout=timeout)
        for ref in ready:
            ray.get(ref)
            self.pool.push(self.waiting.pop(ref))

    def _joining(self, results):
        for result in results:
            yield result
            self._join_placed()

    def map(self, fn, values):
        return self._joining(self.pool.map(fn, values))

    def map_unordered(self, fn, values):
        return self._joining(self.pool.map_unordered(fn, values))


@contextmanager
def teacher_pool(model_dir: str | Path, layers: list[int], batch_size: int, count: int,
                 trust_remote_code: bool = False, gpus_per_actor: float = 0.0, segments: str = "steps", log=print):
    """``count`` teacher actors as a ``PlacedPool``; a dead actor is restarted and its task retried."""
    worker = ray.remote(num_cpus=1, num_gpus=gpus_per_actor, max_restarts=2, max_task_retries=2)(TeacherWorker)
    actors = [worker.remote(str(model_dir), layers, batch_size, trust_remote_code, segments) for _ in range(count)]
    try:
        yield PlacedPool(actors, "1 CPU" + (f" and {gpus_per_actor:g} GPU" if gpus_per_actor else ""), log)
    finally:
        for actor in actors:
            ray.kill(actor)


def complete_missing_cots(model_dir: str | Path, examples: list[Example], num_actors: int = 2, batch_size: int = 64,
                          max_new_tokens: int = 256, trust_remote_code: bool = False, gpus_per_actor: float = 0.0,
                          chunk_size: int = 512, log=print, bars: bool = False) -> list[Example]:
    """Examples without a gold CoT get the teacher's own (batched greedy generation on the actor pool),
    kept only where its answer is right; the list keeps its order and length. ``bars``: a progress bar over
    the chunks too (``progress``)."""
    missing = [i for i, e in enumerate(examples) if not e.steps]
    if not missing:
        return list(examples)
    chunks = [missing[i:i + chunk_size] for i in range(0, len(missing), chunk_size)]
    completed, started = list(examples), time.time()
    with teacher_pool(model_dir, [], batch_size, min(num_actors, len(chunks)), trust_remote_code,
                      gpus_per_actor, log=log) as pool:
        jobs = [[examples[i] for i in chunk] for chunk in chunks]
        results = pool.map(lambda actor, job: actor.complete.remote(job, max_new_tokens), jobs)
        bar = progress_bar(bars, "teacher CoTs", len(chunks), "chunk")
        for done, (chunk, written) in enumerate(zip(chunks, results, strict=True), 1):
            for i, example in zip(chunk, written, strict=True):
                completed[i] = example or examples[i]
            bar.update()
            log(f"[teacher] wrote CoTs for chunk {done}/{len(chunks)} ({time.time() - started:.1f}s)")
        bar.close()
    kept = sum(1 for i in missing if completed[i].steps)
    log(f"[teacher] {kept} of {len(missing)} examples without a gold CoT got a teacher CoT with the right answer")
    return completed


def check_finite(moments: Moments, number: int, index: list[int], layers: list[int], model_dir) -> None:
    """An error naming the layer, the shard and its examples where a moment is not finite (a store fitted on them
    would hold NaN coordinates for every example)."""
    bad = ~(moments.total.isfinite().all(-1) & moments.outer.isfinite().flatten(1).all(-1))
    if bad.any():
        raise FloatingPointError(
            f"trajectory pass: the teacher's hidden states are not finite at layer {layers[int(bad.nonzero()[0])]} "
            f"(trajectory.layers {layers}) on shard {number} (training examples {index[0]}..{index[-1]}); is the "
            f"teacher at {model_dir} trained to non-finite weights?")


def data_fingerprint(examples: list[Example]) -> str:
    return hashlib.sha256("\n".join(e.to_line() for e in examples).encode()).hexdigest()


def build_store(model_dir: str | Path, examples: list[Example], layers: list[int], max_rank: int,
                store_dir: str | Path, num_actors: int = 2, batch_size: int = 64, shard_size: int = 512,
                trust_remote_code: bool = False, gpus_per_actor: float = 0.0, log=print,
                segments: str = "steps", bars: bool = False) -> TrajectoryStore:
    """Extract, fit and project with a pool of teacher actors into ``store_dir`` (a shared path or an
    object-store URI, see ``storage``); reuse the store if it is complete. ``segments``: what one
    trajectory unit averages (``Layout.segments``): each CoT step, or each answer digit's column. ``bars``: a
    progress bar over the shards too (``progress``)."""
    key = store_key(file_fingerprint(model_dir), data_fingerprint(examples), layers, max_rank, segments)
    store = TrajectoryStore(storage.join(str(store_dir), key))
    if store.complete:
        log(f"[teacher] trajectory store {store.uri} found, skipping extraction")
        return store
    # examples without a CoT have no trajectory to align with
    kept = [i for i, e in enumerate(examples) if e.steps]
    shards = [kept[i:i + shard_size] for i in range(0, len(kept), shard_size)]

    started, moments = time.time(), None
    before = {n: found for n, shard in enumerate(shards)
              if (found := store.extracted(n, shard, len(layers))) is not None}
    if before:
        log(f"[teacher] trajectory store {store.uri}: {len(before)} of {len(shards)} shards extracted before, "
            f"continuing with the other {len(shards) - len(before)}")
    for shard_moments in before.values():  # finite: a shard is written only once its moments are checked
        moments = shard_moments if moments is None else moments.merge(shard_moments)
    todo = [n for n in range(len(shards)) if n not in before]
    with teacher_pool(model_dir, layers, batch_size, min(num_actors, len(shards)), trust_remote_code,
                      gpus_per_actor, segments, log) as pool:
        jobs = [(store.uri, n, shards[n], [examples[i] for i in shards[n]]) for n in todo]
        every = max(1, len(jobs) // 50)  # about 50 progress lines however large the data
        bar = progress_bar(bars, "teacher pass", len(jobs), "shard")
        for done, shard_moments in enumerate(pool.map_unordered(lambda a, job: a.extract.remote(*job), jobs), 1):
            moments = shard_moments if moments is None else moments.merge(shard_moments)
            bar.update()
            if done % every == 0 or done == len(jobs):
                elapsed = time.time() - started
                log(f"[teacher] extracted shard {len(before) + done}/{len(shards)} ({moments.count} vectors of "
                    f"{segments}, {elapsed:.1f}s, about {elapsed / done * (len(jobs) - done):.0f}s left)")
        bar.close()
        subspace = fit_pca(moments, max_rank)
        store.write_subspace(subspace)
        projected = sum(pool.map_unordered(lambda a, n: a.project.remote(store.uri, n), range(len(shards))))
    explained = subspace.explained_variance().tolist()
    store.finish({"key": key, "teacher": str(model_dir), "layers": layers, "max_rank": max_rank, "segments": segments,
                  "shards": len(shards), "examples": projected, "step_vectors": moments.count,
                  "skipped_without_cot": len(examples) - len(kept), "explained_variance": explained})
    log(f"[teacher] store {store.uri}: {projected} trajectories, explained variance at rank {max_rank}: "
        + " ".join(f"L{layer}={v:.3f}" for layer, v in zip(layers, explained, strict=True)))
    return store

"""Fresh problems for every batch (``student.problems: fresh``): 4×4 multiplication has 81 million problems, so a
student need never see one twice. Each step's global batch is drawn from a generator seeded by (run seed, step): a
resumed stage sees the same stream, every rank draws the same batch and takes its own rows, and no validation or
held-out question is ever drawn. The frozen teacher's targets for those problems are computed inside the training
step, the same way the trajectory pass computes them for the stored split (``trajectories.teacher_step_means``),
projected on the subspace that pass fitted on the training split.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import BaseModel
from safetensors.torch import load_file

from .batch import Batch, answer_positions
from .data import Example, random_multiplication
from .models import load_model
from .subspace import Subspace, resample_steps
from .tokens import Layout, add_latent_tokens, collate, load_tokenizer
from .trajectories import stack, teacher_step_means


class FreshProblems(BaseModel):
    """What a worker needs to draw a step's problems and their targets (travels in the stage's config)."""
    digits: tuple[int, int]
    seed: int
    excluded: list[str]  # the validation and held-out questions
    latent_slots: int  # the student's (0: none)
    segments: Literal["steps", "separator", "digits"] = "steps"  # what a trajectory unit averages (``Layout.segments``)
    # units the targets are resampled to (``student.latent_slots``, as from the store); None: as extracted, one per
    # answer digit, read at the answer position that writes that digit (``trajectory.segments: digits``)
    steps: int | None = None
    # none: the student's sequences alone (nocot); coordinates: LoRi's, through ``targets_path``'s subspace;
    # hidden: the full-width step states (icot_kd)
    targets: Literal["none", "coordinates", "hidden"] = "none"
    teacher_dir: str | None = None
    teacher_layers: list[int] = []  # hidden-state indices of the teacher, one per aligned student layer
    # safetensors: the subspace (``mean`` [L, d], ``basis`` [L, d, r], ``eigenvalues``) of those layers, and the
    # answer readout's standardisation ``answer_mean``/``answer_std`` [L, F] (when the student has a readout)
    targets_path: str | None = None
    readout: bool = False  # the student reads the trajectory at its answer positions
    slot_targets: bool = False  # the student's latent slots are aligned


def fresh_problems(step: int, count: int, digits: tuple[int, int], seed: int,
                   excluded: frozenset[str] = frozenset()) -> list[Example]:
    """The ``count`` problems of ``step``: the same for the same (seed, step), never a question in ``excluded``."""
    rng = random.Random(f"fresh-{seed}-{step}")  # a str seed is hashed (sha512): independent streams per step
    problems = []
    while len(problems) < count:
        problem = random_multiplication(rng, *digits)
        if problem.question not in excluded:
            problems.append(problem)
    return problems


class FreshBatches:
    """A worker's batches of fresh problems, with the frozen teacher's targets computed on the worker."""

    def __init__(self, fresh: FreshProblems, student_dir: str, batch_size: int):
        self.fresh, self.batch_size = fresh, batch_size
        self.excluded = frozenset(fresh.excluded)
        tokenizer = load_tokenizer(student_dir)
        self.layout = Layout(tokenizer, add_latent_tokens(tokenizer, fresh.latent_slots) if fresh.latent_slots else [])
        self.teacher = self.teacher_layout = None
        if fresh.targets != "none":
            self.teacher = load_model(fresh.teacher_dir).eval().requires_grad_(False)
            self.teacher_layout = Layout(load_tokenizer(fresh.teacher_dir))
        self.tensors = load_file(fresh.targets_path) if fresh.targets_path else {}
        self.subspace = (Subspace(self.tensors["mean"], self.tensors["basis"], self.tensors["eigenvalues"])
                         if fresh.targets == "coordinates" else None)

    def __call__(self, step: int, rank: int, world: int) -> Batch:
        """Rank ``rank``'s rows of the global batch of ``step``."""
        micro = self.batch_size // world
        problems = fresh_problems(step, self.batch_size, self.fresh.digits, self.fresh.seed, self.excluded)
        return self.batch(problems[rank * micro:(rank + 1) * micro])

    @torch.no_grad()
    def batch(self, problems: list[Example]) -> Batch:
        """The training batch of ``problems``, laid out as the student stage stores a split (``stages.student``)."""
        sequences = [self.layout.student(p) for p in problems]
        batch: Batch = collate(sequences, self.layout.pad)
        if self.teacher is None:
            return batch
        teacher_sequences = [self.teacher_layout.teacher(p) for p in problems]
        means = teacher_step_means(self.teacher, self.teacher_layout, teacher_sequences, self.fresh.teacher_layers,
                                   self.fresh.segments)
        states = stack(means, self.fresh.steps)  # [B, L, K, d], resampled to the slots like the store's
        if self.fresh.targets == "coordinates":  # as the trajectory pass projects a stored trajectory
            targets = self.subspace.project(states.transpose(1, 2)).transpose(1, 2)
        else:
            targets = states
        per_digit = self.fresh.steps is None
        if self.fresh.readout:
            positions = answer_positions(sequences)
            # per digit: position p reads digit p's unit [B, L, P, r]; else every position the whole trajectory
            features, positions = (targets, positions[:, :targets.shape[2]]) if per_digit else (targets.flatten(2),
                                                                                               positions)
            if "answer_mean" in self.tensors:  # loss.normalize: standardised as the training split's were
                features = (features - self.tensors["answer_mean"]) / self.tensors["answer_std"]
            batch["answer_positions"], batch["answer_targets"] = positions, features
        if self.fresh.slot_targets:
            batch["latent_positions"] = torch.tensor([[start for start, _ in s.spans] for s in sequences])
            batch["targets"] = resample_steps(targets, self.fresh.latent_slots) if per_digit else targets
        return batch

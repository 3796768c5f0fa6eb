"""The training batch, declared once: the tensors a stage writes (``stages.training.write_tensors`` refuses any
other key), a worker slices per step, the curricula reshape and the objective reads.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor

from .tokens import collate


class Batch(TypedDict, total=False):
    """One batch of B rows and T positions (the stored data set is the same with all its rows). The sequence keys
    are always there; the others when the student's method or curriculum uses them."""

    input_ids: Tensor  # [B, T], right-padded
    labels: Tensor  # [B, T], IGNORE_INDEX where no loss
    attention_mask: Tensor  # [B, T]
    latent_positions: Tensor  # [B, K]: positions aligned with the teacher (latent slots; ``####`` for codi)
    targets: Tensor  # [B, L, K, r]: the teacher's coordinates (lori) or hidden states (icot_kd, codi) there
    answer_positions: Tensor  # [B, P]: ``####`` and the answer tokens, -1 = none
    answer_targets: Tensor  # [B, L, F] (or [B, L, P, F] per digit): what the answer readout predicts
    cot_start: Tensor  # [B]: each row's first CoT token (curricula)
    cot_length: Tensor  # [B]: its CoT tokens up to ``####``
    step_starts: Tensor  # [B, S]: where each CoT step starts, -1 = none (Coconut's stages)
    teacher_input_ids: Tensor  # [B, T']: the teacher's own sequences, for the kd term
    teacher_labels: Tensor  # [B, T']
    teacher_attention_mask: Tensor  # [B, T']


KEYS = frozenset(Batch.__annotations__)
SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask")
TEACHER_PREFIX = "teacher_"


def check_keys(tensors: dict[str, Tensor]) -> None:
    """A tensor the contract does not declare is a bug in the stage that wrote it: no worker would read it."""
    unknown = sorted(set(tensors) - KEYS)
    if unknown:
        raise ValueError(f"not keys of the training batch (lori_ray.batch.Batch): {unknown}")


def teacher_sequences(sequences, pad_id: int) -> Batch:
    """The teacher's own sequences (``Layout.teacher``) under their ``teacher_`` keys."""
    return {f"{TEACHER_PREFIX}{k}": v for k, v in collate(sequences, pad_id).items()}


def answer_positions(sequences) -> torch.Tensor:
    """Positions of ``####`` and the answer tokens of each sequence [n, P], padded with -1."""
    spans = [range(*s.answer) for s in sequences]
    positions = torch.full((len(spans), max(len(r) for r in spans)), -1, dtype=torch.long)
    for row, span in enumerate(spans):
        positions[row, :len(span)] = torch.tensor(span)
    return positions


def trim_padding(batch: Batch) -> Batch:
    """Per-batch padding: the stored sequences are right-padded to the data set's longest one; a batch keeps
    only the columns up to its own last attended token (``input_ids``, ``labels``, ``attention_mask``, and the
    ``teacher_`` ones by their own mask). The cut columns are padding in every row, so nothing a causal model
    computes for the kept positions changes; positions stored elsewhere in the batch all point inside."""
    trimmed = dict(batch)
    for prefix in ("", TEACHER_PREFIX):
        mask = batch.get(f"{prefix}attention_mask")
        if mask is None:
            continue
        attended = mask.any(0).nonzero()
        width = int(attended.max()) + 1 if len(attended) else 0
        for key in SEQUENCE_KEYS:
            trimmed[f"{prefix}{key}"] = batch[f"{prefix}{key}"][:, :width]
    return trimmed

"""Curricula that take the student from the teacher's CoT sequences to answering without them, applied to each
training batch on the fly (seeded by step, so a resumed run sees the same batches); docs/method.md#curricula.

``removal`` (ICoT-SI, Deng et al. 2024): the first CoT tokens go, ``tokens_per_epoch`` more per pass over the
training data; removal smoothing removes ``o`` extra tokens with probability ∝ exp(-λ·o), so the next
increment is never a surprise. The removal is a left shift of each row's tokens after its CoT start.

``stages`` (Coconut, Hao et al. 2024; the config keeps the paper's word): at phase s the first s CoT steps of every
row give way to s·c latent tokens; the last phase has no language CoT left and is the student's own layout. In the
code a *stage* is a pipeline stage (teacher, trajectories, student, evaluation); Coconut's are *phases*.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from .batch import Batch, trim_padding
from .tokens import IGNORE_INDEX

MAX_SMOOTHING_OFFSET = 64  # exp(-λ·o) beyond this is negligible for any useful λ


class RemovalSchedule(BaseModel):
    """ICoT-SI's removal as a training stage runs it (the batch has ``cot_start``, ``cot_length``)."""
    steps_per_token: float  # one more CoT token removed every this many steps
    smoothing: float  # λ of the removal smoothing
    pad_id: int


class PhaseSchedule(BaseModel):
    """Coconut's phases as a training stage runs them (the batch has ``cot_start``, ``cot_length``, ``step_starts``).
    ``steps_per_stage``: ``student.steps_per_stage`` of the config, which keeps Coconut's word."""
    steps_per_stage: int
    last: int  # the last phase: no language CoT left
    latents_per_step: int
    latent_ids: list[int]
    pad_id: int


def cot_spans(sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """Each teacher sequence's CoT as (first CoT token, tokens up to ``####``): what removal may drop."""
    starts = torch.tensor([s.spans[0][0] if s.spans else s.answer[0] for s in sequences])
    return starts, torch.tensor([s.answer[0] for s in sequences]) - starts


def step_starts(sequences) -> torch.Tensor:
    """The first token of each CoT step [n, S], -1 past a row's last step: where Coconut's stages cut."""
    starts = torch.full((len(sequences), max(len(s.spans) for s in sequences)), -1, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        starts[row, :len(sequence.spans)] = torch.tensor([start for start, _ in sequence.spans], dtype=torch.long)
    return starts


def scheduled_removal(step: int, steps_per_token: float) -> int:
    """CoT tokens the schedule has removed at ``step``: one more every ``steps_per_token`` steps."""
    return int(step // steps_per_token)


def sample_removals(scheduled: int, cot_lengths: torch.Tensor, smoothing: float,
                    generator: torch.Generator) -> torch.Tensor:
    """Tokens to remove from each row: the scheduled count plus a smoothing offset (none when ``smoothing``
    is 0), never more than the row's CoT."""
    counts = torch.full_like(cot_lengths, scheduled)
    if smoothing > 0:
        offsets = torch.arange(MAX_SMOOTHING_OFFSET + 1, dtype=torch.float64)
        weights = torch.exp(-smoothing * offsets)
        counts = counts + torch.multinomial(weights, len(cot_lengths), replacement=True, generator=generator)
    return torch.minimum(counts, cot_lengths)


def remove_cot_tokens(batch: Batch, counts: torch.Tensor, pad_id: int) -> Batch:
    """Drop ``counts[i]`` tokens from row i starting at its ``cot_start``: later tokens move left, the freed
    tail is padding (ignored label, masked) and columns that are padding in every row are cut.
    ``answer_positions`` (-1 = none) move with their tokens."""
    input_ids = batch["input_ids"]
    rows, length = input_ids.shape
    starts, counts = batch["cot_start"][:, None], counts[:, None]
    index = torch.arange(length)[None].expand(rows, -1)
    source = torch.where(index < starts, index, index + counts)
    inside = source < length
    source = source.clamp(max=length - 1)
    shifted = dict(batch)
    for key, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
        shifted[key] = torch.where(inside, batch[key].gather(1, source), torch.full_like(batch[key], fill))
    if "answer_positions" in batch:
        positions = batch["answer_positions"]
        shifted["answer_positions"] = torch.where(positions >= starts, positions - counts, positions)
    return trim_padding(shifted)


def latent_phase(step: int, steps_per_stage: int, last: int) -> int:
    """Coconut's phase at ``step``: one more CoT step replaced every ``steps_per_stage`` steps, up to ``last``."""
    return min(step // steps_per_stage, last)


def replace_cot_steps(batch: Batch, phase: int, latent_ids: list[int], pad_id: int) -> Batch:
    """Coconut's phase ``phase``: each row's first ``phase`` CoT steps (with the separators after them; all of its
    CoT when it has no more steps) are cut and ``latent_ids`` (the phase's s·c latents) take their place,
    unlabelled; the rest of the CoT and the answer stay. Needs ``cot_start``, ``cot_length`` and ``step_starts``;
    ``answer_positions`` (-1 = none) move with their tokens; rows are right-padded anew."""
    rows = []
    for row in range(batch["input_ids"].shape[0]):
        length, start = int(batch["attention_mask"][row].sum()), int(batch["cot_start"][row])
        starts = [s for s in batch["step_starts"][row].tolist() if s >= 0]
        cut = starts[phase] if phase < len(starts) else start + int(batch["cot_length"][row])
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        rows.append((torch.cat([ids[:start], torch.tensor(latent_ids, dtype=ids.dtype), ids[cut:length]]),
                     torch.cat([labels[:start], torch.full((len(latent_ids),), IGNORE_INDEX, dtype=labels.dtype),
                                labels[cut:length]]),
                     len(latent_ids) - (cut - start)))
    width = max(len(ids) for ids, _, _ in rows)
    replaced = dict(batch)
    replaced["input_ids"] = torch.full((len(rows), width), pad_id, dtype=batch["input_ids"].dtype)
    replaced["labels"] = torch.full((len(rows), width), IGNORE_INDEX, dtype=batch["labels"].dtype)
    replaced["attention_mask"] = torch.zeros((len(rows), width), dtype=batch["attention_mask"].dtype)
    for row, (ids, labels, _) in enumerate(rows):
        replaced["input_ids"][row, :len(ids)], replaced["labels"][row, :len(ids)] = ids, labels
        replaced["attention_mask"][row, :len(ids)] = 1
    if "answer_positions" in batch:
        positions, shift = batch["answer_positions"], torch.tensor([s for _, _, s in rows])[:, None]
        replaced["answer_positions"] = torch.where(positions >= batch["cot_start"][:, None], positions + shift,
                                                   positions)
    return replaced

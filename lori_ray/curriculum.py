"""ICoT-SI's removal curriculum (Deng et al. 2024): the student trains on the teacher's CoT sequences and
loses their first CoT tokens step by step until it answers from the question alone.

The schedule removes ``tokens_per_epoch`` CoT tokens per pass over the training data; removal smoothing
removes ``o`` extra tokens with probability ∝ exp(-λ·o), so the next increment is never a surprise. The
removal itself is a left shift of each row's tokens after its CoT start, applied to a batch on the fly.
"""

from __future__ import annotations

import torch

from .tokens import IGNORE_INDEX

MAX_SMOOTHING_OFFSET = 64  # exp(-λ·o) beyond this is negligible for any useful λ


def cot_spans(sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """Each teacher sequence's CoT as (first CoT token, tokens up to ``####``): what removal may drop."""
    starts = torch.tensor([s.spans[0][0] if s.spans else s.answer[0] for s in sequences])
    return starts, torch.tensor([s.answer[0] for s in sequences]) - starts


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


def remove_cot_tokens(batch: dict[str, torch.Tensor], counts: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
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
    width = int(shifted["attention_mask"].sum(1).max())
    for key in ("input_ids", "labels", "attention_mask"):
        shifted[key] = shifted[key][:, :width]
    return shifted

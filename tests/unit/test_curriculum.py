"""ICoT-SI removal: the schedule, the smoothing offsets and the token removal against per-row references."""

import math

import torch

from lori_ray.batch import answer_positions
from lori_ray.curriculum import cot_spans, remove_cot_tokens, sample_removals, scheduled_removal
from lori_ray.data import generate_multiplication
from lori_ray.tokens import IGNORE_INDEX, Layout, arithmetic_tokenizer, collate


def teacher_batch(count: int = 6):
    layout = Layout(arithmetic_tokenizer())
    examples = generate_multiplication(count // 2, 2, 2, seed=3) + generate_multiplication(count // 2, 3, 2, seed=4)
    sequences = [layout.teacher(e) for e in examples]
    batch = collate(sequences, layout.pad)
    batch["cot_start"], batch["cot_length"] = cot_spans(sequences)
    batch["answer_positions"] = answer_positions(sequences)
    return layout, examples, sequences, batch


def test_removal_drops_each_rows_first_cot_tokens_like_list_slicing():
    layout, _, sequences, batch = teacher_batch()
    assert batch["cot_length"].tolist() == [8, 8, 8, 10, 10, 10]  # 2x2 and 3x2 CoTs, `+` included
    counts = torch.tensor([0, 3, 8, 1, 10, 5])
    removed = remove_cot_tokens(batch, counts, layout.pad)
    expected = [s.input_ids[:s.spans[0][0]] + s.input_ids[s.spans[0][0] + c:]
                for s, c in zip(sequences, counts.tolist(), strict=True)]
    assert removed["input_ids"].shape[1] == max(len(e) for e in expected)  # all-padding columns are cut
    for row, (sequence, count, ids) in enumerate(zip(sequences, counts.tolist(), expected, strict=True)):
        start = sequence.spans[0][0]
        assert removed["input_ids"][row, :len(ids)].tolist() == ids
        assert removed["labels"][row, :len(ids)].tolist() == sequence.labels[:start] + sequence.labels[start + count:]
        assert removed["attention_mask"][row].sum() == len(ids)
        assert (removed["labels"][row, len(ids):] == IGNORE_INDEX).all()
        assert (removed["input_ids"][row, len(ids):] == layout.pad).all()
        positions = [p for p in removed["answer_positions"][row].tolist() if p >= 0]
        assert [ids[p] for p in positions] == sequence.input_ids[sequence.answer[0]:sequence.answer[1]]


def test_removing_the_whole_cot_leaves_the_students_sequence():
    """Fully removed, a teacher sequence is exactly what a nocot student trains on (and is evaluated on)."""
    layout, examples, _, batch = teacher_batch()
    removed = remove_cot_tokens(batch, batch["cot_length"], layout.pad)
    student = collate([layout.student(e) for e in examples], layout.pad)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(removed[key], student[key]), key


def test_schedule_removes_one_token_every_steps_per_token_steps():
    assert [scheduled_removal(step, 2.5) for step in range(9)] == [0, 0, 0, 1, 1, 2, 2, 2, 3]


def test_smoothing_offsets_follow_exp_minus_lambda_and_never_exceed_the_cot():
    lengths = torch.full((20000,), 30)
    exact = sample_removals(4, lengths, 0.0, torch.Generator().manual_seed(0))
    assert (exact == 4).all()
    smoothed = sample_removals(4, lengths, 1.0, torch.Generator().manual_seed(0)) - 4
    for offset in range(3):  # P(o) = (1 - e^-λ) e^(-λ o)
        expected = (1 - math.exp(-1.0)) * math.exp(-offset)
        assert abs((smoothed == offset).float().mean().item() - expected) < 0.015
    capped = sample_removals(28, torch.tensor([30, 5, 29]), 0.5, torch.Generator().manual_seed(1))
    assert capped[1] == 5 and (capped <= torch.tensor([30, 5, 29])).all()


def stage_batch():
    from lori_ray.curriculum import step_starts
    layout, examples, sequences, batch = teacher_batch()
    batch["step_starts"] = step_starts(sequences)
    return layout, examples, sequences, batch


def test_the_last_coconut_stage_is_the_students_own_layout():
    from lori_ray.curriculum import replace_cot_steps
    from lori_ray.tokens import add_latent_tokens
    layout, examples, _sequences, batch = stage_batch()
    tokenizer = layout.tokenizer
    latents = add_latent_tokens(tokenizer, 4)  # 2 steps (2x2, 3x2 problems) x 2 latents per step
    student = Layout(tokenizer, latents)
    replaced = replace_cot_steps(batch, 2, latents, layout.pad)
    expected = collate([student.student(e) for e in examples], layout.pad)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(replaced[key], expected[key]), key
    assert torch.equal(replaced["answer_positions"], answer_positions([student.student(e) for e in examples]))


def test_a_middle_coconut_stage_keeps_the_later_steps_in_language():
    from lori_ray.curriculum import replace_cot_steps
    layout, _examples, sequences, batch = stage_batch()
    latents = [100, 101]
    replaced = replace_cot_steps(batch, 1, latents, layout.pad)
    for row, sequence in enumerate(sequences):
        (start, _), (second, _) = sequence.spans[:2]  # step 2 starts after step 1 and its `+`
        ids = sequence.input_ids[:start] + latents + sequence.input_ids[second:]
        labels = sequence.labels[:start] + [IGNORE_INDEX] * 2 + sequence.labels[second:]
        assert replaced["input_ids"][row, :len(ids)].tolist() == ids
        assert replaced["labels"][row, :len(ids)].tolist() == labels
        assert replaced["attention_mask"][row].sum() == len(ids)
        positions = [p for p in replaced["answer_positions"][row].tolist() if p >= 0]
        assert [ids[p] for p in positions] == sequence.input_ids[sequence.answer[0]:sequence.answer[1]]
    assert torch.equal(replace_cot_steps(batch, 0, [], layout.pad)["input_ids"], batch["input_ids"])


def test_coconut_stages_advance_every_steps_per_stage_up_to_the_last():
    from lori_ray.curriculum import latent_phase
    assert [latent_phase(step, 3, 2) for step in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]

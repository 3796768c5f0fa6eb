import pytest
import torch
from test_data import GSM8K
from transformers import AutoTokenizer

from lori_ray.data import generate_multiplication, multiplication_example, parse_line
from lori_ray.models import FAMILIES
from lori_ray.tokens import (
    IGNORE_INDEX,
    Layout,
    add_latent_tokens,
    arithmetic_tokenizer,
    collate,
    left_pad,
)


def layout(latents=3):
    tokenizer = arithmetic_tokenizer()
    return Layout(tokenizer, add_latent_tokens(tokenizer, latents))


def test_teacher_spans_cover_exactly_the_steps():
    lay = layout()
    example = generate_multiplication(1, 4, 4, seed=0)[0]
    sequence = lay.teacher(example)
    decoded = [lay.tokenizer.decode(sequence.input_ids[a:b]) for a, b in sequence.spans]
    assert decoded == list(example.steps)
    answer_start = sequence.labels.index(next(x for x in sequence.labels if x != IGNORE_INDEX))
    assert answer_start == sequence.spans[0][0]  # loss on the CoT and answer, not the question
    assert sequence.input_ids[-1] == lay.eos


def test_student_sequence_has_latents_and_no_cot():
    lay = layout(3)
    example = generate_multiplication(1, 3, 3, seed=0)[0]
    sequence = lay.student(example)
    assert [sequence.input_ids[a] for a, _ in sequence.spans] == lay.latent_ids
    assert "+" not in lay.tokenizer.decode(sequence.input_ids)
    labelled = [t for t, y in zip(sequence.input_ids, sequence.labels) if y != IGNORE_INDEX]
    assert lay.decode_answer(labelled, with_cot=True) == example.answer.replace(" ", "")
    assert lay.student_prompt(example) == sequence.input_ids[:len(lay.student_prompt(example))]


def test_decode_answer_from_generated_cot():
    lay = layout()
    example = generate_multiplication(1, 3, 3, seed=1)[0]
    generated = lay.teacher(example).input_ids[len(lay.question(example)):] + [lay.pad, lay.pad]
    assert lay.decode_answer(generated, with_cot=True) == example.answer.replace(" ", "")
    assert lay.decode_answer(lay.tokenizer.encode(" 1 2 3", add_special_tokens=False), with_cot=True) == ""


def test_tokenizer_saves_and_loads_with_autotokenizer(tmp_path):
    tokenizer = arithmetic_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    line = generate_multiplication(1, 2, 2)[0].to_line()
    assert loaded.encode(line.replace("||", " || ")) == tokenizer.encode(line.replace("||", " || "))
    assert loaded.unk_token_id not in loaded.encode(line.replace("||", " || "), add_special_tokens=False)


def test_gsm8k_steps_with_a_bpe_like_tokenizer():
    # any HF tokenizer works: spans still decode to the equations
    tokenizer = arithmetic_tokenizer()
    tokenizer.add_tokens([w for w in GSM8K.replace("||", " ").split() if w not in tokenizer.get_vocab()])
    example = parse_line(GSM8K.replace("||", " ||", 1))
    lay = Layout(tokenizer)
    sequence = lay.teacher(example)
    assert [tokenizer.decode(sequence.input_ids[a:b]) for a, b in sequence.spans] == list(example.steps)


def test_collate_and_left_pad():
    lay = layout()
    sequences = [lay.teacher(e) for e in generate_multiplication(3, 2, 2) + generate_multiplication(2, 3, 3)]
    batch = collate(sequences, lay.pad)
    assert batch["input_ids"].shape == (5, max(len(s.input_ids) for s in sequences))
    assert (batch["attention_mask"].sum(1) == torch.tensor([len(s.input_ids) for s in sequences])).all()
    left = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_answer_span_is_the_separator_and_the_answer_tokens_in_both_layouts():
    lay = layout(2)
    example = generate_multiplication(1, 3, 3, seed=0)[0]
    for sequence in (lay.teacher(example), lay.student(example)):
        start, end = sequence.answer
        assert lay.tokenizer.decode(sequence.input_ids[start:end]) == f"#### {example.answer}"
        assert sequence.input_ids[end] == lay.eos and end == len(sequence.input_ids) - 1


def test_digit_segments_collect_the_writers_of_each_answer_digits_place():
    """3x3: answer digit p (least significant first) is fed by digit p of each partial product and of the
    running sum; its segment holds the positions that write those digits (the token before each)."""
    lay = layout(0)
    example = multiplication_example(123, 456, 3, 3)  # CoT: 8 3 7 0 + 0 5 1 6 0 ( 8 8 8 6 0 ) + 0 0 2 9 4 0
    sequence = lay.teacher(example)
    columns = lay.segments(sequence, "digits")
    assert len(columns) == 6
    tokens = lay.tokenizer.convert_ids_to_tokens(sequence.input_ids)
    written = [[tokens[p + 1] for p in column] for column in columns]
    assert written[0] == ["8", "0", "8", "0"]  # units digit of 738, 6150, their sum 6888, and 49200
    assert written[4] == ["0", "0", "4"]  # ten-thousands: only the 5- and 6-digit numbers have that place
    assert written[5] == ["0"]
    assert all(tokens[p + 1].isdigit() for column in columns for p in column)
    assert lay.segments(sequence, "steps") == [list(range(a, b)) for a, b in sequence.spans]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_preset_of_any_family_keeps_the_tokenizer_it_was_saved_with(family, tmp_path):
    """The teacher's initial directory and the trained model's (the final checkpoint saves the tokenizer again):
    transformers 5's AutoTokenizer turned a qwen2 preset's tokenizer into a byte-level BPE without || and ####."""
    from lori_ray.models import build_model
    from lori_ray.tokens import load_tokenizer, tokenizer_from

    tokenizer = arithmetic_tokenizer()
    model = build_model(family, "tiny", len(tokenizer), 64, {"pad_token_id": tokenizer.pad_token_id})
    for directory in ("init", "trained"):
        model.save_pretrained(tmp_path / directory)
    tokenizer.save_pretrained(tmp_path / "init")
    tokenizer_from(str(tmp_path / "init")).save_pretrained(tmp_path / "trained")
    example = generate_multiplication(1, 3, 3, seed=0)[0]
    expected = Layout(tokenizer).teacher(example).input_ids
    for directory in ("init", "trained"):
        loaded = load_tokenizer(str(tmp_path / directory))
        assert Layout(loaded).teacher(example).input_ids == expected, (family, directory)
        assert loaded.decode(expected) == tokenizer.decode(expected)

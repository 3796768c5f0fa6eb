from dataclasses import replace

import pytest
import torch
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

from .test_data import GSM8K


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
    labelled = [t for t, y in zip(sequence.input_ids, sequence.labels, strict=True) if y != IGNORE_INDEX]
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


def byte_level_tokenizer():
    """A small byte-level BPE (GPT-2's scheme: any text, newlines included, decodes back exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["What is (3+4)*2?\n3+4=7\n7*2=14 #### 14"] * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def test_list_valued_steps_keep_the_users_newline_in_the_teachers_cot_with_a_span_per_step(tmp_path):
    import json

    from lori_ray.data import read_table
    path = tmp_path / "coconut.jsonl"
    path.write_text(json.dumps({"question": "What is (3+4)*2?", "steps": ["3+4=7", "7*2=14"], "answer": "14"}) + "\n")
    (example,) = read_table(path, {"question": "question", "cot": "steps", "answer": "answer"})
    assert example.joiner == "\n" and example.cot == "3+4=7\n7*2=14"
    lay = Layout(byte_level_tokenizer())
    sequence = lay.teacher(example)
    decode = lay.tokenizer.decode
    assert decode(sequence.input_ids[sequence.spans[0][0]:sequence.answer[0]]) == " 3+4=7\n7*2=14"
    assert [decode(sequence.input_ids[a:b]).strip() for a, b in sequence.spans] == ["3+4=7", "7*2=14"]
    assert decode(sequence.input_ids) == " What is (3+4)*2? || 3+4=7\n7*2=14 #### 14<eos>"  # no <bos> here
    # another joiner of the user's: its spaces go with the steps, a span still per step
    sequence = lay.teacher(replace(example, joiner=" ; "))
    assert decode(sequence.input_ids[sequence.spans[0][0]:sequence.answer[0]]) == " 3+4=7 ; 7*2=14"
    assert len(sequence.spans) == 2


def test_the_formats_own_joiners_give_the_tokens_they_always_gave():
    lay = layout()
    for example in (generate_multiplication(1, 4, 4, seed=0)[0], parse_line(GSM8K.replace("||", " ||", 1))):
        tokenizer = lay.tokenizer
        tokenizer.add_tokens([w for w in example.question.split() if w not in tokenizer.get_vocab()])
        expected = list(lay.question(example))
        for i, step in enumerate(example.steps):  # the layout before joiners: ' +' between partial products
            expected += (tokenizer.encode(" +", add_special_tokens=False) if i and "<<" not in step else []) + \
                tokenizer.encode(" " + step, add_special_tokens=False)
        sequence = lay.teacher(example)
        assert sequence.input_ids[:len(expected)] == expected
        assert lay.teacher(replace(example, joiner=example.step_joiner)) == sequence

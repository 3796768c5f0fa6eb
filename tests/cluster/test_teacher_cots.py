"""The teacher writes CoTs for examples that have none: greedy generation (on the actor pool), parsed
like a data line, kept only when the written answer is the gold one."""

import re

import pytest
import ray
import torch

from lori_ray.cluster import start_local
from lori_ray.data import Example, generate_multiplication
from lori_ray.models import build_model
from lori_ray.teacher_pool import complete_missing_cots, written_cots
from lori_ray.tokens import Layout, arithmetic_tokenizer, collate


@pytest.fixture(scope="module")
def memorising_teacher(tmp_path_factory):
    """A tiny teacher trained until it writes the CoT of three known problems."""
    tokenizer = arithmetic_tokenizer()
    layout = Layout(tokenizer)
    examples = generate_multiplication(3, 2, 2, seed=5)
    special = {"pad_token_id": layout.pad, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": layout.eos}
    model = build_model("llama", "tiny", len(tokenizer), 64, special, seed=0)
    batch = collate([layout.teacher(e) for e in examples], layout.pad)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    directory = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model.eval(), layout, examples, directory


def without_cot(example: Example, answer: str | None = None) -> Example:
    return Example(example.question, (), answer or example.answer)


def test_written_cots_parse_into_steps_and_reject_wrong_answers(memorising_teacher):
    model, layout, examples, _ = memorising_teacher
    questions = [without_cot(e) for e in examples] + [without_cot(examples[0], answer="1 2 3")]
    written = written_cots(model, layout, questions, batch_size=2, max_new_tokens=40)
    assert written[:3] == examples  # the memorised CoTs, step by step
    assert written[3] is None  # its answer is not the (wrong) gold one


def test_actor_pool_completes_only_the_missing_cots_in_order(memorising_teacher, capsys):
    _, _, examples, directory = memorising_teacher
    start_local(2, include_dashboard=False)
    try:
        inputs = [examples[0], without_cot(examples[1]), without_cot(examples[2], answer="9")]
        messages = []
        completed = complete_missing_cots(directory, inputs, num_actors=2, batch_size=2, max_new_tokens=40,
                                          chunk_size=1, log=messages.append, bars=True)
    finally:
        ray.shutdown()
    assert re.search(r"teacher CoTs: 100%\|.*\| 2\.00/2\.00 \[", capsys.readouterr().err)  # one per chunk
    assert completed[0] is inputs[0]  # a gold CoT is kept as it is
    assert completed[1] == examples[1]
    assert completed[2] == inputs[2]  # wrong teacher answer: left without a CoT
    assert "1 of 2 examples without a gold CoT" in messages[-1]

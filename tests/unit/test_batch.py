"""The training batch contract: its keys, per-batch padding."""

import pytest
import torch

from lori_ray.batch import KEYS, check_keys, trim_padding
from lori_ray.stages.training import write_tensors
from lori_ray.tokens import Sequence, collate


def test_trim_padding_keeps_each_batch_to_its_own_longest_row():
    # a naive reference: pad every row again to the batch's longest
    rows = [[5, 6, 7], [5, 6], [5, 6, 7, 8, 9, 10]]
    stored = collate([Sequence(r, r, []) for r in rows], pad_id=0, length=12)  # the data set's longest is 12
    batch = {**stored, "answer_positions": torch.tensor([[1], [0], [4]]),
             "teacher_input_ids": torch.ones(3, 9, dtype=torch.long),
             "teacher_labels": torch.ones(3, 9, dtype=torch.long),
             "teacher_attention_mask": torch.tensor([[1] * 7 + [0] * 2] * 3)}
    trimmed = trim_padding({**batch, **{k: v[:2] for k, v in batch.items()}})  # rows 0 and 1: longest 3
    expected = collate([Sequence(r, r, []) for r in rows[:2]], pad_id=0)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(trimmed[key], expected[key])
    assert trimmed["teacher_input_ids"].shape == (2, 7)  # by the teacher's own mask
    assert torch.equal(trimmed["answer_positions"], batch["answer_positions"][:2])  # positions are not columns
    assert trim_padding(batch)["input_ids"].shape == (3, 6)


def test_a_stage_cannot_write_a_tensor_the_batch_does_not_declare(tmp_path):
    sequences = [Sequence([5, 6, 7], [5, 6, 7], [])]
    assert {"input_ids", "labels", "attention_mask", "latent_positions", "answer_targets"} <= KEYS
    write_tensors(sequences, 0, 8, tmp_path / "ok.safetensors", latent_positions=torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"not keys of the training batch .*\['latent_slots'\]"):
        write_tensors(sequences, 0, 8, tmp_path / "typo.safetensors", latent_slots=torch.tensor([[1]]))
    assert not (tmp_path / "typo.safetensors").exists()
    check_keys({"teacher_input_ids": torch.zeros(1)})

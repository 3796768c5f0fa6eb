"""RED pruned students: channel selection, exact reproduction at full width, merging, eRank."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lori_ray.models import build_model
from lori_ray.pruned import (
    PrunedModel,
    channel_scores,
    hidden_erank,
    initial_projection,
    load_student,
    selection_matrix,
)
from lori_ray.subspace import effective_rank

SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def teacher_and_batch(family="llama", vocab=30, seed=0):
    teacher = build_model(family, "tiny", vocab, 64, SPECIAL, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return teacher, ids, mask


def test_selection_matrix_is_orthonormal_and_keeps_the_top_channels_exactly():
    scores = torch.tensor([0.3, 5.0, 0.1, 2.0, 4.0, 0.2], dtype=torch.float64)
    projection = selection_matrix(scores, 3)
    torch.testing.assert_close(torch.linalg.svdvals(projection), torch.ones(3))
    x = torch.randn(7, 6)
    assert torch.equal(x @ projection, x[:, [1, 3, 4]])  # channels in order, values untouched


def test_channel_scores_match_a_loop():
    states = (torch.randn(3, 5, 4), 10 * torch.randn(3, 5, 4))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    expected = torch.zeros(4, dtype=torch.float64)
    for layer in states:
        per_channel = torch.tensor([sum(layer[b, mask[b].bool(), c].norm().item() for b in range(3)) / 3
                                    for c in range(4)], dtype=torch.float64)
        expected += per_channel / per_channel.sum()
    torch.testing.assert_close(channel_scores(states, mask), expected)


@pytest.mark.parametrize("init", ["random", "random_orthogonal"])
def test_random_projections_have_the_documented_spectrum(init):
    projection = initial_projection(init, torch.rand(64), 16, torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(projection)
    if init == "random_orthogonal":
        torch.testing.assert_close(singular, torch.ones(16), rtol=1e-5, atol=1e-5)
    else:
        assert abs(projection.std().item() - 0.02) < 0.003 and singular.max() < 0.5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_width_identity_selection_reproduces_the_teacher(family):
    teacher, ids, mask = teacher_and_batch(family)
    with torch.no_grad():
        expected = teacher(input_ids=ids, attention_mask=mask).logits
        scores = channel_scores(teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states,
                                mask)
    student = PrunedModel.initial(teacher, 64, None, "activation", scores, vocab_size=30)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids, attention_mask=mask).logits, expected)


def test_pruned_student_trains_only_projections_and_merges_into_a_plain_hf_model(tmp_path):
    teacher, ids, mask = teacher_and_batch()
    scores = torch.rand(64, dtype=torch.float64)
    student = PrunedModel.initial(teacher, 32, 1, "activation", scores, vocab_size=33)  # + 3 latent tokens
    names = [n for n, _ in student.named_parameters()]
    assert all(n.startswith(("projection__", "direct__", "new_rows__")) for n in names)
    assert student.state_dict().keys() == set(names)  # frozen teacher weights are buffers, never saved
    ids = torch.cat([ids, torch.full((4, 1), 31)], 1)  # a latent token: its row is trainable
    mask = torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1)
    output = student(input_ids=ids, attention_mask=mask, labels=ids)
    output.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.get_parameter("new_rows__model__embed_tokens__weight").grad.abs().sum() > 0

    student.save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.hidden_size == 32 and merged.config.num_hidden_layers == 1
    assert merged.get_input_embeddings().weight.shape == (33, 32)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, output.logits.detach())


def test_saved_initial_student_reloads_with_its_trained_parameters(tmp_path):
    teacher, ids, mask = teacher_and_batch()
    teacher.save_pretrained(tmp_path / "teacher")
    student = PrunedModel.initial(teacher, 48, None, "random", torch.rand(64), vocab_size=30, seed=3)
    student.save_init(tmp_path / "init", tmp_path / "teacher")
    reloaded = load_student(tmp_path / "init")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                                   student(input_ids=ids, attention_mask=mask).logits)
    plain = load_student(tmp_path / "teacher")  # a plain HF directory loads as itself
    assert isinstance(plain, type(teacher))


def test_erank_matches_a_direct_svd_and_its_bounds():
    teacher, ids, mask = teacher_and_batch()
    with torch.no_grad():
        states = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    streamed = hidden_erank(teacher, ids, mask, chunk=3)  # two chunks
    for layer, value in zip(states, streamed, strict=True):
        matrix = layer[mask.bool()].double()
        singular = torch.linalg.svdvals(matrix - matrix.mean(0))
        p = singular / singular.sum()
        direct = torch.exp(-(p * p.log()).sum()).item()
        assert value == pytest.approx(direct, rel=1e-6)
        assert 1.0 <= value <= min(matrix.shape)
    assert effective_rank(torch.ones(5)).item() == pytest.approx(5.0)
    assert effective_rank(torch.tensor([3.0, 0, 0])).item() == pytest.approx(1.0)


def test_activation_init_keeps_more_erank_than_random_init():
    """The RED observation at init, on a trained-free teacher: random projections shrink the spectrum."""
    teacher, ids, mask = teacher_and_batch()
    with torch.no_grad():
        scores = channel_scores(teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states,
                                mask)
    ranks = {init: hidden_erank(PrunedModel.initial(teacher, 16, None, init, scores, 30).merge(), ids, mask)
             for init in ("activation", "random")}
    assert sum(ranks["activation"][1:]) > sum(ranks["random"][1:])

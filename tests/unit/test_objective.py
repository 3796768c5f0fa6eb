import pytest
import torch

from lori_ray.batch import trim_padding
from lori_ray.data import generate_multiplication
from lori_ray.models import FAMILIES, build_model
from lori_ray.objective import LMObjective, TrajectoryProjection, pair_layers
from lori_ray.subspace import Moments, fit_pca
from lori_ray.teacher_pool import TeacherWorker
from lori_ray.tokens import Layout, add_latent_tokens, arithmetic_tokenizer, collate
from lori_ray.trajectories import TrajectoryStore, pack, segment_means, unpack


def floats(metrics: dict) -> dict[str, float]:
    """The objective's terms are detached tensors (the training step reads them at its log interval only)."""
    return {name: float(value) for name, value in metrics.items()}


def test_pair_layers_by_relative_depth():
    assert pair_layers(4, 4, [1, 2, 3, 4]) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert pair_layers(3, 7, list(range(1, 8))) == [(1, 1), (2, 4), (3, 7)]
    assert pair_layers(3, 7, [4, 7]) == [(2, 4), (3, 7)]
    assert pair_layers(1, 6, [6]) == [(1, 6)]


def test_segment_means_match_a_loop():
    hidden = torch.randn(2, 3, 10, 4)
    segments = [[[1, 2], [3, 4, 5, 6]], [[2, 4, 9]]]  # a step span, or scattered positions (a digit's column)
    means = segment_means(hidden, segments)
    assert means[0].shape == (3, 2, 4) and means[1].shape == (3, 1, 4)
    torch.testing.assert_close(means[0][:, 1], hidden[0, :, 3:7].mean(1))
    torch.testing.assert_close(means[1][:, 0], hidden[1, :, [2, 4, 9]].mean(1))
    restored = unpack(pack(means, [7, 9]))
    assert all(torch.equal(a, b) for a, b in zip(means, restored, strict=True))


def test_projection_from_subspace_equals_subspace_coordinates():
    moments = Moments.zeros(2, 8)
    moments.update(torch.randn(50, 2, 8))
    subspace = fit_pca(moments, 3)
    states = torch.randn(4, 2, 5, 8)  # [B, L, K, d]
    expected = subspace.project(states.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(TrajectoryProjection.from_subspace(subspace)(states), expected)


def student_batch(count: int) -> tuple:
    """(tokenizer, tiny Llama, batch of ``count`` 2x2 student sequences with 2 latent slots and their positions)."""
    torch.manual_seed(0)
    tokenizer = arithmetic_tokenizer()
    layout = Layout(tokenizer, add_latent_tokens(tokenizer, 2))
    model = build_model("llama", "tiny", len(tokenizer), 64, {"pad_token_id": layout.pad})
    sequences = [layout.student(e) for e in generate_multiplication(count, 2, 2)]
    batch = collate(sequences, layout.pad)
    batch["latent_positions"] = torch.tensor([[a for a, _ in s.spans] for s in sequences])
    return tokenizer, model, batch


def test_objective_trains_latent_embeddings_through_alignment_only():
    tokenizer, model, batch = student_batch(4)
    latents = tokenizer.convert_tokens_to_ids(["<latent_0>", "<latent_1>"])
    batch["targets"] = torch.randn(4, 2, 2, 3)
    weights = {"ce": 0.0, "first_order": 1.0, "second_order": 1.0}
    objective = LMObjective(model, [1, 2], TrajectoryProjection(2, 64, 3), weights, terms=list(weights))
    loss, metrics = objective(batch)
    loss.backward()
    embedding_grad = model.get_input_embeddings().weight.grad
    assert set(metrics) == {"ce", "first_order", "second_order", "loss"}
    assert torch.isfinite(loss)
    assert metrics["loss"] == pytest.approx(metrics["first_order"] + metrics["second_order"])
    assert embedding_grad[latents].abs().sum() > 0
    # answer tokens come after the latents: causal attention keeps them out of the alignment gradient
    assert embedding_grad[tokenizer.convert_tokens_to_ids("####")].abs().sum() == 0


def test_without_projection_alignment_is_full_width_mse_at_the_slots():
    _, model, batch = student_batch(3)
    batch["targets"] = torch.randn(3, 1, 2, 64)
    metrics = floats(LMObjective(model, [2], None, {"ce": 1.0, "hidden_mse": 0.5},
                                 terms=["ce", "hidden_mse"])(batch)[1])
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True).hidden_states[2]
    slots = torch.stack([hidden[b, batch["latent_positions"][b]] for b in range(3)])  # [B, K, d]
    expected = (slots - batch["targets"][:, 0]).pow(2).mean().item()
    assert metrics["hidden_mse"] == pytest.approx(expected, rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["ce"] + 0.5 * expected, rel=1e-5)


@pytest.mark.parametrize("aligned", ["lori", "icot_kd"])
def test_target_scale_makes_alignment_invariant_to_the_teachers_magnitude(aligned):
    """Teacher trajectories c times larger, the student's mapped states too (through the projection, or the
    final norm for full-width states), and the scale c times larger: the same terms."""
    _, model, batch = student_batch(4)
    if aligned == "lori":
        layers, names, scale = [1, 2], ("first_order", "second_order"), [2.0, 0.5]
        base_targets = torch.randn(4, 2, 2, 3)
    else:  # the last hidden state is the final norm's output: its gain scales it
        layers, names, scale, base_targets = [2], ("hidden_mse",), [0.5], torch.randn(4, 1, 2, 64)
    projection = TrajectoryProjection(2, 64, 3) if aligned == "lori" else None
    weights = {"ce": 1.0, **{name: 1.0 for name in names}}

    def terms(factor: float, target_scale) -> dict:
        mapped = None
        if projection is not None:
            mapped = TrajectoryProjection(2, 64, 3)
            mapped.load_state_dict({k: factor * v for k, v in projection.state_dict().items()})
        gain = model.model.norm.weight.data.clone()
        if projection is None:
            model.model.norm.weight.data.mul_(factor)
        objective = LMObjective(model, layers, mapped, weights, terms=list(weights),
                                target_scale=target_scale and [factor * s for s in target_scale])
        result = floats(objective({**batch, "targets": factor * base_targets})[1])
        model.model.norm.weight.data.copy_(gain)
        return result

    reference, enlarged, unscaled = terms(1.0, scale), terms(37.0, scale), terms(37.0, None)
    for name in names:
        assert enlarged[name] == pytest.approx(reference[name], rel=1e-4)
        assert unscaled[name] > 100 * reference[name]  # without the scale the terms grow with the magnitude


def test_least_squares_projection_recovers_a_planted_map():
    torch.manual_seed(0)
    states = torch.randn(64, 2, 3, 10)
    weight, bias = torch.randn(2, 4, 10), torch.randn(2, 4)
    targets = torch.einsum("blkd,lrd->blkr", states, weight) + bias[:, None, :]
    projection = TrajectoryProjection.fit(states, targets)
    torch.testing.assert_close(projection.weight, weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(projection(states), targets, atol=1e-4, rtol=1e-4)


def test_slot_states_gathers_each_rows_positions():
    from lori_ray.objective import slot_states
    hidden = tuple(torch.randn(2, 6, 3) for _ in range(3))  # embeddings + 2 layers
    positions = torch.tensor([[1, 2], [4, 5]])
    states = slot_states(hidden, [2], positions)
    assert states.shape == (2, 1, 2, 3)
    torch.testing.assert_close(states[1, 0, 1], hidden[2][1, 5])


def test_tucker_projection_matches_the_fit_and_its_least_squares_init():
    from lori_ray.objective import TuckerProjection, load_projection
    from lori_ray.subspace import TuckerMoments, fit_tucker

    torch.manual_seed(0)
    x = torch.randn(200, 3, 4, 8)
    moments = TuckerMoments.zeros(3, 4, 8)
    moments.update(x)
    tucker = fit_tucker(moments, 2, 3, 5)
    projection = TuckerProjection.from_tucker(tucker)
    torch.testing.assert_close(projection(x), tucker.project(x), atol=1e-5, rtol=1e-5)
    restored = load_projection(dict(projection.state_dict()))
    torch.testing.assert_close(restored(x), projection(x))
    # another width: a planted linear student map is recovered by least squares
    student = torch.randn(200, 3, 4, 6)
    planted = torch.randn(5, 6)
    mixed = torch.einsum("nlki,la,kb->nabi", student, tucker.layer_factor, tucker.step_factor)
    fitted = TuckerProjection.fit(tucker, student, mixed @ planted.T + 1.0)
    torch.testing.assert_close(fitted(student), mixed @ planted.T + 1.0, atol=1e-4, rtol=1e-4)


def test_kd_term_runs_the_frozen_teacher_on_its_own_sequences():
    import copy
    tokenizer = arithmetic_tokenizer()
    student_layout = Layout(tokenizer, add_latent_tokens(tokenizer, 2))
    teacher_layout = Layout(tokenizer)
    examples = generate_multiplication(4, 2, 2, seed=0)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    model = build_model("llama", "tiny", len(tokenizer), 64, special, seed=1)
    sequences = [student_layout.student(e) for e in examples]
    batch = collate(sequences, tokenizer.pad_token_id)
    batch.update({f"teacher_{k}": v for k, v in
                  collate([teacher_layout.teacher(e) for e in examples], tokenizer.pad_token_id).items()})
    teacher = build_model("llama", "tiny", len(tokenizer), 64, special, seed=2)
    objective = LMObjective(model, weights={"ce": 1.0, "kd": 0.5}, teacher=teacher, terms=["ce", "kd"])
    loss, metrics = objective(batch)
    metrics = floats(metrics)
    assert metrics["kd"] > 0 and loss.item() == pytest.approx(metrics["ce"] + 0.5 * metrics["kd"], rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # frozen, and not part of the module tree
    assert not any(p is q for p in objective.parameters() for q in teacher.parameters())
    # alongside trajectory alignment the KL still sees the answer labels, not the trajectory targets
    batch["latent_positions"] = torch.tensor([[a for a, _ in s.spans] for s in sequences])
    batch["targets"] = torch.randn(4, 2, 2, 3)
    weights = {"ce": 1.0, "first_order": 1.0, "second_order": 1.0, "kd": 0.5}
    _, aligned = LMObjective(model, [1, 2], TrajectoryProjection(2, 64, 3), weights, teacher=teacher,
                             terms=list(weights))(batch)
    assert float(aligned["kd"]) == pytest.approx(float(metrics["kd"]), rel=1e-5)
    # an explicit student trains on the teacher's sequences: the same model gives KL 0
    explicit = collate([teacher_layout.teacher(e) for e in examples], tokenizer.pad_token_id)
    _, same = LMObjective(model, weights={"ce": 0.0, "kd": 1.0}, teacher=copy.deepcopy(model),
                          terms=["ce", "kd"])(explicit)
    assert float(same["kd"]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_ce_from_labelled_positions_only_equals_the_full_hf_loss(family):
    tokenizer = arithmetic_tokenizer()
    layout = Layout(tokenizer, add_latent_tokens(tokenizer, 2))
    model = build_model(family, "tiny", len(tokenizer), 64, {"pad_token_id": layout.pad}, seed=3)
    batch = collate([layout.student(e) for e in generate_multiplication(5, 3, 2, seed=1)], layout.pad)
    full = model(**batch)
    loss, _metrics = LMObjective(model)(batch)
    torch.testing.assert_close(loss, full.loss)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected = torch.autograd.grad(model(**batch).loss, list(model.parameters()), allow_unused=True)
    for mine, theirs in zip(grads, expected, strict=True):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs)


def test_answer_readout_is_one_linear_map_per_layer_and_position():
    from lori_ray.objective import AnswerReadout
    readout = AnswerReadout(2, 3, 5, 8)
    with torch.no_grad():
        readout.bias.normal_()
    states = torch.randn(4, 2, 3, 8)
    expected = torch.stack([torch.stack([states[:, layer, p] @ readout.weight[layer, p].T + readout.bias[layer, p]
                                         for p in range(3)], 1) for layer in range(2)], 1)
    torch.testing.assert_close(readout(states), expected)


def test_answer_alignment_reads_the_trajectory_at_the_answer_positions_only():
    """The readout sees the states that write ``####`` and the answer digits, never the slots or the question;
    padded positions (-1) count for nothing."""
    from lori_ray.batch import answer_positions
    from lori_ray.objective import AnswerReadout
    tokenizer = arithmetic_tokenizer()
    layout = Layout(tokenizer)  # no latent slots: the nocot layout, as with align_at=answer
    model = build_model("llama", "tiny", len(tokenizer), 64, {"pad_token_id": layout.pad})
    sequences = [layout.student(e) for e in generate_multiplication(3, 2, 2)]
    batch = collate(sequences, layout.pad)
    batch["answer_positions"] = answer_positions(sequences)
    batch["answer_positions"][2, -2:] = -1  # a shorter answer
    batch["answer_targets"] = torch.randn(3, 2, 6)
    torch.manual_seed(1)
    readout = AnswerReadout(2, batch["answer_positions"].shape[1], 6, 64)
    loss, metrics = LMObjective(model, [1, 2], weights={"ce": 1.0, "answer_align": 0.5}, readout=readout,
                                terms=["ce", "answer_align"])(batch)
    metrics = floats(metrics)
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True).hidden_states
    errors = []
    for b in range(3):
        for p in batch["answer_positions"][b].tolist():
            if p < 0:
                continue
            assert tokenizer.convert_ids_to_tokens(batch["input_ids"][b, p].item()) != "<pad>"
            for i, layer in enumerate((1, 2)):
                index = batch["answer_positions"][b].tolist().index(p)
                guess = hidden[layer][b, p] @ readout.weight[i, index].T + readout.bias[i, index]
                errors.append((guess - batch["answer_targets"][b, i]).pow(2).mean())
    assert metrics["answer_align"] == pytest.approx(torch.stack(errors).mean().item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["ce"] + 0.5 * metrics["answer_align"], rel=1e-5)
    loss.backward()
    assert readout.weight.grad[:, -1].abs().sum() > 0  # the last position is real in two rows


def test_objective_runs_in_bf16_with_every_alignment_head():
    """DeepSpeed's bf16 casts the projection and readout with the model; the caller's states may be fp32
    (failed on the H100: 'expected scalar type Float but found BFloat16' in the projection's einsum)."""
    from lori_ray.objective import AnswerReadout
    _, model, batch = student_batch(4)
    batch["targets"] = torch.randn(4, 2, 2, 3)
    batch["answer_positions"] = torch.tensor([[5, 6, 7]] * 4)
    batch["answer_targets"] = torch.randn(4, 2, 6)
    weights = {"ce": 1.0, "first_order": 1.0, "second_order": 1.0, "answer_align": 1.0}
    objective = LMObjective(model, [1, 2], TrajectoryProjection(2, 64, 3), weights, terms=list(weights),
                            readout=AnswerReadout(2, 3, 6, 64)).to(torch.bfloat16)
    loss, metrics = objective(batch)
    loss.backward()
    assert torch.isfinite(loss) and {"first_order", "answer_align"} <= set(metrics)


def test_codi_aligns_the_students_state_at_the_separator_with_the_teachers(tmp_path):
    """codi: the store unit is the teacher's own hidden state at ``####`` (padded batch = each sequence alone),
    and the student's aligned position is its own ``####``, which predicts the first answer digit."""
    tokenizer = arithmetic_tokenizer()
    layout = Layout(tokenizer)
    special = {"pad_token_id": layout.pad, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": layout.eos}
    model = build_model("llama", "tiny", len(tokenizer), 64, special, seed=0).eval()
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    examples = generate_multiplication(3, 2, 2, seed=1) + generate_multiplication(2, 3, 2, seed=2)  # ragged
    worker = TeacherWorker(str(tmp_path / "teacher"), [1, 2], batch_size=5, segments="separator")
    worker.extract(str(tmp_path / "store"), 0, [0, 1, 2, 3, 4], examples)
    units = unpack(TrajectoryStore(tmp_path / "store").shard("hidden", 0))
    separator = tokenizer.convert_tokens_to_ids("####")
    for example, unit in zip(examples, units, strict=True):
        sequence = layout.teacher(example)
        assert sequence.input_ids[sequence.answer[0]] == separator
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([sequence.input_ids]), output_hidden_states=True).hidden_states
        assert unit.shape == (2, 1, 64)
        torch.testing.assert_close(unit[:, 0], torch.stack([alone[1][0, sequence.answer[0]],
                                                            alone[2][0, sequence.answer[0]]]), atol=1e-5, rtol=1e-4)
        student = layout.student(example)
        assert student.input_ids[student.answer[0]] == separator
        first_digit = student.input_ids[student.answer[0] + 1]  # what the state at ``####`` predicts (a label)
        assert student.labels[student.answer[0] + 1] == first_digit
        assert tokenizer.convert_ids_to_tokens(first_digit) == example.answer.split()[0]


def test_per_batch_padding_leaves_the_loss_and_its_gradients_unchanged():
    tokenizer = arithmetic_tokenizer()
    layout = Layout(tokenizer, add_latent_tokens(tokenizer, 2))
    model = build_model("llama", "tiny", len(tokenizer), 64, {"pad_token_id": layout.pad}, seed=3)
    sequences = [layout.student(e) for e in [*generate_multiplication(3, 3, 2, seed=1),
                                              *generate_multiplication(3, 2, 2, seed=1)]]  # two lengths
    padded = collate(sequences, layout.pad, length=40)  # as stored: padded to a longer data set's longest
    trimmed = trim_padding(padded)
    assert trimmed["input_ids"].shape[1] == max(len(s.input_ids) for s in sequences) < 40
    losses = [LMObjective(model)(batch)[0] for batch in (padded, trimmed)]
    torch.testing.assert_close(losses[0], losses[1])
    grads = [torch.autograd.grad(loss, list(model.parameters()), allow_unused=True) for loss in losses]
    for mine, theirs in zip(*grads, strict=True):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs)

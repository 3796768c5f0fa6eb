import torch

from lori_ray.losses import LoRiLoss, trajectory_scale


def naive_lori(zs, zt):
    """Loops straight from docs/method.md#loss: first order = per-(b,l,k) squared distance / r + batch-mean term / r,
    second order = Σ_l ‖Cov_b(zs[:, l] flattened) − Cov_b(zt[:, l] flattened)‖²_F / r²."""
    batch, layers, steps, rank = zs.shape
    per_example = sum(((zs[b, layer, k] - zt[b, layer, k]) ** 2).sum() for b in range(batch) for layer in range(layers)
                      for k in range(steps)) / (batch * layers * steps) / rank
    batch_mean = sum(((zs[:, layer, k].mean(0) - zt[:, layer, k].mean(0)) ** 2).sum() for layer in range(layers)
                     for k in range(steps)) / (layers * steps) / rank
    second = 0.0
    for layer in range(layers):
        cs = torch.cov(zs[:, layer].reshape(batch, -1).T)
        ct = torch.cov(zt[:, layer].reshape(batch, -1).T)
        second = second + ((cs - ct) ** 2).sum() / rank**2
    return per_example + batch_mean, second


def test_lori_matches_naive_reference_values_and_gradients():
    torch.manual_seed(0)
    zs = torch.randn(6, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(6, 2, 3, 4, dtype=torch.float64)
    terms = LoRiLoss()(zs, zt)
    first, second = naive_lori(zs, zt)
    torch.testing.assert_close(terms["first_order"].double(), first)
    torch.testing.assert_close(terms["second_order"].double(), second)
    grad_fast = torch.autograd.grad(terms["first_order"] + 0.5 * terms["second_order"], zs)[0]
    grad_naive = torch.autograd.grad(first + 0.5 * second, zs)[0]
    torch.testing.assert_close(grad_fast.double(), grad_naive, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad_fast).all()


def test_lori_is_zero_for_identical_trajectories_and_positive_otherwise():
    z = torch.randn(5, 2, 3, 4)
    terms = LoRiLoss()(z, z.clone())
    assert terms["first_order"] == 0 and terms["second_order"] == 0
    shifted = LoRiLoss()(z + 1.0, z)
    assert shifted["first_order"] > 0 and torch.isclose(shifted["second_order"], torch.tensor(0.0), atol=1e-6)
    scaled = LoRiLoss()(2 * z, z)
    assert scaled["second_order"] > 0


def test_lori_gradient_finite_for_batch_of_one():
    zs = torch.randn(1, 2, 3, 4, requires_grad=True)
    terms = LoRiLoss()(zs, torch.randn(1, 2, 3, 4))
    (terms["first_order"] + terms["second_order"]).backward()
    assert torch.isfinite(zs.grad).all()


def test_shape_mismatch_is_a_clear_error():
    import pytest
    with pytest.raises(ValueError, match="student coordinates"):
        LoRiLoss()(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 5))


def naive_answer_kl(student_logits, student_labels, teacher_logits, teacher_labels, temperature):
    """Row by row: pair the student's labelled tokens with the teacher's last labelled tokens."""
    terms = []
    for b in range(student_labels.shape[0]):
        s_pos = [i for i in range(student_labels.shape[1] - 1) if student_labels[b, i + 1] != -100]
        t_pos = [i for i in range(teacher_labels.shape[1] - 1) if teacher_labels[b, i + 1] != -100][-len(s_pos):]
        for i, j in zip(s_pos, t_pos, strict=False):
            p = torch.softmax(teacher_logits[b, j] / temperature, -1)
            q = torch.softmax(student_logits[b, i] / temperature, -1)[:len(p)]
            terms.append((p * (p.log() - q.log())).sum() * temperature**2)
    return torch.stack(terms).mean()


def test_answer_kl_matches_naive_reference_values_and_gradients():
    from lori_ray.losses import AnswerKL
    torch.manual_seed(0)
    # student: 2-token prompt + 3 answer tokens (row 0) / 2 (row 1); teacher: longer prompt with a CoT
    student_labels = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, -100, -100, 5, 6, -100]])
    teacher_labels = torch.tensor([[-100, 1, 2, 3, 5, 6, 7, -100], [-100, -100, 4, 4, 4, 5, 6, -100]])
    student_logits = torch.randn(2, 6, 11, dtype=torch.float64, requires_grad=True)  # + 2 latent tokens
    teacher_logits = torch.randn(2, 8, 9, dtype=torch.float64)
    for temperature in (1.0, 2.0):
        # target-aligned inputs: logits[:, i] predicts labels[:, i + 1]
        fast = AnswerKL(temperature)(student_logits[:, :-1], student_labels[:, 1:], teacher_logits[:, :-1],
                                     teacher_labels[:, 1:])
        naive = naive_answer_kl(student_logits, student_labels, teacher_logits, teacher_labels, temperature)
        torch.testing.assert_close(fast.double(), naive)
        torch.testing.assert_close(torch.autograd.grad(fast, student_logits)[0],
                                   torch.autograd.grad(naive, student_logits)[0])


def test_answer_kl_zero_when_distributions_agree_and_error_on_short_teacher():
    import pytest

    from lori_ray.losses import AnswerKL
    targets = torch.tensor([[3, 4, -100, -100]])
    logits = torch.randn(1, 4, 6)
    assert AnswerKL()(logits, targets, logits.clone(), targets).abs() < 1e-6
    assert AnswerKL()(logits, targets, torch.randn(1, 4, 6), targets) > 0
    with pytest.raises(ValueError, match="fewer labelled tokens"):
        AnswerKL()(logits, targets, logits, torch.tensor([[-100, 4, -100, -100]]))


def test_trajectory_scale_is_the_rms_deviation_per_layer_or_over_all():
    torch.manual_seed(0)
    targets = torch.randn(7, 3, 2, 5) * torch.tensor([0.5, 4.0, 30.0])[None, :, None, None] + 100.0
    per_layer = torch.stack([
        ((targets[:, layer] - targets[:, layer].mean(0)) ** 2).mean().sqrt() for layer in range(3)])
    torch.testing.assert_close(trajectory_scale(targets), per_layer)
    overall = ((targets - targets.mean(0)) ** 2).mean().sqrt()
    torch.testing.assert_close(trajectory_scale(targets, per_layer=False), overall.expand(3))
    assert trajectory_scale(torch.ones(4, 2, 3)).min() > 0  # a constant layer does not divide by zero


def test_readout_mse_averages_over_real_positions_like_a_loop():
    from lori_ray.losses import readout_mse
    predicted, targets = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    errors = [(predicted[b, layer, p] - targets[b, layer]).pow(2).mean()
              for b in range(3) for layer in range(2) for p in range(4) if mask[b, p]]
    torch.testing.assert_close(readout_mse(predicted, targets, mask), torch.stack(errors).mean())


def test_standardize_gives_every_feature_zero_mean_and_unit_variance():
    from lori_ray.losses import standardize
    targets = torch.randn(200, 2, 6) * torch.tensor([100.0, 1.0, 0.01, 5.0, 3.0, 2.0]) + 7
    scaled = standardize(targets)
    torch.testing.assert_close(scaled.mean(0), torch.zeros(2, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled.std(0), torch.ones(2, 6), atol=1e-5, rtol=0)


def test_readout_mse_compares_each_position_with_its_own_target():
    from lori_ray.losses import readout_mse
    predicted, targets = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    errors = [(predicted[b, layer, p] - targets[b, layer, p]).pow(2).mean()
              for b in range(2) for layer in range(3) for p in range(4) if mask[b, p]]
    torch.testing.assert_close(readout_mse(predicted, targets, mask), torch.stack(errors).mean())

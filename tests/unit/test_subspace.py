import torch

from lori_ray.subspace import Moments, effective_rank, fit_pca, resample_steps


def test_streaming_moments_match_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(100, 3, 5, dtype=torch.float64) * torch.arange(1, 6) + 2.0
    left, right = Moments.zeros(3, 5), Moments.zeros(3, 5)
    for chunk in x[:37].split(10):
        left.update(chunk)
    right.update(x[37:])
    merged = left.merge(right)
    assert merged.count == 100
    torch.testing.assert_close(merged.mean(), x.mean(0))
    for layer in range(3):
        torch.testing.assert_close(merged.covariance()[layer], torch.cov(x[:, layer].T))


def test_pca_recovers_a_planted_low_rank_subspace():
    torch.manual_seed(0)
    dim, rank, layers = 32, 3, 2
    basis = torch.linalg.qr(torch.randn(layers, dim, rank))[0]
    scales = torch.tensor([5.0, 3.0, 2.0])
    codes = torch.randn(2000, layers, rank) * scales
    x = torch.einsum("ldr,nlr->nld", basis, codes) + 0.01 * torch.randn(2000, layers, dim) + 1.5
    moments = Moments.zeros(layers, dim)
    moments.update(x)
    subspace = fit_pca(moments, rank)
    for layer in range(layers):
        # principal angles ~0: the fitted projector equals the planted one
        planted = basis[layer] @ basis[layer].T
        fitted = subspace.basis[layer] @ subspace.basis[layer].T
        assert (planted - fitted).norm() < 0.02
        torch.testing.assert_close(subspace.basis[layer].T @ subspace.basis[layer], torch.eye(rank), atol=1e-5, rtol=0)
    assert (subspace.explained_variance() > 0.999).all()
    assert (subspace.explained_variance(1) < 0.8).all()
    assert torch.allclose(subspace.eigenvalues[:, :3], (scales**2).expand(layers, 3), rtol=0.1)
    coords = subspace.project(x)
    torch.testing.assert_close(coords.mean(0), torch.zeros(layers, rank), atol=0.05, rtol=0)
    assert subspace.truncate(2).rank == 2


def test_resample_steps_is_linear_interpolation():
    x = torch.tensor([[0.0, 10.0], [2.0, 20.0], [4.0, 30.0]])  # K=3 steps, r=2
    out = resample_steps(x, 5)
    torch.testing.assert_close(out, torch.tensor([[0.0, 10], [1, 15], [2, 20], [3, 25], [4, 30]]))
    assert torch.equal(resample_steps(x, 3), x)
    assert torch.equal(resample_steps(x[:1], 4), x[:1].expand(4, 2))
    batched = resample_steps(torch.stack([x, 2 * x]), 5)
    torch.testing.assert_close(batched[1], 2 * out)


def test_effective_rank_bounds_and_direct_value():
    assert torch.isclose(effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])), torch.tensor(4.0))
    assert torch.isclose(effective_rank(torch.tensor([3.0, 0.0, 0.0])), torch.tensor(1.0))
    s = torch.tensor([4.0, 2.0, 1.0])
    p = s / s.sum()
    assert torch.isclose(effective_rank(s), torch.exp(-(p * p.log()).sum()))
    assert 1.0 <= effective_rank(s) <= 3.0


def test_spectrum_summary_erank_equals_erank_of_centred_trajectories():
    from lori_ray.plots import spectrum_figure, spectrum_summary

    torch.manual_seed(0)
    x = torch.randn(300, 2, 6, dtype=torch.float64) * torch.tensor([4.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    moments = Moments.zeros(2, 6)
    moments.update(x)
    summary = spectrum_summary(fit_pca(moments, 3), layers=[1, 3])
    for i in range(2):
        direct = effective_rank(torch.linalg.svdvals(x[:, i] - x[:, i].mean(0)))
        assert abs(summary["erank"][i] - direct.item()) < 1e-4
        assert 1.0 <= summary["erank"][i] <= 6.0
        assert abs(summary["cumulative_explained_variance"][i][-1] - 1.0) < 1e-6
    assert len(spectrum_figure(summary).axes) == 2


def test_tucker_recovers_planted_mode_factors_and_its_moments_stream():
    from lori_ray.subspace import TuckerMoments, fit_tucker

    torch.manual_seed(0)
    layers, steps, dim, n = 4, 5, 12, 600
    u_l, u_k, u_d = (torch.linalg.qr(torch.randn(size, r))[0] for size, r in ((layers, 2), (steps, 2), (dim, 3)))
    core = torch.randn(n, 2, 2, 3) * torch.tensor([3.0, 1.5, 1.0])
    x = torch.einsum("nabc,la,kb,ic->nlki", core, u_l, u_k, u_d) + 0.01 * torch.randn(n, layers, steps, dim) + 0.5
    whole, left, right = (TuckerMoments.zeros(layers, steps, dim) for _ in range(3))
    whole.update(x)
    left.update(x[:250])
    right.update(x[250:])
    merged = left.merge(right)
    for a, b in zip(whole.centred(), merged.centred(), strict=True):
        torch.testing.assert_close(a, b)
    # the centred hidden Gram equals the direct computation on the unfolded, centred tensor
    y = (x - x.mean(0)).double()
    torch.testing.assert_close(whole.centred()[3], y.reshape(-1, dim).T @ y.reshape(-1, dim))

    tucker = fit_tucker(whole, 2, 2, 3)
    for planted, fitted in ((u_l, tucker.layer_factor), (u_k, tucker.step_factor), (u_d, tucker.hidden_factor)):
        assert (planted @ planted.T - fitted @ fitted.T).norm() < 0.05
    assert all(v > 0.99 for v in tucker.explained_variance().values())
    coords = tucker.project(x)
    assert coords.shape == (n, 2, 2, 3)
    # coordinates keep almost all of the centred energy
    assert abs(coords.pow(2).sum() / (x - tucker.mean).pow(2).sum() - 1) < 0.01

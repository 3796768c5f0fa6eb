"""Streaming moments of teacher trajectories and the per-layer low-rank subspace fitted on them
(docs/method.md#subspace)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Moments:
    """Per-layer count, sum and sum of outer products in float64; ``merge`` combines actors' shares."""

    count: int
    total: torch.Tensor  # [L, d]
    outer: torch.Tensor  # [L, d, d]

    @classmethod
    def zeros(cls, layers: int, dim: int, device: str | torch.device = "cpu") -> Moments:
        return cls(0, torch.zeros(layers, dim, dtype=torch.float64, device=device),
                   torch.zeros(layers, dim, dim, dtype=torch.float64, device=device))

    def to(self, device: str | torch.device) -> Moments:
        return Moments(self.count, self.total.to(device), self.outer.to(device))

    def update(self, vectors: torch.Tensor) -> None:
        """Add samples ``vectors`` [n, L, d] (one vector per layer per sample)."""
        x = vectors.to(self.total.device, torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += torch.einsum("nld,nle->lde", x, x)

    def merge(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def covariance(self) -> torch.Tensor:
        """Unbiased per-layer covariance [L, d, d]."""
        mean = self.mean()
        scatter = self.outer - self.count * torch.einsum("ld,le->lde", mean, mean)
        return scatter / max(self.count - 1, 1)


@dataclass
class Subspace:
    mean: torch.Tensor  # [L, d]
    basis: torch.Tensor  # [L, d, r] orthonormal columns, leading components first
    eigenvalues: torch.Tensor  # [L, d] full covariance spectrum, descending

    @property
    def rank(self) -> int:
        return self.basis.shape[-1]

    def explained_variance(self, rank: int | None = None) -> torch.Tensor:
        """Fraction of each layer's variance captured by the leading ``rank`` components [L]."""
        rank = rank or self.rank
        spectrum = self.eigenvalues.clamp_min(0)
        return spectrum[:, :rank].sum(-1) / spectrum.sum(-1)

    def truncate(self, rank: int) -> Subspace:
        if rank > self.rank:
            raise ValueError(f"rank {rank} exceeds the stored rank {self.rank}")
        return Subspace(self.mean, self.basis[..., :rank], self.eigenvalues)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates U_lᵀ(x − μ_l) of ``x`` [..., L, d] → [..., L, r]."""
        centred = x.to(self.basis.dtype) - self.mean
        return torch.einsum("...ld,ldr->...lr", centred, self.basis)


def fit_pca(moments: Moments, rank: int) -> Subspace:
    """Top-``rank`` eigenvectors of each layer's covariance, with a deterministic sign."""
    eigenvalues, vectors = torch.linalg.eigh(moments.covariance())
    eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)
    # make the largest-magnitude entry of each component positive, so refits agree
    index = vectors.abs().argmax(dim=-2, keepdim=True)
    vectors = vectors * torch.gather(vectors, -2, index).sign()
    return Subspace(moments.mean().float(), vectors[..., :rank].float().contiguous(), eigenvalues.float())


def resample_steps(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Linearly resample the step axis (dim -2) of ``x`` [..., K_t, r] to ``steps`` points."""
    if x.shape[-2] == steps:
        return x
    if x.shape[-2] == 1:
        return x.expand(*x.shape[:-2], steps, x.shape[-1])
    flat = x.reshape(-1, x.shape[-2], x.shape[-1]).transpose(1, 2)
    out = F.interpolate(flat, size=steps, mode="linear", align_corners=True)
    return out.transpose(1, 2).reshape(*x.shape[:-2], steps, x.shape[-1])


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the normalised singular values (Roy & Vetterli)."""
    p = singular_values / singular_values.sum(-1, keepdim=True)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum(-1))


@dataclass
class TuckerMoments:
    """Streaming sums for a Tucker (layer × step × hidden) fit of fixed-length trajectories [n, L, K, d]:
    the sum and the three mode Gram matrices of the raw tensors, centred at fit time."""

    count: int
    total: torch.Tensor  # [L, K, d]
    layer: torch.Tensor  # [L, L]
    step: torch.Tensor  # [K, K]
    hidden: torch.Tensor  # [d, d]

    @classmethod
    def zeros(cls, layers: int, steps: int, dim: int) -> TuckerMoments:
        def z(*shape):
            return torch.zeros(*shape, dtype=torch.float64)

        return cls(0, z(layers, steps, dim), z(layers, layers), z(steps, steps), z(dim, dim))

    def update(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.layer += torch.einsum("nlki,nmki->lm", x, x)
        self.step += torch.einsum("nlki,nlji->kj", x, x)
        self.hidden += torch.einsum("nlki,nlkj->ij", x, x)

    def merge(self, other: TuckerMoments) -> TuckerMoments:
        return TuckerMoments(self.count + other.count, self.total + other.total, self.layer + other.layer,
                             self.step + other.step, self.hidden + other.hidden)

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean tensor and the mode Gram matrices of the centred tensors (Σ_n Y_(mode) Y_(mode)ᵀ)."""
        mean = self.total / self.count
        n = self.count
        return (mean, self.layer - n * torch.einsum("lki,mki->lm", mean, mean),
                self.step - n * torch.einsum("lki,lji->kj", mean, mean),
                self.hidden - n * torch.einsum("lki,lkj->ij", mean, mean))


@dataclass
class Tucker:
    mean: torch.Tensor  # [L, K, d]
    layer_factor: torch.Tensor  # [L, r_L]
    step_factor: torch.Tensor  # [K, r_K]
    hidden_factor: torch.Tensor  # [d, r]
    spectra: dict  # mode → eigenvalues, descending

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Core coordinates (x − M) ×₁ U_Lᵀ ×₂ U_Kᵀ ×₃ U_dᵀ of x [..., L, K, d] → [..., r_L, r_K, r]."""
        centred = x.to(self.mean.dtype) - self.mean
        return torch.einsum("...lki,la,kb,ic->...abc", centred, self.layer_factor, self.step_factor, self.hidden_factor)

    def explained_variance(self) -> dict[str, float]:
        """Per mode, the fraction of variance the kept components carry."""
        ranks = {"layer": self.layer_factor.shape[1], "step": self.step_factor.shape[1],
                 "hidden": self.hidden_factor.shape[1]}
        return {mode: (values[:ranks[mode]].sum() / values.sum()).item() for mode, values in self.spectra.items()}


def _top_eigenvectors(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
    index = vectors.abs().argmax(dim=0, keepdim=True)  # deterministic sign, as in fit_pca
    vectors = vectors * torch.gather(vectors, 0, index).sign()
    return values, vectors[:, :rank]


def fit_tucker(moments: TuckerMoments, layer_rank: int, step_rank: int, rank: int) -> Tucker:
    """HOSVD from the mode-unfolded covariances: each factor is the top eigenvectors of its mode's Gram."""
    mean, layer, step, hidden = moments.centred()
    spectra, factors = {}, {}
    for mode, gram, r in (("layer", layer, layer_rank), ("step", step, step_rank), ("hidden", hidden, rank)):
        if r > gram.shape[0]:
            raise ValueError(f"Tucker {mode} rank {r} exceeds that mode's size {gram.shape[0]}")
        spectra[mode], factors[mode] = _top_eigenvectors(gram, r)
    return Tucker(mean.float(), factors["layer"].float(), factors["step"].float(), factors["hidden"].float(),
                  {mode: values.float() for mode, values in spectra.items()})

"""Streaming moments of teacher trajectories and the per-layer low-rank subspace fitted on them."""

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
    def zeros(cls, layers: int, dim: int) -> "Moments":
        return cls(0, torch.zeros(layers, dim, dtype=torch.float64), torch.zeros(layers, dim, dim, dtype=torch.float64))

    def update(self, vectors: torch.Tensor) -> None:
        """Add samples ``vectors`` [n, L, d] (one vector per layer per sample)."""
        x = vectors.to(torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += torch.einsum("nld,nle->lde", x, x)

    def merge(self, other: "Moments") -> "Moments":
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

    def truncate(self, rank: int) -> "Subspace":
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

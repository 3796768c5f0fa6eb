"""LoRi trajectory-alignment losses in the teacher's low-rank subspace (SPEC, "Loss")."""

from __future__ import annotations

import torch
from torch import nn


def batch_covariance(x: torch.Tensor) -> torch.Tensor:
    """Covariance across the batch (dim 0) of ``x`` [B, L, F] → [L, F, F]."""
    centred = x - x.mean(0, keepdim=True)
    return torch.einsum("blf,blg->lfg", centred, centred) / max(x.shape[0] - 1, 1)


class LoRiLoss(nn.Module):
    """First- and second-order alignment of student and teacher coordinates ``[B, L, K, r]``.

    first_order  = mean_{b,l,k} ‖Z_s − Z_t‖² / r  +  mean_{l,k} ‖mean_b Z_s − mean_b Z_t‖² / r
    second_order = Σ_l ‖Cov_b(Z_s[:, l]) − Cov_b(Z_t[:, l])‖²_F / r²   (steps × rank flattened)
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        if student.shape != teacher.shape:
            raise ValueError(f"student coordinates {tuple(student.shape)} != teacher {tuple(teacher.shape)}")
        student, teacher = student.float(), teacher.float()
        rank = student.shape[-1]
        per_example = (student - teacher).pow(2).sum(-1).mean() / rank
        batch_mean = (student.mean(0) - teacher.mean(0)).pow(2).sum(-1).mean() / rank
        flat_s, flat_t = student.flatten(2), teacher.flatten(2)
        second = (batch_covariance(flat_s) - batch_covariance(flat_t)).pow(2).sum() / rank**2
        return {"first_order": per_example + batch_mean, "second_order": second}

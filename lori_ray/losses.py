"""LoRi trajectory-alignment losses in the teacher's low-rank subspace (docs/method.md#loss)."""

from __future__ import annotations

import torch
from torch import nn

from .tokens import IGNORE_INDEX


def batch_covariance(x: torch.Tensor) -> torch.Tensor:
    """Covariance across the batch (dim 0) of ``x`` [B, L, F] → [L, F, F]."""
    centred = x - x.mean(0, keepdim=True)
    return torch.einsum("blf,blg->lfg", centred, centred) / max(x.shape[0] - 1, 1)


def trajectory_scale(targets: torch.Tensor, per_layer: bool = True) -> torch.Tensor:
    """RMS deviation of teacher trajectories ``[N, L, ...]`` from their mean over examples, per layer (dim 1)
    or one value for all layers, as an ``[L]`` tensor.

    Dividing student and teacher trajectories by it makes the alignment terms scale-free: a real LLM's
    hidden states (and their PCA coordinates) are one to two orders of magnitude larger than those of a
    small model trained from scratch, and grow with depth, so unscaled terms drown the CE.
    """
    deviation = (targets.double() - targets.double().mean(0, keepdim=True)).pow(2)
    spread = deviation.transpose(0, 1).flatten(1).mean(1) if per_layer else deviation.mean().expand(targets.shape[1])
    return spread.sqrt().clamp_min(1e-6).float()


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


def readout_mse(predicted: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of answer-position readouts ``predicted`` [B, L, P, F] against each example's whole
    trajectory ``targets`` [B, L, F] (the same for every position) or a target per position [B, L, P, F],
    over the positions where ``mask`` [B, P] is set."""
    per_position = targets if targets.dim() == 4 else targets[:, :, None, :]
    error = (predicted.float() - per_position.float()).pow(2).mean(-1)  # [B, L, P]
    weights = mask.to(error.dtype)[:, None, :].expand_as(error)
    return (error * weights).sum() / weights.sum().clamp_min(1)


def standardization(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each feature of ``targets`` [N, ...] over examples, [1, ...] each: the readout
    weighs a trajectory's minor PCA components like its leading ones."""
    mean = targets.double().mean(0, keepdim=True)
    return mean, targets.double().std(0, keepdim=True).clamp_min(1e-6)


def standardize(targets: torch.Tensor) -> torch.Tensor:
    """Each feature (last dim) of ``targets`` [N, ...] centred and scaled to unit variance over examples."""
    mean, std = standardization(targets)
    return ((targets.double() - mean) / std).float()


class AnswerKL(nn.Module):
    """KL(teacher ‖ student) of next-token distributions over the student's labelled tokens, × T².

    Inputs are target-aligned: ``targets[:, i]`` is the token ``logits[:, i]`` predicts (-100: none).
    The student's labelled tokens (the answer, or CoT and answer for an explicit student) are the last
    labelled tokens of the teacher's sequence, so each student position is paired with the teacher
    position that predicts the same token: the teacher may have seen a CoT where the student saw
    latents. The student's vocabulary may extend the teacher's (latent-slot tokens).
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, student_targets: torch.Tensor,
                teacher_logits: torch.Tensor, teacher_targets: torch.Tensor) -> torch.Tensor:
        student_mask = student_targets != IGNORE_INDEX
        counts = student_mask.sum(1)
        teacher_mask = teacher_targets != IGNORE_INDEX
        from_end = teacher_mask.flip(1).cumsum(1).flip(1)  # labelled positions at or after each one
        teacher_mask &= from_end <= counts[:, None]
        if not torch.equal(teacher_mask.sum(1), counts):
            raise ValueError("teacher sequences have fewer labelled tokens than the student's: "
                             f"{teacher_mask.sum(1).tolist()} < {counts.tolist()}")
        t, dtype = self.temperature, torch.promote_types(student_logits.dtype, torch.float32)  # bf16 → fp32
        # tokens the teacher lacks (latent slots) have teacher probability 0 and only enter the normaliser
        vocab = teacher_logits.shape[-1]
        student = torch.log_softmax(student_logits[student_mask].to(dtype) / t, -1)[:, :vocab]
        teacher = torch.log_softmax(teacher_logits[teacher_mask].to(dtype) / t, -1)
        return (teacher.exp() * (teacher - student)).sum(-1).mean() * t**2

"""The training objective around an HF causal LM: CE on the answer (and CoT for the teacher),
plus LoRi alignment of the student's hidden states with the teacher's trajectory coordinates: at the
latent slots (one slot per teacher step), and/or at the answer positions, where a student without a
CoT computes its digits (a learned readout per layer and position predicts the whole trajectory).
The method: docs/method.md#loss and docs/method.md#alignment-sites."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batch import Batch
from .latents import continuous_forward
from .losses import AnswerKL, LoRiLoss, readout_mse
from .methods import TERMS
from .models import keep_layers
from .subspace import Subspace


def pair_layers(student_layers: int, teacher_layers: int, teacher_selected: list[int]) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices (1-based) paired by relative depth (``models.keep_layers``); only
    pairs whose teacher layer is in ``teacher_selected`` are kept."""
    return [(i + 1, t + 1) for i, t in enumerate(keep_layers(teacher_layers, student_layers))
            if t + 1 in teacher_selected]


class TrajectoryProjection(nn.Module):
    """Per-layer affine maps P_l: R^{d_s} → R^r, batched as one [L, r, d_s] weight."""

    def __init__(self, layers: int, dim: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(layers, rank, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(layers, rank))

    @classmethod
    def from_subspace(cls, subspace: Subspace) -> TrajectoryProjection:
        """P_l(x) = U_lᵀ(x − μ_l): exact when student and teacher widths match."""
        layers, dim, rank = subspace.basis.shape
        projection = cls(layers, dim, rank)
        with torch.no_grad():
            projection.weight.copy_(subspace.basis.transpose(1, 2))
            projection.bias.copy_(-torch.einsum("lrd,ld->lr", projection.weight, subspace.mean))
        return projection

    @classmethod
    def fit(cls, states: torch.Tensor, targets: torch.Tensor) -> TrajectoryProjection:
        """Least squares per layer on a calibration batch: states [n, L, K, d] → targets [n, L, K, r]
        (the initialisation when student and teacher widths differ)."""
        layers, dim, rank = states.shape[1], states.shape[-1], targets.shape[-1]
        projection = cls(layers, dim, rank)
        with torch.no_grad():
            for layer in range(layers):
                x = states[:, layer].reshape(-1, dim).double()
                design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
                solution = torch.linalg.lstsq(design, targets[:, layer].reshape(-1, rank).double()).solution
                projection.weight[layer] = solution[:dim].T.float()
                projection.bias[layer] = solution[dim].float()
        return projection

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """states [B, L, K, d] → coordinates [B, L, K, r]."""
        # in the weights' dtype: under bf16 DeepSpeed casts them while the caller's states may be fp32
        return torch.einsum("blkd,lrd->blkr", states.to(self.weight.dtype), self.weight) + self.bias[:, None, :]


class TuckerProjection(nn.Module):
    """Student states [B, L, K, d_s] → Tucker core coordinates [B, r_L, r_K, r]: the teacher's layer and
    step factors (fixed), then a learned hidden map (the teacher's hidden factor when widths match)."""

    def __init__(self, mean: torch.Tensor, layer_factor: torch.Tensor, step_factor: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("layer_factor", layer_factor.clone())
        self.register_buffer("step_factor", step_factor.clone())
        self.weight = nn.Parameter(weight.clone())  # [r, d_s]
        self.bias = nn.Parameter(bias.clone())  # [r]

    @classmethod
    def from_tucker(cls, tucker) -> TuckerProjection:
        rank = tucker.hidden_factor.shape[1]
        return cls(tucker.mean, tucker.layer_factor, tucker.step_factor, tucker.hidden_factor.T, torch.zeros(rank))

    @classmethod
    def fit(cls, tucker, states: torch.Tensor, targets: torch.Tensor) -> TuckerProjection:
        """Another student width: least squares for the hidden map on a calibration batch."""
        mixed = torch.einsum("nlki,la,kb->nabi", states, tucker.layer_factor, tucker.step_factor)
        x = mixed.reshape(-1, mixed.shape[-1]).double()
        design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        solution = torch.linalg.lstsq(design, targets.reshape(-1, targets.shape[-1]).double()).solution
        zeros = torch.zeros(*tucker.mean.shape[:2], states.shape[-1])
        return cls(zeros, tucker.layer_factor, tucker.step_factor, solution[:-1].T.float(), solution[-1].float())

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("nlki,la,kb->nabi", states.to(self.weight.dtype) - self.mean, self.layer_factor,
                             self.step_factor)
        return mixed @ self.weight.T + self.bias


class AnswerReadout(nn.Module):
    """A linear map per (student layer, answer position): states [B, L, P, d] → trajectory coordinates
    [B, L, P, F]. Position p of every layer reads the teacher's whole trajectory (F = steps × rank) out of
    the state that writes answer token p, so the CoT's intermediate results must be computed there."""

    def __init__(self, layers: int, positions: int, features: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(layers, positions, features, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(layers, positions, features))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.einsum("blpd,lpfd->blpf", states.to(self.weight.dtype), self.weight) + self.bias


def load_projection(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A saved projection or answer readout (``state_dict``)."""
    if "layer_factor" in tensors:
        return TuckerProjection(**tensors)
    if tensors["weight"].dim() == 4:
        readout = AnswerReadout(*tensors["weight"].shape)
        readout.load_state_dict(tensors)
        return readout
    layers, rank, dim = tensors["weight"].shape
    projection = TrajectoryProjection(layers, dim, rank)
    projection.load_state_dict(tensors)
    return projection


def slot_states(hidden_states: tuple[torch.Tensor, ...], layers: list[int], positions: torch.Tensor) -> torch.Tensor:
    """Hidden states of ``layers`` at the latent-slot ``positions`` [B, K] → [B, L, K, d]."""
    states = torch.stack([hidden_states[layer] for layer in layers], dim=1)
    index = positions[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1])
    return torch.gather(states, 2, index)


def labelled_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    latent_ids: list[int] | None = None, **kwargs) -> tuple:
    """(output, targets): logits only at positions where some row predicts a labelled token, and the
    tokens they predict ([B, P], -100 for none). The LM head over the whole vocabulary is the largest
    activation of a step; a student trained on its answer needs it at a few positions only.
    ``latent_ids``: those tokens are continuous thoughts (the output then always has hidden states)."""
    targets = labels[:, 1:]
    keep = (targets != -100).any(0).nonzero().squeeze(1)
    if latent_ids:
        output = continuous_forward(model, input_ids, attention_mask, latent_ids, logits_to_keep=keep)
    else:
        output = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **kwargs)
    return output, targets[:, keep]


# the terms that read hidden states: at the latent slots (or ``####``), and at the answer positions
SLOT_TERMS = frozenset({"first_order", "second_order", "hidden_mse"})
HIDDEN_STATE_TERMS = SLOT_TERMS | {"answer_align"}


def check_terms(terms: Sequence[str], weights: dict[str, float], layers: bool, projection: bool, readout: bool,
                teacher: bool) -> frozenset[str]:
    """``terms`` as a set, when each is a known term with a weight and the module it needs, each weight has its
    term, and each module given is used; ValueError naming the term otherwise."""
    terms = frozenset(terms)
    unknown = sorted(terms - set(TERMS))
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}; the objective computes {list(TERMS)}")
    if "ce" not in terms:
        raise ValueError("loss term 'ce' is always computed: list it among the terms (weight 0 keeps it out of the "
                         "loss)")
    for term in TERMS:
        if term in weights and term not in terms:
            raise ValueError(f"loss term {term!r} has a weight ({weights[term]}) but is not computed: the terms are "
                             f"{sorted(terms)}")
        if term in terms and term not in weights:
            raise ValueError(f"loss term {term!r} is computed but has no weight: the weights are {weights}")
    stray = sorted(set(weights) - set(TERMS))
    if stray:
        raise ValueError(f"loss terms {stray} have weights but are not computed: the terms are {sorted(terms)}")
    lori, full_width = bool({"first_order", "second_order"} & terms), "hidden_mse" in terms
    needs = {"a projection (first_order, second_order)": (lori, projection),
             "student_layers (an alignment term)": (bool(terms & HIDDEN_STATE_TERMS), layers),
             "a readout (answer_align)": ("answer_align" in terms, readout),
             "a teacher (kd)": ("kd" in terms, teacher)}
    for what, (wanted, given) in needs.items():
        if wanted and not given:
            raise ValueError(f"loss terms {sorted(terms)} need {what}")
    if lori and full_width:
        raise ValueError("hidden_mse aligns full-width states, first_order and second_order projected ones: one of "
                         "the two")
    if lori and not {"first_order", "second_order"} <= terms:
        raise ValueError(f"first_order and second_order come together (the LoRi loss); the terms are {sorted(terms)}")
    unused = [name for name, given, wanted in (("projection", projection, lori), ("readout", readout,
                                                "answer_align" in terms), ("teacher", teacher, "kd" in terms))
              if given and not wanted]
    if unused:
        raise ValueError(f"a {unused[0]} is given but no loss term uses it: the terms are {sorted(terms)}")
    return terms


class LMObjective(nn.Module):
    """``forward(batch) -> (loss, metrics)``; the only module DeepSpeed wraps.

    It computes exactly ``terms`` (a method's, ``methods.MethodSpec.terms``) and sums them with ``weights``, one
    weight per term: a term without a weight, a weight without its term, or a term without the module it needs
    raises ValueError. ``ce`` is the mean cross-entropy of the labelled tokens. ``first_order`` and
    ``second_order`` (the LoRi loss) align the hidden states of ``student_layers`` at ``batch["latent_positions"]``
    through ``projection`` with ``batch["targets"]``; ``hidden_mse`` aligns them without one, at full width (the
    ICoT-KD and CODI baselines); with ``target_scale`` [L] both sides are divided by it per layer first.
    ``answer_align`` maps the states at ``batch["answer_positions"]`` [B, P] (-1: none) through ``readout`` to
    ``batch["answer_targets"]`` [B, L, F] (MSE). ``kd`` is the KL from the ``teacher``'s next-token distributions
    on ``batch["teacher_*"]`` (the student's own sequences when absent) to the student's on the student's
    labelled tokens. With ``continuous_latents`` those tokens are continuous thoughts (``latents.continuous_forward``).
    """

    def __init__(self, model: nn.Module, student_layers: list[int] = (), projection: nn.Module | None = None,
                 weights: dict[str, float] | None = None, teacher: nn.Module | None = None,
                 kd_temperature: float = 1.0, target_scale: list[float] | None = None,
                 readout: AnswerReadout | None = None, continuous_latents: list[int] | None = None,
                 terms: Sequence[str] = ("ce",)):
        super().__init__()
        self.model = model
        self.continuous_latents = list(continuous_latents or [])
        self.student_layers = list(student_layers)
        self.projection = projection
        self.readout = readout
        self.weights = dict(weights or {"ce": 1.0})
        self.terms = check_terms(terms, self.weights, bool(self.student_layers), projection is not None,
                                 readout is not None, teacher is not None)
        self.lori = LoRiLoss()
        self.answer_kl = AnswerKL(kd_temperature)
        scale = torch.tensor(target_scale or [1.0] * len(self.student_layers), dtype=torch.float32)
        self.register_buffer("target_scale", scale[None, :, None, None], persistent=False)
        # frozen and outside the module tree: DeepSpeed neither optimises, casts nor partitions it
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []

    @torch.no_grad()
    def _teacher_logits(self, batch: Batch, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self._teacher[0]
        parameter = next(teacher.parameters())
        if parameter.device != like.device or parameter.dtype != like.dtype:
            teacher.to(like.device, like.dtype)
        output, targets = labelled_logits(teacher, batch.get("teacher_input_ids", batch["input_ids"]),
                                          batch.get("teacher_attention_mask", batch["attention_mask"]),
                                          batch.get("teacher_labels", batch["labels"]))
        return output.logits, targets

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        wanted = self.terms
        output, targets = labelled_logits(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          self.continuous_latents,
                                          output_hidden_states=bool(wanted & HIDDEN_STATE_TERMS))
        logits = output.logits
        terms = {"ce": F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)}
        if wanted & SLOT_TERMS:
            states = slot_states(output.hidden_states, self.student_layers, batch["latent_positions"]).float()
            teacher_states = batch["targets"] / self.target_scale
            if self.projection is not None:
                terms.update(self.lori(self.projection(states) / self.target_scale, teacher_states))
            else:
                terms["hidden_mse"] = (states / self.target_scale - teacher_states).pow(2).mean()
        if "answer_align" in wanted:
            positions = batch["answer_positions"]
            states = slot_states(output.hidden_states, self.student_layers, positions.clamp_min(0)).float()
            terms["answer_align"] = readout_mse(self.readout(states), batch["answer_targets"], positions >= 0)
        if "kd" in wanted:
            terms["kd"] = self.answer_kl(logits, targets, *self._teacher_logits(batch, logits))
        loss = sum(self.weights[name] * value for name, value in terms.items())
        metrics = {name: value.detach() for name, value in terms.items()}  # tensors: no wait for the device
        metrics["loss"] = loss.detach()
        return loss, metrics

    def model_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The wrapped HF model's entries of this module's state dict."""
        return {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}

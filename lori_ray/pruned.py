"""RED: width-pruned students whose weights are the frozen teacher's composed with trainable projections.

LRC-style: every teacher matrix W_t that reads the residual stream becomes W_t·P (embedding, q/k/v,
gate/up, untied lm_head), every matrix that writes it becomes Pᵀ·W_t (o, down), and the RMSNorm gains
start at Pᵀ·g. Each matrix has its own projection P ∈ R^{d_t × d_s}. Only the projections, norm gains,
biases and the rows of tokens the teacher lacks (latent slots) are trained; ``merge`` folds them into a
plain HF model of width d_s.

Projection init (docs/method.md#red-students): ``random`` N(0, 0.02), the baseline that collapses;
``activation`` keeps the d_s residual channels with the largest activations on calibration data, as
columns of the identity; ``random_orthogonal`` an orthonormal random basis (an ablation).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .config import PRUNED_INITS
from .latents import continuous_forward
from .models import keep_layers, load_model
from .subspace import Moments, effective_rank

READS_RESIDUAL = ("embed_tokens.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                  "up_proj.weight", "lm_head.weight")
WRITES_RESIDUAL = ("o_proj.weight", "down_proj.weight")
PRUNING_FILE, PARAMETERS_FILE = "pruning.json", "pruning.safetensors"


def channel_scores(hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> torch.Tensor:
    """Importance of each residual channel: per layer, the mean over examples of the channel's L2 norm
    over the sequence (docs/method.md#red-students), normalised to sum 1 per layer so that layers with large
    activations do not decide alone; summed over layers → [d]."""
    mask = attention_mask[..., None].to(hidden_states[0].dtype)
    scores = torch.zeros(hidden_states[0].shape[-1], dtype=torch.float64)
    for states in hidden_states:
        per_layer = (states * mask).pow(2).sum(1).sqrt().mean(0).double()
        scores += per_layer / per_layer.sum()
    return scores


def selection_matrix(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Columns of the identity at the ``width`` highest-scoring channels (in channel order): [d_t, width]."""
    keep = scores.topk(width).indices.sort().values
    return torch.eye(len(scores))[:, keep]


def initial_projection(init: str, scores: torch.Tensor, width: int, generator: torch.Generator) -> torch.Tensor:
    dim = len(scores)
    if init == "activation":
        return selection_matrix(scores, width)
    if init == "random":
        return torch.randn(dim, width, generator=generator) * 0.02
    if init == "random_orthogonal":
        return torch.linalg.qr(torch.randn(dim, width, generator=generator)).Q
    raise ValueError(f"student.init: unknown projection init {init!r}; expected one of {PRUNED_INITS}")


def _side(name: str) -> str | None:
    if name.endswith(READS_RESIDUAL):
        return "reads"
    if name.endswith(WRITES_RESIDUAL):
        return "writes"
    if name.endswith("norm.weight"):
        return "norm"
    return None


def _slot(name: str) -> str:
    return name.replace(".", "__")  # parameter names cannot contain dots


def _teacher_name(name: str, layers: list[int]) -> str:
    """The teacher weight a student weight comes from (student layer i ↔ teacher layer layers[i])."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        parts[2] = str(layers[int(parts[2])])
    return ".".join(parts)


def student_config(teacher_config, width: int, layers: list[int], vocab_size: int):
    """The teacher's config at residual width ``width`` with teacher ``layers``; heads and head size unchanged."""
    config = copy.deepcopy(teacher_config)
    config.head_dim = getattr(teacher_config, "head_dim", None) or (
        teacher_config.hidden_size // teacher_config.num_attention_heads)
    config.hidden_size, config.num_hidden_layers, config.vocab_size = width, len(layers), vocab_size
    if getattr(config, "layer_types", None):
        config.layer_types = [teacher_config.layer_types[i] for i in layers]
    return config


class PrunedModel(nn.Module):
    """A causal LM of width d_s computed from frozen teacher weights; ``forward`` takes HF model kwargs."""

    def __init__(self, config, teacher_state: dict[str, torch.Tensor], layers: list[int],
                 parameters: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.layers = list(layers)
        # the skeleton gives the architecture and its rotary buffers; its own weights are never used,
        # so it is kept out of the module tree (DeepSpeed must not train or partition it)
        self._skeleton = [AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").requires_grad_(False)]
        tied = set(self._skeleton[0]._tied_weights_keys or {}) if config.tie_word_embeddings else set()
        self.names = [n for n in self._skeleton[0].state_dict() if n not in tied]
        for name, tensor in teacher_state.items():
            self.register_buffer(_slot(name), tensor, persistent=False)
        for name, tensor in parameters.items():
            self.register_parameter(name, nn.Parameter(tensor.clone()))

    @classmethod
    def initial(cls, teacher: nn.Module, width: int, depth: int | None, init: str, scores: torch.Tensor,
                vocab_size: int, seed: int = 0) -> PrunedModel:
        layers = keep_layers(teacher.config.num_hidden_layers, depth)
        config = student_config(teacher.config, width, layers, vocab_size)
        teacher_state = {k: v.detach().float() for k, v in teacher.state_dict().items()}
        generator = torch.Generator().manual_seed(seed)
        model = cls(config, {k: v for k, v in teacher_state.items() if _side(k) != "norm" and not k.endswith("bias")},
                    layers, {})
        parameters = {}
        for name in model.names:
            source = teacher_state[_teacher_name(name, layers)]
            side = _side(name)
            if side in ("reads", "writes"):
                parameters[f"projection__{_slot(name)}"] = initial_projection(init, scores, width, generator)
                new_rows = vocab_size - source.shape[0]
                if name.endswith(("embed_tokens.weight", "lm_head.weight")) and new_rows > 0:
                    # tokens the teacher lacks (latent slots) start at the teacher's mean embedding, in its width
                    parameters[f"new_rows__{_slot(name)}"] = source.mean(0, keepdim=True).repeat(new_rows, 1)
            elif side == "norm":
                # RMSNorm gains follow the residual projection: exactly the kept gains under channel selection
                projection = initial_projection(init, scores, width, torch.Generator().manual_seed(seed))
                parameters[f"direct__{_slot(name)}"] = projection.T @ source
            else:
                parameters[f"direct__{_slot(name)}"] = source  # biases of q/k/v: not on the residual stream
        for name, tensor in parameters.items():
            model.register_parameter(name, nn.Parameter(tensor))
        return model

    def weights(self) -> dict[str, torch.Tensor]:
        """The student's HF state dict, differentiable in the trainable parameters."""
        out = {}
        for name in self.names:
            slot = _slot(name)
            side = _side(name)
            if side not in ("reads", "writes"):
                out[name] = getattr(self, f"direct__{slot}")
                continue
            source = getattr(self, _slot(_teacher_name(name, self.layers)))
            new_rows = getattr(self, f"new_rows__{slot}", None)
            if new_rows is not None:
                source = torch.cat([source, new_rows])
            projection = getattr(self, f"projection__{slot}")
            out[name] = source @ projection if side == "reads" else projection.T @ source
        return out

    def forward(self, **kwargs):
        skeleton = self._skeleton[0]
        weights = self.weights()
        device = next(iter(weights.values())).device
        if next(skeleton.buffers()).device != device:
            skeleton.to(device)
        return torch.func.functional_call(skeleton, weights, args=(), kwargs=kwargs)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A plain HF model holding the current student weights."""
        model = AutoModelForCausalLM.from_config(self.config, attn_implementation="sdpa")
        model.load_state_dict({k: v.detach().float().cpu() for k, v in self.weights().items()}, strict=False)
        model.tie_weights()
        return model

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save the merged HF model (``state_dict``: this module's trainable state, e.g. gathered by ZeRO-3)."""
        if state_dict is not None:
            self.load_state_dict(state_dict, strict=False)
        self.merge().save_pretrained(directory)

    def save_init(self, directory: Path, teacher_dir: Path) -> None:
        """A directory ``load_student`` reads: the merged model (for tooling) plus what training needs."""
        self.merge().save_pretrained(directory)
        (directory / PRUNING_FILE).write_text(json.dumps({"teacher_dir": str(teacher_dir), "layers": self.layers}))
        save_file({k: v.detach().contiguous() for k, v in self.named_parameters()}, directory / PARAMETERS_FILE)


def load_student(directory: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """An HF model directory, or a pruned student's initial directory (see ``PrunedModel.save_init``)."""
    directory = Path(directory)
    if not (directory / PRUNING_FILE).is_file():
        return load_model(directory, trust_remote_code=trust_remote_code)
    meta = json.loads((directory / PRUNING_FILE).read_text())
    teacher = load_model(meta["teacher_dir"], trust_remote_code=trust_remote_code)
    teacher_state = {k: v.float() for k, v in teacher.state_dict().items()
                     if _side(k) != "norm" and not k.endswith("bias")}
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    return PrunedModel(config, teacher_state, meta["layers"], load_file(directory / PARAMETERS_FILE))


@torch.no_grad()
def hidden_erank(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 chunk: int = 32, latent_ids: list[int] | None = None) -> list[float]:
    """eRank of each layer's hidden states (embedding output first) over the real tokens, as a
    (tokens × d) matrix, centred. Streamed in chunks through second moments: the singular values of the
    centred matrix are the square roots of its scatter matrix's eigenvalues. ``latent_ids``: continuous thoughts."""
    moments = None
    for start in range(0, len(input_ids), chunk):
        mask, ids = attention_mask[start:start + chunk], input_ids[start:start + chunk]
        output = (continuous_forward(model, ids, mask, latent_ids, compute_logits=False) if latent_ids else
                  model(input_ids=ids, attention_mask=mask, output_hidden_states=True))
        states = torch.stack([h[mask.bool()] for h in output.hidden_states], 1)  # [tokens, L + 1, d]
        moments = moments or Moments.zeros(states.shape[1], states.shape[2])
        moments.update(states)
    eigenvalues = torch.linalg.eigvalsh(moments.covariance()).clamp_min(0)
    return effective_rank(eigenvalues.sqrt()).tolist()

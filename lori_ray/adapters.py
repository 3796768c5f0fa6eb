"""LoRA adapters (peft) on a training stage's model (``train.lora``).

The HF model's own weights freeze; low-rank updates of the chosen linear layers train, and so do the rows of the
student's latent-slot tokens (new tokens, with nothing pretrained in them: peft's trainable tokens). Modules of
the objective outside the model (the LoRi projection, the answer readout) are untouched and train as always.
The published model has the updates merged: a plain HF model that every later stage, transformers and MLflow
read as any other; ``lora.save_adapter`` also keeps the adapter beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import LoraConfig
from .pruned import load_student
from .tokens import latent_ids_of, tokenizer_from

ADAPTER_DIR = "adapter"  # in the published model's directory, with lora.save_adapter


def with_lora(model: nn.Module, lora: LoraConfig, trainable_token_ids: list[int]) -> nn.Module:
    """``model`` wrapped as a peft model whose only trainable weights are the LoRA updates and the rows of
    ``trainable_token_ids`` in the input embeddings."""
    import peft  # imported as a LoRA stage builds its model: its import costs seconds every other stage skips
    settings = peft.LoraConfig(r=lora.rank, lora_alpha=lora.lora_alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, task_type="CAUSAL_LM",
                               trainable_token_indices=list(trainable_token_ids) or None)
    return peft.get_peft_model(model, settings)


def publish(base_dir: str | Path, lora: LoraConfig, trainable_token_ids: list[int],
            state: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Save the trained adapter's model at ``directory`` with the updates merged, from the base it was trained on
    and its trained ``state`` (the peft model's state dict, e.g. ZeRO-3's consolidated one): rebuilt here rather
    than merged in place, since under ZeRO-3 no rank holds the whole model."""
    model = with_lora(load_student(str(base_dir)), lora, trainable_token_ids)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the trained adapter does not fit its base {base_dir}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if lora.save_adapter:  # names its base by the directory it was loaded from
        model.save_pretrained(Path(directory) / ADAPTER_DIR)
    model.merge_and_unload().save_pretrained(directory)


def lora_token_ids(model_dir: str | Path) -> list[int]:
    """The embedding rows a LoRA stage trains besides its adapters: the latent-slot tokens, new in a student."""
    return latent_ids_of(tokenizer_from(str(model_dir)))

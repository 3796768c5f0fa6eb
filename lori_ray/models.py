"""Llama and Qwen2 models: built from a named size preset or loaded from a local HF directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

# per-load progress bars from every actor and worker would flood the job log
hf_logging.disable_progress_bar()

FAMILIES = ("llama", "qwen2")

# hidden, layers, heads, kv heads, mlp; "135m" and "1b" match SmolLM2-135M and TinyLlama-1.1B shapes.
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256),
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512),
    "base": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024),
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632),
}


def preset_config(family: str, size: str, vocab_size: int, max_positions: int, special_ids: dict[str, int]):
    if family not in FAMILIES:
        raise ValueError(f"model.family must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"model.size must be one of {sorted(SIZES)}, got {size!r}")
    return AutoConfig.for_model(
        family, vocab_size=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=True,
        attn_implementation="sdpa", **special_ids, **SIZES[size])


def build_model(family: str, size: str, vocab_size: int, max_positions: int, special_ids: dict[str, int],
                seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = preset_config(family, size, vocab_size, max_positions, special_ids)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               gguf_file: str | None = None) -> torch.nn.Module:
    """A causal LM from a local directory (safetensors only) or a GGUF file inside it."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, gguf_file=gguf_file,
        use_safetensors=None if gguf_file else True, attn_implementation="sdpa")


def model_shape(family: str, size: str, path: str | None, trust_remote_code: bool = False) -> tuple[int, int]:
    """(hidden size, layer count) without building the model, for config validation."""
    if path:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return config.hidden_size, config.num_hidden_layers
    return SIZES[size]["hidden_size"], SIZES[size]["num_hidden_layers"]

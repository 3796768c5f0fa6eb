"""Continuous thoughts (Coconut, Hao et al. 2024): the input embedding of each latent slot is the previous
position's last-layer hidden state, so K latents are K serial passes through the model (depth), not K
parallel input tokens (docs/method.md#latent-slots-pause-and-continuous).

Latent slots are found by their token ids and may sit at different columns in different rows. The sequence
is run left to right in chunks that end just before the next column holding a latent of some row; after
each chunk those rows' latent embeddings are replaced by the state just computed at the column before, and
the KV cache carries everything already run. Gradients flow through the fed-back states, as in Coconut.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache


def _cache_keyword(decoder: nn.Module) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@dataclass
class ContinuousOutput:
    logits: torch.Tensor | None  # at ``logits_to_keep`` positions (all when None)
    hidden_states: tuple[torch.Tensor, ...]  # embeddings and every layer's output, [B, T, d] each
    inputs_embeds: torch.Tensor  # the input embeddings with every latent filled in


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding on either side (left-padded prompts, right-padded training rows)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def continuous_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       latent_ids: list[int], logits_to_keep: torch.Tensor | None = None,
                       compute_logits: bool = True) -> ContinuousOutput:
    """One forward of an HF causal LM (``get_decoder`` + ``get_output_embeddings``) with every token in
    ``latent_ids`` replaced by the hidden state before it. Equals running the whole sequence once per latent
    column, filling one column each time (``tests/unit/test_latents.py`` checks it against that loop)."""
    decoder = model.get_decoder()
    embeddings = model.get_input_embeddings()(input_ids)
    is_latent = torch.isin(input_ids, torch.as_tensor(latent_ids, device=input_ids.device))
    columns = is_latent.any(0).nonzero().flatten().tolist()
    positions = mask_positions(attention_mask)
    cache = {_cache_keyword(decoder): DynamicCache()}
    chunks, done = [], 0
    for end in [*columns, input_ids.shape[1]]:
        output = decoder(inputs_embeds=embeddings[:, done:end], attention_mask=attention_mask[:, :end],
                         position_ids=positions[:, done:end], use_cache=True, **cache,
                         output_hidden_states=True)
        chunks.append(output.hidden_states)
        if end < input_ids.shape[1]:  # the rows with a latent at ``end`` take the state just computed before it
            fill = is_latent[:, end, None]
            column = torch.where(fill, output.hidden_states[-1][:, -1].to(embeddings.dtype), embeddings[:, end])
            embeddings = torch.cat([embeddings[:, :end], column[:, None], embeddings[:, end + 1:]], 1)
        done = end
    hidden_states = tuple(torch.cat(layer, 1) for layer in zip(*chunks, strict=True))
    logits = None
    if compute_logits:
        last = hidden_states[-1] if logits_to_keep is None else hidden_states[-1][:, logits_to_keep]
        logits = model.get_output_embeddings()(last)
    return ContinuousOutput(logits, hidden_states, embeddings)

"""Exact-match evaluation by greedy generation: teacher with CoT, student with latent slots only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .data import Example, normalize_answer
from .tokens import Layout, left_pad


@dataclass
class EvalResult:
    accuracy: float
    tokens_per_answer: float  # generated tokens before <eos>, mean over examples
    seconds: float  # generation wall time for the whole split
    examples: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{k}": float(v) for k, v in vars(self).items()}


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], pad: int, eos: int, batch_size: int, max_new_tokens: int,
                    static_cache: bool = False, progress: Callable[[int, int], None] | None = None,
                    ) -> tuple[list[list[int]], float]:
    """Greedy continuations (cut at ``eos``) of left-padded prompt batches, and the generation wall time.

    ``static_cache`` on a GPU: a preallocated KV cache, with which ``generate`` compiles the decoding step.
    ``progress(done, total)`` is called after each batch.
    """
    model.eval()
    device = next(model.parameters()).device
    cache = "static" if static_cache and device.type == "cuda" else None
    outputs, seconds = [], 0.0
    for start in range(0, len(prompts), batch_size):
        batch = {k: v.to(device) for k, v in left_pad(prompts[start:start + batch_size], pad).items()}
        began = time.perf_counter()
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                eos_token_id=eos, cache_implementation=cache)
        seconds += time.perf_counter() - began
        for row in output[:, batch["input_ids"].shape[1]:].tolist():
            outputs.append(row[:row.index(eos)] if eos in row else row)
        if progress:
            progress(len(outputs), len(prompts))
    return outputs, seconds


def evaluate(model, layout: Layout, examples: list[Example], with_cot: bool, batch_size: int = 100,
             max_new_tokens: int = 64, progress: Callable[[int, int], None] | None = None) -> EvalResult:
    prompts = [layout.question(e) if with_cot else layout.student_prompt(e) for e in examples]
    outputs, seconds = greedy_generate(model, prompts, layout.pad, layout.eos, batch_size, max_new_tokens,
                                       progress=progress)
    correct = sum(layout.decode_answer(row, with_cot) == normalize_answer(e.answer) for e, row in zip(examples, outputs))
    generated_tokens = sum(len(row) for row in outputs)
    return EvalResult(correct / len(examples), generated_tokens / len(examples), seconds, len(examples))

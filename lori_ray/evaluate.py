"""Exact-match evaluation by greedy generation: teacher with CoT, student with latent slots only."""

from __future__ import annotations

import time
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
def evaluate(model, layout: Layout, examples: list[Example], with_cot: bool, batch_size: int = 100,
             max_new_tokens: int = 64) -> EvalResult:
    model.eval()
    device = next(model.parameters()).device
    correct, generated_tokens, seconds = 0, 0, 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [layout.question(e) if with_cot else layout.student_prompt(e) for e in chunk]
        batch = {k: v.to(device) for k, v in left_pad(prompts, layout.pad).items()}
        began = time.perf_counter()
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=layout.pad, eos_token_id=layout.eos)
        seconds += time.perf_counter() - began
        for example, row in zip(chunk, output[:, batch["input_ids"].shape[1]:].tolist()):
            length = row.index(layout.eos) if layout.eos in row else len(row)
            generated_tokens += length
            correct += layout.decode_answer(row, with_cot) == normalize_answer(example.answer)
    return EvalResult(correct / len(examples), generated_tokens / len(examples), seconds, len(examples))

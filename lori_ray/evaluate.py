"""Exact-match evaluation by greedy generation: teacher with CoT, student with latent slots only."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .data import DataFormatError, Example, normalize_answer, read_examples
from .latents import continuous_forward
from .tokens import IGNORE_INDEX, Layout, left_pad


@dataclass
class EvalResult:
    accuracy: float
    tokens_per_answer: float  # generated tokens before <eos>, mean over examples
    seconds: float  # generation wall time for the whole split
    examples: int
    # per answer character (digits in the task's order: least significant first for multiplication), the
    # fraction of examples with that character right, over the examples whose answer is that long
    digit_accuracy: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, fields: dict) -> EvalResult:
        """One read back from JSON (``vars`` of one), where the per-digit tuple became a list."""
        return cls(**{**fields, "digit_accuracy": tuple(fields["digit_accuracy"])})

    def as_metrics(self, prefix: str) -> dict[str, float]:
        metrics = {f"{prefix}_{k}": float(v) for k, v in vars(self).items() if k != "digit_accuracy"}
        metrics.update({f"{prefix}_digit_{i}_accuracy": v for i, v in enumerate(self.digit_accuracy)})
        return metrics


def digit_accuracy(predicted: list[str], gold: list[str]) -> tuple[float, ...]:
    """Accuracy of each answer position: where exact match is near zero, which digits a model gets."""
    longest = max((len(g) for g in gold), default=0)
    hits, counts = [0] * longest, [0] * longest
    for guess, answer in zip(predicted, gold, strict=True):
        for i, char in enumerate(answer):
            counts[i] += 1
            hits[i] += i < len(guess) and guess[i] == char
    return tuple(h / c for h, c in zip(hits, counts, strict=True))


def format_digits(values) -> str:
    """Per-digit accuracies as ``1.00 / 0.87 / ...`` in the answer's own order (units first for multiplication)."""
    return " / ".join(f"{v:.2f}" for v in values)


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], pad: int, eos: int, batch_size: int, max_new_tokens: int,
                    static_cache: bool = False, progress: Callable[[int, int], None] | None = None,
                    latent_ids: list[int] | None = None) -> tuple[list[list[int]], float]:
    """Greedy continuations (cut at ``eos``) of left-padded prompt batches, and the generation wall time.

    ``static_cache`` on a GPU: a preallocated KV cache, with which ``generate`` compiles the decoding step.
    ``progress(done, total)`` is called after each batch. With ``latent_ids`` those prompt tokens are continuous
    thoughts: their serial passes fill the prompt's embeddings, then ``generate`` decodes from them.
    """
    model.eval()
    device = next(model.parameters()).device
    cache = "static" if static_cache and device.type == "cuda" else None
    outputs, seconds = [], 0.0
    for start in range(0, len(prompts), batch_size):
        batch = {k: v.to(device) for k, v in left_pad(prompts[start:start + batch_size], pad).items()}
        began = time.perf_counter()
        prompt = batch
        if latent_ids:
            filled = continuous_forward(model, batch["input_ids"], batch["attention_mask"], latent_ids,
                                        compute_logits=False).inputs_embeds
            prompt = {"inputs_embeds": filled, "attention_mask": batch["attention_mask"]}
        output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                eos_token_id=eos, cache_implementation=cache)
        seconds += time.perf_counter() - began
        new_tokens = output if latent_ids else output[:, batch["input_ids"].shape[1]:]  # from embeddings: only new
        for row in new_tokens.tolist():
            outputs.append(row[:row.index(eos)] if eos in row else row)
        if progress:
            progress(len(outputs), len(prompts))
    return outputs, seconds


@torch.no_grad()
def exact_match(model, data: dict[str, torch.Tensor], rank: int, world: int, batch_size: int,
                latent_ids: list[int] | None = None) -> float:
    """Fraction of sequences whose every labelled token is the argmax given the gold prefix.

    For the answer (and CoT) tokens this equals exact match of greedy generation, in one forward
    pass. Rows are strided over ranks with the same number of forwards on each (ZeRO-3 gathers
    parameters collectively). ``latent_ids``: those tokens are continuous thoughts.
    """
    device = next(model.parameters()).device
    total = data["input_ids"].shape[0]
    rows = torch.arange(rank, total, world)
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, seen
    for chunk in range(math.ceil(math.ceil(total / world) / batch_size)):
        part = rows[chunk * batch_size:(chunk + 1) * batch_size]
        counted = len(part) > 0
        part = part if counted else torch.tensor([0])  # a rank with fewer rows still joins the forward
        input_ids, attention_mask = data["input_ids"][part].to(device), data["attention_mask"][part].to(device)
        logits = (continuous_forward(model, input_ids, attention_mask, latent_ids) if latent_ids else
                  model(input_ids=input_ids, attention_mask=attention_mask)).logits
        gold = data["labels"][part, 1:].to(device)
        hits = ((logits[:, :-1].argmax(-1) == gold) | (gold == IGNORE_INDEX)).all(1)
        if counted:
            counts += torch.tensor([hits.sum().item(), len(part)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def evaluate(model, layout: Layout, examples: list[Example], with_cot: bool, batch_size: int = 100,
             max_new_tokens: int = 64, progress: Callable[[int, int], None] | None = None,
             continuous: bool = False) -> EvalResult:
    """``continuous``: the student's latent slots are continuous thoughts (``student.latent: continuous``)."""
    prompts = [layout.question(e) if with_cot else layout.student_prompt(e) for e in examples]
    outputs, seconds = greedy_generate(model, prompts, layout.pad, layout.eos, batch_size, max_new_tokens,
                                       progress=progress, latent_ids=layout.latent_ids if continuous else None)
    predicted = [layout.decode_answer(row, with_cot) for row in outputs]
    gold = [normalize_answer(e.answer) for e in examples]
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    generated_tokens = sum(len(row) for row in outputs)
    return EvalResult(correct / len(examples), generated_tokens / len(examples), seconds, len(examples),
                      digit_accuracy(predicted, gold))


def main(argv: list[str] | None = None) -> int:
    """``python -m lori_ray.evaluate MODEL --data FILE``: a model directory a run wrote, scored on a data file in
    its training format (iCoT ``.txt``, GSM8K ``.jsonl``, or a table with ``--field role=column``)."""
    arguments = argparse.ArgumentParser(description="Exact match of a lori-ray model on a data file (greedy).")
    arguments.add_argument("model", help="a model directory of a run, e.g. runs/demo/student")
    arguments.add_argument("--data", required=True, help="iCoT .txt, GSM8K .jsonl, or a table with --field")
    arguments.add_argument("--field", action="append", default=[], metavar="ROLE=COLUMN",
                           help="a table's column for question, cot, answer or messages (as data.fields.*)")
    arguments.add_argument("--limit", type=int, help="the first N examples only")
    arguments.add_argument("--batch-size", type=int, default=100)
    arguments.add_argument("--max-new-tokens", type=int, default=64)
    arguments.add_argument("--json", action="store_true", help="one JSON object instead of the summary")
    args = arguments.parse_args(argv)

    from .predict import Predictor  # here, not at the top: predict imports this module's greedy_generate
    fields = None
    if args.field:
        if not all("=" in f for f in args.field):
            print(f"error: --field: expected ROLE=COLUMN, got {args.field}", file=sys.stderr)
            return 2
        fields = {"question": "question", "cot": None, "answer": "answer", "messages": None, "answer_marker": "####",
                  **dict(f.split("=", 1) for f in args.field)}
    try:
        examples = read_examples(args.data, fields=fields)[:args.limit]
        predictor = Predictor(args.model, args.max_new_tokens)
    except (DataFormatError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    contract = predictor.contract
    with_cot = contract.latent_slots is None
    result = evaluate(predictor.model, predictor.layout, examples, with_cot, args.batch_size, args.max_new_tokens,
                      continuous=contract.continuous)
    report = {"model": str(args.model), "data": str(args.data), "examples": result.examples,
              "exact_match": result.accuracy, "tokens_per_answer": result.tokens_per_answer,
              "seconds": result.seconds, "with_cot": with_cot}
    if contract.digits:  # per-digit accuracy means something for digit-by-digit answers only
        report["digit_accuracy"] = list(result.digit_accuracy)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.model} on {args.data}: {result.examples} examples, exact match {result.accuracy:.3f}, "
              f"{result.tokens_per_answer:.1f} tokens per answer ({'with' if with_cot else 'without'} its CoT), "
              f"{result.seconds:.1f} s" + (f"\nper digit (least significant first): "
                                            f"{format_digits(result.digit_accuracy)}" if contract.digits else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

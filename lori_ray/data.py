"""Reasoning data in the iCoT line format: ``question||step + step ... #### answer``.

Multiplication is generated procedurally (digits least-significant first, exactly like the
published iCoT files); GSM8K converts from the openai jsonl annotation to the equation format
``question||<<a+b=c>> <<c*2=d>> #### d``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

COT_SEPARATOR = "||"
ANSWER_SEPARATOR = "####"
_EQUATION = re.compile(r"<<[^<>]*>>")


class DataFormatError(ValueError):
    """A data line that is not in the iCoT format; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Example:
    question: str
    steps: tuple[str, ...]
    answer: str

    @property
    def cot(self) -> str:
        return join_steps(self.steps)

    def to_line(self) -> str:
        return f"{self.question}{COT_SEPARATOR}{self.cot} {ANSWER_SEPARATOR} {self.answer}"


def split_steps(cot: str) -> tuple[str, ...]:
    """CoT steps: each ``<<...>>`` equation (GSM8K), else each ``+``-separated partial product.

    A multiplication running sum ``( ... )`` stays with the partial product it follows.
    """
    cot = cot.strip()
    if not cot:
        return ()
    if "<<" in cot:
        return tuple(_EQUATION.findall(cot))
    return tuple(step.strip() for step in cot.split(" + "))


def join_steps(steps: tuple[str, ...] | list[str]) -> str:
    if any(step.startswith("<<") for step in steps):
        return " ".join(steps)
    return " + ".join(steps)


def parse_line(line: str, where: str = "<line>") -> Example:
    line = line.rstrip("\n")
    if line.count(COT_SEPARATOR) != 1:
        raise DataFormatError(f"{where}: expected exactly one '{COT_SEPARATOR}' between question and CoT")
    question, rest = line.split(COT_SEPARATOR)
    if rest.count(ANSWER_SEPARATOR) != 1:
        raise DataFormatError(f"{where}: expected exactly one '{ANSWER_SEPARATOR}' before the answer")
    cot, answer = rest.split(ANSWER_SEPARATOR)
    question, answer = question.strip(), answer.strip()
    if not question:
        raise DataFormatError(f"{where}: empty question")
    if not answer:
        raise DataFormatError(f"{where}: empty answer")
    return Example(question, split_steps(cot), answer)


def read_icot(path: str | Path) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                examples.append(parse_line(line, f"{path}:{number}"))
    if not examples:
        raise DataFormatError(f"{path}: no examples")
    return examples


def write_icot(examples, path: str | Path) -> None:
    Path(path).write_text("".join(e.to_line() + "\n" for e in examples), encoding="utf-8")


def _digits(value: int, width: int) -> str:
    """``value`` as ``width`` space-separated digits, least significant first."""
    return " ".join(str(value).zfill(width)[::-1])


def multiplication_example(a: int, b: int, a_digits: int, b_digits: int) -> Example:
    partials, running = [], 0
    for j, digit in enumerate(str(b).zfill(b_digits)[::-1]):
        product = a * int(digit) * 10**j
        running += product
        width = a_digits + 1 + j
        step = _digits(product, width)
        if 0 < j < b_digits - 1:
            step += f" ( {_digits(running, width)} )"
        partials.append(step)
    question = f"{_digits(a, a_digits)} * {_digits(b, b_digits)}"
    return Example(question, tuple(partials), _digits(a * b, a_digits + b_digits))


def generate_multiplication(n: int, a_digits: int, b_digits: int, seed: int = 0,
                            exclude: set[str] = frozenset()) -> list[Example]:
    """``n`` distinct problems with exactly ``a_digits`` × ``b_digits`` digits, skipping questions in ``exclude``."""
    space = 9 * 10 ** (a_digits - 1) * 9 * 10 ** (b_digits - 1)
    if n > space - len(exclude):
        raise ValueError(f"cannot draw {n} distinct {a_digits}x{b_digits} problems")
    rng = random.Random(seed)
    seen, examples = set(exclude), []
    while len(examples) < n:
        a = rng.randrange(10 ** (a_digits - 1), 10**a_digits)
        b = rng.randrange(10 ** (b_digits - 1), 10**b_digits)
        example = multiplication_example(a, b, a_digits, b_digits)
        if example.question not in seen:
            seen.add(example.question)
            examples.append(example)
    return examples


def gsm8k_example(record: dict) -> Example:
    """openai GSM8K record → iCoT equation format (the ``<<expr=value>>`` annotations are the steps)."""
    rationale, _, answer = record["answer"].rpartition(ANSWER_SEPARATOR)
    return Example(record["question"].strip(), tuple(_EQUATION.findall(rationale)), normalize_answer(answer))


def read_gsm8k_jsonl(path: str | Path) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                examples.append(gsm8k_example(record))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise DataFormatError(f"{path}:{number}: not a GSM8K record ({error})") from error
    if not examples:
        raise DataFormatError(f"{path}: no examples")
    return examples


def read_examples(path: str | Path) -> list[Example]:
    """iCoT ``.txt`` or openai GSM8K ``.jsonl``, by extension."""
    return read_gsm8k_jsonl(path) if str(path).endswith(".jsonl") else read_icot(path)


def normalize_answer(text: str) -> str:
    """Compare answers ignoring whitespace and thousands separators (``1,500`` == ``1500``)."""
    return re.sub(r"[\s,]", "", text)

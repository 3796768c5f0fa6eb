"""Tokenizers and the token layouts of teacher and student sequences.

Teacher (explicit CoT):  <bos> question || step1 + step2 ... #### answer <eos>  (+: the data's joiner)
Student (implicit):      <bos> question || <latent_0> ... <latent_K-1> #### answer <eos>

Segments are tokenized separately (each with a leading space; a step after a joiner that ends in a newline
without one) so the token span of every CoT step is known exactly, for any Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .data import ANSWER_SEPARATOR, ARITHMETIC_SYMBOLS, COT_SEPARATOR, Example, normalize_answer
from .model_sources import hub_errors, resolve_model_source

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
IGNORE_INDEX = -100
ENCODE_CACHE_SIZE = 1 << 20  # texts whose token ids a Layout remembers


def arithmetic_tokenizer() -> PreTrainedTokenizerFast:
    """One token per digit or symbol: the vocabulary of the multiplication tasks. Saved with the model, it works
    from plain transformers as in training: digits split one per token whether or not they are spaced ("12" is
    "1", "2"), and ``tokenizer(text)`` starts with ``<bos>`` as every training sequence does (lori-ray's own
    encoding passes ``add_special_tokens=False`` and places it itself)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *ARITHMETIC_SYMBOLS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Digits(individual_digits=True)])
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                        special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)


def load_tokenizer(path: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    """The tokenizer of a model directory, a GGUF file (or its directory plus ``gguf_file``) or a hub id."""
    source, gguf_file = resolve_model_source(path, gguf_file)
    with hub_errors(source):
        tokenizer = tokenizer_from(source, trust_remote_code, gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def tokenizer_from(source: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    """``AutoTokenizer``, except for a directory whose tokenizer was saved as a plain ``tokenizer.json`` (ours, built
    from config for any family): that one loads exactly as saved. AutoTokenizer swaps in a family's own class for
    some model types (transformers 5 forces Qwen2Tokenizer on a qwen2 config, which rebuilds a byte-level BPE from
    the vocabulary and drops ``||`` and ``####``)."""
    local = Path(source)
    settings = local / "tokenizer_config.json"
    if not gguf_file and (local / "tokenizer.json").is_file() and settings.is_file() and \
            json.loads(settings.read_text()).get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, gguf_file=gguf_file)


def latent_tokens(count: int) -> list[str]:
    return [f"<latent_{i}>" for i in range(count)]


def latent_ids_of(tokenizer) -> list[int]:
    """The ids of the latent-slot tokens ``tokenizer`` has (none for a teacher's)."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[token] for token in vocab if re.fullmatch(r"<latent_\d+>", token))


def add_latent_tokens(tokenizer, count: int) -> list[int]:
    """Add the K latent-slot tokens (idempotent) and return their ids."""
    tokens = latent_tokens(count)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(tokens)


@dataclass
class Sequence:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss
    spans: list[tuple[int, int]]  # [start, end) token positions of each CoT step or latent slot
    answer: tuple[int, int] = (0, 0)  # [start, end) positions of ``####`` and the answer tokens (not <eos>)


class Layout:
    """Builds teacher/student token sequences for one tokenizer and set of latent tokens.

    A tokenizer with a chat template (an instruct model) gets the question as a user turn and the
    CoT/latents and answer as the assistant's reply, ending with the template's end-of-turn token.
    """

    def __init__(self, tokenizer, latent_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.latent_ids = list(latent_ids or [])
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not self.chat else []
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self._digit_ids: set[int] | None = None
        self._encoded: dict[str, tuple[int, ...]] = {}

    def _tokens(self, text: str) -> list[int]:
        # memoised: a HF encode call costs ~40 us, and a data set of 300,000 problems makes millions of them,
        # most of them the same separators and steps
        ids = self._encoded.get(text)
        if ids is None:
            if len(self._encoded) >= ENCODE_CACHE_SIZE:
                self._encoded.clear()
            ids = self._encoded[text] = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        return list(ids)

    def _encode(self, text: str) -> list[int]:
        """A segment of the layout: its own tokens, after a space."""
        return self._tokens(" " + text)

    def question(self, example: Example) -> list[int]:
        if self.chat:
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": example.question}],
                                                           add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        return self.bos + self._encode(example.question) + self._encode(COT_SEPARATOR)

    def _answer(self, example: Example) -> list[int]:
        return self._encode(ANSWER_SEPARATOR) + self._encode(example.answer) + [self.eos]

    def teacher(self, example: Example) -> Sequence:
        """The question, the steps with the example's joiner between them, and the answer. The joiner's trailing
        spaces go with the next step (`` + `` is `` +`` then `` step``, the tokens of the iCoT formats); one that
        ends otherwise (a newline) is written as it is and the next step right after it."""
        prompt = self.question(example)
        joiner = example.step_joiner
        between = joiner.rstrip(" ")
        lead = joiner[len(between):]
        target, spans = [], []
        for i, step in enumerate(example.steps):
            if i and between:
                target += self._tokens(between)
            start = len(prompt) + len(target)
            target += self._tokens((lead if i else " ") + step)
            spans.append((start, len(prompt) + len(target)))
        answer_start = len(prompt) + len(target)
        target += self._answer(example)
        return Sequence(prompt + target, [IGNORE_INDEX] * len(prompt) + target, spans,
                        (answer_start, len(prompt) + len(target) - 1))

    def segments(self, sequence: Sequence, kind: str) -> list[list[int]]:
        """Token positions whose hidden states form each unit of the teacher's trajectory. ``steps``: each CoT
        step's tokens. ``digits``: for each answer digit p, the positions that write digit p of every number in
        the CoT (the token before it): the partial products and running sums that feed that answer digit. Digits
        must be single tokens, written in the answer's order (least significant first in the iCoT layout).
        ``separator``: the ``####`` token alone, whose state predicts the answer (CODI's distillation token)."""
        if kind == "steps":
            return [list(range(start, end)) for start, end in sequence.spans]
        if kind == "separator":
            return [[sequence.answer[0]]]
        if self._digit_ids is None:
            self._digit_ids = {self.tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
        columns = [[] for _ in range(sequence.answer[1] - sequence.answer[0] - 1)]  # answer tokens after ####
        place = 0
        for position in range(sequence.spans[0][0] if sequence.spans else 0, sequence.answer[0]):
            if sequence.input_ids[position] in self._digit_ids:
                if place < len(columns):
                    columns[place].append(position - 1)
                place += 1
            else:
                place = 0
        empty = [p for p, column in enumerate(columns) if not column]
        if empty:
            raise ValueError(f"trajectory.segments=digits: answer digits {empty} have no digit in their place in "
                             f"any CoT number of '{self.tokenizer.decode(sequence.input_ids)}'")
        return columns

    def student_prompt(self, example: Example) -> list[int]:
        return self.question(example) + self.latent_ids + self._encode(ANSWER_SEPARATOR)

    def student(self, example: Example) -> Sequence:
        question = self.question(example)
        prompt = question + self.latent_ids
        answer = self._answer(example)
        start = len(question)
        spans = [(start + i, start + i + 1) for i in range(len(self.latent_ids))]
        return Sequence(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, spans,
                        (len(prompt), len(prompt) + len(answer) - 1))

    def decode_answer(self, generated: list[int], with_cot: bool) -> str:
        """The normalised answer in generated tokens (after ``####`` when the model wrote a CoT)."""
        if self.eos in generated:
            generated = generated[: generated.index(self.eos)]
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if with_cot:
            if ANSWER_SEPARATOR not in text:
                return ""
            text = text.split(ANSWER_SEPARATOR, 1)[1]
        return normalize_answer(text.replace(ANSWER_SEPARATOR, ""))


def collate(sequences: list[Sequence], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``labels``/``attention_mask`` tensors."""
    lengths = np.array([len(s.input_ids) for s in sequences], dtype=np.int64)
    length = length or int(lengths.max())
    if len(lengths) and lengths.max() > length:
        raise ValueError(f"sequence of {lengths.max()} tokens is longer than the context ({length})")
    # one flat copy per field, then a boolean scatter: a tensor per row costs ~40 us, 12 s over 300,000 rows
    mask = np.arange(length) < lengths[:, None]
    tensors = {}
    for name, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX)):
        values = np.full((len(sequences), length), fill, dtype=np.int64)
        values[mask] = np.fromiter(chain.from_iterable(getattr(s, name) for s in sequences), dtype=np.int64,
                                   count=int(lengths.sum()))
        tensors[name] = torch.from_numpy(values)
    tensors["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
    return tensors


def left_pad(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, length - len(p):] = torch.tensor(p)
        mask[row, length - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}

"""Token sequences of a data set, tokenized once: ``datasets.map`` writes them to an Arrow file named by what they
depend on (the tokenizer, the layout's latent tokens, teacher or student sequences, the examples), so a rerun, a
stage whose model is already trained, or another run on the same data (a benchmark's methods and seeds) reads
them back instead of tokenizing hundreds of thousands of problems again."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, Features, Value, disable_progress_bars
from datasets import Sequence as ListOf
from filelock import FileLock

from .data import Example
from .tokens import Layout, Sequence

KINDS = ("teacher", "student")


def cache_key(layout: Layout, kind: str, examples: list[Example]) -> str:
    """Digest of everything a sequence depends on: the tokenizer (vocabulary, merges, added tokens, chat
    template), which layout builds it, and every example's text."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tokenizer = layout.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha256()
    for part in (vocabulary, json.dumps([kind, layout.latent_ids, layout.bos, layout.eos,
                                         getattr(tokenizer, "chat_template", None)])):
        digest.update(part.encode())
    for example in examples:  # \x1f/\x1e: separators no text holds, so two splits of one text differ
        # a joiner of the user's after \x1d; none (the format's own) adds nothing: the keys of older caches hold
        joiner = "" if example.joiner is None else "\x1d" + example.joiner
        digest.update(("\x1f".join((example.question, *example.steps, example.answer)) + joiner).encode() + b"\x1e")
    return digest.hexdigest()[:24]


def tokenized(layout: Layout, kind: str, examples: list[Example], cache_dir: Path,
              log: Callable[[str], None] = print) -> list[Sequence]:
    """``layout.teacher`` or ``layout.student`` of each example, through the Arrow cache in ``cache_dir``."""
    if not examples:
        return []
    disable_progress_bars()  # one line of ours in the job log, not a bar per map
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{kind}-{cache_key(layout, kind, examples)}.arrow"
    started = time.time()
    with FileLock(f"{path}.lock"):  # runs sharing the output_dir side by side: one of them tokenizes
        if path.is_file():
            dataset = Dataset.from_file(str(path))
            log(f"[data] {len(dataset)} {kind} sequences read from the tokenized cache {path}")
        else:
            dataset = _map(layout, kind, examples, path)
            log(f"[data] {len(dataset)} {kind} sequences tokenized in {time.time() - started:.0f}s, cached at {path}")
    columns = dataset.to_dict()
    return [Sequence(input_ids, labels, [tuple(span) for span in spans], tuple(answer))
            for input_ids, labels, spans, answer in zip(columns["input_ids"], columns["labels"], columns["spans"],
                                                        columns["answer"], strict=True)]


def _map(layout: Layout, kind: str, examples: list[Example], path: Path):
    build = getattr(layout, kind)

    def encode(batch: dict) -> dict:
        rows = [build(Example(q, tuple(s), a, j))
                for q, s, a, j in zip(batch["question"], batch["steps"], batch["answer"], batch["joiner"], strict=True)]
        return {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows],
                "spans": [[list(span) for span in r.spans] for r in rows], "answer": [list(r.answer) for r in rows]}

    ids = ListOf(Value("int32"))
    source = Dataset.from_dict({"question": [e.question for e in examples], "steps": [list(e.steps) for e in examples],
                                "answer": [e.answer for e in examples], "joiner": [e.joiner for e in examples]},
                               features=Features({"question": Value("string"), "steps": ListOf(Value("string")),
                                                  "answer": Value("string"), "joiner": Value("string")}))
    # datasets writes the file under a temporary name and moves it into place: a killed run leaves no half file
    return source.map(encode, batched=True, batch_size=4096, remove_columns=source.column_names,
                      features=Features({"input_ids": ids, "labels": ids, "spans": ListOf(ids), "answer": ids}),
                      cache_file_name=str(path), new_fingerprint=path.stem)

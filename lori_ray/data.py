"""Reasoning data in the iCoT line format: ``question||step + step ... #### answer``.

Multiplication is generated procedurally (digits least-significant first, exactly like the
published iCoT files); GSM8K converts from the openai jsonl annotation (a local ``train.jsonl``,
or ``hf:openai/gsm8k`` through Hugging Face ``datasets`` where the hub is reachable) to the
equation format ``question||<<a+b=c>> <<c*2=d>> #### d``; any table (``.jsonl``, ``.csv``, ``.parquet``, ``hf:``,
a folder or glob of parquet shards, a folder written by ``datasets``' ``save_to_disk``) goes through ``datasets``
with a column mapping (``read_table``). Past ~250 lines: one reader per source format, each with its own errors
naming the file and line or row.
"""

from __future__ import annotations

import glob
import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

COT_SEPARATOR = "||"
ANSWER_SEPARATOR = "####"
_EQUATION = re.compile(r"<<[^<>]*>>")
# the whitespace-separated symbols of the multiplication tasks: the whole vocabulary of a model built from a preset
ARITHMETIC_SYMBOLS = (*"0123456789", "*", "+", "(", ")", COT_SEPARATOR, ANSWER_SEPARATOR)


class DataFormatError(ValueError):
    """A data line that is not in the iCoT format; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Example:
    question: str
    steps: tuple[str, ...]
    answer: str
    # the text between two steps in the teacher's CoT (the user's own, e.g. a newline); None: the format's own
    joiner: str | None = None

    @property
    def step_joiner(self) -> str:
        return self.joiner if self.joiner is not None else format_joiner(self.steps)

    @property
    def cot(self) -> str:
        return self.step_joiner.join(self.steps)

    def to_line(self) -> str:
        return f"{self.question}{COT_SEPARATOR}{self.cot} {ANSWER_SEPARATOR} {self.answer}"


ARITHMETIC_JOINER = " + "  # between the partial products of the multiplication format
EQUATION_JOINER = " "  # between the <<...>> equations of the GSM8K format


def format_joiner(steps: tuple[str, ...] | list[str]) -> str:
    """The text between two steps in the iCoT formats: a space between equations, else `` + ``."""
    return EQUATION_JOINER if any(step.startswith("<<") for step in steps) else ARITHMETIC_JOINER


def split_steps(cot: str, joiner: str | None = None) -> tuple[str, ...]:
    """CoT steps: at ``joiner`` (its text without the spaces around it, which a tokenizer may write otherwise; a
    newline as it is), else each ``<<...>>`` equation (GSM8K), else each ``+``-separated partial product.

    A multiplication running sum ``( ... )`` stays with the partial product it follows.
    """
    cot = cot.strip()
    if not cot:
        return ()
    if joiner is not None:
        return tuple(step.strip() for step in cot.split(joiner.strip() or joiner) if step.strip())
    if "<<" in cot:
        return tuple(_EQUATION.findall(cot))
    return tuple(step.strip() for step in cot.split(ARITHMETIC_JOINER))


def parse_line(line: str, where: str = "<line>", symbols: frozenset[str] | None = None,
               joiner: str | None = None) -> Example:
    """``symbols``: the only whitespace-separated tokens allowed (a word-level vocabulary), else any text;
    ``joiner``: the text between the CoT's steps (see :func:`split_steps`), kept with the example."""
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
    words = f"{question} {cot} {answer}".split()  # each segment is tokenized on its own, the separators apart
    unknown = next((word for word in words if word not in symbols), None) if symbols else None
    if unknown is not None:
        raise DataFormatError(f"{where}: {unknown[:20]!r} is not in the vocabulary of a model built from a preset "
                              f"({' '.join(sorted(symbols))}); set model.path to a pretrained model for other text")
    return Example(question, split_steps(cot, joiner), answer, joiner)


def _read(path: str | Path, parse, skip_bad: bool) -> list[Example]:
    """Parse each non-empty line; a malformed one raises ``file:line: reason`` or, with
    ``skip_bad``, is skipped and counted in one warning."""
    examples, bad = [], []
    with open(path, "rb") as f:  # decoded line by line: a non-UTF-8 byte is a bad line with its number
        for number, raw in enumerate(f, start=1):
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataFormatError(f"{path}:{number}: not UTF-8 text (byte {error.start + 1})") from None
                if not line.strip():
                    continue
                examples.append(parse(line, f"{path}:{number}"))
            except DataFormatError:
                if not skip_bad:
                    raise
                bad.append(number)
    return _kept(path, examples, bad, "malformed lines (lines")


def _kept(path, examples: list[Example], bad: list[int | str], skipped: str) -> list[Example]:
    """The examples read, with one warning for the ``bad`` line or row numbers skipped (``shard: row`` for a table
    read in parts); none at all is an error."""
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} {skipped} {', '.join(map(str, bad[:10]))}"
                      f"{', ...' if len(bad) > 10 else ''})", stacklevel=4)
    if not examples:
        raise DataFormatError(f"{path}: no examples")
    return examples


def read_icot(path: str | Path, skip_bad: bool = False, symbols: frozenset[str] | None = None) -> list[Example]:
    return _read(path, lambda line, where: parse_line(line, where, symbols), skip_bad)


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


_ICOT_PRODUCT = re.compile(r"^(\d(?: \d)*) \* (\d(?: \d)*)$")


def multiplication_digits(examples: list[Example]) -> list[int] | None:
    """[digits of A, digits of B] when every question is an iCoT multiplication of one shape (``5 6 3 * 7 4 3``,
    least significant digit first), else None: a model trained on such a file is asked "365 * 347" the same way."""
    shapes = set()
    for example in examples:
        match = _ICOT_PRODUCT.match(example.question)
        if not match:
            return None
        shapes.add(tuple(len(part.split()) for part in match.groups()))
    return list(shapes.pop()) if len(shapes) == 1 else None


def random_multiplication(rng: random.Random, a_digits: int, b_digits: int) -> Example:
    """One problem with exactly ``a_digits`` × ``b_digits`` digits, drawn uniformly with ``rng``."""
    a = rng.randrange(10 ** (a_digits - 1), 10**a_digits)
    b = rng.randrange(10 ** (b_digits - 1), 10**b_digits)
    return multiplication_example(a, b, a_digits, b_digits)


def generate_multiplication(n: int, a_digits: int, b_digits: int, seed: int = 0,
                            exclude: set[str] = frozenset()) -> list[Example]:
    """``n`` distinct problems with exactly ``a_digits`` × ``b_digits`` digits, skipping questions in ``exclude``."""
    space = 9 * 10 ** (a_digits - 1) * 9 * 10 ** (b_digits - 1)
    if n > space - len(exclude):
        raise ValueError(f"cannot draw {n} distinct {a_digits}x{b_digits} problems")
    rng = random.Random(seed)
    seen, examples = set(exclude), []
    while len(examples) < n:
        example = random_multiplication(rng, a_digits, b_digits)
        if example.question not in seen:
            seen.add(example.question)
            examples.append(example)
    return examples


def gsm8k_example(record: dict) -> Example:
    """openai GSM8K record → iCoT equation format (the ``<<expr=value>>`` annotations are the steps)."""
    rationale, separator, answer = record["answer"].rpartition(ANSWER_SEPARATOR)
    if not separator or not answer.strip():
        raise DataFormatError(f"the answer has no final '{ANSWER_SEPARATOR} <number>'")
    if not re.search(r"\d", answer):  # '#### twenty-four' could never be matched against a generated number
        raise DataFormatError(f"the final answer {answer.strip()[:40]!r} is not a number ('{ANSWER_SEPARATOR} "
                              f"<number>')")
    return Example(record["question"].strip(), tuple(_EQUATION.findall(rationale)), normalize_answer(answer))


def parse_gsm8k_line(line: str, where: str = "<line>") -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
    missing = [key for key in ("question", "answer") if not isinstance(record, dict) or key not in record]
    if missing:
        raise DataFormatError(f"{where}: GSM8K record without {' and '.join(repr(k) for k in missing)}")
    try:
        return gsm8k_example(record)
    except DataFormatError as error:
        raise DataFormatError(f"{where}: {error}") from None
    except (TypeError, AttributeError) as error:
        raise DataFormatError(f"{where}: not a GSM8K record ({error!r})") from error


def read_gsm8k_jsonl(path: str | Path, skip_bad: bool = False) -> list[Example]:
    return _read(path, parse_gsm8k_line, skip_bad)


HF_PREFIX = "hf:"
_HF_SPEC = re.compile(r"^hf:(?P<name>[\w.-]+/[\w.-]+)(?:/(?P<config>[\w.-]+))?(?:@(?P<split>[\w.\[\]:%-]+))?$")
HF_DEFAULT_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:OWNER/NAME[/CONFIG][@SPLIT]`` → (dataset, config, split); split defaults to ``train``,
    config to the dataset's usual one (``main`` for openai/gsm8k)."""
    match = _HF_SPEC.match(spec)
    if not match:
        raise ValueError(f"{spec}: not a Hugging Face dataset spec; expected hf:OWNER/NAME[/CONFIG][@SPLIT], "
                         "e.g. hf:openai/gsm8k@test")
    name = match["name"]
    return name, match["config"] or HF_DEFAULT_CONFIGS.get(name), match["split"] or "train"


def load_hf_gsm8k(spec: str = "hf:openai/gsm8k", skip_bad: bool = False) -> list[Example]:
    """A GSM8K-shaped Hugging Face dataset (``question``, ``answer`` ending in ``#### n``) in the
    iCoT equation format. Needs the ``datasets`` package and a reachable hub (or its local cache)."""
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{spec}: loading a Hugging Face dataset needs the 'datasets' package "
                          "(pip install datasets), or give a local GSM8K train.jsonl") from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # hub errors come in many types (ConnectionError, HfHubHTTPError, ...)
        raise DataFormatError(f"{spec}: could not load {name} ({config}, split {split}) from the Hugging Face hub "
                              f"(unreachable, or no such dataset/split); a local train.jsonl works offline: "
                              f"{type(error).__name__}: {error}") from error
    examples, bad = [], []
    for number, record in enumerate(rows):
        try:
            examples.append(gsm8k_example(dict(record)))
        except (DataFormatError, KeyError, TypeError, AttributeError) as error:
            if not skip_bad:
                raise DataFormatError(f"{spec}:{number}: not a GSM8K record ({error})") from error
            bad.append(number)
    if bad:
        warnings.warn(f"{spec}: skipped {len(bad)} malformed records", stacklevel=2)
    if not examples:
        raise DataFormatError(f"{spec}: no examples")
    return examples


def read_examples(path: str | Path, skip_bad: bool = False, fields: dict[str, str | None] | None = None,
                  step_separator: str | None = None, symbols: frozenset[str] | None = None,
                  step_joiner: str | None = None) -> list[Example]:
    """With ``fields``, a table (see :func:`read_table`); else (and for any ``.txt``) iCoT ``.txt`` or openai GSM8K
    ``.jsonl`` by extension, or ``hf:openai/gsm8k[@split]``; parquet and saved datasets need ``fields``. ``symbols``:
    an iCoT line with any other token is a bad line (a word-level vocabulary would read it as unknown tokens)."""
    columns_only = (Path(path).suffix.lower() == ".parquet"
                    or bool(saved_dataset(str(path)) or parquet_shards(str(path))))
    if fields and (columns_only or str(path).startswith(HF_PREFIX) or Path(path).suffix.lower() in TABLE_FORMATS):
        return read_table(path, fields, step_separator, skip_bad, step_joiner)
    if columns_only:
        raise DataFormatError(f"{path}: a table (parquet, or a dataset saved by datasets) is read by its columns: "
                              "name them with data.fields (e.g. data.fields.question=problem)")
    if str(path).startswith(HF_PREFIX):
        return load_hf_gsm8k(str(path), skip_bad)
    if str(path).endswith(".jsonl"):
        return read_gsm8k_jsonl(path, skip_bad)
    return read_icot(path, skip_bad, symbols)


# the datasets builder for each table file a column mapping reads
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# what Dataset.save_to_disk and DatasetDict.save_to_disk write into the folder they save
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")
SPLIT_SEPARATOR = "@"  # PATH@SPLIT: a split of a saved DatasetDict, as hf:OWNER/NAME@SPLIT names a hub split


def saved_dataset(spec: str) -> tuple[Path, str | None] | None:
    """(folder, split) of a folder written by ``datasets``' ``save_to_disk``, ``PATH@SPLIT`` naming a split of a
    saved DatasetDict; None for any other spec."""
    path, split = Path(spec), None
    if not path.exists() and SPLIT_SEPARATOR in spec:
        base, split = spec.rsplit(SPLIT_SEPARATOR, 1)
        path = Path(base)
    if path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES):
        return path, split
    return None


def parquet_shards(spec: str) -> list[Path]:
    """The files a glob matches, or the ``.parquet`` files in a folder, in name order (the order of their rows:
    ``train-00000-of-00004.parquet`` first); [] for anything else."""
    if glob.has_magic(spec):
        return sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    return sorted(Path(spec).glob("*.parquet")) if Path(spec).is_dir() else []


def source_problem(spec: str) -> str | None:
    """Why a data file setting names no data (no such file, a glob that matches none or matches other files
    than parquet, a folder with neither a saved dataset nor parquet files, a split its DatasetDict lacks), or None.
    ``hf:`` datasets are checked when they are loaded."""
    if spec.startswith(HF_PREFIX) or Path(spec).is_file():
        return None
    saved = saved_dataset(spec)
    if saved:
        return _split_problem(*saved)
    shards = parquet_shards(spec)
    other = next((p for p in shards if p.suffix.lower() != ".parquet"), None)
    if other:
        return f"{spec}: matches {other}, not a .parquet file"
    if shards:
        return None
    if glob.has_magic(spec):
        return f"{spec}: no file matches"
    if Path(spec).is_dir():
        return f"{spec}: a folder with neither a dataset saved by datasets (save_to_disk) nor .parquet files"
    return f"no such file: {spec}"


def _split_problem(folder: Path, split: str | None) -> str | None:
    listing = folder / "dataset_dict.json"  # a DatasetDict's splits; a Dataset saved alone has none
    splits = json.loads(listing.read_text())["splits"] if listing.is_file() else None
    if splits is None:
        return f"{folder}{SPLIT_SEPARATOR}{split}: {folder} is a Dataset saved without splits" if split else None
    if split is None and len(splits) > 1:
        return (f"{folder}: a DatasetDict with the splits {', '.join(splits)}; name one as "
                f"{folder}{SPLIT_SEPARATOR}SPLIT")
    if split is not None and split not in splits:
        return f"{folder}: no split {split!r}; its splits: {', '.join(splits)}"
    return None


def read_table(path: str | Path, fields: dict[str, str | None], step_separator: str | None = None,
               skip_bad: bool = False, step_joiner: str | None = None) -> list[Example]:
    """The rows of a table through Hugging Face ``datasets`` (a local ``.jsonl``/``.json``/``.csv``/``.parquet``
    file, cached as Arrow by ``datasets``, or ``hf:OWNER/NAME[/CONFIG][@SPLIT]``), one example per row:
    ``fields`` names the ``question``, ``answer`` and (optional) ``cot`` columns; the CoT splits into steps at
    ``step_separator`` (a regular expression), else by :func:`split_steps`. The teacher's CoT joins the steps
    with ``step_joiner``, else with the data's own: a newline between a list's items or a chat's lines, the text
    ``step_separator`` first matches in the file, or the format's own (steps :func:`split_steps` found). A missing
    column, or a row with an empty question or answer, raises :class:`DataFormatError` naming the file and the row
    (1-based, header not counted), or with ``skip_bad`` the row is skipped and counted in one warning. Parquet
    shards and a saved DatasetDict split are read part by part: an error names the shard (or ``folder@split``)
    and its row."""
    roles = ("messages",) if fields.get("messages") else ("question", "cot", "answer")
    wanted = {role: fields[role] for role in roles if fields.get(role)}
    splitter = re.compile(step_separator) if step_separator else None

    def steps_of(cot, chat: bool) -> tuple[tuple[str, ...], str | None]:
        """The steps and the text the data has between them (None: none shown, or the format's own)."""
        if isinstance(cot, (list, tuple)):  # one step per item (Coconut-style JSON), a line each as Coconut writes
            return tuple(str(s).strip() for s in cot if s is not None and str(s).strip()), "\n"
        cot = "" if cot is None else str(cot).strip()
        if splitter:
            between = splitter.search(cot)
            return tuple(s.strip() for s in splitter.split(cot) if s.strip()), between and between.group()
        if chat:
            return tuple(s.strip() for s in cot.splitlines() if s.strip()), "\n"
        return split_steps(cot), None

    examples, bad, joiner = [], [], step_joiner
    for part, rows in _table_parts(str(path)):
        missing = {role: column for role, column in wanted.items() if column not in rows.column_names}
        if missing:
            raise DataFormatError(f"{part}: no column " + ", ".join(f"{c!r} (data.fields.{r})"
                                                                    for r, c in missing.items())
                                  + f"; its columns: {', '.join(rows.column_names)}")
        for number, row in enumerate(rows.select_columns(list(dict.fromkeys(wanted.values()))), start=1):
            try:
                if "messages" in wanted:
                    question, cot, answer = chat_parts(row[wanted["messages"]], fields.get("answer_marker") or "####")
                else:
                    question, cot, answer = (row[wanted[r]] if r in wanted else None
                                             for r in ("question", "cot", "answer"))
                    question, answer = ("" if v is None else str(v).strip() for v in (question, answer))
                    empty = [role for role, value in (("question", question), ("answer", answer)) if not value]
                    if empty:
                        raise DataFormatError(f"empty {empty[0]} (column {wanted[empty[0]]!r})")
            except DataFormatError as error:
                if not skip_bad:
                    raise DataFormatError(f"{part}: row {number}: {error}") from None
                bad.append(f"{part}: {number}" if part != str(path) else number)
                continue
            steps, between = steps_of(cot, "messages" in wanted)
            examples.append((question, steps, answer))
            joiner = joiner or between  # one joiner for the file: rows without two steps show none
    return _kept(path, [Example(*example, joiner) for example in examples], bad, "malformed rows (rows")


def turn_parts(content) -> list[str]:
    """A chat turn's content as its text parts: a string is one part; a list (OpenAI-style content parts) holds
    strings or ``{"type": "text", "text": ...}`` parts, other types (images, ...) are refused."""
    if content is None:
        return []
    if not isinstance(content, (list, tuple)):
        return [str(content).strip()]
    parts = []
    for part in content:
        if isinstance(part, dict):
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise DataFormatError(f"messages: a content part of type {part.get('type')!r}; only text parts are "
                                      "read")
            part = part["text"]
        parts.append(str(part).strip())
    return [part for part in parts if part]


def chat_parts(messages, marker: str) -> tuple[str, str | tuple[str, ...], str]:
    """(question, CoT, answer) of a chat: the last user turn before the last assistant turn, whose content is the
    CoT, ``marker`` and the answer (split at the marker's last occurrence). An assistant turn in content parts
    gives its CoT as one step per part (list-valued steps), the marker and answer in the last part that has it."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise DataFormatError("messages: not a list of {role, content} turns")
    turns = [(str(m.get("role", "")), turn_parts(m.get("content"))) for m in messages]
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise DataFormatError("messages: no assistant turn")
    user = [" ".join(parts) for role, parts in turns[:last] if role == "user"]
    if not user or not user[-1]:
        raise DataFormatError("messages: no user turn (with content) before the assistant's")
    reply = turns[last][1]
    marked = max((i for i, part in enumerate(reply) if marker in part), default=None)
    if marked is None:
        raise DataFormatError(f"messages: the assistant turn has no {marker!r} before its answer "
                              "(data.fields.answer_marker)")
    last_step, answer = (part.strip() for part in reply[marked].rsplit(marker, 1))
    answer = " ".join([answer, *reply[marked + 1:]]).strip()
    if not answer:
        raise DataFormatError(f"messages: empty answer after {marker!r}")
    steps = [*reply[:marked], last_step]
    cot = tuple(step for step in steps if step) if len(reply) > 1 else last_step
    return user[-1], cot, answer


def _table_parts(spec: str) -> list[tuple[str, object]]:
    """The rows of a table spec as (name, ``datasets.Dataset``) parts, each named as its errors name it: the spec
    itself (a file, ``hf:``), each parquet shard of a folder or glob, or a saved dataset's ``folder[@split]``."""
    import datasets

    datasets.disable_progress_bars()  # one bar per file and split from every process would flood the job log
    problem = source_problem(spec)
    if problem:
        raise DataFormatError(problem)
    saved = saved_dataset(spec)
    if saved:
        folder, split = saved
        try:
            rows = datasets.load_from_disk(str(folder))
        except Exception as error:  # a damaged save raises what Arrow or json raise (ArrowInvalid, KeyError, ...)
            raise DataFormatError(f"{folder}: could not be read as a saved dataset: {type(error).__name__}: "
                                  f"{error}") from error
        if split is None and isinstance(rows, datasets.DatasetDict):  # its only split (source_problem checked)
            split = next(iter(rows))
        return [(f"{folder}{SPLIT_SEPARATOR}{split}", rows[split]) if split else (str(folder), rows)]
    return [(str(shard), _load_table(str(shard))) for shard in parquet_shards(spec)] or [(spec, _load_table(spec))]


def _load_table(spec: str):
    import datasets

    if spec.startswith(HF_PREFIX):
        name, config, split = parse_hf_spec(spec)
        options, where = {"path": name, "name": config, "split": split}, "from the Hugging Face hub"
    else:
        builder = TABLE_FORMATS[Path(spec).suffix.lower()]
        options, where = {"path": builder, "data_files": str(Path(spec).resolve()), "split": "train"}, "as a table"
    try:
        return datasets.load_dataset(**options)
    except Exception as error:  # hub and parser errors come in many types (ConnectionError, ArrowInvalid, ...)
        raise DataFormatError(f"{spec}: could not be read {where}: {type(error).__name__}: {error}") from error


# digit groups split by spaces or thousands commas ("1 5 0 0", "1,500") are one number
_DIGIT_GAP = re.compile(r"(?<=[0-9])[\s,]+(?=[0-9])")
_NUMBER = re.compile(r"(?P<sign>-?)[$€£¥]?(?P<value>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def normalize_answer(text: str) -> str:
    """The answer as a bare number, for exact-match comparison.

    Whitespace and thousands commas between digits join (``1,500`` == ``1500``; the
    multiplication layout ``1 5 0 0`` == ``1500``, leading zeros kept); the first number is
    taken, so currency, units and trailing text drop out (``$1,234.00 dollars.`` == ``1234``);
    a decimal part loses trailing zeros (``2.50`` == ``2.5``, ``7.0`` == ``7``). Text without a
    number compares with whitespace and commas removed.
    """
    joined = _DIGIT_GAP.sub("", text)
    match = _NUMBER.search(joined)
    if not match:
        return re.sub(r"[\s,]", "", text)
    value = match["value"]
    if "." in value:
        value = value.rstrip("0").rstrip(".")
        value = "0" + value if value.startswith(".") else value or "0"
    return match["sign"] + value

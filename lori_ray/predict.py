"""Ask a trained model in plain form: ``python -m lori_ray.predict runs/demo/student "365 * 347"``, or a file of
questions (``--file questions.txt``, ``--file -`` for stdin), one answer per line.

Every model directory a run produces carries ``lori-model.json`` (how to prompt it: the task's format, the
student's latent slots and whether they are continuous thoughts) and a model card (``README.md``). This
module turns a question as people write it into the model's format (multiplication: digits least
significant first, space-separated, as the iCoT data has them) and the model's answer back.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

# the package's other modules are imported where used: answering a question needs none of the training stack
CONTRACT_FILE = "lori-model.json"
_PRODUCT = re.compile(r"^\s*(\d+)\s*[*x×]\s*(\d+)\s*$")


@dataclass
class Contract:
    role: str  # teacher (writes its CoT) | student (answers after its latent slots)
    method: str
    task: str  # multiplication | file
    # digits of each factor of the multiplications it was trained on (generated, or a file of iCoT multiplication
    # lines): "A * B" questions are converted to its format; None: questions go to it as text
    digits: list[int] | None
    latent_slots: int | None  # None: it writes its CoT
    continuous: bool = False

    @classmethod
    def read(cls, path: Path) -> Contract:
        """The contract at ``path``; a ValueError naming the file for one that is not JSON or not a contract."""
        try:
            fields = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        known = set(cls.__dataclass_fields__)
        if not isinstance(fields, dict) or set(fields) - known or not {"role", "method", "task"} <= set(fields):
            keys = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise ValueError(f"{path}: not a lori-ray model contract (keys {keys}; expected {sorted(known)})")
        return cls(**{"digits": None, "latent_slots": None, **fields})


def model_question(question: str, contract: Contract) -> str:
    """A human question in the model's format; raises ValueError for one it was not trained on."""
    if not contract.digits:
        if not question.strip():
            raise ValueError(f"{question!r}: empty question")
        return question.strip()
    from .data import multiplication_example
    match = _PRODUCT.match(question)
    if not match:
        raise ValueError(f"{question!r}: expected 'A * B' with whole numbers")
    a, b = match.groups()
    if [len(a), len(b)] != contract.digits or any(len(n) > 1 and n[0] == "0" for n in (a, b)):
        raise ValueError(f"{question!r}: this model multiplies {contract.digits[0]}-digit by "
                         f"{contract.digits[1]}-digit numbers (no leading zeros)")
    return multiplication_example(int(a), int(b), *contract.digits).question


def human_answer(answer: str, contract: Contract) -> str:
    """The model's normalised answer as people write it (multiplication: most significant digit first)."""
    if contract.digits and answer.isdigit():
        return str(int(answer[::-1]))
    return answer


class Predictor:
    """A model directory with its contract, loaded once; ``predictor(["365 * 347"]) -> ["126655"]``."""

    def __init__(self, directory: str | Path, max_new_tokens: int = 64):
        from .models import load_model
        from .tokens import Layout, add_latent_tokens, load_tokenizer
        directory = Path(directory)
        contract_path = directory / CONTRACT_FILE
        if not contract_path.is_file():
            raise FileNotFoundError(f"{contract_path}: not a model directory a lori-ray run wrote (no {CONTRACT_FILE})")
        self.contract = Contract.read(contract_path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory}: no config.json, not a Hugging Face model directory")
        if not list(directory.glob("*.safetensors")):
            pickled = sorted(p.name for p in directory.glob("*.bin"))
            raise FileNotFoundError(f"{directory}: no *.safetensors weights" + (
                f" ({', '.join(pickled)} is a pickle, which lori-ray does not load: save the model as safetensors)"
                if pickled else ""))
        tokenizer = load_tokenizer(str(directory))
        slots = self.contract.latent_slots
        self.layout = Layout(tokenizer, add_latent_tokens(tokenizer, slots) if slots is not None else None)
        self.model = load_model(directory).eval()
        self.max_new_tokens = max_new_tokens

    def prompt(self, question: str):
        """The question as the example the model is prompted with; ValueError for one it cannot read."""
        from .data import Example
        converted = model_question(question, self.contract)
        tokenizer = self.layout.tokenizer
        if tokenizer.unk_token_id is not None:  # a word-level vocabulary (a model built from a preset)
            unknown = [word for word in converted.split()
                       if tokenizer.unk_token_id in tokenizer(word, add_special_tokens=False)["input_ids"]]
            if unknown:
                raise ValueError(f"{question!r}: {' '.join(unknown[:5])!r} not in the model's vocabulary")
        return Example(converted, (), "")

    def __call__(self, questions: list[str]) -> list[str]:
        """Each question's answer; a ValueError for the first question the model cannot read (``answer_each``
        answers the others)."""
        return self._generate([self.prompt(q) for q in questions])

    def answer_each(self, questions: list[str]) -> list[str | ValueError]:
        """Each question's answer, or the ValueError saying why the model cannot read it."""
        prompts = {}
        results: list[str | ValueError] = []
        for i, question in enumerate(questions):
            try:
                prompts[i] = self.prompt(question)
                results.append("")
            except ValueError as error:
                results.append(error)
        for i, answer in zip(prompts, self._generate(list(prompts.values())) if prompts else [], strict=True):
            results[i] = answer
        return results

    def _generate(self, examples) -> list[str]:
        from .evaluate import greedy_generate
        with_cot = self.contract.latent_slots is None
        prompts = [self.layout.question(e) if with_cot else self.layout.student_prompt(e) for e in examples]
        outputs, _ = greedy_generate(self.model, prompts, self.layout.pad, self.layout.eos, len(prompts),
                                     self.max_new_tokens, latent_ids=self.layout.latent_ids
                                     if self.contract.continuous else None)
        return [human_answer(self.layout.decode_answer(row, with_cot), self.contract) for row in outputs]


def plain_prompt(directory: Path, contract: Contract, question: str) -> tuple[str, bool] | None:
    """The text that plain ``tokenizer(text, add_special_tokens=...)`` turns into exactly the token ids the model
    was trained to answer after, for ``question`` as people write it, and that flag; None for a model plain
    generation cannot drive (continuous thoughts) or a tokenizer that does not round-trip its prompt."""
    from .data import Example
    from .tokens import Layout, add_latent_tokens, load_tokenizer
    if contract.continuous:
        return None
    tokenizer = load_tokenizer(str(directory))
    slots = contract.latent_slots
    layout = Layout(tokenizer, add_latent_tokens(tokenizer, slots) if slots is not None else None)
    example = Example(model_question(question, contract), (), "")
    ids = layout.question(example) if slots is None else layout.student_prompt(example)
    bos = tokenizer.bos_token_id
    without_bos = tokenizer.decode(ids[1:] if ids and ids[0] == bos else ids).strip()
    for text, special in ((without_bos, True), (tokenizer.decode(ids).strip(), False)):
        if tokenizer(text, add_special_tokens=special)["input_ids"] == ids:
            return text, special
    return None


def model_card_header(contract: Contract, teacher: str) -> str:
    """The Hugging Face Hub metadata of a model card (YAML front matter)."""
    tags = ["lori-ray", "distillation", "chain-of-thought"] + (
        ["implicit-reasoning"] if contract.role == "student" else []) + (
        ["multiplication"] if contract.digits else [])
    base = teacher if re.fullmatch(r"[\w.-]+/[\w.-]+", teacher) and not Path(teacher).exists() else None
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:",
             *[f"- {tag}" for tag in tags]]
    if base:  # a hub id; a local teacher has none to cite
        lines += [f"base_model: {base}"]
    return "\n".join([*lines, "---", ""])


def write_model_files(directory: Path, contract: Contract, teacher: str, data: str, results: str) -> None:
    """``lori-model.json`` and the model card into a finished model directory (written whole)."""
    from .storage import write_local
    write_local(directory / CONTRACT_FILE, json.dumps(asdict(contract), indent=1) + "\n")
    example = "365 * 347" if contract.digits == [3, 3] else (
        f"{'1234567890'[:contract.digits[0]]} * {'3456789012'[:contract.digits[1]]}" if contract.digits
        else "How many legs do 3 spiders have?")
    if contract.latent_slots is None:
        layout = "`<bos> question ||` then it writes `step + step ... #### answer <eos>`"
    else:
        layout = (f"`<bos> question || <latent_0> ... <latent_{contract.latent_slots - 1}> ####` then it writes "
                  f"`answer <eos>`" + (" (each latent slot's input is the model's own last hidden state at the "
                                       "position before it: continuous thoughts)" if contract.continuous else "")
                  if contract.latent_slots else "`<bos> question || ####` then it writes `answer <eos>`")
    digits = (" Numbers are written digit by digit, separated by spaces, least significant digit first "
              "(365 is `5 6 3`), in the question and in the answer." if contract.digits else "")
    # a local teacher by its run and stage folder, not by this machine's absolute path
    teacher_name = teacher if not Path(teacher).is_absolute() else "/".join(Path(teacher).parts[-2:])
    found = plain_prompt(directory, contract, example)
    if found:
        text, special = found
        reading = '  # least significant digit first: "5 6 3" is 365' if contract.digits else ""
        plain = f"""From plain transformers, the prompt for `{example}` is exactly the token ids it was trained on:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{directory}")
model = AutoModelForCausalLM.from_pretrained("{directory}")
inputs = tokenizer({text!r}{'' if special else ', add_special_tokens=False'}, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)){reading}
```"""
    else:
        plain = ("Plain `generate` cannot drive it ("
                 + ("its latent slots are continuous thoughts" if contract.continuous
                    else "its tokenizer does not rebuild the prompt from text")
                 + "): use the `Predictor` above.")
    card = f"""{model_card_header(contract, teacher)}
# lori-ray {contract.role}: {contract.method}

A {'student distilled to answer without writing its chain of thought' if contract.role == 'student'
   else 'teacher fine-tuned to write its chain of thought before the answer'}, trained by
lori-ray on {data}. Teacher: {teacher_name}.

## Results (held-out problems, greedy decoding)

{results}

## Prompt format

{layout}.{digits}

## Use it

```bash
python -m lori_ray.predict {directory} "{example}"
```

```python
from lori_ray.predict import Predictor
print(Predictor("{directory}")(["{example}"]))
```

{plain}
"""
    write_local(directory / "README.md", card)


def read_questions(lines: Iterable[bytes], where: str,
                   field: str | None) -> Iterator[tuple[str, str | ValueError | None]]:
    """(``where:line``, question) for each line: the line's text, or with ``field`` that field of the JSON object on
    the line; a ValueError saying why in place of a question that cannot be read; None for a blank line."""
    for number, raw in enumerate(lines, start=1):
        at = f"{where}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield at, ValueError(f"not UTF-8 text (byte {error.start + 1})")
            continue
        if not line.strip():
            yield at, None
            continue
        if field is None:
            yield at, line.strip()
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            yield at, ValueError(f"not JSON ({error.msg} at column {error.colno})")
            continue
        question = record.get(field) if isinstance(record, dict) else None
        yield at, question if isinstance(question, str) else ValueError(f"no {field!r} text (--question-field)")


def answer_lines(predictor: Predictor, questions: Iterable[tuple[str, str | ValueError | None]],
                 batch_size: int) -> bool:
    """A line on stdout for each line read, in order, a batch at a time (a file of any length, stdin as it comes):
    its answer, or empty for a blank line and for a question it cannot read (whose error goes to stderr), so line N
    of the answers is the answer to line N of the questions. Whether every question was answered."""
    answered = True
    questions = iter(questions)
    while batch := list(islice(questions, batch_size)):
        answers = iter(predictor.answer_each([q for _, q in batch if isinstance(q, str)]))
        for at, question in batch:
            result = next(answers) if isinstance(question, str) else question
            if isinstance(result, ValueError):
                print(f"error: {at}: {result}", file=sys.stderr)
                answered = False
            print(result if isinstance(result, str) else "", flush=True)
    return answered


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description="Ask a model a lori-ray run wrote, in plain form.")
    arguments.add_argument("model", help="a model directory of a run, e.g. runs/demo/student")
    given = arguments.add_mutually_exclusive_group(required=True)
    given.add_argument("questions", nargs="*", default=[],
                       help='e.g. "365 * 347"; each answered as "question = answer"')
    given.add_argument("--file", metavar="PATH", help="one question per line, or a .jsonl of objects with the question "
                                                      "in --question-field; '-' reads stdin; one answer per line")
    arguments.add_argument("--question-field", metavar="NAME",
                           help="read each line as a JSON object and ask its NAME (a .jsonl file: question)")
    arguments.add_argument("--batch-size", type=int, default=100, help="questions generated together (--file)")
    args = arguments.parse_args(argv)
    if args.batch_size < 1:  # (lori_ray.cli's at_least_one would import the training stack, and DeepSpeed's banner)
        arguments.error(f"argument --batch-size: at least 1, got {args.batch_size}")
    if args.file not in (None, "-") and not Path(args.file).is_file():  # said before the model loads
        print(f"error: --file: no such file: {args.file}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(args.model)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.file is not None:
        field = args.question_field or ("question" if args.file.endswith(".jsonl") else None)
        with nullcontext(sys.stdin.buffer) if args.file == "-" else open(args.file, "rb") as source:
            questions = read_questions(source, "stdin" if args.file == "-" else args.file, field)
            return 0 if answer_lines(predictor, questions, args.batch_size) else 2
    results = predictor.answer_each(args.questions)
    # one line each; a question it cannot read fails alone
    for question, result in zip(args.questions, results, strict=True):
        if isinstance(result, ValueError):
            print(f"error: {result}", file=sys.stderr)
        else:
            print(f"{question} = {result}")
    return 2 if any(isinstance(r, ValueError) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

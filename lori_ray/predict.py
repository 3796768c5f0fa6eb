"""Ask a trained model in plain form: ``python -m lori_ray.predict runs/demo/student "365 * 347"``.

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
from dataclasses import asdict, dataclass
from pathlib import Path

CONTRACT_FILE = "lori-model.json"
_PRODUCT = re.compile(r"^\s*(\d+)\s*[*x×]\s*(\d+)\s*$")


@dataclass
class Contract:
    role: str  # teacher (writes its CoT) | student (answers after its latent slots)
    method: str
    task: str  # multiplication | file
    digits: list[int] | None  # multiplication: digits of each factor it was trained on
    latent_slots: int | None  # None: it writes its CoT
    continuous: bool = False


def model_question(question: str, contract: Contract) -> str:
    """A human question in the model's format; raises ValueError for one it was not trained on."""
    if contract.task != "multiplication":
        return question.strip()
    from .data import multiplication_example
    match = _PRODUCT.match(question)
    if not match:
        raise ValueError(f"{question!r}: expected 'A * B' with whole numbers")
    a, b = match.groups()
    if [len(a), len(b)] != contract.digits:
        raise ValueError(f"{question!r}: this model multiplies {contract.digits[0]}-digit by {contract.digits[1]}-digit "
                         f"numbers (no leading zeros)")
    return multiplication_example(int(a), int(b), *contract.digits).question


def human_answer(answer: str, contract: Contract) -> str:
    """The model's normalised answer as people write it (multiplication: most significant digit first)."""
    if contract.task == "multiplication" and answer.isdigit():
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
        self.contract = Contract(**json.loads(contract_path.read_text()))
        tokenizer = load_tokenizer(str(directory))
        slots = self.contract.latent_slots
        self.layout = Layout(tokenizer, add_latent_tokens(tokenizer, slots) if slots is not None else None)
        self.model = load_model(directory).eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, questions: list[str]) -> list[str]:
        from .data import Example
        from .evaluate import greedy_generate
        examples = [Example(model_question(q, self.contract), (), "") for q in questions]
        with_cot = self.contract.latent_slots is None
        prompts = [self.layout.question(e) if with_cot else self.layout.student_prompt(e) for e in examples]
        outputs, _ = greedy_generate(self.model, prompts, self.layout.pad, self.layout.eos, len(prompts),
                                     self.max_new_tokens, latent_ids=self.layout.latent_ids
                                     if self.contract.continuous else None)
        return [human_answer(self.layout.decode_answer(row, with_cot), self.contract) for row in outputs]


def write_model_files(directory: Path, contract: Contract, teacher: str, data: str, results: str) -> None:
    """``lori-model.json`` and the model card into a finished model directory (written whole)."""
    from .storage import write_local
    write_local(directory / CONTRACT_FILE, json.dumps(asdict(contract), indent=1) + "\n")
    example = "365 * 347" if contract.digits == [3, 3] else ("12 * 34" if contract.task == "multiplication"
                                                             else "How many legs do 3 spiders have?")
    if contract.latent_slots is None:
        layout = "`<bos> question ||` then it writes `step + step ... #### answer <eos>`"
    else:
        layout = (f"`<bos> question || <latent_0> ... <latent_{contract.latent_slots - 1}> ####` then it writes "
                  f"`answer <eos>`" + (" (each latent slot's input is the model's own last hidden state at the "
                                       "position before it: continuous thoughts)" if contract.continuous else "")
                  if contract.latent_slots else "`<bos> question || ####` then it writes `answer <eos>`")
    digits = (" Numbers are written digit by digit, separated by spaces, least significant digit first "
              "(365 is `5 6 3`), in the question and in the answer." if contract.task == "multiplication" else "")
    card = f"""# lori-ray {contract.role}: {contract.method}

A {'student distilled to answer without writing its chain of thought' if contract.role == 'student'
   else 'teacher fine-tuned to write its chain of thought before the answer'}, trained by
lori-ray on {data}. Teacher: {teacher}.

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

It is a plain Hugging Face model too (`AutoModelForCausalLM.from_pretrained("{directory}")`); the prompt
format above is what it was trained on.
"""
    write_local(directory / "README.md", card)


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(description="Ask a model a lori-ray run wrote, in plain form.")
    arguments.add_argument("model", help="a model directory of a run, e.g. runs/demo/student")
    arguments.add_argument("questions", nargs="+", help='e.g. "365 * 347"')
    args = arguments.parse_args(argv)
    try:
        predictor = Predictor(args.model)
        answers = predictor(args.questions)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for question, answer in zip(args.questions, answers):
        print(f"{question} = {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

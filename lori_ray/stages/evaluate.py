"""Held-out evaluation, eRank diagnostics, the results table and the model cards of a run."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch

from ..cluster import on_a_gpu
from ..config import Config
from ..data import Example, multiplication_digits
from ..evaluate import EvalResult, evaluate, format_digits
from ..fingerprint import FINGERPRINT_FILE, digest
from ..methods import METHODS
from ..models import load_model
from ..plots import erank_figure
from ..predict import Contract, write_model_files
from ..pruned import hidden_erank, load_student
from ..storage import write_local
from ..tokens import Layout, add_latent_tokens, load_tokenizer
from ..tracking import stage_run, tracked
from . import log
from .student import latent_slots
from .training import calibration_batch


def evaluate_model(config: Config, model_dir: Path, splits: dict[str, list[Example]],
                   slots: int | None) -> dict[str, EvalResult]:
    """Each named split's result, the model loaded once (on a GPU where the cluster has them); ``slots=None``:
    the teacher, prompted with the question and writing its CoT."""
    return on_a_gpu(config.cluster.gpus_per_actor, generate_and_score, config, model_dir, splits, slots)


def generate_and_score(config: Config, model_dir: Path, splits: dict[str, list[Example]],
                       slots: int | None) -> dict[str, EvalResult]:
    tokenizer = load_tokenizer(str(model_dir), config.model.trust_remote_code)
    layout = Layout(tokenizer, add_latent_tokens(tokenizer, slots) if slots is not None else None)
    continuous = slots is not None and config.student.continuous
    model = load_model(model_dir, trust_remote_code=config.model.trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
    role = "teacher" if slots is None else "student"
    results = {}
    for split, examples in splits.items():
        started = time.perf_counter()

        def progress(done: int, total: int, split: str = split, started: float = started) -> None:
            log(f"[eval] {role}: {done}/{total} {split} answers generated ({time.perf_counter() - started:.0f}s)")

        results[split] = evaluate(model, layout, examples, with_cot=slots is None, batch_size=config.eval.batch_size,
                                  max_new_tokens=config.eval.max_new_tokens, progress=progress, continuous=continuous)
    return results


def erank_diagnostics(config: Config, teacher_dir: Path, init_dir: Path, student_dir: Path,
                      examples: list[Example]) -> dict[str, list[float]]:
    """eRank per layer of hidden states on calibration examples: teacher, initial and trained student
    (each on its own sequences); saved as erank.json and logged to MLflow with a plot."""
    ranks = on_a_gpu(config.cluster.gpus_per_actor, hidden_eranks, config, teacher_dir, init_dir, student_dir,
                     examples[:config.student.calibration_size])
    with stage_run("erank"):
        for label, values in ranks.items():
            tracked(mlflow.log_metrics, {f"erank_{label.replace(' ', '_')}_layer_{i}": v for i, v in enumerate(values)})
        tracked(mlflow.log_dict, ranks, "erank.json")
        tracked(mlflow.log_figure, erank_figure(ranks), "erank.png")
    write_local(config.run_dir / "erank.json", json.dumps(ranks, indent=1))
    return ranks


def hidden_eranks(config: Config, teacher_dir: Path, init_dir: Path, student_dir: Path,
                  examples: list[Example]) -> dict[str, list[float]]:
    tokenizer = load_tokenizer(str(init_dir))
    slots = latent_slots(config)
    teacher_batch = calibration_batch(config, Layout(tokenizer), examples, student=False)
    latents = add_latent_tokens(tokenizer, slots) if slots is not None else None
    student_batch = teacher_batch if slots is None else calibration_batch(
        config, Layout(tokenizer, latents), examples, student=True)
    if slots is not None and config.student.continuous:
        student_batch["latent_ids"] = latents
    code = config.model.trust_remote_code
    return {"teacher": hidden_erank(load_model(teacher_dir, trust_remote_code=code).eval(), **teacher_batch),
            "student init": hidden_erank(load_student(init_dir, code).eval(), **student_batch),
            "student trained": hidden_erank(load_model(student_dir, trust_remote_code=code).eval(), **student_batch)}


@dataclass
class Report:
    teacher: EvalResult
    student: EvalResult
    explained_variance: float  # mean over layers at the configured rank
    rank: int
    method: str
    erank: dict[str, list[float]]  # per layer: teacher, initial and trained student
    student_train: EvalResult | None = None  # the student on as many training problems: memorisation shows

    def table(self) -> str:
        speedup = self.teacher.seconds / max(self.student.seconds, 1e-9)
        student = f"student ({self.method}{'' if METHODS[self.method].writes_cot else ', no CoT'})"
        rows = [("teacher (explicit CoT)", self.teacher, "1.00x"), (student, self.student, f"{speedup:.2f}x")]
        lines = ["| model | accuracy | tokens/answer | inference s | speedup | per-digit accuracy |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {r.accuracy:.3f} | {r.tokens_per_answer:.1f} | {r.seconds:.2f} | {s} | "
                  f"{format_digits(r.digit_accuracy)} |" for name, r, s in rows]
        if self.student_train:
            lines.append(f"\n{student} on {self.student_train.examples} training problems: "
                         f"{self.student_train.accuracy:.3f} (held-out {self.student.accuracy:.3f})")
        lines.append(f"\nexplained variance of the rank-{self.rank} subspace (mean over layers): "
                     f"{self.explained_variance:.3f}")
        return "\n".join(lines)


REPORT_FILE = "report.json"


def evaluation_inputs(config: Config, teacher_dir: Path, student_dir: Path, splits: dict[str, list[Example]]) -> str:
    """One digest of what a run's evaluation reads: both models (their stage fingerprints, else their contents),
    the problems of each split and the eval settings (generation is greedy, so equal inputs give equal results)."""
    models = [Path(d) / FINGERPRINT_FILE if (Path(d) / FINGERPRINT_FILE).is_file() else Path(d)
              for d in (teacher_dir, student_dir)]
    problems = {name: [e.to_line() for e in examples] for name, examples in splits.items()}
    return hashlib.sha256(json.dumps([[digest(m) for m in models], problems, config.eval.model_dump(),
                                      config.subspace.rank, config.student.method]).encode()).hexdigest()


def save_report(config: Config, report: Report, inputs: str) -> None:
    write_local(config.run_dir / REPORT_FILE, json.dumps({"inputs": inputs, "report": asdict(report)}, indent=1))


def _eval_result(fields: dict | None) -> EvalResult | None:
    return EvalResult.from_dict(fields) if fields else None


def saved_report(config: Config, inputs: str) -> Report | None:
    """The report a finished run saved for these evaluation ``inputs`` (a rerun skips the evaluation), else None."""
    path = config.run_dir / REPORT_FILE
    try:
        saved = json.loads(path.read_text())
        if saved["inputs"] != inputs:
            return None
        fields = saved["report"]
        results = {k: _eval_result(fields[k]) for k in ("teacher", "student", "student_train")}
        return Report(**{**fields, **results})
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:  # an unreadable report is evaluated again, not trusted
        log(f"[eval] {path} unreadable ({type(error).__name__}: {error}): evaluating again")
        return None


def describe_models(config: Config, teacher_dir: Path, student_dir: Path, examples: list[Example],
                    results: str) -> None:
    """The prompt contract and model card of the student, and of the teacher when this run trained it."""
    data = config.data
    source = (f"{len(examples):,} {data.digits[0]}x{data.digits[1]} multiplication problems"
              if data.task == "multiplication" else f"{len(examples):,} examples of {Path(data.train_file).name}")
    digits = list(data.digits) if data.task == "multiplication" else multiplication_digits(examples)
    slots = latent_slots(config)
    contract = Contract("student", config.student.method, data.task, digits, slots,
                        slots is not None and config.student.continuous)
    write_model_files(student_dir, contract, str(teacher_dir), source, results)
    if not config.teacher.path:
        write_model_files(teacher_dir, Contract("teacher", "explicit CoT", data.task, digits, None), "itself",
                          source, results)

"""Bad input is refused before Ray starts and before anything is written: one table of inputs, each with
its exit status 2, a message naming the field or file:line, an empty output directory and no Ray."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray

from lori_ray.cli import config_or_exit
from lori_ray.cluster import free_port
from lori_ray.data import generate_multiplication, read_examples, write_icot

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny.yaml")


def icot_lines(count: int, seed: int = 0) -> list[str]:
    return [e.to_line() for e in generate_multiplication(count, 2, 2, seed=seed)]


def write(path: Path, lines: list[str] | bytes) -> str:
    path.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode())
    return str(path)


def gsm8k(question: str = "q", answer: str = "a <<1+1=2>> 2\n#### 2") -> str:
    return json.dumps({"question": question, "answer": answer})


def file_task(tmp_path: Path, train: str) -> list[str]:
    held_out = tmp_path / "eval.txt"
    write_icot(generate_multiplication(16, 2, 2, seed=99), held_out)
    return ["data.task=file", f"data.train_file={train}", f"data.eval_file={held_out}", "data.val_size=8"]


CASES = {  # name: (overrides given tmp_path, message fragment)
    "malformed line": (lambda t: file_task(t, write(t / "train.txt", icot_lines(36) + ["3 4 * 5 6 #### 1"] +
                                                                    icot_lines(5, 1))),
                       "train.txt:37: expected exactly one '||'"),
    "symbol outside a preset model's vocabulary": (
        lambda t: file_task(t, write(t / "train.txt", icot_lines(36) + ["1 2 * a b||1 + 2 #### 3"])),
        "train.txt:37: 'a' is not in the vocabulary of a model built from a preset"),
    "empty file": (lambda t: file_task(t, write(t / "train.txt", b"")), "train.txt: no examples"),
    "not UTF-8": (lambda t: file_task(t, write(t / "train.txt", "\n".join(icot_lines(2)).encode() + b"\n\xff\xfe 1\n")),
                  "train.txt:3: not UTF-8 text"),
    "GSM8K without answer": (lambda t: file_task(t, write(t / "train.jsonl", [gsm8k(), json.dumps({"question": "q"})])),
                             "train.jsonl:2: GSM8K record without 'answer'"),
    "GSM8K answer without ####": (lambda t: file_task(t, write(t / "train.jsonl", [gsm8k(answer="it is 2")])),
                                  "train.jsonl:1: the answer has no final '####"),
    "GSM8K answer that is not a number": (
        lambda t: file_task(t, write(t / "train.jsonl", [gsm8k(), gsm8k(answer="a <<1+1=2>> 2\n#### twenty-four")])),
        "train.jsonl:2: the final answer 'twenty-four' is not a number"),
    "table without the mapped column": (
        lambda t: (file_task(t, write(t / "train.jsonl", [json.dumps({"q": "1", "a": "2"})]))
                   + ["data.fields.question=q"]),
        "train.jsonl: no column 'cot' (data.fields.cot), 'answer' (data.fields.answer); its columns: q, a"),
    "table row with an empty answer": (
        lambda t: (file_task(t, write(t / "train.csv", ["q,cot,answer", "1 * 2,,2", "3 * 4,,"]))
                   + ["data.fields.question=q"]),
        "train.csv: row 2: empty answer (column 'answer')"),
    "step separator that is not a regex": (lambda t: file_task(t, write(t / "train.csv", ["q,cot,answer"]))
                                           + ["data.fields.question=q", "data.step_separator=(;"],
                                           "data.step_separator: not a regular expression"),
    "step joiner without a column mapping": (lambda t: file_task(t, write(t / "train.txt", icot_lines(40)))
                                             + ["data.step_joiner=;"],
                                             "data.step_joiner: applies to table data only (set data.fields)"),
    "step joiner outside a preset model's words": (
        lambda t: file_task(t, write(t / "train.csv", ["q,cot,answer", "1 * 2,,2"])) + ["data.fields.question=q",
                                                                                      "data.step_joiner=' ; '"],
        "data.step_joiner: ' ; ' writes no word, or one outside the vocabulary of a model built from a preset"),
    "column mapping for generated data": (lambda t: ["data.fields.question=q"],
                                          "data.fields: applies to data files"),
    "too few examples for the splits": (lambda t: file_task(t, write(t / "train.txt", icot_lines(20))) +
                                        ["data.val_size=32"], "data.val_size: 32 validation examples leave none"),
    "fewer examples than a batch": (lambda t: file_task(t, write(t / "train.txt", icot_lines(20))),
                                    "teacher.train.batch_size: 16 is more than the 12 training examples"),
    "sequence longer than the context": (lambda t: ["model.max_positions=20"],
                                         "model.max_positions: 20 is shorter than 16 of the 16 sequences"),
    "a generation budget shorter than the teacher's answers": (
        lambda t: ["eval.max_new_tokens=10"],
        "eval.max_new_tokens: 10 is fewer than the 14 tokens the teacher writes for"),
    "an infinite learning rate": (lambda t: ["teacher.train.lr=.inf"], "teacher.train.lr: Input should be a finite"),
    "a NaN loss weight": (lambda t: ["loss.first_order=.nan"], "loss.first_order: Input should be a finite number"),
    "an override that is not YAML": (lambda t: ["data.digits=[2,"],
                                     "override 'data.digits=[2,': not valid YAML (line 1, column 4)"),
    "output_dir that is a file": (lambda t: [f"output_dir={write(t / 'afile', b'x')}/runs"],
                                  "afile is a file, not a directory"),
    "a local cluster too small for a stage": (
        lambda t: ["cluster.num_cpus=1"],
        ("teacher.train.num_workers: 2 workers x 1 CPU each need 2 CPUs, and the local cluster would have 1 "
         "(cluster.num_cpus is 1)")),
    "a negative cluster size": (lambda t: ["cluster.num_cpus=-3"], "cluster.num_cpus: Input should be greater than 0"),
    "an MLflow server that does not answer": (
        lambda t: [f"tracking.uri=http://alice:hunter2@127.0.0.1:{free_port()}"],
        "tracking.uri: the MLflow server at http://alice:***@127.0.0.1:"),
    "more problems than the task has": (lambda t: ["data.train_size=9000"], "data.train_size: cannot draw 9000"),
    "bool for an int": (lambda t: ["subspace.rank=true"], "subspace.rank: Input should be a valid integer"),
    "float for an int": (lambda t: ["student.train.steps=10.5"],
                         "student.train.steps: Input should be a valid integer"),
    "name with a path": (lambda t: ["name=../elsewhere"], "is not a plain name"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_naming_it_with_nothing_written_and_no_ray(case, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    overrides, message = CASES[case]
    output = tmp_path / "runs"
    started = time.time()
    with pytest.raises(SystemExit) as exit:
        config_or_exit(TINY, [f"output_dir={output}", *overrides(inputs)])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert not output.exists() and not ray.is_initialized()
    assert time.time() - started < 10


def test_the_entry_point_prints_one_error_line_not_a_traceback(tmp_path):
    overrides = file_task(tmp_path, write(tmp_path / "train.txt", icot_lines(3) + ["no separators here"]))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    result = subprocess.run([sys.executable, "jobs/distill.py", "--config", TINY, f"output_dir={tmp_path / 'runs'}",
                             *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [(f"error: {tmp_path / 'train.txt'}:4: expected exactly one '||' "
                                                   "between question and CoT")]
    assert not (tmp_path / "runs").exists() and "Ray" not in result.stdout


def test_skipping_bad_lines_is_the_users_choice(tmp_path):
    overrides = file_task(tmp_path, write(tmp_path / "train.txt", "\n".join(icot_lines(40)).encode() + b"\n\xff\n"))
    with pytest.warns(UserWarning, match="skipped 1 malformed lines"):
        config = config_or_exit(TINY, [f"output_dir={tmp_path / 'runs'}", *overrides, "data.on_bad_line=skip"])
    assert config.data.on_bad_line == "skip"


def test_dry_run_prints_the_plan_and_print_config_the_resolved_yaml_with_nothing_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    result = subprocess.run([sys.executable, "jobs/distill.py", "--config", TINY, f"output_dir={tmp_path / 'runs'}",
                             "student.method=nocot", "--dry-run", "--print-config"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "  method: nocot\n" in result.stdout  # the YAML, overrides applied
    assert "data: 256 training, 32 validation, 16 held-out examples" in result.stdout
    assert (f"teacher: to train, from a random llama 'tiny' preset, full fine-tuning, 6 steps x batch 16 = 0.38 epochs "
            f"on 2 worker(s), ZeRO-2 -> {tmp_path / 'runs'}") in result.stdout
    assert "student (nocot): to train, from the teacher's weights, full fine-tuning" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_the_plan_says_what_each_stage_trains_from_and_how(tmp_path, tiny_model):
    """The user's own teacher through LoRA and a separate student, as the plan (--dry-run) shows them."""
    from lori_ray.preflight import plan, preflight
    teacher, student = tiny_model(tmp_path / "my-teacher"), tiny_model(tmp_path / "my-student")
    config = config_or_exit(TINY, [f"output_dir={tmp_path / 'runs'}", f"model.path={teacher}",
                                   "teacher.train.lora.rank=4", f"student.path={student}"])
    lines = plan(config, preflight(config)).splitlines()
    assert f"teacher: to train, from {teacher}, LoRA rank 4 on all-linear, 6 steps" in lines[2]
    assert f"student (lori): to train, from {student} (student.path), full fine-tuning, 6 steps" in lines[4]
    pruned = config_or_exit(TINY, [f"output_dir={tmp_path / 'runs'}", "student.kind=pruned", "student.width=32",
                                   "student.init=activation"])
    assert "from the teacher pruned to width 32 (activation init)" in plan(pruned, preflight(pruned))


def test_no_credential_reaches_the_plan_the_printed_config_or_the_run_directory(tmp_path, answering):
    from lori_ray.recipe import opened
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    with answering(200) as server:  # the preflight probes the tracking server
        secrets = [f"trajectory.store_dir=file://{tmp_path}/st?access_key=AKEY&token=TOKEN",
                   f"cluster.storage_path=file://{tmp_path}/ck?secret_key=SKEY",
                   f"tracking.uri={server.uri.replace('//', '//alice:PASSWORD@')}"]
        result = subprocess.run([sys.executable, "jobs/distill.py", "--config", TINY,
                                 f"output_dir={tmp_path / 'runs'}", *secrets, "--dry-run", "--print-config"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "access_key=***&token=***" in result.stdout and "alice:***@127.0.0.1" in result.stdout
    assert not any(word in result.stdout + result.stderr for word in ("AKEY", "TOKEN", "SKEY", "PASSWORD"))
    # the run directory's config.yaml (what a rerun is checked against) holds none either, and the rerun passes
    config = config_or_exit(TINY, [f"output_dir={tmp_path / 'runs'}", *secrets[:2]])
    with opened(config):
        pass
    saved = (config.run_dir / "config.yaml").read_text()
    assert "access_key=***" in saved and not any(word in saved for word in ("AKEY", "TOKEN", "SKEY"))
    config_or_exit(TINY, [f"output_dir={tmp_path / 'runs'}", *secrets[:2]])  # the same run: not refused


def test_help_lists_every_config_key_with_its_type_default_and_note():
    from lori_ray.cli import config_reference, parser
    from lori_ray.config import Config
    text = parser("Run it.").format_help()
    assert "  student.latent (Literal['pause', 'continuous'], default pause): pause: the latent slots are" in text
    assert "  subspace.rank (int, default 8)" in text
    assert "  data.fields (TableFields | None, default none): read train_file" in text
    assert "  data.fields.cot (str | None, default cot)" in text  # an optional section's own keys
    keys = [line.split()[0] for line in config_reference()]
    assert len(keys) == len(set(keys)) and "tune.space" in keys and "cluster.storage_path" in keys
    assert len(keys) > 80 and all(key.split(".")[0] in Config.model_fields for key in keys)


@pytest.mark.parametrize("command, flag", [(["bench/accuracy.py", "--config", TINY], "--seeds"),
                                           (["bench/accuracy.py", "--config", TINY], "--parallel"),
                                           (["bench/red.py", "--config", TINY], "--parallel"),
                                           (["bench/throughput.py"], "--latents")])
def test_a_benchmark_count_below_one_exits_2_naming_its_flag(command, flag):
    """(the throughput bench's LoRi step with no latent slots used to print a NaN loss instead)"""
    result = subprocess.run([sys.executable, *command, flag, "0"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 2 and f"argument {flag}: at least 1, got '0'" in result.stderr


def test_table_data_is_read_through_datasets_with_a_column_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lori_ray.preflight import load_data
    problems, held_out = generate_multiplication(48, 2, 2, seed=3), generate_multiplication(16, 2, 2, seed=99)
    table = {"problem": [e.question for e in problems], "steps": [" ; ".join(e.steps) for e in problems],
             "solution": [e.answer for e in problems]}
    train = tmp_path / "train.parquet"
    pq.write_table(pa.table(table), train)
    eval_file = write(tmp_path / "eval.jsonl", [json.dumps({"problem": e.question, "solution": e.answer, "steps": ""})
                                                for e in held_out])  # answer-only rows: no steps
    config = config_or_exit(TINY, [f"output_dir={tmp_path / 'runs'}", "data.task=file", f"data.train_file={train}",
                                   f"data.eval_file={eval_file}", "data.val_size=8", "data.fields.question=problem",
                                   "data.fields.cot=steps", "data.fields.answer=solution",
                                   r"data.step_separator=\s*;\s*"])
    splits = load_data(config)
    kept = [e for e in problems if e.question not in {h.question for h in held_out}]
    # the steps split at the separator; a model built from a preset joins them with its ' +' (no ';' in its words)
    assert [*splits.train, *splits.val] == [replace(e, joiner=" + ") for e in kept[:config.data.train_size]]
    assert splits.held_out == [replace(e, steps=(), joiner=" + ") for e in held_out]


def test_without_an_eval_file_the_held_out_split_is_carved_from_the_training_file_and_never_trained_on(tmp_path):
    train = write(tmp_path / "train.txt", icot_lines(200))
    overrides = [f"output_dir={tmp_path / 'runs'}", "data.task=file", f"data.train_file={train}", "data.val_size=8",
                 "data.eval_size=20", "data.train_size=1000"]
    config = config_or_exit(TINY, overrides)
    from lori_ray.preflight import load_data
    splits = load_data(config)
    held_out = {e.question for e in splits.held_out}
    assert len(held_out) == 20 and not held_out & {e.question for e in splits.train + splits.val}
    assert len(splits.train) + len(splits.val) == 180
    # a seeded draw, not the file's head: the same for the same seed, another for another seed
    assert [e.question for e in load_data(config_or_exit(TINY, overrides)).held_out] == \
        [e.question for e in splits.held_out]
    assert {e.question for e in load_data(config_or_exit(TINY, [*overrides, "seed=1"])).held_out} != held_out
    assert held_out != {e.question for e in read_examples(train)[:20]}


def test_size_settings_that_leave_out_supplied_rows_say_so(tmp_path):
    overrides = [f"output_dir={tmp_path / 'runs'}",
                 *file_task(tmp_path, write(tmp_path / "train.txt", icot_lines(400))),
                 "data.train_size=100", "data.eval_size=10"]
    with pytest.warns(UserWarning) as warned:
        config_or_exit(TINY, overrides)
    messages = [str(w.message) for w in warned]
    assert any(m.startswith("data.train_size: 100 of the 400 rows of ") and "(300 left out)" in m for m in messages)
    assert any(m.startswith("data.eval_size: 10 of the 16 rows of ") for m in messages), messages


def test_a_chat_file_runs_through_the_preflight_with_its_held_out_split_carved(tmp_path):
    rows = []
    for example in generate_multiplication(120, 2, 2, seed=3):
        reply = "\n".join(example.steps) + f"\n#### {example.answer}"
        rows.append(json.dumps({"messages": [{"role": "user", "content": example.question},
                                             {"role": "assistant", "content": reply}]}))
    chat = write(tmp_path / "chat.jsonl", rows)
    config = config_or_exit(TINY, [f"output_dir={tmp_path / 'runs'}", "data.task=file", f"data.train_file={chat}",
                                   "data.fields.messages=messages", "data.train_size=200", "data.val_size=8",
                                   "data.eval_size=12"])
    from lori_ray.preflight import load_data
    splits = load_data(config)
    assert (len(splits.train), len(splits.val), len(splits.held_out)) == (100, 8, 12)
    assert all(e.steps for e in splits.train) and splits.train[0].answer

"""Plain questions in, plain answers out: the multiplication format round trip, the contract's checks, the CLI."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lori_ray.data import (
    Example,
    generate_multiplication,
    multiplication_digits,
    multiplication_example,
    normalize_answer,
)
from lori_ray.models import build_model
from lori_ray.predict import CONTRACT_FILE, Contract, Predictor, human_answer, model_question, write_model_files
from lori_ray.tokens import add_latent_tokens, arithmetic_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = Contract("student", "lori", "multiplication", [3, 3], 3)


def test_human_multiplication_maps_to_the_training_format_and_back():
    for example in generate_multiplication(20, 3, 3, seed=5):
        a, b = (int("".join(part.split())[::-1]) for part in example.question.split("*"))
        assert model_question(f"{a} * {b}", CONTRACT) == example.question
        assert model_question(f" {a}x{b} ", CONTRACT) == example.question
        assert human_answer(normalize_answer(example.answer), CONTRACT) == str(a * b)
    assert human_answer(normalize_answer(multiplication_example(100, 100, 3, 3).answer), CONTRACT) == "10000"
    with pytest.raises(ValueError, match="multiplies 3-digit by 3-digit"):
        model_question("12 * 345", CONTRACT)
    with pytest.raises(ValueError, match="expected 'A \\* B'"):
        model_question("twelve times three", CONTRACT)
    with pytest.raises(ValueError, match="no leading zeros"):
        model_question("056 * 347", CONTRACT)
    assert model_question(" What is 2+2? ", Contract("student", "lori", "file", None, 0)) == "What is 2+2?"
    with pytest.raises(ValueError, match="empty question"):
        model_question("  ", Contract("student", "lori", "file", None, 0))
    # a file of iCoT multiplication lines: its model is asked "A * B" like a generated-data one
    file_contract = Contract("student", "lori", "file", multiplication_digits(generate_multiplication(8, 4, 2)), 4)
    assert file_contract.digits == [4, 2]
    assert model_question("1234 * 56", file_contract) == multiplication_example(1234, 56, 4, 2).question
    assert human_answer("01", file_contract) == "10"  # normalised answers, least significant digit first
    assert multiplication_digits([*generate_multiplication(4, 2, 2), *generate_multiplication(4, 3, 3)]) is None
    assert multiplication_digits([Example("What is 2+2?", (), "4")]) is None


def test_the_predictor_prompts_with_the_students_layout_and_the_cli_answers(tmp_path):
    tokenizer = arithmetic_tokenizer()
    latents = add_latent_tokens(tokenizer, 3)
    model = build_model("llama", "tiny", len(tokenizer), 64, {"pad_token_id": tokenizer.pad_token_id}, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    write_model_files(tmp_path, CONTRACT, "runs/x/teacher", "300 problems", "| model | accuracy |")
    card = (tmp_path / "README.md").read_text()
    assert "`<bos> question || <latent_0> ... <latent_2> ####`" in card and "least significant digit first" in card
    predictor = Predictor(tmp_path)
    assert predictor.layout.latent_ids == latents
    answers = predictor(["365 * 347", "999 * 100"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    result = subprocess.run([sys.executable, "-m", "lori_ray.predict", str(tmp_path), "365 * 347"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout == f"365 * 347 = {answers[0]}\n"
    wrong = subprocess.run([sys.executable, "-m", "lori_ray.predict", str(tmp_path), "1 * 2"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, check=False)
    assert wrong.returncode == 2 and "multiplies 3-digit by 3-digit" in wrong.stderr
    (tmp_path / CONTRACT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not a model directory a lori-ray run wrote"):
        Predictor(tmp_path)


def tiny_student_dir(directory: Path, contract: Contract = CONTRACT) -> Path:
    tokenizer = arithmetic_tokenizer()
    add_latent_tokens(tokenizer, contract.latent_slots or 0)
    build_model("llama", "tiny", len(tokenizer), 64, {"pad_token_id": tokenizer.pad_token_id}, seed=0).save_pretrained(
        directory)
    tokenizer.save_pretrained(directory)
    write_model_files(directory, contract, "runs/x/teacher", "300 problems", "| model | accuracy |")
    return directory


def predict_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lori_ray.predict", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_each_question_the_model_cannot_read_gets_its_own_error_line_and_the_others_their_answers(tmp_path):
    directory = tiny_student_dir(tmp_path / "m")
    good = Predictor(directory)(["365 * 347"])[0]
    result = predict_cli(directory, "abc", "365 * 347", "", "1234 * 56", "056 * 347")
    assert result.returncode == 2 and result.stdout == f"365 * 347 = {good}\n"
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: 'abc': expected 'A * B' with whole numbers", "error: '': expected 'A * B' with whole numbers",
        "error: '1234 * 56': this model multiplies 3-digit by 3-digit numbers (no leading zeros)",
        "error: '056 * 347': this model multiplies 3-digit by 3-digit numbers (no leading zeros)"]
    # a text-format model with a word-level vocabulary: words it has no token for are refused, not read as <unk>
    text = Predictor(tiny_student_dir(tmp_path / "text", Contract("student", "lori", "file", None, 2)))
    answers = text.answer_each(["3 4 * 5 6", "a b * c d"])
    assert isinstance(answers[0], str) and "'a b c d' not in the model's vocabulary" in str(answers[1])


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / CONTRACT_FILE).write_text('{"role": "student"'), r"lori-model.json: not valid JSON"),
    (lambda d: (d / CONTRACT_FILE).write_text('{"role": "student", "method": "lori", "task": "file", "extra": 1}'),
     r"lori-model.json: not a lori-ray model contract \(keys \['extra', 'method', 'role', 'task'\]"),
    (lambda d: (d / "config.json").unlink(), r"m: no config.json, not a Hugging Face model directory"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
     r"m: no \*.safetensors weights \(pytorch_model.bin is a pickle, which lori-ray does not load"),
])
def test_a_damaged_model_directory_is_one_error_line_naming_the_file(tmp_path, damage, message):
    directory = tiny_student_dir(tmp_path / "m")
    damage(directory)
    result = predict_cli(directory, "365 * 347")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and re.search(message, result.stderr), result.stderr


def test_the_cards_prompt_drives_the_student_from_plain_transformers_as_lori_ray_does(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lori_ray.evaluate import greedy_generate
    directory = tiny_student_dir(tmp_path / "m")
    card = (directory / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- lori-ray\n")
    assert "Teacher: runs/x/teacher." in card and "base_model" not in card  # a local teacher: no hub id
    # the tokenizer adds <bos> itself, as every training sequence starts
    assert "inputs = tokenizer('5 6 3 * 7 4 3 || <latent_0> <latent_1> <latent_2> ####', return_tensors=\"pt\")" \
        in card
    tokenizer, model = AutoTokenizer.from_pretrained(directory), AutoModelForCausalLM.from_pretrained(directory)
    predictor = Predictor(directory)
    for question in ("365 * 347", "999 * 100", "120 * 705"):
        a, b = question.split(" * ")  # the card's format: digits spaced, least significant first
        text = f"{' '.join(a[::-1])} * {' '.join(b[::-1])} || <latent_0> <latent_1> <latent_2> ####"
        inputs = tokenizer(text, return_tensors="pt")
        expected = predictor.layout.student_prompt(predictor.prompt(question))
        assert inputs["input_ids"][0].tolist() == expected
        plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, len(expected):].tolist()
        ours, _ = greedy_generate(predictor.model, [expected], predictor.layout.pad, predictor.layout.eos, 1, 8)
        assert plain[:len(ours[0])] == list(ours[0])[:len(plain)]
    assert tokenizer("12 * 34")["input_ids"] == tokenizer("1 2 * 3 4")["input_ids"]  # digits one per token


def test_the_card_names_a_local_teacher_by_its_run_folder_and_a_hub_teacher_as_its_base_model(tmp_path):
    directory = tiny_student_dir(tmp_path / "m")
    write_model_files(directory, CONTRACT, "/home/alice/runs/demo/teacher", "300 problems", "| model |")
    card = (directory / "README.md").read_text()
    assert "Teacher: demo/teacher." in card and "/home/alice" not in card and "base_model" not in card
    write_model_files(directory, CONTRACT, "HuggingFaceTB/SmolLM2-135M-Instruct", "300 problems", "| model |")
    assert "\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n" in (directory / "README.md").read_text()


def test_the_evaluate_entry_point_scores_a_model_on_a_data_file_as_a_summary_or_json(tmp_path):
    import json

    from lori_ray.data import write_icot
    from lori_ray.evaluate import evaluate
    directory = tiny_student_dir(tmp_path / "m")
    problems = generate_multiplication(12, 3, 3, seed=5)
    write_icot(problems, tmp_path / "test.txt")
    run = [sys.executable, "-m", "lori_ray.evaluate", str(directory), "--data", str(tmp_path / "test.txt")]
    as_json = subprocess.run([*run, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    predictor = Predictor(directory)
    expected = evaluate(predictor.model, predictor.layout, problems, False)
    assert report["examples"] == 12 and report["exact_match"] == expected.accuracy and not report["with_cot"]
    assert report["tokens_per_answer"] == expected.tokens_per_answer and len(report["digit_accuracy"]) == 6
    summary = subprocess.run([*run, "--limit", "5"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert summary.returncode == 0 and re.match(rf"{directory} on .*test.txt: 5 examples, exact match \d\.\d{{3}}, "
                                                r"[\d.]+ tokens per answer \(without its CoT\)", summary.stdout)
    missing = subprocess.run([*run[:3], str(tmp_path), "--data", str(tmp_path / "test.txt")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


def test_questions_from_a_file_or_stdin_get_one_answer_a_line_in_order(tmp_path, monkeypatch, capsys):
    import io
    import json

    from lori_ray.predict import main
    directory = tiny_student_dir(tmp_path / "m")
    questions = ["365 * 347", "999 * 100", "120 * 705"]
    piped = subprocess.run([sys.executable, "-m", "lori_ray.predict", str(directory), "--file", "-"], cwd=ROOT,
                           input="\n".join(questions), capture_output=True, text=True, timeout=120, check=False)
    assert piped.returncode == 0 and piped.stdout == "\n".join(Predictor(directory)(questions)) + "\n"
    capsys.readouterr()  # what generating in this process logged (DeepSpeed's accelerator line, on stdout)

    # each answer on its question's line: a stand-in model answers with the question in its format
    monkeypatch.setattr(Predictor, "_generate", lambda self, examples: [e.question for e in examples])
    formatted = [model_question(q, CONTRACT) for q in questions]
    text = tmp_path / "questions.txt"
    text.write_text(f"{questions[0]}\n\n{questions[1]}\n12 * 34\n{questions[2]}\n")
    assert main([str(directory), "--file", str(text), "--batch-size", "2"]) == 2  # batches that split the file
    out, err = capsys.readouterr()
    # line N answers line N: a blank line and the question it cannot read get an empty one
    assert out.splitlines() == [formatted[0], "", formatted[1], "", formatted[2]]
    assert err == f"error: {text}:4: '12 * 34': this model multiplies 3-digit by 3-digit numbers (no leading zeros)\n"

    records = tmp_path / "questions.jsonl"
    records.write_text("\n".join([json.dumps({"problem": questions[2]}), "{not json", json.dumps({"q": "1"}),
                                  json.dumps({"problem": questions[0]})]) + "\n")
    assert main([str(directory), "--file", str(records), "--question-field", "problem"]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [formatted[2], "", "", formatted[0]]
    assert err.splitlines() == [
        f"error: {records}:2: not JSON (Expecting property name enclosed in double quotes at column 2)",
        f"error: {records}:3: no 'problem' text (--question-field)"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(json.dumps({"question": questions[1]}).encode())))
    assert main([str(directory), "--file", "-", "--question-field", "question"]) == 0
    assert capsys.readouterr().out == formatted[1] + "\n"

    assert main([str(directory), "--file", str(tmp_path / "none.txt")]) == 2
    assert capsys.readouterr().err == f"error: --file: no such file: {tmp_path / 'none.txt'}\n"
    for wrong in ([questions[0], "--file", str(text)], ["--file", str(text), "--batch-size", "0"]):
        with pytest.raises(SystemExit):  # questions or a file, not both; a batch of at least one
            main([str(directory), *wrong])

"""Plain questions in, plain answers out: the multiplication format round trip, the contract's checks, the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from lori_ray.data import generate_multiplication, multiplication_example, normalize_answer
from lori_ray.models import build_model
from lori_ray.predict import CONTRACT_FILE, Contract, Predictor, human_answer, model_question, write_model_files
from lori_ray.tokens import add_latent_tokens, arithmetic_tokenizer

ROOT = Path(__file__).resolve().parents[1]
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
    assert model_question(" What is 2+2? ", Contract("student", "lori", "file", None, 0)) == "What is 2+2?"


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

"""Every stage of the GSM8K preset on SmolLM2-135M-Instruct's weights at a tiny budget (CPU): teacher SFT with
the model's chat template, trajectories from its hidden states, a LoRi student with logit KD, evaluation. The
model keeps its tokenizer, chat template, embeddings and width but only its first two of 30 layers (the whole
model answers "Paris" in test_smollm2.py): 135M parameters cost this test ~2 minutes of checkpoints and steps."""

import json
import re
import subprocess
import sys
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lori_ray.conversions import ensure_smollm2
from lori_ray.data import ANSWER_SEPARATOR, normalize_answer

ROOT = Path(__file__).resolve().parents[2]


def gsm8k_jsonl(path: Path, count: int, seed: int) -> Path:
    """GSM8K-format word problems (openai jsonl with <<expr=value>> annotations)."""
    import random
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 5)
            total = (a + b) * c
            question = f"Tom has {a} apples and buys {b} more. He then multiplies his apples by {c}. How many now?"
            answer = (f"He has {a}+{b}=<<{a}+{b}={a + b}>>{a + b}. "
                      f"Then {a + b}*{c}=<<{a + b}*{c}={total}>>{total}.\n#### {total}")
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return path


def first_layers_of_smollm2(path: Path, layers: int) -> Path:
    """SmolLM2-135M-Instruct cut to its first ``layers`` decoder layers, saved as an HF directory at ``path``."""
    source = ensure_smollm2()
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = layers
    AutoModelForCausalLM.from_pretrained(source, config=config).save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def test_gsm8k_preset_runs_every_stage_on_smollm2(tmp_path, ray_head):
    model_dir = first_layers_of_smollm2(tmp_path / "smollm2-2-layers", 2)
    env = ray_head.env()
    # one step of two examples per stage: the 135M model's forward and backward cost ~5 s a sequence on one core
    tiny = {"steps": 1, "batch_size": 2, "num_workers": 1, "log_every": 1, "warmup": 1}
    overrides = [f"output_dir={tmp_path}", ray_head.override, f"model.path={model_dir}",
                 f"data.train_file={gsm8k_jsonl(tmp_path / 'train.jsonl', 24, 0)}",
                 f"data.eval_file={gsm8k_jsonl(tmp_path / 'test.jsonl', 4, 1)}",
                 "data.train_size=24", "data.val_size=4", "data.eval_size=4", "trajectory.layers=[1,2]",
                 "trajectory.num_actors=1", "subspace.max_rank=8", "subspace.rank=4", "student.latent_slots=2",
                 "student.calibration_size=8", "eval.max_new_tokens=32", "eval.batch_size=4",
                 "tracking.log_models=false"]  # 2 x 540 MB into MLflow: logging is tested on the tiny model
    overrides += [f"{who}.train.{k}={v}" for who in ("teacher", "student") for k, v in tiny.items()]
    result = subprocess.run([sys.executable, "jobs/distill.py", "--config", "configs/gsm8k-smollm2.yaml", *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| teacher (explicit CoT) |" in result.stdout and "| student (lori, no CoT) |" in result.stdout

    run_dir = tmp_path / "gsm8k-smollm2"
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.hidden_size == 576
    assert student.config.num_hidden_layers == 2
    assert tokenizer.chat_template and "<latent_1>" in tokenizer.get_vocab()
    assert student.get_input_embeddings().weight.shape[0] == len(tokenizer)
    (manifest,) = (tmp_path / "trajectories").glob("*/manifest.json")
    stored = json.loads(manifest.read_text())
    assert stored["layers"] == [1, 2] and stored["examples"] == 20  # 24 - 4 validation


def chat_jsonl(path: Path, count: int, seed: int) -> Path:
    """Chat-format rows in OpenAI-style content parts: the question as the user turn, the assistant's steps as a
    list (a text part each), the last part ``#### answer``; a system turn first, as exported chats have."""
    import random
    rng = random.Random(seed)

    def text(*parts):
        return [{"type": "text", "text": part} for part in parts]
    with open(path, "w") as f:
        for _ in range(count):
            a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 5)
            steps = [f"{a}+{b}={a + b}", f"{a + b}*{c}={(a + b) * c}"]
            f.write(json.dumps({"messages": [
                {"role": "system", "content": text("You are a careful calculator.")},
                {"role": "user", "content": text(f"What is ({a}+{b})*{c}?")},
                {"role": "assistant", "content": text(*steps, f"#### {(a + b) * c}")}]}) + "\n")
    return path


def separate_student(path: Path, tokenizer_source: Path) -> Path:
    """A pretrained-student stand-in of another width and depth than the teacher (2 layers x 64 against 576),
    saved with the teacher's tokenizer, as a user's own small model would be."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_own_lora_teacher_own_student_own_chat_data_every_stage_then_plain_transformers_and_mlflow(
        tmp_path, job_env, ray_head):
    """A user's setup end to end: SmolLM2 (its first two layers) fine-tuned as the CoT teacher through a LoRA
    adapter, a separate smaller pretrained student, a chat-format dataset; then the student from plain
    transformers, from MLflow, and through ``python -m lori_ray.evaluate``."""
    import mlflow
    from safetensors.torch import load_file

    from lori_ray.predict import CONTRACT_FILE, Contract, Predictor, plain_prompt
    model_dir = first_layers_of_smollm2(tmp_path / "smollm2-2-layers", 2)
    student_dir = separate_student(tmp_path / "my-student", model_dir)
    data = chat_jsonl(tmp_path / "chats.jsonl", 28, 0)
    tiny = {"steps": 2, "batch_size": 2, "num_workers": 1, "log_every": 1, "warmup": 1, "lr": 1e-3}
    overrides = [f"output_dir={tmp_path}", "name=mine", ray_head.override, f"model.path={model_dir}",
                 f"data.train_file={data}", "data.eval_file=null", "data.fields.messages=messages",
                 "data.train_size=20", "data.val_size=4", "data.eval_size=4", "trajectory.layers=[1,2]",
                 "trajectory.num_actors=1", "subspace.max_rank=8", "subspace.rank=4", "student.latent_slots=2",
                 f"student.path={student_dir}", "loss.kd=0", "eval.max_new_tokens=24", "eval.batch_size=4",
                 "teacher.train.lora.rank=4", "teacher.train.lora.save_adapter=true"]
    overrides += [f"{who}.train.{k}={v}" for who in ("teacher", "student") for k, v in tiny.items()]
    result = subprocess.run([sys.executable, "jobs/distill.py", "--config", "configs/gsm8k-smollm2.yaml", *overrides],
                            cwd=ROOT, env=ray_head.env(), capture_output=True, text=True, timeout=1500, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| student (lori, no CoT) |" in result.stdout

    run_dir = tmp_path / "mine"
    # the teacher trained its LoRA updates only: merged into every projection, the embeddings and norms as they were
    base, teacher = load_file(model_dir / "model.safetensors"), load_file(run_dir / "teacher" / "model.safetensors")
    assert set(teacher) == set(base) and torch_equal(teacher, base, "embed_tokens")
    assert not torch_equal(teacher, base, "q_proj")
    assert (run_dir / "teacher" / "adapter" / "adapter_config.json").is_file()
    # the student kept its own shape, trained from its own weights
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    assert student.config.hidden_size == 64 and student.config.num_hidden_layers == 2
    assert tokenizer.chat_template and "<latent_1>" in tokenizer.get_vocab()
    # plain transformers: the card's exact prompt (the chat template, then the latent slots) gives the ids lori-ray
    # trained on, and greedy generation from it the answer lori-ray's own predictor gives
    contract = Contract.read(run_dir / "student" / CONTRACT_FILE)
    question = "How many legs do 3 spiders have?"  # the card's example question
    text, special = plain_prompt(run_dir / "student", contract, question)
    assert repr(text) in (run_dir / "student" / "README.md").read_text() and "<latent_1>" in text
    ids = tokenizer(text, add_special_tokens=special, return_tensors="pt")
    predictor = Predictor(run_dir / "student")
    out = student.generate(**ids, max_new_tokens=predictor.max_new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
    plain = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    # the same tokens: the same answer once compared as lori-ray compares answers (a student two steps into
    # training writes anything, e.g. "#### #### Pam Pam")
    assert predictor([question])[0] == normalize_answer(plain.replace(ANSWER_SEPARATOR, ""))
    # MLflow: the student as a pyfunc model answering plain questions
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    uri = re.search(r"\[tracking\] student logged as an MLflow model: (models:/\S+) \(pyfunc", result.stdout).group(1)
    answers = mlflow.pyfunc.load_model(uri).predict(["What is (3+4)*2?"])
    assert len(answers) == 1 and isinstance(answers[0], str)
    # the evaluation entry point on the user's own file
    evaluated = subprocess.run([sys.executable, "-m", "lori_ray.evaluate", str(run_dir / "student"), "--data",
                                str(data), "--field", "messages=messages", "--limit", "4", "--json"],
                               cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600, check=False)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scored = json.loads(evaluated.stdout)
    assert scored["examples"] == 4 and 0.0 <= scored["exact_match"] <= 1.0


def torch_equal(a: dict, b: dict, part: str) -> bool:
    """Whether every tensor whose name contains ``part`` is the same in both state dicts."""
    import torch
    return all(torch.equal(a[k], b[k]) for k in a if part in k)

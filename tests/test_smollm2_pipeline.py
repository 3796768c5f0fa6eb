"""Every stage of the GSM8K preset on SmolLM2-135M-Instruct's weights at a tiny budget (CPU): teacher SFT with
the model's chat template, trajectories from its hidden states, a LoRi student with logit KD, evaluation. The
model keeps its tokenizer, chat template, embeddings and width but only its first two of 30 layers (the whole
model answers "Paris" in test_smollm2.py): 135M parameters cost this test ~2 minutes of checkpoints and steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import job_env
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lori_ray.models import ensure_smollm2

pytestmark = pytest.mark.cluster  # a real Ray cluster or a full pipeline: `make test-fast` skips it

ROOT = Path(__file__).resolve().parents[1]


def gsm8k_jsonl(path: Path, count: int, seed: int) -> Path:
    """GSM8K-format word problems (openai jsonl with <<expr=value>> annotations)."""
    import random
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 5)
            total = (a + b) * c
            question = f"Tom has {a} apples and buys {b} more. He then multiplies his apples by {c}. How many now?"
            answer = f"He has {a}+{b}=<<{a}+{b}={a + b}>>{a + b}. Then {a + b}*{c}=<<{a + b}*{c}={total}>>{total}.\n#### {total}"
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


def test_gsm8k_preset_runs_every_stage_on_smollm2(tmp_path):
    model_dir = first_layers_of_smollm2(tmp_path / "smollm2-2-layers", 2)
    env = job_env()
    # one step of two examples per stage: the 135M model's forward and backward cost ~5 s a sequence on one core
    tiny = {"steps": 1, "batch_size": 2, "num_workers": 1, "log_every": 1, "warmup": 1}
    overrides = [f"output_dir={tmp_path}", "cluster.num_cpus=2", f"model.path={model_dir}",
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

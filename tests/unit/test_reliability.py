"""Bad input, numerical faults, unreachable tracking and the security defaults."""

import json
import re
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lori_ray.cluster import free_port
from lori_ray.config import Config, ConfigError, ModelConfig, load_config
from lori_ray.data import (
    DataFormatError,
    generate_multiplication,
    parse_gsm8k_line,
    parse_line,
    read_examples,
    write_icot,
)
from lori_ray.models import load_model
from lori_ray.teacher_pool import TeacherWorker
from lori_ray.tokens import arithmetic_tokenizer
from lori_ray.tracking import StepLogger

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("suffix, bad", [(".txt", "no separators here"), (".jsonl", "{broken json")])
def test_malformed_lines_fail_with_line_number_or_are_skipped_with_a_warning(tmp_path, suffix, bad):
    good = generate_multiplication(3, 2, 2)
    path = tmp_path / f"data{suffix}"
    if suffix == ".txt":
        lines = [e.to_line() for e in good]
    else:
        lines = [json.dumps({"question": "How many?", "answer": "2+2=<<2+2=4>>4\n#### 4"})] * 3
    path.write_text("\n".join([lines[0], bad, lines[1], bad, lines[2]]) + "\n")
    with pytest.raises(DataFormatError, match=rf"data{re.escape(suffix)}:2: "):
        read_examples(path)
    with pytest.warns(UserWarning, match=r"skipped 2 malformed lines \(lines 2, 4\)"):
        assert len(read_examples(path, skip_bad=True)) == 3


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataFormatError, match="empty.txt: no examples"):
        read_examples(tmp_path / "empty.txt")
    with pytest.raises(DataFormatError, match="no examples"):
        write_icot([], tmp_path / "none.txt") or read_examples(tmp_path / "none.txt")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789 +*()|#<>=-.,{}\":abc\n")), max_size=80))
def test_readers_raise_only_the_documented_error_on_random_lines(line):
    for parse in (parse_line, parse_gsm8k_line):
        try:
            parse(line, "fuzz:1")
        except DataFormatError as error:
            assert str(error).startswith("fuzz:1: ")


def test_refuse_non_finite_names_the_tensors_and_the_last_terms():
    from lori_ray.checkpoints import refuse_non_finite
    refuse_non_finite({"w": torch.ones(2), "ids": torch.tensor([1])}, "s", 3, {"ce": 1.0})  # finite: no error
    with pytest.raises(FloatingPointError, match=r"\[s\] not published: .* at step 3 \(w\); last logged terms: ce=1"):
        refuse_non_finite({"w": torch.tensor([1.0, float("nan")])}, "s", 3, {"ce": 1.0, "step": 3})


def test_teacher_out_of_memory_message_names_the_knob(tmp_path, tiny_model):
    worker = TeacherWorker(str(tiny_model(tmp_path / "model")), [1, 2], batch_size=8)

    def out_of_memory(**_):
        raise torch.OutOfMemoryError("CUDA out of memory")

    worker.model.forward = out_of_memory
    with pytest.raises(RuntimeError, match=r"lower trajectory.batch_size \(now 8\)"):
        worker.extract(str(tmp_path / "store"), 0, [0], generate_multiplication(1, 2, 2))


def test_unreachable_mlflow_warns_once_and_training_goes_on(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = StepLogger("http://127.0.0.1:9", "0" * 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log({"ce": 1.0}, 1)
        logger.log({"ce": 0.5}, 2)
        logger.close()
    assert logger.failed == 2
    assert len([w for w in caught if "MLflow logging" in str(w.message)]) == 1


def test_a_training_step_never_waits_for_a_tracking_server_that_is_down():
    """With MLflow's own retries (about four minutes a request) a step used to wait for each of them."""
    logger = StepLogger(f"http://127.0.0.1:{free_port()}", "0" * 32)
    started = time.monotonic()
    for step in range(1, 21):
        logger.log({"ce": 1.0 / step}, step)
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    logger.close(timeout_s=1.0)  # the end of a stage waits a bounded time for what is queued
    assert time.monotonic() - started < 5.0 and logger.failed == 0  # still retrying the first request


def test_security_defaults(tmp_path, tiny_model):
    assert ModelConfig().trust_remote_code is False and Config().model.trust_remote_code is False
    # weights only from safetensors: a pickle checkpoint is refused
    model_dir = tiny_model(tmp_path / "model")
    load_model(model_dir)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((model_dir / "config.json").read_text())
    torch.save(load_model(model_dir).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        load_model(pickled)
    # our scripts bind the dashboard, job server and MLflow UI to loopback
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert "--dashboard-host 127.0.0.1" in demo and "--node-ip-address 127.0.0.1" in demo
    assert re.search(r"env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .*\\\n\s*ray start --head", demo)  # else: host address
    assert 'dashboard_host="127.0.0.1"' in (ROOT / "lori_ray" / "cluster.py").read_text()
    assert "--host 127.0.0.1" in (ROOT / "docs" / "mlflow.md").read_text()  # the documented MLflow UI
    # no credentials in presets
    for preset in (ROOT / "configs").glob("*.yaml"):
        assert not re.search(r"(password|token|secret|api_key)\s*:", preset.read_text(), re.IGNORECASE)


def test_tokenizer_larger_than_the_model_vocabulary_is_a_config_error(tmp_path, tiny_model):
    model_dir = tiny_model(tmp_path / "model")
    load_config(ROOT / "configs/tiny.yaml", [f"model.path={model_dir}"])  # matching: fine
    tokenizer = arithmetic_tokenizer()
    tokenizer.add_tokens([f"extra{i}" for i in range(30)])
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(ConfigError, match=r"model.path: the tokenizer in .* has 50 tokens but the model's "
                                          r"vocabulary has 20 rows"):
        load_config(ROOT / "configs/tiny.yaml", [f"model.path={model_dir}"])


def test_the_local_cluster_token_file_is_private(tmp_path, monkeypatch):
    import os
    import stat

    from lori_ray.cluster import private_token_file
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "ray" / "auth_token"))
    created = private_token_file()
    assert stat.S_IMODE(os.stat(created).st_mode) == 0o600 and len(created.read_text()) == 64
    created.chmod(0o644)  # as Ray writes it
    assert private_token_file() == created and stat.S_IMODE(os.stat(created).st_mode) == 0o600
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-environment")
    assert private_token_file() is None


@pytest.mark.parametrize("text, shown", [
    ("s3://AKIAID:wJalrSECRET@bucket/runs", "s3://AKIAID:***@bucket/runs"),
    ("http://alice:hunter2@mlflow:5000", "http://alice:***@mlflow:5000"),
    ("s3://bucket/p?access_key=AKIAID&secret_key=wJalr&region=eu", "s3://bucket/p?access_key=***&secret_key=***&region=eu"),
    ("gs://bucket/p?token=ya29.abc", "gs://bucket/p?token=***"),
    ("[tracking] MLflow run 1 at sqlite:////tmp/mlflow.db", "[tracking] MLflow run 1 at sqlite:////tmp/mlflow.db"),
])
def test_credentials_in_uris_never_reach_the_log(text, shown, capsys):
    from lori_ray.stages import log
    log(f"[teacher] store {text}")
    assert capsys.readouterr().out == f"[teacher] store {shown}\n"


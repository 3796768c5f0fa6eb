"""LoRA adapters (``train.lora``): what trains, what is published, and the stage that trains them."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lori_ray.adapters import ADAPTER_DIR, publish, with_lora
from lori_ray.config import ConfigError, LoraConfig, load_config
from lori_ray.models import load_model
from lori_ray.tokens import add_latent_tokens, latent_ids_of, load_tokenizer


def student_dir(path):
    """The tiny model saved at ``path`` with three latent-slot tokens added, as a student's initial directory is."""
    tokenizer = load_tokenizer(str(path))
    ids = add_latent_tokens(tokenizer, 3)
    model = load_model(path)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, ids


def test_only_the_adapters_and_the_latent_rows_train_and_the_merged_model_computes_the_same(tmp_path, tiny_model):
    base, ids = student_dir(tiny_model(tmp_path / "base"))
    assert latent_ids_of(load_tokenizer(str(base))) == ids
    lora = LoraConfig(rank=2, target_modules=["q_proj", "v_proj"], save_adapter=True)
    model = with_lora(load_model(base), lora, ids)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "trainable_tokens" in name for name in trainable)
    assert any("q_proj" in name for name in trainable) and not any("k_proj" in name for name in trainable)
    with torch.no_grad():  # as training would: every trainable weight moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    inputs = torch.tensor([[1, 5, 6, ids[0], ids[1], 7]])
    expected = model(input_ids=inputs).logits

    publish(base, lora, ids, model.state_dict(), tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers, no peft
    torch.testing.assert_close(merged(input_ids=inputs).logits, expected, rtol=1e-4, atol=1e-4)
    before, after = load_model(base).get_input_embeddings().weight, merged.get_input_embeddings().weight
    others = [i for i in range(len(before)) if i not in ids]
    assert torch.equal(before[others], after[others]) and not torch.equal(before[ids], after[ids])
    adapter = json.loads((tmp_path / "out" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base) and adapter["r"] == 2 and adapter["lora_alpha"] == 4


def test_a_lora_stage_trains_the_adapters_under_deepspeed_and_publishes_the_merged_model(tmp_path, tiny_stage):
    stage = tiny_stage(tmp_path, "lora", num_workers=0, steps=3, log_every=3, lr=1e-2,
                       lora=LoraConfig(rank=2, save_adapter=True))
    from lori_ray.driver import fit
    out, metrics = fit(stage, tmp_path / "lora", tmp_path / "ray")
    before, after = load_file(tmp_path / "model" / "model.safetensors"), load_file(out / "model.safetensors")
    assert metrics["step"] == 3 and set(after) == set(before)  # a plain HF model: no peft names
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # all-linear: every projection of every layer has its update merged; norms and embeddings stay frozen
    assert {k for k in changed if k.endswith("q_proj.weight")} == {k for k in before if k.endswith("q_proj.weight")}
    assert not any("norm" in k or "embed_tokens" in k for k in changed)
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    # ZeRO-3: no rank holds the whole model; the merge starts from the consolidated state
    out3, _ = fit(replace(stage, name="lora3", train=stage.train.model_copy(update={"zero_stage": 3})),
                  tmp_path / "lora3", tmp_path / "ray")
    assert set(load_file(out3 / "model.safetensors")) == set(before)


def test_lora_is_refused_where_there_are_no_pretrained_weights_to_adapt():
    config = load_config("configs/tiny.yaml")
    with pytest.raises(ConfigError, match="teacher.train.lora: the teacher starts from a fresh preset"):
        load_config("configs/tiny.yaml", ["teacher.train.lora.rank=4"])
    with pytest.raises(ConfigError, match="train.lora: adapters update pretrained weights"):
        load_config("configs/tiny.yaml", ["student.kind=pruned", "student.width=32", "student.init=activation",
                                          "student.train.lora.rank=4"])
    assert config.student.train.lora is None
    assert load_config("configs/tiny.yaml", ["student.train.lora.rank=4"]).student.train.lora.lora_alpha == 8

import math
import tempfile
from dataclasses import replace

import pytest
import torch

from lori_ray.config import TrainConfig
from lori_ray.data import generate_multiplication
from lori_ray.evaluate import exact_match
from lori_ray.models import build_model
from lori_ray.tokens import IGNORE_INDEX, Layout, arithmetic_tokenizer, left_pad
from lori_ray.worker import batch_indices, deepspeed_config, lr_factor, time_left


def test_exact_match_equals_greedy_generation():
    torch.manual_seed(0)
    tokenizer = arithmetic_tokenizer()
    layout = Layout(tokenizer)
    model = build_model("llama", "tiny", len(tokenizer), 64, {"pad_token_id": layout.pad}).eval()
    prompts = [layout.question(e) for e in generate_multiplication(6, 2, 2)]
    batch = left_pad(prompts, layout.pad)
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=layout.pad)
    continuation = generated[:, batch["input_ids"].shape[1]:]
    # right-padded sequences whose labels are exactly the model's own greedy continuation
    length = len(prompts[0]) + 5
    data = {"input_ids": torch.cat([torch.tensor(prompts), continuation], 1),
            "attention_mask": torch.ones(6, length, dtype=torch.long),
            "labels": torch.cat([torch.full((6, len(prompts[0])), IGNORE_INDEX), continuation], 1)}
    assert exact_match(model, data, rank=0, world=1, batch_size=4) == 1.0
    wrong = data["labels"].clone()
    wrong[:3, -2] = (wrong[:3, -2] + 1) % len(tokenizer)
    assert exact_match(model, {**data, "labels": wrong}, rank=0, world=1, batch_size=4) == 0.5
    # a rank sees every world-th row
    assert exact_match(model, {**data, "labels": wrong}, rank=1, world=2, batch_size=2) == 2 / 3  # rows 1, 3, 5


def test_batches_are_deterministic_epoch_permutations():
    first = torch.cat([batch_indices(s, 10, 5, seed=0) for s in range(2)])
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(batch_indices(3, 10, 5, seed=0), batch_indices(3, 10, 5, seed=0))
    assert not torch.equal(batch_indices(0, 10, 5, seed=0), batch_indices(2, 10, 5, seed=0))


def test_schedule_and_deepspeed_config():
    assert lr_factor(0, 10, 100) == 0.1 and lr_factor(9, 10, 100) == 1.0
    assert lr_factor(100, 10, 100) == 0.1 and 0.1 < lr_factor(50, 10, 100) < 1.0
    # a wall-clock budget half spent decays like half the steps; the steps still count when they are further on
    assert lr_factor(10, 10, 100, budget_spent=0.5) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, budget_spent=0.5) == 0.1 and lr_factor(5, 10, 100, budget_spent=0.9) == 0.6
    # cosine: a half cosine from 1 to min_lr after the warmup, against the formula written out
    for step in (10, 30, 55, 80, 100):
        progress = (step - 10) / 90
        assert lr_factor(step, 10, 100, schedule="cosine", min_lr=0.0) == pytest.approx(
            (1 + math.cos(math.pi * progress)) / 2)
    assert lr_factor(55, 10, 100, schedule="cosine") == pytest.approx(0.55)  # halfway: halfway down to min_lr 0.1
    assert lr_factor(20, 10, 100, schedule="cosine") > lr_factor(20, 10, 100)  # slower at first than linear
    assert lr_factor(100, 10, 100, schedule="cosine", min_lr=0.02) == pytest.approx(0.02)
    assert lr_factor(10, 10, 100, budget_spent=1.0, schedule="cosine") == pytest.approx(0.1)
    train = TrainConfig(batch_size=64, grad_clip=1.0, zero_stage=3, precision="auto")
    config = deepspeed_config(train, world_size=2)
    assert config["train_micro_batch_size_per_gpu"] == 32 and config["zero_optimization"]["stage"] == 3
    assert ("bf16" in config) == torch.cuda.is_available()  # auto: bf16 on GPU only
    assert config.get("zero_optimization", {}).get("overlap_comm", False) == torch.cuda.is_available()
    assert deepspeed_config(train.model_copy(update={"precision": "bf16"}), 2)["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_config(train.model_copy(update={"precision": "fp32"}), 2)


def test_curriculum_batch_shows_each_coconut_stage_at_its_steps():
    from lori_ray.curriculum import PhaseSchedule, cot_spans, step_starts
    from lori_ray.tokens import add_latent_tokens, collate
    from lori_ray.worker import Stage, curriculum_batch, curriculum_level
    tokenizer = arithmetic_tokenizer()
    latents = add_latent_tokens(tokenizer, 2)
    examples = generate_multiplication(4, 2, 2, seed=1)
    sequences = [Layout(tokenizer).teacher(e) for e in examples]
    batch = collate(sequences, tokenizer.pad_token_id)
    batch["cot_start"], batch["cot_length"] = cot_spans(sequences)
    batch["step_starts"] = step_starts(sequences)
    stage = Stage(name="s", model_dir="", data_path="", train=TrainConfig(),
                  phases=PhaseSchedule(steps_per_stage=5, last=2, latents_per_step=1, latent_ids=latents,
                                       pad_id=tokenizer.pad_token_id))
    assert [curriculum_level(stage, step) for step in (0, 4, 5, 9, 10, 99)] == [0, 0, 1, 1, 2, 2]
    first, shown = curriculum_batch(stage, batch, 0, rank=0)
    assert shown == {"latent_stage": 0.0} and torch.equal(first["input_ids"], batch["input_ids"])
    middle, _ = curriculum_batch(stage, batch, 7, rank=0)
    assert (middle["input_ids"] == latents[0]).sum(1).tolist() == [1] * 4
    assert not (middle["input_ids"] == latents[1]).any()
    last, shown = curriculum_batch(stage, batch, 12, rank=0)
    expected = collate([Layout(tokenizer, latents).student(e) for e in examples], tokenizer.pad_token_id)
    assert shown == {"latent_stage": 2.0} and torch.equal(last["input_ids"], expected["input_ids"])


def test_optimizer_reset_clears_adam_moments_inside_a_deepspeed_zero2_engine():
    from lori_ray.worker import _import_deepspeed, _process_group, reset_optimizer_state
    deepspeed = _import_deepspeed()
    with _process_group(deepspeed):
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        train = TrainConfig(batch_size=2, grad_clip=1.0, zero_stage=2, precision="fp32")
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(train, 1))

        def step():
            engine.backward(engine(torch.ones(2, 4)).square().sum())
            engine.step()

        step(), step()
        (state,) = optimizer.state.values()  # ZeRO-2 steps one flat fp32 partition
        assert state["step"] == 2 and state["exp_avg"].abs().sum() > 0
        reset_optimizer_state(engine)
        assert not optimizer.state
        step()
        (state,) = optimizer.state.values()
        assert state["step"] == 1  # the moments started afresh


def test_stages_in_the_driver_one_after_another_each_train(tmp_path, tiny_stage, monkeypatch):
    """``num_workers=0`` trains in the driver. Ray ends such a stage's process group with torch alone (and after
    a stage that raised, not at all); the next stage failed on DeepSpeed's clone of the old group ("Group ... is
    not registered"), so a run with both stages in the driver never reached its student. Ray Train's local mode
    keeps the checkpoints it is given where they are: every one a stage wrote stayed in /tmp."""
    from lori_ray.driver import fit
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the loop writes its checkpoints
    stage = tiny_stage(tmp_path, "first", num_workers=0, steps=4, log_every=2, checkpoint_every=2, max_bad_steps=1)
    with pytest.raises(Exception, match="loss was NaN/Inf"):  # a stage that fails, then two that train
        fit(replace(stage, name="failed", weights={"ce": float("nan")}), tmp_path / "failed", tmp_path / "ray")
    for name in ("first", "second"):
        out, metrics = fit(replace(stage, name=name), tmp_path / name, tmp_path / "ray")
        assert metrics["step"] == 4 and (out / "model.safetensors").is_file()
    assert not list(temp.glob("lori-ckpt-*"))  # no checkpoint was left behind, periodic (step 2) or final


@pytest.mark.parametrize("elapsed, done, remaining, shown", [
    (10.0, 100, 900, "1m30s"), (10.0, 100, 50, "5s"), (100.0, 1000, 37_000, "1h01m"), (5.0, 0, 10, "50s"),
    (3.0, 30, 0, "0s")])
def test_time_left_at_the_pace_so_far(elapsed, done, remaining, shown):
    assert time_left(elapsed, done, remaining) == shown


def test_gradient_accumulation_takes_the_same_steps_as_the_whole_batch(tmp_path, tiny_stage):
    """Two micro-batches of 8 per step against one of 16 (2x2 sequences are all one length, so the token-mean
    loss of the halves averages to the whole's): the same weights after the same steps."""
    from safetensors.torch import load_file

    from lori_ray.driver import fit
    stage = tiny_stage(tmp_path, "whole", num_workers=0, steps=3, log_every=3, batch_size=16)
    assert deepspeed_config(stage.train.model_copy(update={"grad_accumulation": 2}), 1)[
        "train_micro_batch_size_per_gpu"] == 8
    whole, _ = fit(stage, tmp_path / "whole", tmp_path / "ray")
    halves, _ = fit(replace(stage, name="halves", train=stage.train.model_copy(update={"grad_accumulation": 2})),
                    tmp_path / "halves", tmp_path / "ray")
    a, b = load_file(whole / "model.safetensors"), load_file(halves / "model.safetensors")
    before = load_file(next((tmp_path / "model").glob("*.safetensors")))
    assert any(not torch.equal(a[k], before[k]) for k in a)  # it trained
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"batch_size: 16 does not split over 2 workers x 3 micro-batches"):
        TrainConfig(batch_size=16, num_workers=2, grad_accumulation=3)

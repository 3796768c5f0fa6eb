"""Continuous thoughts: the KV-cached chunked forward against the naive loop (one full pass per latent
column), on rows whose latents sit at different columns, for both model families."""

import pytest
import torch

from lori_ray.latents import continuous_forward, mask_positions
from lori_ray.models import FAMILIES, build_model

SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LATENTS = [20, 21, 22]


def ragged_batch():
    """Three rows: question lengths 3, 5 and 4, then the 3 latents, then 2-4 answer tokens, right-padded."""
    rows = [[1, 5, 6, *LATENTS, 7, 8],
            [1, 5, 6, 9, 10, *LATENTS, 7, 8, 9, 2],
            [1, 6, 6, 9, *LATENTS, 8, 2]]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return input_ids, attention_mask


def unrolled(model, input_ids, attention_mask):
    """The definition: run everything, put the state before the first unfilled latent column into it, repeat."""
    embeddings = model.get_input_embeddings()(input_ids)
    is_latent = torch.isin(input_ids, torch.tensor(LATENTS))
    for column in is_latent.any(0).nonzero().flatten().tolist():
        states = model(inputs_embeds=embeddings, attention_mask=attention_mask,
                       position_ids=mask_positions(attention_mask), output_hidden_states=True).hidden_states[-1]
        filled = torch.where(is_latent[:, column, None], states[:, column - 1], embeddings[:, column])
        embeddings = torch.cat([embeddings[:, :column], filled[:, None], embeddings[:, column + 1:]], 1)
    return model(inputs_embeds=embeddings, attention_mask=attention_mask, position_ids=mask_positions(attention_mask),
                 output_hidden_states=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_forward_equals_one_full_pass_per_latent_column(family):
    model = build_model(family, "tiny", 32, 64, SPECIAL, seed=0).eval()
    input_ids, attention_mask = ragged_batch()
    output = continuous_forward(model, input_ids, attention_mask, LATENTS)
    reference = unrolled(model, input_ids, attention_mask)
    valid = attention_mask.bool()
    assert torch.allclose(output.logits[valid], reference.logits[valid], atol=1e-5)
    for ours, theirs in zip(output.hidden_states, reference.hidden_states, strict=True):
        assert torch.allclose(ours[valid], theirs[valid], atol=1e-5)
    # the latents really are fed back: the same rows with pause-token latents give other answer logits
    paused = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert not torch.allclose(output.logits[valid], paused[valid], atol=1e-3)
    # each latent's input is the last-layer state at the position before it, row by row
    for row, column in torch.isin(input_ids, torch.tensor(LATENTS)).nonzero().tolist():
        assert torch.allclose(output.inputs_embeds[row, column], output.hidden_states[-1][row, column - 1], atol=1e-6)


def test_gradients_flow_through_the_fed_back_states_like_the_loop():
    model = build_model("llama", "tiny", 32, 64, SPECIAL, seed=1)
    input_ids, attention_mask = ragged_batch()
    keep = torch.arange(5, input_ids.shape[1])
    continuous_forward(model, input_ids, attention_mask, LATENTS, logits_to_keep=keep).logits.square().sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    unrolled(model, input_ids, attention_mask).logits[:, keep].square().sum().backward()
    for name, parameter in model.named_parameters():
        assert torch.allclose(ours[name], parameter.grad, atol=1e-4, rtol=1e-4), name


def test_without_latents_it_is_the_plain_forward():
    model = build_model("llama", "tiny", 32, 64, SPECIAL, seed=2).eval()
    input_ids, attention_mask = ragged_batch()
    plain = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    output = continuous_forward(model, input_ids, attention_mask, [31])
    valid = attention_mask.bool()
    assert torch.allclose(output.logits[valid], plain.logits[valid], atol=1e-5)
    assert torch.allclose(output.hidden_states[2][valid], plain.hidden_states[2][valid], atol=1e-5)


def test_generation_decodes_from_the_filled_prompt_like_the_forward_token_by_token():
    from lori_ray.evaluate import greedy_generate
    from lori_ray.tokens import left_pad
    model = build_model("llama", "tiny", 32, 64, SPECIAL, seed=3).eval()
    torch.manual_seed(3)
    model.lm_head = torch.nn.Linear(64, 32)  # untied: a random tied model repeats its last token
    with torch.no_grad():  # and never writes a latent token (the by-hand loop would take it for one)
        model.lm_head.bias[LATENTS] = -1e4
    prompts = [[1, 5, 6, *LATENTS, 30], [1, 9, 10, 11, 6, *LATENTS, 30]]  # latents aligned by the left padding
    generated, _ = greedy_generate(model, prompts, pad=0, eos=2, batch_size=2, max_new_tokens=4, latent_ids=LATENTS)
    for prompt, tokens in zip(prompts, generated, strict=True):
        sequence = list(prompt)
        for _ in range(len(tokens)):  # greedy by hand: the whole sequence through the continuous forward each time
            batch = left_pad([sequence], 0)
            logits = continuous_forward(model, batch["input_ids"], batch["attention_mask"], LATENTS).logits
            sequence.append(int(logits[0, -1].argmax()))
        assert sequence[len(prompt):] == tokens
    paused, _ = greedy_generate(model, prompts, pad=0, eos=2, batch_size=2, max_new_tokens=4)
    assert paused != generated  # pause tokens (the plain prompt) decode to something else here


def test_objective_trains_through_the_continuous_forward():
    import torch.nn.functional as F

    from lori_ray.objective import LMObjective, slot_states
    model = build_model("llama", "tiny", 32, 64, SPECIAL, seed=4)
    input_ids, attention_mask = ragged_batch()
    labels = torch.where(torch.arange(input_ids.shape[1]) > 6, input_ids, -100).masked_fill(attention_mask == 0, -100)
    positions = torch.stack([(row == LATENTS[0]).nonzero()[0] + torch.arange(3) for row in input_ids])
    targets = torch.randn(3, 1, 3, 64)
    objective = LMObjective(model, [2], weights={"ce": 1.0, "hidden_mse": 1.0}, continuous_latents=LATENTS,
                            terms=["ce", "hidden_mse"])
    _, metrics = objective({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                            "latent_positions": positions, "targets": targets})
    output = continuous_forward(model, input_ids, attention_mask, LATENTS)
    ce = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    mse = (slot_states(output.hidden_states, [2], positions) - targets).pow(2).mean()
    assert metrics["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert metrics["hidden_mse"] == pytest.approx(mse.item(), rel=1e-5)
    paused = LMObjective(model, [2], weights={"ce": 1.0})({"input_ids": input_ids, "attention_mask": attention_mask,
                                                           "labels": labels})[1]
    assert paused["ce"] != pytest.approx(ce.item(), rel=1e-3)

"""Step time of the student objective with CE only vs CE + LoRi alignment, same model and batch.

    python bench/loss_overhead.py --size small --batch 64 --steps 20

Prints ms per forward+backward+AdamW step for each and the LoRi overhead in percent. `--json PATH`
also writes the figures as JSON; `--profile PATH` writes a torch.profiler table (top operators by
device time, or CPU time without a GPU) of a few CE + LoRi steps.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lori_ray.data import generate_multiplication
from lori_ray.models import build_model
from lori_ray.objective import LMObjective, TrajectoryProjection
from lori_ray.tokens import Layout, add_latent_tokens, arithmetic_tokenizer, collate


def step_ms(objective: LMObjective, batch: dict, steps: int) -> float:
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
            loss, _ = objective(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps * 1000


def profile_table(objective: LMObjective, batch: dict, steps: int = 3, rows: int = 30) -> str:
    """Top operators of ``steps`` CE + LoRi steps (after the timed ones: warm), by device time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=cuda):
                loss, _ = objective(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    key = "device_time_total" if cuda else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama")
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--latents", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler table of CE + LoRi steps here")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = arithmetic_tokenizer()
    layout = Layout(tokenizer, add_latent_tokens(tokenizer, args.latents))
    model = build_model(args.family, args.size, len(tokenizer), 256, {"pad_token_id": layout.pad}).to(device)
    layers = list(range(1, model.config.num_hidden_layers + 1))
    sequences = [layout.student(e) for e in generate_multiplication(args.batch, args.digits, args.digits)]
    batch = collate(sequences, layout.pad)
    batch["latent_positions"] = torch.tensor([[a for a, _ in s.spans] for s in sequences])
    batch["targets"] = torch.randn(args.batch, len(layers), args.latents, args.rank)
    batch = {k: v.to(device) for k, v in batch.items()}
    projection = TrajectoryProjection(len(layers), model.config.hidden_size, args.rank).to(device)

    # .to(device): the objective's own buffers (target_scale) start on the CPU; in training DeepSpeed moves them
    ce_only = step_ms(LMObjective(model).to(device), batch, args.steps)
    weights = {"ce": 1.0, "first_order": 1.0, "second_order": 1.0}
    with_lori = LMObjective(model, layers, projection, weights, terms=list(weights)).to(device)
    lori = step_ms(with_lori, batch, args.steps)
    tokens = int(batch["attention_mask"].sum())
    print(f"device={device} model={args.family}/{args.size} batch={args.batch} rank={args.rank} K={args.latents} "
          f"tokens/batch={tokens} seq={batch['input_ids'].shape[1]}")
    print(f"CE only     {ce_only:8.2f} ms/step")
    print(f"CE + LoRi   {lori:8.2f} ms/step")
    print(f"LoRi overhead {100 * (lori / ce_only - 1):+.1f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "family": args.family,
            "size": args.size, "parameters": sum(p.numel() for p in model.parameters()), "batch": args.batch,
            "digits": args.digits, "latents": args.latents, "rank": args.rank, "steps": args.steps,
            "tokens_per_batch": tokens, "seq": batch["input_ids"].shape[1], "ce_ms": ce_only, "ce_lori_ms": lori,
            "overhead_pct": 100 * (lori / ce_only - 1)}, indent=2))
    if args.profile:
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        args.profile.write_text(profile_table(with_lori, batch))


if __name__ == "__main__":
    main()

"""Step time of the student objective with CE only vs CE + LoRi alignment, same model and batch.

    python bench/loss_overhead.py --size small --batch 64 --steps 20

Prints ms per forward+backward+AdamW step for each and the LoRi overhead in percent.
"""

import argparse
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama")
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--latents", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
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

    ce_only = step_ms(LMObjective(model), batch, args.steps)
    lori = step_ms(LMObjective(model, layers, projection, {"ce": 1.0, "first_order": 1.0, "second_order": 1.0}), batch, args.steps)
    print(f"device={device} model={args.family}/{args.size} batch={args.batch} rank={args.rank} K={args.latents}")
    print(f"CE only     {ce_only:8.2f} ms/step")
    print(f"CE + LoRi   {lori:8.2f} ms/step")
    print(f"LoRi overhead {100 * (lori / ce_only - 1):+.1f}%")


if __name__ == "__main__":
    main()

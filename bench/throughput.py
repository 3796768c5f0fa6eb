"""Throughput side by side on one model and batch: plain PyTorch vs our Ray Train + DeepSpeed student step.

    python bench/throughput.py [--family llama] [--size small] [--batch 16] [--seq 128] [--steps 20]
                               [--zero 2] [--workers 1] [--threads 1] [--extract 512] [--generate 64]

Prints one table:
  * matmul peak (bf16 on GPU, fp32 on CPU), the denominator of MFU;
  * training: a plain-PyTorch eager AdamW step (CE only) and our production loop (`lori_ray.worker`:
    Ray Train workers, DeepSpeed ZeRO, CE + LoRi loss) — tokens/s, MFU, peak GPU memory;
  * teacher extraction: `build_store` through the Ray actor pool (two passes: step means + moments,
    then coordinates; actor start included) vs a bare forward with hidden states on the same sequences;
  * teacher free generation: HF `generate` (dynamic cache) vs HF `generate` with a static cache.
Runs on CPU with small sizes (what CI exercises) and on a GPU with the real ones.

On CPU the plain step runs with the torch threads each of our workers takes (`--threads`, default 1, the
`train.cpus_per_worker` default): the ratio compares steps on the same cores.
`--parts` picks the measurements (train, extract, generate); `--plain-compile` adds a torch.compile'd
plain step; `--json PATH` also writes the figures as JSON, `--markdown PATH` the table headed by the command,
date, commit and machine (``lori_ray.provenance``). A measurement that fails is reported as
failed (traceback on stderr) and the others still run; the exit status is then 1.
"""

import argparse
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import save_file

from lori_ray import provenance
from lori_ray.cli import at_least_one
from lori_ray.data import generate_multiplication
from lori_ray.models import build_model
from lori_ray.objective import TrajectoryProjection
from lori_ray.tokens import Layout, add_latent_tokens, arithmetic_tokenizer, collate, left_pad

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def sync():
    if CUDA:
        torch.cuda.synchronize()


def matmul_peak(size: int) -> float:
    """FLOP/s of a square matmul in the training dtype: the MFU denominator on this machine."""
    a = torch.randn(size, size, device=DEVICE, dtype=DTYPE)
    b = torch.randn(size, size, device=DEVICE, dtype=DTYPE)
    for _ in range(3):
        a @ b
    sync()
    runs, started = 10, time.perf_counter()
    for _ in range(runs):
        a @ b
    sync()
    return 2 * size**3 * runs / (time.perf_counter() - started)


def flops_per_token(model, seq: int) -> float:
    """6·N for the weights (forward + backward) plus the attention scores, per token."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * seq


def synthetic_batch(layout: Layout, batch: int, seq: int, latents: int, layers: int, rank: int) -> dict:
    """Random tokens at full length, the student layout's label and latent structure."""
    vocab = len(layout.tokenizer)
    input_ids = torch.randint(5, vocab - latents, (batch, seq))
    labels = input_ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
            "latent_positions": torch.arange(4, 4 + latents).repeat(batch, 1),
            "targets": torch.randn(batch, layers, latents, rank)}


def free_memory() -> None:
    """Give cached GPU memory back, so the next measurement (or a Ray worker) has the whole card."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def plain_torch_step(model_dir: Path, batch: dict, steps: int, compile: bool = False,
                     threads: int | None = None) -> tuple[float, float]:
    """(seconds per step, peak GB) of AdamW on CE, bf16 autocast on GPU; eager unless ``compile``. On CPU with
    ``threads`` torch threads: as many as each of our workers takes (``train.cpus_per_worker``)."""
    from lori_ray.models import load_model
    if threads and not CUDA:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return plain_torch_step(model_dir, batch, steps, compile)
        finally:
            torch.set_num_threads(before)  # the extraction and generation rows use the process's threads
    model = load_model(model_dir).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    if compile:
        model = torch.compile(model)
    batch = {k: batch[k].to(DEVICE) for k in ("input_ids", "labels", "attention_mask")}
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):
        if i == 3:
            sync()
            started = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    peak = torch.cuda.max_memory_allocated() / 1e9 if CUDA else float("nan")
    return (time.perf_counter() - started) / steps, peak


def our_training_step(work: Path, model_dir: Path, batch: dict, steps: int, zero: int, workers: int,
                      compile: bool, threads: int) -> dict:
    """The production loop through Ray Train: the last report's window excludes the warm-up steps."""
    from lori_ray.config import TrainConfig
    from lori_ray.driver import fit
    from lori_ray.worker import Stage
    layers = list(range(1, 1 + batch["targets"].shape[1]))
    projection = TrajectoryProjection(len(layers), _hidden(model_dir), batch["targets"].shape[-1])
    save_file({k: v.detach().contiguous() for k, v in projection.state_dict().items()}, work / "projection.safetensors")
    rows = {k: v.repeat(workers, *[1] * (v.dim() - 1)) for k, v in batch.items()}  # the same micro-batch per worker
    save_file({k: v.contiguous() for k, v in rows.items()}, work / "data.safetensors")
    train = TrainConfig(steps=2 * steps, batch_size=len(rows["input_ids"]), lr=1e-4, warmup=1, zero_stage=zero,
                        num_workers=workers, cpus_per_worker=threads, log_every=steps, compile=compile)
    stage = Stage(name="throughput", model_dir=str(model_dir), data_path=str(work / "data.safetensors"), train=train,
                  weights={"ce": 1.0, "first_order": 1.0, "second_order": 1.0},
                  terms=["ce", "first_order", "second_order"], student_layers=layers,
                  projection_path=str(work / "projection.safetensors"), gpus_per_worker=1.0 if CUDA else 0.0)
    _, metrics = fit(stage, work / "out", work / "ray")
    return metrics


def _hidden(model_dir: Path) -> int:
    import json
    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


def bare_forward(model_dir: Path, sequences: list, pad: int, batch_size: int) -> float:
    """Tokens/s of a teacher forward with hidden states, no Ray, same batching as the actors."""
    from lori_ray.models import load_model
    model = load_model(model_dir).to(DEVICE, DTYPE).eval()
    tokens, started = 0, time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = collate(sequences[start:start + batch_size], pad)
            model(input_ids=chunk["input_ids"].to(DEVICE), attention_mask=chunk["attention_mask"].to(DEVICE),
                  output_hidden_states=True)
            tokens += int(chunk["attention_mask"].sum())
    sync()
    return tokens / (time.perf_counter() - started)


def generation(model_dir: Path, prompts: list[list[int]], pad: int, eos: int, new_tokens: int,
               cache: str | None) -> float:
    """New tokens/s of greedy HF ``generate`` for one batch (no early stop: every row writes ``new_tokens``)."""
    from lori_ray.models import load_model
    model = load_model(model_dir).to(DEVICE, DTYPE).eval()
    batch = {k: v.to(DEVICE) for k, v in left_pad(prompts, pad).items()}
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad,
               "eos_token_id": eos, "cache_implementation": cache}
    model.generate(**batch, **options)  # warm-up (and compilation for the static cache)
    sync()
    started = time.perf_counter()
    model.generate(**batch, **options)
    sync()
    return len(prompts) * new_tokens / (time.perf_counter() - started)


PARTS = ("train", "extract", "generate")


def json_text(value) -> str:
    """Strict JSON: NaN/inf become null, anything else unknown becomes its string."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
    return json.dumps(clean(value), indent=2, allow_nan=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama")
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per worker")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile our training step (train.compile)")
    parser.add_argument("--threads", type=at_least_one, default=1,
                        help="CPU only: torch threads of each worker (train.cpus_per_worker) and of the plain step, "
                             "so the two compare on the same cores")
    parser.add_argument("--plain-compile", action="store_true", help="also time a torch.compile'd plain step")
    parser.add_argument("--latents", type=at_least_one, default=4,
                        help="latent slots the LoRi step aligns (its first- and second-order terms need one)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--extract", type=int, default=512, help="examples for the extraction comparison")
    parser.add_argument("--generate", type=int, default=64, help="batch for the generation comparison")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--peak-size", type=int, default=8192 if CUDA else 1024)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--markdown", type=Path, help="also write the table, headed by the command, date, commit "
                        "and machine, to this markdown file")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        parser.error(f"--parts: choose from {','.join(PARTS)}")

    work = Path(tempfile.mkdtemp(prefix="lori-throughput-"))
    tokenizer = arithmetic_tokenizer()
    layout = Layout(tokenizer, add_latent_tokens(tokenizer, args.latents))
    special = {"pad_token_id": layout.pad, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": layout.eos}
    model = build_model(args.family, args.size, len(tokenizer), max(args.seq, 256), special)
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    per_token = flops_per_token(model, args.seq)
    layers = model.config.num_hidden_layers
    params = sum(p.numel() for p in model.parameters())
    del model
    batch = synthetic_batch(layout, args.batch, args.seq, args.latents, layers, args.rank)
    examples = generate_multiplication(max(args.extract, args.generate), 4, 4, seed=0)
    teacher_layout = Layout(arithmetic_tokenizer())

    peak = matmul_peak(args.peak_size)
    free_memory()
    device = (torch.cuda.get_device_name() if CUDA else
              f"CPU ({args.threads} thread{'s' if args.threads > 1 else ''} per step, of {torch.get_num_threads()})")
    tokens_per_step = args.batch * args.seq
    prompts = [teacher_layout.question(e) for e in examples[:args.generate]]
    sequences = [teacher_layout.teacher(e) for e in examples[:args.extract]]
    extract_tokens = sum(len(s.input_ids) for s in sequences)
    results, failed, done = {}, [], []

    def rows() -> dict:
        """The table rows so far (or all, once ``done``): key -> label, tokens/s, MFU, peak GB, ratio."""
        table = {}

        def row(key, label, tokens=None, mfu=None, memory=None, ratio=None, suffix="x"):
            if key in results or key in failed or done:
                table[key] = {"label": label, "tokens_per_s": tokens if key in results else None, "mfu": mfu,
                              "peak_gb": memory, "ratio": ratio, "ratio_suffix": suffix}

        plain = tokens_per_step / results["plain"][0] if "plain" in results else None
        if "train" in parts:
            row("plain", "plain PyTorch eager step (CE)", plain, plain and plain * per_token / peak,
                results.get("plain", (0, None))[1], 1.0)
            if args.plain_compile:
                compiled = tokens_per_step / results["plain_compiled"][0] if "plain_compiled" in results else None
                row("plain_compiled", "plain PyTorch step, torch.compile (CE)", compiled,
                    compiled and compiled * per_token / peak, results.get("plain_compiled", (0, None))[1],
                    compiled / plain if compiled and plain else None)
            ours = results["ours"]["steps_per_s"] * tokens_per_step * args.workers if "ours" in results else None
            row("ours", "Ray Train + DeepSpeed step (CE + LoRi)", ours,
                ours and ours * per_token / (peak * args.workers),
                results["ours"].get("peak_memory_gb", float("nan")) if "ours" in results else None,
                ours / (plain * args.workers) if ours and plain else None, "x per worker")
        if "extract" in parts:
            bare, pool = results.get("bare"), results.get("pool")
            row("bare", "bare teacher forward with hidden states", bare, ratio=1.0 if bare else None)
            row("pool", "trajectory extraction, actor pool (incl. start)", pool,
                ratio=pool / bare if pool and bare else None)
        if "generate" in parts:
            dynamic, static = results.get("dynamic"), results.get("static")
            row("dynamic", f"HF generate, batch {len(prompts)} (new tokens/s)", dynamic, ratio=1.0 if dynamic else None)
            row("static", "HF generate + static cache (new tokens/s)", static,
                ratio=static / dynamic if static and dynamic else None)
        return table

    def render(r: dict) -> str:
        if r["tokens_per_s"] is None:
            return f"| {r['label']} | failed | | | |"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else ""
        memory = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else ""
        ratio = f"{r['ratio']:.2f}{r['ratio_suffix']}" if r["ratio"] is not None else ""
        return f"| {r['label']} | {r['tokens_per_s']:,.0f} | {mfu} | {memory} | {ratio} |"

    def write_json() -> None:
        if not args.json:
            return
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json_text({
            "device": device, "family": args.family, "size": args.size, "parameters": params,
            "micro_batch": args.batch, "seq": args.seq, "steps": args.steps, "workers": args.workers,
            "zero": args.zero, "compile": args.compile, "dtype": "bf16" if CUDA else "fp32",
            "matmul_peak_flops": peak, "flops_per_token": per_token, "parts": sorted(parts),
            "complete": bool(done), "failed": failed,
            "rows": {k: {f: v for f, v in r.items() if f != "ratio_suffix"} for k, r in rows().items()},
            "ours_metrics": results.get("ours"),
        }))

    def measure(name: str, function):
        """Run one measurement; a failure is recorded (traceback on stderr), not raised. Each result is
        logged (and the JSON rewritten) at once, so a run cut off later keeps what it measured."""
        print(f"[throughput] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            results[name] = function()
        except Exception:  # noqa: BLE001 - one broken measurement must not hide the others
            failed.append(name)
            traceback.print_exc()
        finally:
            free_memory()
        line = render(rows()[name]) if name in rows() else ""
        print(f"[throughput] {name} {'failed' if name in failed else 'done'} in "
              f"{time.perf_counter() - started:.1f}s {line}", file=sys.stderr, flush=True)
        write_json()

    ray_started = False

    def start_ray():
        nonlocal ray_started
        from lori_ray.cluster import start_local
        if not ray_started:
            start_local(max(2, args.workers * args.threads), include_dashboard=False)
            ray_started = True

    def ours():
        start_ray()
        return our_training_step(work, model_dir, batch, args.steps, args.zero, args.workers, args.compile,
                                 args.threads)

    def pool():
        from lori_ray.teacher_pool import build_store
        start_ray()
        started = time.perf_counter()
        build_store(model_dir, examples[:args.extract], list(range(1, layers + 1)), args.rank, work / "store",
                    num_actors=1, batch_size=64, gpus_per_actor=1.0 if CUDA else 0.0, log=lambda _: None)
        return extract_tokens / (time.perf_counter() - started)

    if "train" in parts:
        measure("plain", lambda: plain_torch_step(model_dir, batch, args.steps, threads=args.threads))
        if args.plain_compile:
            measure("plain_compiled", lambda: plain_torch_step(model_dir, batch, args.steps, compile=True,
                                                                threads=args.threads))
        measure("ours", ours)
    if "extract" in parts:
        measure("pool", pool)
        measure("bare", lambda: bare_forward(model_dir, sequences, layout.pad, 64))
    if ray_started:
        import ray
        ray.shutdown()
    if "generate" in parts:
        measure("dynamic", lambda: generation(model_dir, prompts, layout.pad, layout.eos, args.new_tokens, None))
        measure("static", lambda: generation(model_dir, prompts, layout.pad, layout.eos, args.new_tokens, "static"))
    done.append(True)

    table = "\n".join([
        (f"device: {device}; model {args.family}/{args.size} ({params / 1e6:.1f}M parameters), "
         f"micro-batch {args.batch} x {args.seq} tokens, {args.workers} worker(s), ZeRO-{args.zero}"
         f"{', compiled' if args.compile else ''}, {'bf16' if CUDA else 'fp32'}; "
         f"matmul peak {peak / 1e12:.2f} TFLOP/s"),
        "", "| measurement | tokens/s | MFU | peak GPU GB | ratio |", "|---|---|---|---|---|",
        *(render(r) for r in rows().values())])
    print("\n" + table)
    if args.markdown:
        provenance.write_results(args.markdown, table)
    write_json()
    if failed:
        print(f"\nfailed: {', '.join(failed)} (tracebacks on stderr)")
        sys.exit(1)


if __name__ == "__main__":
    main()

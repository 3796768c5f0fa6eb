"""Accuracy of every method on one task under one budget, as one table.

    python bench/accuracy.py --config configs/accuracy-cpu.yaml [key=value ...] [--methods nocot icot_kd lori]

(overrides go before --methods, which takes several values)

The first method trains the teacher (explicit CoT) and builds the trajectory store; the others
reuse both, so every student gets the same teacher, data, steps and batch. Prints: method,
exact-match accuracy, generated tokens per answer, inference time and speedup over `explicit`;
writes the table to <output_dir>/<name>/accuracy.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lori_ray.cli import config_or_exit, configs_sharing_teacher, parser  # noqa: E402

METHODS = ("nocot", "icot_kd", "lori")


def main() -> int:
    arguments = parser(__doc__)
    arguments.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = arguments.parse_args()
    base = config_or_exit(args.config, args.overrides)
    configs = configs_sharing_teacher(args.config, {
        m: [*args.overrides, f"name={base.name}-{m}", f"student.method={m}"] for m in args.methods})

    from lori_ray.cluster import connect
    from lori_ray.pipeline import run_sharing_teacher

    connect(base)
    reports = run_sharing_teacher(configs)
    explicit = next(iter(reports.values())).teacher
    rows = [("explicit", explicit)] + [(m, r.student) for m, r in reports.items()]
    lines = [f"task: {base.data.task} {base.data.eval_file or base.data.digits}, {explicit.examples} held-out examples; "
             f"student budget {base.student.train.steps} steps x batch {base.student.train.batch_size}; "
             f"model {base.model.family}/{base.model.path or base.model.size}",
             "", "| method | accuracy | tokens/answer | inference s | speedup vs explicit |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r.accuracy:.3f} | {r.tokens_per_answer:.1f} | {r.seconds:.2f} | "
              f"{explicit.seconds / max(r.seconds, 1e-9):.2f}x |" for name, r in rows]
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    out = base.run_dir / "accuracy.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

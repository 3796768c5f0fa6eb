"""Every model family a preset builds, through the whole pipeline: one table.

    python bench/families.py --config configs/tiny.yaml [key=value ...] [--families llama gpt2 ...]

(overrides go before --families)

For each family: a random-weight model of the preset's size built from config, teacher SFT on two DeepSpeed
workers, the teacher actors' trajectory store, the student, held-out evaluation — on one local Ray cluster,
each family under its own run name (<name>-<family>). Prints per family: parameters, the teacher's and the
student's exact match and tokens per answer, and the run's wall time; writes <output_dir>/<name>/families.md.
The figures of a tiny budget say that every path runs, not how well a family learns.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lori_ray.cli import config_or_exit, inspected, parser, start, user_errors
from lori_ray.models import FAMILIES


def main() -> int:
    arguments = parser(__doc__)
    arguments.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    args = arguments.parse_args()
    base = config_or_exit(args.config, args.overrides)
    configs = {family: config_or_exit(args.config, [*args.overrides, f"model.family={family}",
                                                     f"name={base.name}-{family}"]) for family in args.families}
    if inspected(args, next(iter(configs.values()))):
        return 0

    from lori_ray.models import load_model
    from lori_ray.recipe import run

    start(args, list(configs.values()))
    lines = [(f"task: {base.data.task} {base.data.eval_file or base.data.digits}; model size {base.model.size}; "
              f"teacher {base.teacher.train.steps} steps, student ({base.student.method}) {base.student.train.steps} "
              f"steps x batch {base.student.train.batch_size}"), "",
             "| family | parameters | teacher (CoT) | student (no CoT) | tokens/answer teacher / student | run |",
             "|---|---|---|---|---|---|"]
    for family, config in configs.items():
        started = time.perf_counter()
        with user_errors():
            report = run(config)
        parameters = sum(p.numel() for p in load_model(config.run_dir / "teacher").parameters())
        lines.append(f"| {family} | {parameters:,} | {report.teacher.accuracy:.3f} | {report.student.accuracy:.3f} | "
                     f"{report.teacher.tokens_per_answer:.1f} / {report.student.tokens_per_answer:.1f} | "
                     f"{time.perf_counter() - started:.0f}s |")
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    base.run_dir.mkdir(parents=True, exist_ok=True)
    (base.run_dir / "families.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""RED: width-pruned students from `random` vs `activation` (channel-selection) projections, one table.

    python bench/red.py --config configs/red-cpu.yaml [key=value ...] [--widths 0.5 0.25] [--inits random activation]
        [--parallel 2]

(overrides go before --widths/--inits, which take several values)

The teacher (explicit CoT) is trained once, or taken from teacher.path; every student gets the same
data, steps, batch and loss (student.method and loss.* from the config). Prints per student: width,
init, exact-match accuracy, tokens per answer, inference time and speedup over the CoT teacher, and the
eRank of its hidden states (mean over layers) at init and after training, next to the teacher's; writes
the table and the per-layer eRank to <output_dir>/<name>/red.md and red.json. ``--full-width`` adds a
full-width student of the same method (student.kind=full) and the pruned ones' speedup over it: with an
implicit method (``student.method=lori``) the table shows what width reduction and skipping the CoT give
together.

red.md is headed by the command, date, commit and machine (``lori_ray.provenance``).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lori_ray import provenance
from lori_ray.cli import add_parallel, config_or_exit, configs_sharing_teacher, inspected, parser, start, user_errors
from lori_ray.config import PRUNED_INITS


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> int:
    arguments = parser(__doc__)
    arguments.add_argument("--widths", nargs="+", type=float, default=[0.5, 0.25],
                           help="student width as a fraction of the teacher's hidden size")
    arguments.add_argument("--inits", nargs="+", choices=PRUNED_INITS, default=["random", "activation"])
    arguments.add_argument("--full-width", action="store_true",
                           help="also a full-width student of the same method, and each one's speedup over it")
    add_parallel(arguments)
    args = arguments.parse_args()
    base = config_or_exit(args.config, args.overrides)
    if inspected(args, base):  # the first run's plan; every later one shares its teacher and data
        return 0

    from lori_ray.models import model_shape
    from lori_ray.recipe import run_sharing_teacher

    hidden, _ = model_shape(base.model.family, base.model.size, base.teacher.path or base.model.path)
    students = [(round(fraction * hidden), init) for fraction in args.widths for init in args.inits]
    runs = {(width, init): [*args.overrides, f"name={base.name}-w{width}-{init}", "student.kind=pruned",
                            f"student.width={width}", f"student.init={init}"] for width, init in students}
    if args.full_width:  # the teacher's shape and weights, the same method and budget
        runs[(hidden, "teacher")] = [*args.overrides, f"name={base.name}-full", "student.kind=full",
                                     "student.init=teacher", "student.width=null", "student.depth=null"]
    configs = configs_sharing_teacher(args.config, runs)

    start(args, list(configs.values()))
    with user_errors():
        reports = run_sharing_teacher(configs, args.parallel)
    teacher_result = next(iter(reports.values())).teacher
    teacher_erank = next(iter(reports.values())).erank["teacher"]
    lines = [(f"task: {base.data.task} {base.data.eval_file or base.data.digits}, {teacher_result.examples} held-out "
              f"examples; student method {base.student.method}, {base.student.train.steps} steps x batch "
              f"{base.student.train.batch_size}, loss ce={base.loss.ce} kd={base.loss.kd}; teacher "
              f"{base.model.family}/{base.model.path or base.model.size} (hidden {hidden})"), "",
             ("| student | init | accuracy | tokens/answer | inference s | speedup over the teacher | speedup over the "
              "full-width student | eRank at init | eRank trained |"), "|---|---|---|---|---|---|---|---|---|",
             (f"| teacher ({hidden}) | - | {teacher_result.accuracy:.3f} | {teacher_result.tokens_per_answer:.1f} | "
              f"{teacher_result.seconds:.2f} | 1.00x | - | {mean(teacher_erank):.2f} | {mean(teacher_erank):.2f} |")]
    full = reports.get((hidden, "teacher"))
    for (width, init), report in reports.items():
        r = report.student
        over_full = f"{full.student.seconds / max(r.seconds, 1e-9):.2f}x" if full else "-"
        lines.append(f"| width {width} | {init} | {r.accuracy:.3f} | {r.tokens_per_answer:.1f} | {r.seconds:.2f} | "
                     f"{teacher_result.seconds / max(r.seconds, 1e-9):.2f}x | {over_full} | "
                     f"{mean(report.erank['student init']):.2f} | {mean(report.erank['student trained']):.2f} |")
    lines.append("\neRank: mean over layers (embedding output included) of exp(entropy of the normalised singular "
                 f"values) of centred hidden states on {base.student.calibration_size} training examples.")
    table = provenance.header() + "\n".join(lines)
    print("\n" + table, flush=True)
    out = base.run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "red.md").write_text(table + "\n")
    (out / "red.json").write_text(json.dumps(
        {f"w{width}-{init}": {"accuracy": report.student.accuracy, "seconds": report.student.seconds, **report.erank}
         for (width, init), report in reports.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy of every method on one task under one budget, over several student seeds, as one table.

    python bench/accuracy.py --config configs/implicit-3x3.yaml [key=value ...] [--methods nocot lori] [--seeds 3]

(overrides go before --methods, which takes several values)

The first run trains the teacher (explicit CoT) and builds the trajectory store; every other run
reuses both, so every student gets the same teacher, data, steps and batch; seeds differ in the
student's batch order and fresh weights (``student.seed``). Prints per method: held-out exact match
(mean ± std over seeds, and each seed), exact match on as many training problems (memorisation
shows as a gap), per-digit accuracy, generated tokens per answer, inference time and speedup over
the CoT teacher. Writes <output_dir>/<name>/accuracy.md (headed by the command, date, commit and machine:
``lori_ray.provenance``) and curves.png (validation exact match
against steps and minutes, one line per seed), and logs both to MLflow (run <name>-benchmark).
"""

import statistics
import sys
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lori_ray import provenance
from lori_ray.cli import (
    add_parallel,
    at_least_one,
    config_or_exit,
    configs_sharing_teacher,
    inspected,
    parser,
    start,
    user_errors,
)
from lori_ray.config import Method

# every student method that answers without a CoT (``explicit`` writes one)
METHODS = tuple(m for m in get_args(Method) if m != "explicit")


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def table(base, reports: dict[tuple[str, int], object]) -> str:
    """Markdown: the teacher, then one row per method aggregated over its seeds."""
    from lori_ray.evaluate import format_digits  # torch: imported once the config is known to be valid
    teacher = next(iter(reports.values())).teacher
    methods = dict.fromkeys(method for method, _ in reports)
    lines = [(f"task: {base.data.task} {base.data.eval_file or base.data.digits}, {teacher.examples} held-out "
              f"problems, {base.data.train_size} training problems; student budget {base.student.train.steps} "
              f"steps x batch {base.student.train.batch_size}; model {base.model.family}/"
              f"{base.model.path or base.model.size}" + (f"; separate student {base.student.path}"
                                                          if base.student.path else "")),
             "", ("| method | held-out exact match (mean ± std) | per seed | training problems | per-digit accuracy "
                  "| tokens/answer | inference s | speedup |"), "|---|---|---|---|---|---|---|---|",
             (f"| explicit CoT teacher | {teacher.accuracy:.3f} | – | – | "
              f"{format_digits(teacher.digit_accuracy)} | {teacher.tokens_per_answer:.1f} | "
              f"{teacher.seconds:.2f} | 1.00x |")]
    for method in methods:
        runs = [r for (m, _), r in reports.items() if m == method]
        held_out = [r.student.accuracy for r in runs]
        train = [r.student_train.accuracy for r in runs if r.student_train]
        digits = [statistics.mean(d) for d in zip(*(r.student.digit_accuracy for r in runs), strict=False)]
        seconds = statistics.mean(r.student.seconds for r in runs)
        lines.append(f"| {method} | {mean_std(held_out)} | {', '.join(f'{v:.3f}' for v in held_out)} | "
                     f"{mean_std(train) if train else '–'} | {format_digits(digits)} | "
                     f"{statistics.mean(r.student.tokens_per_answer for r in runs):.1f} | {seconds:.2f} | "
                     f"{teacher.seconds / max(seconds, 1e-9):.2f}x |")
    return "\n".join(lines)


def milestone(curve: list[tuple[int, float, float]], threshold: float) -> str:
    """The first (step, minutes, value) point of ``curve`` at or above ``threshold``, as a table cell."""
    hit = next(((step, minutes) for step, minutes, value in curve if value >= threshold), None)
    return f"step {hit[0]:,} ({hit[1]:.1f} min)" if hit else "not reached"


def milestones(curves: dict[tuple[str, int], list[tuple[int, float, float]]], thresholds=(0.5, 0.9)) -> str:
    """Markdown: for each (method, seed) validation curve of (step, minutes since its stage began, exact match),
    the first point at or above each threshold, and where the curve ended."""
    lines = ["| method | seed | " + " | ".join(f"reaches {t:g}" for t in thresholds) + " | last validation |",
             "|---|---|" + "---|" * (len(thresholds) + 1)]
    for (method, seed), curve in curves.items():
        cells = [milestone(curve, threshold) for threshold in thresholds]
        last = f"{curve[-1][2]:.3f} at step {curve[-1][0]:,} ({curve[-1][1]:.1f} min)" if curve else "–"
        lines.append(f"| {method} | {seed} | {' | '.join(cells)} | {last} |")
    return "\n".join(lines)


def main() -> int:
    arguments = parser(__doc__)
    arguments.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    arguments.add_argument("--seeds", type=at_least_one, default=1,
                           help="student seeds per method: student.seed, student.seed + 1, ... "
                                "(run names end -s<seed>)")
    add_parallel(arguments)
    args = arguments.parse_args()
    base = config_or_exit(args.config, args.overrides)
    if inspected(args, base):  # the first run's plan; every later one shares its teacher and data
        return 0
    seeds = [base.student_seed + i for i in range(args.seeds)]
    runs = {(m, seed): [*args.overrides, f"name={base.name}-{m}" + (f"-s{seed}" if args.seeds > 1 else ""),
                        f"student.method={m}", f"student.seed={seed}"]
            for m in args.methods for seed in seeds}
    configs = configs_sharing_teacher(args.config, runs)

    import mlflow

    from lori_ray.plots import curves_figure
    from lori_ray.recipe import RunsFailed, run_sharing_teacher
    from lori_ray.tracking import end_run, stage_history, tracked, without_credentials

    start(args, list(configs.values()))
    with user_errors():
        try:
            reports, failed = run_sharing_teacher(configs, args.parallel), None
        except RunsFailed as error:  # parallel runs: the table of those that finished, then exit 1
            reports, failed = error.reports, error
            if not reports:
                raise
    first = next(iter(configs.values()))
    # the curves come from MLflow: a server gone away gives the table without them
    histories = {key: tracked(stage_history, first.tracking_uri(), config.tracking.experiment, config.name, "student",
                              "val_accuracy") or [] for key, config in configs.items()}
    text = provenance.header() + table(base, reports) + "\n\nValidation exact match while training (minutes since " \
        "each student's stage began):\n\n" + milestones(histories)
    print("\n" + text, flush=True)
    curves = {}
    for (method, _), history in histories.items():
        curves.setdefault(method, []).append(history)
    figure = curves_figure(curves)
    out = base.run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text(text + "\n")
    figure.savefig(out / "curves.png", dpi=120)
    mlflow.set_tracking_uri(without_credentials(first.tracking_uri()))
    if tracked(mlflow.set_experiment, first.tracking.experiment) and \
            tracked(mlflow.start_run, run_name=f"{base.name}-benchmark"):
        tracked(mlflow.log_text, text, "accuracy.md")
        tracked(mlflow.log_figure, figure, "curves.png")
        for method, seeds in curves.items():
            for i, curve in enumerate(seeds):
                for step, _, value in curve:
                    tracked(mlflow.log_metric, f"{method}_s{i}_val_accuracy", value, step=step)
        end_run()
    if tracked.summary():
        print(tracked.summary(), file=sys.stderr, flush=True)
    print(f"table: {out / 'accuracy.md'}\ncurves: {out / 'curves.png'}", flush=True)
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the CoT teacher converge on every seed? One teacher per seed, trained alone, as one table.

    python bench/teachers.py --config configs/implicit-4x4.yaml [key=value ...] [--seeds 3] [--parallel 2]

Seed s is run <name>-teacher-s<s> with ``seed=s``: the model's initial weights, the generated problems, the
validation split carved from them and the batch order all change with it. Prints per seed: validation exact
match (every CoT and answer token the argmax given the gold prefix, which is greedy generation's exact match) at
each evaluation, the first step and minute at or above the target (``teacher.train.until_val``, else 0.99), and
the held-out exact match of the teacher writing its own CoT. Finished teachers are found on disk and not trained
again, and a stage with ``train.checkpoint_minutes`` resumes, so a stopped benchmark continues when run again.
Writes <output_dir>/<name>-teachers.md, headed by the command, date, commit and machine.
"""

import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accuracy import mean_std, milestone  # bench/, the script's own folder

from lori_ray import provenance
from lori_ray.cli import at_least_one, config_or_exit, inspected, parser, start, user_errors


def teacher_and_held_out(config):
    """Train (or find) the teacher of ``config`` and its held-out result, evaluated once per teacher."""
    import mlflow

    from lori_ray.driver import DRIVER_TURNS
    from lori_ray.evaluate import EvalResult
    from lori_ray.fingerprint import FINGERPRINT_FILE, digest
    from lori_ray.recipe import opened
    from lori_ray.stages import log
    from lori_ray.stages.evaluate import evaluate_model
    from lori_ray.stages.teacher_sft import teacher_sft
    from lori_ray.storage import write_local
    from lori_ray.tracking import stage_run, tracked

    with DRIVER_TURNS.turn(), opened(config) as (splits, _parent):
        teacher_dir = teacher_sft(config, splits)
        inputs = hashlib.sha256(json.dumps([digest(teacher_dir / FINGERPRINT_FILE),
                                            [e.to_line() for e in splits.held_out],
                                            config.eval.model_dump()]).encode()).hexdigest()
        saved_path = config.run_dir / "teacher-held-out.json"
        saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
        if saved.get("inputs") == inputs:
            log(f"[eval] {config.name}: teacher evaluated before on the same problems, from {saved_path}")
            result = EvalResult.from_dict(saved["result"])
        else:
            with stage_run("evaluate"):
                result = evaluate_model(config, teacher_dir, {"held-out": splits.held_out}, slots=None)["held-out"]
                tracked(mlflow.log_metrics, result.as_metrics("teacher"))
            write_local(saved_path, json.dumps({"inputs": inputs, "result": vars(result)}, indent=1))
    return result


def main() -> int:
    arguments = parser(__doc__)
    arguments.add_argument("--seeds", type=at_least_one, default=3, help="teachers: seed, seed + 1, ...")
    arguments.add_argument("--parallel", type=at_least_one, default=1,
                           help="teachers trained at once (each stage must fit the cluster beside the others: "
                                "teacher.train.num_workers)")
    args = arguments.parse_args()
    base = config_or_exit(args.config, args.overrides)
    if inspected(args, base):
        return 0
    seeds = [base.seed + i for i in range(args.seeds)]
    configs = {seed: config_or_exit(args.config, [*args.overrides, f"name={base.name}-teacher-s{seed}",
                                                  f"seed={seed}"]) for seed in seeds}
    first = configs[seeds[0]]
    for config in configs.values():  # one MLflow store compares them all: the first run's
        config.tracking.uri = config.tracking.uri or first.tracking_uri()

    from lori_ray.evaluate import format_digits
    from lori_ray.tracking import stage_history

    start(args, list(configs.values()))
    with user_errors(), ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = dict(zip(seeds, pool.map(teacher_and_held_out, configs.values()), strict=True))
    target = base.teacher.train.until_val or 0.99
    curves = {seed: stage_history(first.tracking_uri(), config.tracking.experiment, config.name, "teacher",
                                  "val_accuracy") for seed, config in configs.items()}
    steps = sorted({step for curve in curves.values() for step, _, _ in curve})
    held_out = [r.accuracy for r in results.values()]
    lines = [(f"task: {base.data.task} {base.data.eval_file or base.data.digits}, "
              f"{next(iter(results.values())).examples} held-out problems, {base.data.train_size} training problems; "
              f"teacher {base.model.family}/{base.model.path or base.model.size}, "
              f"lr {base.teacher.train.lr:g}, warmup {base.teacher.train.warmup},"
              f" batch {base.teacher.train.batch_size}, at most {base.teacher.train.steps} steps; held-out "
              f"{mean_std(held_out)} over {len(seeds)} seeds"), "",
             (f"| seed | reaches {target:g} | last validation | held-out exact match | tokens/answer "
              "| per-digit accuracy |"),
             "|---|---|---|---|---|---|"]
    for seed, result in results.items():
        curve = curves[seed]
        last = f"{curve[-1][2]:.3f} at step {curve[-1][0]:,}" if curve else "–"
        lines.append(f"| {seed} | {milestone(curve, target)} | {last} | {result.accuracy:.3f} | "
                     f"{result.tokens_per_answer:.1f} | {format_digits(result.digit_accuracy)} |")
    lines += ["", "Validation exact match (CoT and answer) at each evaluation:", "",
              "| step | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for step in steps:
        cells = [next((f"{value:.3f}" for s, _, value in curves[seed] if s == step), "") for seed in seeds]
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    text = provenance.header() + "\n".join(lines)
    print("\n" + text, flush=True)
    path = Path(base.output_dir) / f"{base.name}-teachers.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A separate student of another width and depth than the teacher, distilled with LoRi against ``nocot`` at the
same budget: the student is built from a size preset with the teacher's tokenizer (random weights, seeded), saved
as an HF directory, and given to ``bench/accuracy.py`` as ``student.path``.

    python bench/separate_student.py --config configs/demo.yaml [key=value ...] [--size tiny] [--family llama]
        [--methods lori nocot] [--seeds 1] [--parallel 2]

(overrides go before the flags; the teacher is the config's: a preset, or teacher.path/model.path; other flags
go to bench/accuracy.py. The student's directory is written first, under output_dir.)
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lori_ray.cli import config_or_exit


def main() -> int:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    arguments.add_argument("--config", required=True)
    arguments.add_argument("overrides", nargs="*")
    arguments.add_argument("--size", default="tiny", help="the separate student's size preset (models.SIZES)")
    arguments.add_argument("--family", default="llama")
    arguments.add_argument("--methods", nargs="+", default=["lori", "nocot"])
    arguments.add_argument("--seeds", default="1")
    arguments.add_argument("--parallel", default="1")
    args, passed_on = arguments.parse_known_args()  # e.g. --dry-run, --restart-from: accuracy.py's
    base = config_or_exit(args.config, args.overrides)

    from lori_ray.models import build_model
    from lori_ray.tokens import arithmetic_tokenizer, load_tokenizer
    source = base.teacher.path or base.model.path
    tokenizer = load_tokenizer(source, base.model.trust_remote_code) if source else arithmetic_tokenizer()
    student = Path(base.output_dir).resolve() / f"separate-student-{args.family}-{args.size}"
    if not (student / "config.json").is_file():
        special = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
        build_model(args.family, args.size, len(tokenizer), base.model.max_positions, special,
                    seed=base.seed + 11).save_pretrained(student)
        tokenizer.save_pretrained(student)
    print(f"[bench] separate student ({args.family}/{args.size}) at {student}", flush=True)
    command = [sys.executable, str(Path(__file__).with_name("accuracy.py")), "--config", args.config,
               *args.overrides, f"student.path={student}", "--methods", *args.methods, "--seeds", args.seeds,
               "--parallel", args.parallel, *passed_on]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    sys.exit(main())

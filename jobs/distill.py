"""Run the whole distillation pipeline: ``python jobs/distill.py --config configs/demo.yaml [a.b=value ...]``.

Works directly (starts a local Ray) and under ``ray job submit`` (joins the job's cluster).
The config is validated before Ray starts.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lori_ray.cli import config_or_exit, inspected, parser, start, user_errors


def main() -> int:
    args = parser(__doc__).parse_args()
    config = config_or_exit(args.config, args.overrides)
    if inspected(args, config):
        return 0

    from lori_ray.recipe import run

    start(args, [config])
    with user_errors():
        report = run(config)
    print("\n" + report.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the whole distillation pipeline: ``python jobs/distill.py --config configs/demo.yaml [a.b=value ...]``.

Works directly (starts a local Ray) and under ``ray job submit`` (joins the job's cluster).
The config is validated before Ray starts.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lori_ray.config import ConfigError, check_rerun, load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.overrides)
        check_rerun(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from lori_ray.cluster import connect
    from lori_ray.pipeline import run

    connect(config)
    report = run(config)
    print("\n" + report.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

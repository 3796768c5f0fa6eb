"""Ray Tune search over the LoRi hyperparameters: ``python jobs/tune.py --config configs/tune-demo.yaml``.

The teacher and the trajectory store are built once; every trial reads them. Rerunning the same
command continues an interrupted search.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lori_ray.config import ConfigError, check_rerun, load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML preset with a tune.space section")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.overrides)
        if not config.tune.space:
            raise ConfigError("tune.space: empty; name at least one field to search")
        if config.tune.search == "optuna" and importlib.util.find_spec("optuna") is None:
            raise ConfigError("tune.search: 'optuna' needs the optuna package (pip install optuna)")
        check_rerun(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from lori_ray.cluster import connect
    from lori_ray.tuning import run_search

    connect(config)
    run_search(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

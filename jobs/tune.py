"""Ray Tune search over the LoRi hyperparameters: ``python jobs/tune.py --config configs/tune-demo.yaml``.

The teacher and the trajectory store are built once; every trial reads them. Rerunning the same
command continues an interrupted search.
"""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lori_ray.cli import config_or_exit, inspected, parser, start, user_errors
from lori_ray.config import ConfigError


def searchable(config) -> None:
    if not config.tune.space:
        raise ConfigError("tune.space: empty; name at least one field to search")
    if config.tune.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("tune.search: 'optuna' needs the optuna package (pip install optuna)")


def main() -> int:
    args = parser(__doc__).parse_args()
    config = config_or_exit(args.config, args.overrides, searchable)
    if inspected(args, config):
        return 0

    from lori_ray.tuning import run_search

    start(args, [config])
    with user_errors():
        run_search(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

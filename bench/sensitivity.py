"""LoRi's sensitivity to its rank, loss weights and alignment site: Ray Tune grids over one teacher and store.

    python bench/sensitivity.py --config configs/implicit-3x3.yaml [key=value ...] [--ranks 1 2 4 8 16]
        [--sites latents answer both] [--first-order 0 0.3 1 3] [--second-order 0 0.03 0.1 0.3]
        [--answer 0 0.5 2] [--seeds 2]

(overrides go before the flags that take several values)

Four searches, each a Tune grid of single-worker trials (every trial runs to the end: FIFO, no early stopping;
``student.train.num_workers=1`` so that a 2-core machine runs two trials at once):

- ``rank``: subspace rank × alignment site (``loss.align_at``) × seed, the loss weights at the preset's values;
- ``first_order``, ``second_order``, ``answer``: one weight varied at a time (λ1, λ2, λ_answer), the rank and
  site at the preset's, × seed.

The teacher is trained and the trajectory store built once (coordinates at the largest rank) by the first
search; the others reuse both. Every finished trial's student is scored on the held-out split, which no choice
in the search reads (the searches compare validation exact match carved from the training data). Each search is
its own MLflow parent run with one nested run per trial (parameters under their config keys, ``val_accuracy``
and ``held_out_accuracy`` as metrics: MLflow's parallel-coordinates view compares them). Writes
``<output_dir>/<name>/sensitivity.md`` (command, date, commit, machine; one table per search, mean ± std over
seeds) and ``sensitivity.png`` (held-out accuracy against rank, one line per site). A stopped study continues
when the same command is run again: finished searches and trials are read back, not retrained.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accuracy import mean_std  # bench/, the script's own folder

from lori_ray.cli import at_least_one, config_or_exit, inspected, parser, start, user_errors
from lori_ray.config import Config, with_overrides

WEIGHTS = {"first_order": "loss.first_order", "second_order": "loss.second_order", "answer": "loss.answer"}


def search_configs(base: Config, args: argparse.Namespace) -> dict[str, Config]:
    """One config per search, named ``<name>-<search>``, sharing the base's teacher, data and store."""
    seeds = {"student.seed": {"grid": [base.student_seed + i for i in range(args.seeds)]}}
    # coordinates stored at the largest rank any search uses (the weight searches keep the preset's rank)
    common = {"subspace.max_rank": max(*args.ranks, base.subspace.rank), "student.train.num_workers": 1,
              "tune.scheduler": "fifo", "tune.num_samples": 1, "tune.evaluate": "all"}
    spaces = {"rank": {"subspace.rank": {"grid": args.ranks}, "loss.align_at": {"grid": args.sites}, **seeds}}
    for search, key in WEIGHTS.items():
        spaces[search] = {key: {"grid": getattr(args, search)}, **seeds}
    return {search: with_overrides(base, {**common, "name": f"{base.name}-{search}", "tune.space": space})
            for search, space in spaces.items()}


def grouped(rows: list[dict], keys: list[str]) -> dict[tuple, list[float]]:
    """Held-out accuracy of every evaluated trial, grouped by its values of ``keys`` (seeds pooled)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if "held_out" in row:
            groups.setdefault(tuple(row["params"][k] for k in keys), []).append(row["held_out"])
    return dict(sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))))


def search_table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " | held-out exact match (mean ± std) | per seed |",
             "|---" * (len(keys) + 2) + "|"]
    for values, accuracies in grouped(rows, keys).items():
        lines.append("| " + " | ".join(map(str, values)) + f" | {mean_std(accuracies)} | "
                     + ", ".join(f"{a:.3f}" for a in accuracies) + " |")
    return "\n".join(lines)


def rank_figure(rows: list[dict]):
    from matplotlib.figure import Figure
    figure = Figure(figsize=(5.5, 4))
    axes = figure.subplots()
    by_site: dict[str, list[tuple[int, list[float]]]] = {}
    for (rank, site), accuracies in grouped(rows, ["subspace.rank", "loss.align_at"]).items():
        by_site.setdefault(site, []).append((rank, accuracies))
    for site, points in sorted(by_site.items()):
        points.sort()
        axes.errorbar([r for r, _ in points], [statistics.mean(a) for _, a in points],
                      yerr=[statistics.stdev(a) if len(a) > 1 else 0.0 for _, a in points], marker="o", capsize=3,
                      label=f"align_at: {site}")
    axes.set(xscale="log", xlabel="subspace rank r", ylabel="held-out exact match", ylim=(-0.02, 1.02),
             title="LoRi sensitivity to rank")
    axes.legend()
    return figure


def main() -> int:
    arguments = parser(__doc__)
    arguments.add_argument("--ranks", nargs="+", type=at_least_one, default=[1, 2, 4, 8, 16])
    arguments.add_argument("--sites", nargs="+", choices=("latents", "answer", "both"),
                           default=["latents", "answer", "both"])
    arguments.add_argument("--first-order", nargs="+", type=float, default=[0.0, 0.3, 1.0, 3.0])
    arguments.add_argument("--second-order", nargs="+", type=float, default=[0.0, 0.03, 0.1, 0.3])
    arguments.add_argument("--answer", nargs="+", type=float, default=[0.0, 0.5, 2.0])
    arguments.add_argument("--seeds", type=at_least_one, default=2, help="student seeds per setting")
    args = arguments.parse_args()
    # every search's config and grid values validated before Ray starts: a bad one exits 2 naming the field
    base = config_or_exit(args.config, args.overrides, lambda config: search_configs(config, args))
    searches = search_configs(base, args)
    if inspected(args, base):
        if args.dry_run:  # the size of each search, to fit the study to a machine before it starts
            from lori_ray.preflight import search_line
            print("\n".join(search_line(config) for config in searches.values()))
            print(f"in all: {sum(c.tune.trials for c in searches.values())} trials, "
                  f"{sum(c.tune.trials * c.student.train.steps for c in searches.values()):,} student steps")
        return 0

    from lori_ray.tuning import run_search

    first, *_ = searches.values()
    start(args, [first])
    results = {}
    with user_errors():
        for search, config in searches.items():
            if search != "rank":  # the first search trained the teacher
                config = with_overrides(config, {"teacher.path": str(first.run_dir / "teacher")})
            results[search] = run_search(config)["rows"]

    from lori_ray.provenance import header

    sections = [f"## rank × alignment site\n\n{search_table(results['rank'], ['subspace.rank', 'loss.align_at'])}"]
    sections += [f"## {key} (the others at the preset's values)\n\n{search_table(results[search], [key])}"
                 for search, key in WEIGHTS.items()]
    text = header() + "\n\n".join(sections) + "\n"
    print("\n" + text, flush=True)
    out = base.run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.md").write_text(text)
    rank_figure(results["rank"]).savefig(out / "sensitivity.png", dpi=120)
    print(f"[sensitivity] {out / 'sensitivity.md'}, {out / 'sensitivity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/sensitivity.py's searches, tables and figure, and the ``grid`` kind of a Tune search space."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from lori_ray.config import ConfigError, load_config
from lori_ray.tuning import search_space, summary_table

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # as when it runs as a script: it shares bench/accuracy.py's helpers
spec = importlib.util.spec_from_file_location("sensitivity", ROOT / "bench/sensitivity.py")
sensitivity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sensitivity)


def arguments(**changes) -> argparse.Namespace:
    values = {"ranks": [1, 4, 16], "sites": ["latents", "both"], "first_order": [0.0, 1.0], "second_order": [0.1],
              "answer": [0.0, 0.5], "seeds": 2}
    return argparse.Namespace(**{**values, **changes})


def test_grid_is_every_value_and_validated():
    assert search_space({"subspace.rank": {"grid": [1, 2]}})["subspace.rank"] == {"grid_search": [1, 2]}
    with pytest.raises(ConfigError, match=r"tune.space.subspace.rank: value 99 is invalid"):
        load_config(ROOT / "configs/tune-demo.yaml", ['tune.space={"subspace.rank": {"grid": [2, 99]}}'])
    with pytest.raises(ConfigError, match=r"tune.space: loss.ce: grid needs at least one value"):
        load_config(ROOT / "configs/tune-demo.yaml", ['tune.space={"loss.ce": {"grid": []}}'])


def test_trial_count_is_samples_times_grid_combinations(tmp_path):
    base = load_config(ROOT / "configs/implicit-3x3.yaml", [f"output_dir={tmp_path}"])
    searches = sensitivity.search_configs(base, arguments())
    assert searches["rank"].tune.trials == 3 * 2 * 2 and searches["second_order"].tune.trials == 1 * 2
    assert load_config(ROOT / "configs/tune-demo.yaml").tune.trials == 3
    random = load_config(ROOT / "configs/tune-demo.yaml", ["tune.num_samples=4",
                                                           'tune.space={"subspace.rank": {"choice": [2, 4]}}'])
    assert random.tune.trials == 4


def test_dry_run_sizes_every_search_and_writes_nothing(tmp_path):
    """A study is fitted to a machine before it starts: the dry run names each search's trials and steps."""
    result = subprocess.run([sys.executable, "bench/sensitivity.py", "--config", "configs/implicit-3x3.yaml",
                             f"output_dir={tmp_path}", "student.train.steps=500", "--ranks", "1", "4", "--sites",
                             "answer", "both", "--first-order", "0", "3", "--second-order", "0.1", "--answer", "0.5",
                             "--seeds", "2", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    (rank,) = [line for line in lines if line.startswith("search 'implicit-3x3-rank': ")]
    assert rank.startswith("search 'implicit-3x3-rank': 8 trials (subspace.rank [1, 4]; loss.align_at ['answer', "
                           "'both']; student.seed [0, 1]), 1 worker(s) per trial, 500 steps each (every trial runs "
                           "to its end): up to 4,000 student steps in all")
    assert any(line.startswith("search 'implicit-3x3-first_order': 4 trials (loss.first_order [0.0, 3.0]; "
                               "student.seed [0, 1])") for line in lines)
    assert lines[-1] == "in all: 16 trials, 8,000 student steps"  # 8 + 4 + 2 + 2
    assert not any(tmp_path.iterdir())


def test_searches_share_teacher_data_and_store_and_vary_one_thing_each(tmp_path):
    base = load_config(ROOT / "configs/implicit-3x3.yaml", [f"output_dir={tmp_path}", "student.seed=5"])
    searches = sensitivity.search_configs(base, arguments())
    assert list(searches) == ["rank", "first_order", "second_order", "answer"]
    seeds = {"grid": [5, 6]}
    assert searches["rank"].tune.space == {"subspace.rank": {"grid": [1, 4, 16]},
                                           "loss.align_at": {"grid": ["latents", "both"]}, "student.seed": seeds}
    assert searches["answer"].tune.space == {"loss.answer": {"grid": [0.0, 0.5]}, "student.seed": seeds}
    for name, config in searches.items():
        assert config.name == f"implicit-3x3-{name}"
        # coordinates stored at the largest rank: one store serves every rank of every search
        assert config.subspace.max_rank == 16 and config.store_dir == searches["rank"].store_dir
        assert config.student.train.num_workers == 1 and config.tune.scheduler == "fifo"
        assert config.tune.evaluate == "all" and config.tune.num_samples == 1
        assert config.data == base.data and config.teacher == base.teacher


def test_a_rank_larger_than_the_model_is_refused_before_ray(tmp_path):
    base = load_config(ROOT / "configs/implicit-3x3.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="max_rank"):
        sensitivity.search_configs(base, arguments(ranks=[1, 4096]))
    result = subprocess.run([sys.executable, "bench/sensitivity.py", "--config", "configs/implicit-3x3.yaml",
                             f"output_dir={tmp_path}", "--ranks", "1", "4096", "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: subspace.max_rank: 4096 is larger than the "
                                                              "hidden size (128)")


def test_ranks_below_the_presets_keep_its_rank_storable(tmp_path):
    """The weight searches train at the preset's rank (8): the store must hold it although --ranks stop at 2."""
    base = load_config(ROOT / "configs/implicit-3x3.yaml", [f"output_dir={tmp_path}"])
    searches = sensitivity.search_configs(base, arguments(ranks=[1, 2]))
    assert {config.subspace.max_rank for config in searches.values()} == {8}
    assert searches["answer"].subspace.rank == 8


def row(trial, rank, site, seed, held_out=None, checkpoint="ck"):
    row = {"trial": trial, "params": {"subspace.rank": rank, "loss.align_at": site, "student.seed": seed},
           "metric": 0.5, "checkpoint": checkpoint}
    return row if held_out is None else {**row, "held_out": held_out}


def test_tables_pool_seeds_and_skip_trials_without_a_held_out_score():
    rows = [row("a", 1, "both", 0, 0.5), row("b", 1, "both", 1, 0.7), row("c", 4, "both", 0, 1.0),
            row("d", 4, "latents", 0, checkpoint=None)]
    table = sensitivity.search_table(rows, ["subspace.rank", "loss.align_at"])
    assert "| 1 | both | 0.600 ± 0.141 | 0.500, 0.700 |" in table
    assert "| 4 | both | 1.000 ± 0.000 | 1.000 |" in table
    assert "latents" not in table  # stopped, never scored
    summary = summary_table(rows, ["subspace.rank", "loss.align_at"], "val_accuracy")
    assert "| d | 4 | latents | 0.5000 | stopped | – |" in summary
    assert "| a | 1 | both | 0.5000 | yes | 0.500 |" in summary


def test_rank_figure_has_a_line_per_site():
    rows = [row("a", 1, "both", 0, 0.5), row("b", 4, "both", 0, 0.9), row("c", 1, "answer", 0, 0.1),
            row("d", 4, "answer", 0, 0.2)]
    axes = sensitivity.rank_figure(rows).axes[0]
    labels = sorted(text.get_text() for text in axes.get_legend().get_texts())
    assert labels == ["align_at: answer", "align_at: both"]

"""A Tune search's configuration, without a cluster: search spaces from YAML, their errors naming the field, and a
trial's config. The search itself runs in ``tests/cluster/test_tuning.py``."""

from pathlib import Path

import pytest
from ray import tune

from lori_ray.config import ConfigError, load_config
from lori_ray.models import build_model
from lori_ray.preflight import search_line
from lori_ray.tokens import arithmetic_tokenizer
from lori_ray.tuning import search_space, trial_config

ROOT = Path(__file__).resolve().parents[2]


def test_search_space_maps_yaml_to_tune_distributions():
    space = search_space({"subspace.rank": {"choice": [2, 4]}, "loss.first_order": {"loguniform": [0.1, 10.0]},
                          "loss.second_order": {"uniform": [0.0, 1.0]}, "student.latent_slots": {"randint": [1, 3]}})
    assert isinstance(space["subspace.rank"], tune.search.sample.Categorical)
    assert space["loss.first_order"].lower == 0.1 and space["loss.first_order"].upper == 10.0
    assert isinstance(space["student.latent_slots"], tune.search.sample.Integer)


@pytest.mark.parametrize("override, message", [
    ('tune.space={"subspace.rank": {"choice": [4, 99]}}', r"tune.space.subspace.rank: value 99 is invalid"),
    ('tune.space={"loss.fourth_order": {"choice": [1]}}', r"tune.space.loss.fourth_order: .*Extra inputs"),
    ('tune.space={"loss.ce": {"normal": [0, 1]}}', r"tune.space: loss.ce needs exactly one of"),
    ('tune.space={"loss.ce": {"uniform": [0]}}', r"tune.space: loss.ce: uniform takes \[low, high\]"),
    ('tune.space={"loss.layers": {"choice": [[1], [7]]}}', r"tune.space.loss.layers: value \[7\] is invalid"),
])
def test_bad_search_space_names_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tune-demo.yaml", [override])


def test_trial_config_applies_params_and_shares_teacher_and_store(tmp_path):
    config = load_config(ROOT / "configs/tune-demo.yaml", [f"output_dir={tmp_path}"])
    teacher = tmp_path / "teacher"
    # validation reads the shape and vocabulary, and refuses a directory without safetensors weights
    build_model("llama", "small", 20, 64, {}).save_pretrained(teacher)
    arithmetic_tokenizer().save_pretrained(teacher)
    settings = trial_config(config, {"subspace.rank": 2, "loss.first_order": 0.5}, "t1", teacher)
    assert settings.subspace.rank == 2 and settings.loss.first_order == 0.5
    assert settings.run_dir == config.run_dir / "trials" / "t1" and settings.teacher.path == str(teacher)
    assert settings.store_dir == config.store_dir
    assert settings.student.train.eval_every == settings.student.train.log_every


def test_dry_run_line_sizes_the_search(tmp_path):
    """What ``--dry-run`` prints of a search: its trials, what they vary, and the steps ASHA may cut them to."""
    demo = load_config(ROOT / "configs/tune-demo.yaml", [f"output_dir={tmp_path}"])
    assert search_line(demo) == (
        "search 'tune-demo': 3 trials (loss.align_at ['both', 'latents', 'answer']), 1 worker(s) per trial, 1600 "
        "steps each (ASHA may stop a trial after 400 steps): up to 4,800 student steps in all -> "
        f"{tmp_path / 'tune-demo' / 'tune'}")
    sampled = load_config(ROOT / "configs/tune-demo.yaml", [
        f"output_dir={tmp_path}", "tune.num_samples=4", "tune.scheduler=fifo",
        'tune.space={"subspace.rank": {"grid": [2, 4]}, "loss.first_order": {"loguniform": [0.1, 10.0]}}'])
    assert search_line(sampled).startswith(
        "search 'tune-demo': 8 trials (subspace.rank [2, 4]; loss.first_order loguniform [0.1, 10.0]; each 4 times), "
        "1 worker(s) per trial, 1600 steps each (every trial runs to its end): up to 12,800 student steps in all")

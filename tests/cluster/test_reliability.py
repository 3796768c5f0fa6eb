"""Numerical faults and budgets of a training stage on a local cluster: NaN losses, non-finite weights, the wall-clock
budget, ``until_val`` and ``checkpoint_minutes``. Bad input, tracking and the security defaults are in
``tests/unit/test_reliability.py``."""

from dataclasses import replace

import pytest
import ray
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from lori_ray.cluster import answers_state_queries, start_local
from lori_ray.driver import StageTrainer, fit


@pytest.fixture(scope="module")
def local_ray():
    start_local(2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_cluster_without_a_state_api_trains_without_rays_placement_group_cleaner(local_ray):
    """Ray's cleaner would take this cluster's silence for a dead controller and remove a live stage's placement
    group (``driver.StageTrainer``); the stages here and in the other tests of this module run without it."""
    assert not answers_state_queries()

    def cleaners(trainer_class):
        trainer = trainer_class(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return [c for c in trainer._create_default_callbacks() if isinstance(c, PlacementGroupCleanerCallback)]
    assert cleaners(TorchTrainer) and not cleaners(StageTrainer)


def test_nan_loss_stops_the_stage_with_a_clear_error_and_publishes_nothing(local_ray, tmp_path, tiny_stage):
    stage = replace(tiny_stage(tmp_path, "nan", num_workers=0, steps=12, log_every=3,
                               max_bad_steps=3), weights={"ce": float("nan")})
    with pytest.raises(Exception, match=r"loss was NaN/Inf for 3 consecutive steps"):
        fit(stage, tmp_path / "out", tmp_path / "ray")
    assert not (tmp_path / "out").exists()  # no model was published from a failed stage


def test_a_model_with_non_finite_weights_is_never_published(local_ray, tmp_path, tiny_stage):
    """An infinite learning rate (a typed stage is not validated like a config) makes every weight NaN at step 1;
    the later NaN losses are skipped, fewer than max_bad_steps, so the stage reached its end and published the
    model as finished, which a rerun would reuse."""
    stage = tiny_stage(tmp_path, "inf", num_workers=0, steps=6, log_every=3, lr=float("inf"))
    with pytest.raises(Exception, match=r"\[inf\] not published: the model has non-finite weights at step 6 \("):
        fit(stage, tmp_path / "out", tmp_path / "ray")
    assert not (tmp_path / "out").exists()


def test_a_wall_clock_budget_ends_the_stage_at_a_log_interval_and_publishes_it(local_ray, tmp_path, tiny_stage):
    stage = tiny_stage(tmp_path, "budget", num_workers=1, cpus_per_worker=2, steps=10**6, log_every=4,
                       max_minutes=1e-5)
    stage = replace(stage, val_path=stage.data_path)
    out, metrics = fit(stage, tmp_path / "out", tmp_path / "ray")  # a worker process: DeepSpeed's state stays there
    assert metrics["step"] == 4 and metrics["budget_spent"] >= 1
    assert metrics["threads_per_worker"] == 2  # the worker took both of the cluster's cores
    assert "val_accuracy" in metrics  # the last interval is validated like a last step
    assert (out / "model.safetensors").is_file()


def test_until_val_ends_the_stage_at_the_first_validation_that_reaches_it(local_ray, tmp_path, monkeypatch, capsys,
                                                                          tiny_stage):
    accuracies = iter([0.5, 0.995, 1.0])  # what validation measures at steps 2, 4, 6 (the rule is under test)
    monkeypatch.setattr("lori_ray.worker.exact_match", lambda *args: next(accuracies))
    stage = tiny_stage(tmp_path, "until", num_workers=0, steps=100, log_every=2, eval_every=2, until_val=0.99)
    out, metrics = fit(replace(stage, val_path=stage.data_path), tmp_path / "out", tmp_path / "ray")
    assert metrics["step"] == 4 and metrics["val_accuracy"] == 0.995
    assert ("[until] stopped at step 4 of 100: validation 0.995 reached train.until_val (0.99)"
            in capsys.readouterr().out)
    assert (out / "model.safetensors").is_file()  # published like a last step


def test_checkpoint_minutes_saves_resumable_checkpoints_that_a_rerun_continues_from(local_ray, tmp_path, tiny_stage):
    key = "0f" * 32  # the same key on both runs, as a run's own key file gives them
    stage = tiny_stage(tmp_path, "minutes", num_workers=1, steps=8, log_every=2, checkpoint_minutes=1e-6)
    stage = replace(stage, checkpoint_key=key)
    fit(stage, tmp_path / "first", tmp_path / "ray")
    folders = sorted(p.name for p in (tmp_path / "ray" / "minutes").glob("step-*"))
    # every log interval was past the (tiny) interval: resumable DeepSpeed state there, no checkpoint_every needed
    assert folders[-1] == "step-000008" and "step-000006" in folders
    assert (tmp_path / "ray" / "minutes" / "step-000006" / "ds").is_dir()
    # the same stage run again (how often it saves may change) continues from the newest resumable one
    again = replace(stage, train=stage.train.model_copy(update={"checkpoint_minutes": 30.0}))
    _, metrics = fit(again, tmp_path / "second", tmp_path / "ray")
    assert metrics["resumed_from_step"] == 6 and metrics["step"] == 8

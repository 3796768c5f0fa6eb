"""A finished stage is reused only when every input is identical: settings and the content of every file."""

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lori_ray.config import load_config
from lori_ray.fingerprint import FINGERPRINT_FILE, StageChanged, digest, finished, stage_inputs, write_fingerprint
from lori_ray.recipe import forget_stages
from lori_ray.stages.training import make_stage, train_stage
from lori_ray.storage import published_directory, write_local

ROOT = Path(__file__).resolve().parents[2]


def stage_files(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    data = tmp_path / "data.safetensors"
    data.write_bytes(b"tensors")
    return model, data


def test_digest_follows_content_not_names_or_times(tmp_path):
    model, data = stage_files(tmp_path)
    before = digest(model)
    (model / "model.safetensors").write_bytes(b"weights")  # rewritten, same bytes
    assert digest(model) == before
    (model / "model.safetensors").write_bytes(b"weightz")
    assert digest(model) != before
    assert digest(data) != digest(tmp_path / "model" / "config.json")


def test_a_finished_stage_is_reused_only_on_identical_inputs(tmp_path):
    config = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path / 'runs'}", "cluster.gpus_per_worker=0"])
    model, data = stage_files(tmp_path)
    train = config.teacher.train
    output = config.run_dir / "teacher"
    inputs = stage_inputs(make_stage(config, "teacher", model, data, train))
    assert not finished(output, inputs, "teacher")  # nothing there
    output.mkdir(parents=True)
    (output / "config.json").write_text("{}")  # what an interrupted save_pretrained leaves: not finished
    assert not finished(output, inputs, "teacher")
    write_fingerprint(output, inputs)
    # same inputs: train_stage returns the finished stage without starting Ray
    assert train_stage(config, "teacher", model, data, train) == output
    data.write_bytes(b"other tensors")  # same path, new content (e.g. an edited data.train_file)
    with pytest.raises(StageChanged, match=r"stage teacher: .* trained on other inputs \(data_path changed\); "
                                           r"rerun with --restart-from teacher"):
        train_stage(config, "teacher", model, data, train)
    other = config.teacher.train.model_copy(update={"lr": 1e-2})
    with pytest.raises(StageChanged, match=r"\(data_path, settings changed\)"):
        train_stage(config, "teacher", model, data, other)
    assert forget_stages(config, "teacher") == [output] and not output.exists()


def test_results_and_directories_appear_whole(tmp_path):
    write_local(tmp_path / "results.md", "table\n")
    assert (tmp_path / "results.md").read_text() == "table\n" and list(tmp_path.iterdir()) == [tmp_path / "results.md"]
    with pytest.raises(RuntimeError), published_directory(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("killed while saving")
    assert not (tmp_path / "model").exists()  # a failed save never appears under the real name
    with published_directory(tmp_path / "model") as staging:
        (staging / FINGERPRINT_FILE).write_text("{}")
    assert (tmp_path / "model" / FINGERPRINT_FILE).is_file()


def test_a_disk_full_while_publishing_removes_the_partial_copy_and_keeps_the_earlier_model(tmp_path):
    with published_directory(tmp_path / "model") as staging:
        (staging / "model.safetensors").write_text("earlier")
    with pytest.raises(OSError, match=r"model not published \(No space left on device\); its partial copy was "
                                      r"removed and the earlier one there is untouched") as caught, \
            published_directory(tmp_path / "model") as staging:
        (staging / "model.safetensors").write_text("half of a new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .model.partial taking the space
    assert (tmp_path / "model" / "model.safetensors").read_text() == "earlier"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 256 KiB tmpfs, where this machine lets the test mount one (root with CAP_SYS_ADMIN)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False) if shutil.which("mount") else None
    if made is None or made.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test above covers the same path")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk_while_publishing_leaves_the_earlier_model_and_frees_the_space(small_tmpfs):
    with published_directory(small_tmpfs / "model") as staging:
        (staging / "model.safetensors").write_bytes(b"e" * 64 * 1024)
    with pytest.raises(OSError, match=r"model not published \(No space left on device\); its partial copy was "
                                      r"removed and the earlier one there is untouched") as caught, \
            published_directory(small_tmpfs / "model") as staging:
        (staging / "model.safetensors").write_bytes(b"n" * 1024 * 1024)  # 1 MiB into the 192 KiB left
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["model"]
    assert (small_tmpfs / "model" / "model.safetensors").read_bytes() == b"e" * 64 * 1024
    assert shutil.disk_usage(small_tmpfs).used <= 80 * 1024  # the partial copy's space is given back


def test_a_stage_carries_its_typed_settings_across_ray_and_digests_them_as_before(tmp_path):
    import pickle
    from dataclasses import asdict

    from lori_ray.config import TrainConfig
    from lori_ray.curriculum import RemovalSchedule
    from lori_ray.worker import Stage
    (tmp_path / "model").write_text("m")
    (tmp_path / "data").write_text("d")
    stage = Stage(name="s", model_dir=str(tmp_path / "model"), data_path=str(tmp_path / "data"),
                  train=TrainConfig(steps=7, lr=2e-3), removal=RemovalSchedule(steps_per_token=2.5, smoothing=4.0,
                                                                               pad_id=0))
    travelled = Stage(**pickle.loads(pickle.dumps(asdict(stage))))  # as train_loop_config reaches a worker
    assert isinstance(travelled.train, TrainConfig) and travelled.train.steps == 7
    assert isinstance(travelled.removal, RemovalSchedule) and travelled.removal.steps_per_token == 2.5
    # the digest of a stage whose settings travelled as dicts: finished stages of earlier runs are still found
    as_dict = Stage(name="s", model_dir=stage.model_dir, data_path=stage.data_path, train=stage.train.model_dump(),
                    removal=stage.removal.model_dump())
    assert stage_inputs(travelled) == stage_inputs(stage) == stage_inputs(as_dict)


def test_how_often_a_stage_checkpoints_is_not_an_input_and_until_val_is_one_only_when_set(tmp_path):
    from dataclasses import replace

    from lori_ray.config import TrainConfig
    from lori_ray.worker import Stage
    model, data = stage_files(tmp_path)
    stage = Stage(name="s", model_dir=str(model), data_path=str(data), train=TrainConfig(steps=7, eval_every=25))
    before = stage_inputs(stage)
    # a digest from before both settings existed (the settings as they travelled then): still the same stage
    old = {k: v for k, v in stage.train.model_dump().items()
           if k not in ("checkpoint_minutes", "until_val", "schedule", "min_lr")}
    assert stage_inputs(replace(stage, train=old)) == before
    for added in ({"schedule": "cosine"}, {"min_lr": 0.0}):  # the later settings, set: another stage
        assert stage_inputs(replace(stage, train=stage.train.model_copy(update=added)))["settings"] != \
            before["settings"]
    minutes = stage.train.model_copy(update={"checkpoint_minutes": 20.0})
    assert stage_inputs(replace(stage, train=minutes)) == before  # its checkpoints resume under another interval
    target = stage.train.model_copy(update={"until_val": 0.99})
    assert stage_inputs(replace(stage, train=target))["settings"] != before["settings"]  # it stops elsewhere


def test_restart_from_deletes_a_stage_only_as_it_starts_after_the_earlier_stages_passed_their_checks(tmp_path,
                                                                                                    monkeypatch):
    """--restart-from student after the training file changed: the teacher (not restarted) is refused for its
    changed inputs before anything is deleted, so the finished student survives; a restarted stage is deleted
    (with its checkpoints) only when it starts to train again."""
    from lori_ray import stages
    from lori_ray.recipe import restart_from
    config = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path / 'runs'}", "cluster.gpus_per_worker=0"])
    model, data = stage_files(tmp_path)
    train = config.teacher.train
    teacher = config.run_dir / "teacher"
    teacher.mkdir(parents=True)
    write_fingerprint(teacher, stage_inputs(make_stage(config, "teacher", model, data, train)))
    student = config.run_dir / "student"
    student.mkdir()
    (student / "model.safetensors").write_bytes(b"finished student")
    checkpoints = Path(config.storage_path) / f"{config.name}-student"
    checkpoints.mkdir(parents=True)

    restart_from(config, "student")
    data.write_bytes(b"edited training file")
    with pytest.raises(StageChanged, match=r"stage teacher: .*data_path changed"):
        train_stage(config, "teacher", model, data, train)
    assert (student / "model.safetensors").is_file() and checkpoints.is_dir()  # nothing lost

    trained = []
    monkeypatch.setattr(stages.training, "fit", lambda stage, output, *args, **kwargs: trained.append(
        (Path(output).exists(), checkpoints.exists())))
    train_stage(config, "student", model, data, config.student.train)
    assert trained == [(False, False)]  # the old student and its checkpoints were gone before it trained again


def test_a_students_explicit_loss_terms_digest_as_its_weights_did_before(tmp_path):
    """Before the objective took explicit terms, a student's weights named kd (0 without a teacher) and no terms:
    a stage finished then is still found finished; another weight or term is another input."""
    config = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path / 'runs'}", "cluster.gpus_per_worker=0"])
    model, data = stage_files(tmp_path)

    def settings(**fields) -> str:
        return stage_inputs(make_stage(config, "student", model, data, config.student.train, **fields))["settings"]

    before = settings(weights={"ce": 1.0, "kd": 0.0, "first_order": 1.0, "second_order": 1.0})
    assert settings(weights={"ce": 1.0, "first_order": 1.0, "second_order": 1.0},
                    terms=["ce", "first_order", "second_order"]) == before
    assert settings(weights={"ce": 1.0, "kd": 0.5}, terms=["ce", "kd"]) == settings(weights={"ce": 1.0, "kd": 0.5})
    assert settings(weights={"ce": 1.0, "first_order": 2.0, "second_order": 1.0},
                    terms=["ce", "first_order", "second_order"]) != before
    # a teacher stage (ce alone, no terms given) digests as it always did
    assert settings() == settings(weights={"ce": 1.0})

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lori_ray.config import ConfigError, load_config
from lori_ray.preflight import check_rerun

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load(preset):
    if "smollm2" in preset.name:  # its model.path is the converted GGUF in the cache
        from lori_ray.conversions import ensure_smollm2
        ensure_smollm2()
    config = load_config(preset)
    assert config.subspace.rank <= config.subspace.max_rank


def test_overrides_are_typed_and_nested():
    config = load_config(ROOT / "configs/tiny.yaml", ["subspace.rank=2", "loss.second_order=0.5", "data.digits=[3, 2]"])
    assert config.subspace.rank == 2 and config.loss.second_order == 0.5 and config.data.digits == (3, 2)


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    """``lr: 3e-4`` as ML engineers write it: PyYAML's YAML 1.1 rules read it as a string, which the schema refused
    ("Input should be a valid number")."""
    preset = tmp_path / "preset.yaml"
    preset.write_text((ROOT / "configs/tiny.yaml").read_text().replace("lr: 2.0e-3", "lr: 5e-4"))
    config = load_config(preset, ["student.train.lr=3e-3", "loss.answer=1E+0", "data.digits=[3, 2]"])
    assert (config.teacher.train.lr, config.student.train.lr, config.loss.answer) == (5e-4, 3e-3, 1.0)
    assert config.data.digits == (3, 2) and load_config(preset, ["name=1e3x"]).name == "1e3x"


@pytest.mark.parametrize("overrides, field", [
    (["bogus=1"], "bogus"),
    (["loss.third_order=1"], "loss.third_order"),
    (["subspace.rank=40"], "subspace.rank"),
    (["subspace.max_rank=65", "subspace.rank=4"], "subspace.max_rank"),  # tiny preset: hidden size 64
    (["data.task=file", "data.train_file=/no/such.txt", "data.eval_file=/no/such.txt"], "data.train_file"),
    (["teacher.train.batch_size=15"], "teacher.train.batch_size"),
    (["teacher.train.zero_stage=4"], "teacher.train.zero_stage"),
    (["trajectory.layers=[0, 1]"], "trajectory.layers"),
    (["model.size=huge"], "model.size"),
    (["student.latent_slots=64"], "student.latent_slots"),
    (["student.kind=pruned", "student.init=activation"], "student.width"),
    (["student.kind=pruned", "student.init=activation", "student.width=65"], "student.width"),
    (["student.kind=pruned", "student.width=32"], "student.init"),
    (["student.init=random"], "student.init"),
    (["student.kind=pruned", "student.init=random", "student.width=32", "student.depth=3"], "student.depth"),
    (["student.kind=pruned", "student.init=random", "student.width=32", "student.train.zero_stage=3"],
     "student.train.zero_stage"),
    (["model.family=gpt2", "student.kind=pruned", "student.init=random", "student.width=32"], "student.kind"),
    (["model.family=falcon"], "model.family"),
    (["trajectory.store_dir=ftp://host/trajectories"], "trajectory.store_dir"),
    (["cluster.storage_path=s3:///no-bucket"], "cluster.storage_path"),
    (["teacher.train.until_val=0.99", "teacher.train.eval_every=0"], "teacher.train.until_val"),
    (["student.train.until_val=1.5"], "student.train.until_val"),
    (["teacher.train.checkpoint_minutes=0"], "teacher.train.checkpoint_minutes"),
    (["cluster.wait_minutes=0"], "cluster.wait_minutes"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"(?m)^(\s*|invalid config:\s*)?{field}:"):
        load_config(ROOT / "configs/tiny.yaml", overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(ROOT / "configs/none.yaml")


@pytest.mark.parametrize("override, field", [
    ("unknown.key=1", "unknown"),
    ("subspace.max_rank=1000", "subspace.max_rank"),
    ("data.eval_file=missing.txt", "data.train_file"),
])
def test_distill_job_rejects_bad_config_before_ray_starts(tmp_path, override, field):
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(tmp_path)}
    overrides = [override] + (["data.task=file"] if "eval_file" in override else [])
    started = time.time()
    result = subprocess.run([sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml", *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert field in result.stderr
    assert "Ray" not in result.stdout + result.stderr and not any(tmp_path.iterdir())  # no cluster was started
    assert time.time() - started < 60


def test_rerun_with_a_different_config_is_refused(tmp_path):
    config = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path}"])
    check_rerun(config)  # no run yet
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "config.yaml").write_text(config.to_yaml())
    # how many teacher actors extract changes no result: a rerun on a smaller cluster may use fewer
    check_rerun(load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path}", "eval.batch_size=4",
                                                         "trajectory.num_actors=1"]))
    # a setting added since the saved run (absent from its config.yaml) ran as its default
    saved = yaml.safe_load((config.run_dir / "config.yaml").read_text())
    del saved["student"]["train"]["cpus_per_worker"]
    (config.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    check_rerun(config)
    with pytest.raises(ConfigError, match=r"^name: .*different subspace.rank: 4 -> 2; loss.ce: 1.0 -> 0.5; pick"):
        check_rerun(load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path}", "subspace.rank=2",
                                                             "loss.ce=0.5"]))


def test_a_student_sharing_another_runs_teacher_reruns_after_an_interruption(tmp_path):
    """bench/ students run with the first run's teacher and save that path: a rerun, before the teacher
    is assigned again, must accept the saved run and still refuse a different teacher."""
    from lori_ray.cli import configs_sharing_teacher

    overrides = {m: [f"output_dir={tmp_path}", f"name=b-{m}", f"student.method={m}"] for m in ("nocot", "lori")}
    _, student = configs_sharing_teacher(str(ROOT / "configs/tiny.yaml"), overrides).values()
    (tmp_path / "b-nocot" / "teacher").mkdir(parents=True)
    student.teacher.path = str(tmp_path / "b-nocot" / "teacher")  # what run_sharing_teacher does
    student.run_dir.mkdir(parents=True)
    (student.run_dir / "config.yaml").write_text(student.to_yaml())
    configs_sharing_teacher(str(ROOT / "configs/tiny.yaml"), overrides)
    with pytest.raises(SystemExit):
        configs_sharing_teacher(str(ROOT / "configs/tiny.yaml"),
                                {**overrides, "nocot": [*overrides["nocot"], "name=other"]})


def test_student_seed_defaults_to_the_run_seed_and_defines_the_run():
    from lori_ray.config import Config
    assert Config(seed=3).student_seed == 3
    assert Config(seed=3, student={"seed": 7}).student_seed == 7


def test_digit_segments_need_the_multiplication_task_and_a_method_that_reads_them(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("1 2 * 3 4||3 6 + 0 4 #### 3 0 4\n" * 4)
    with pytest.raises(ConfigError, match="trajectory.segments: 'digits' needs the multiplication task"):
        load_config(None, ["trajectory.segments=digits", "data.task=file", f"data.train_file={train}",
                           f"data.eval_file={train}", "data.train_size=4", "data.val_size=0"])
    assert load_config(None, ["trajectory.segments=digits"]).trajectory.segments == "digits"
    with pytest.raises(ConfigError, match="trajectory.segments: 'digits' does not apply to student.method codi"):
        load_config(None, ["trajectory.segments=digits", "student.method=codi"])


def test_continuous_latents_and_stages_are_checked_against_the_method():
    config = load_config(None, ["student.method=coconut", "student.latent_slots=4", "student.latents_per_step=2"])
    assert config.student.continuous and config.student.staged and config.student.stages == 2
    assert load_config(None, ["student.latent=continuous", "student.method=icot_kd"]).student.continuous
    for overrides, message in [
        (["student.latent=continuous", "student.method=nocot"], "student.latent: continuous needs latent slots"),
        (["student.latent=continuous", "loss.align_at=answer"], "student.method lori with loss.align_at answer"),
        (["student.curriculum=stages", "student.method=lori"], "student.curriculum: stages trains coconut"),
        (["student.method=coconut", "student.latent_slots=3", "student.latents_per_step=2"],
         "student.latents_per_step: 2 does not divide student.latent_slots"),
        (["student.method=coconut", "student.kind=pruned", "student.width=32", "student.init=random"],
         "student.latent: continuous is for kind full"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_a_model_family_that_contradicts_the_weights_config_is_refused(tmp_path, tiny_model):
    llama = tiny_model(tmp_path / "llama")
    with pytest.raises(ConfigError, match="model.family: 'qwen2', but model.path's config.json says model_type "
                                          "'llama'; set model.family: llama or leave it unset"):
        load_config(None, [f"model.path={llama}", "model.family=qwen2"])
    assert load_config(None, [f"model.path={llama}", "model.family=llama"]).model.path == str(llama)
    assert load_config(None, [f"model.path={llama}"]).model.family == "llama"  # unset: the weights decide


def test_an_aligning_method_on_data_without_a_cot_is_refused_unless_the_teacher_writes_them(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(f'{{"q": "{a} * {b}", "a": "{a * b}"}}\n' for a in range(10, 30) for b in (11, 12)))
    data = ["data.task=file", f"data.train_file={train}", "data.fields.question=q", "data.fields.answer=a",
            "data.fields.cot=null", "data.train_size=40", "data.val_size=4"]
    for method in ("lori", "icot_kd", "codi"):
        with pytest.raises(ConfigError, match=f"student.method: {method} aligns the student with the teacher's CoT, "
                                              r"and the data has none \(data.fields.cot is null\)"):
            load_config(None, [*data, f"student.method={method}"])
    assert load_config(None, [*data, "student.method=nocot"]).student.method == "nocot"
    assert load_config(None, [*data, "teacher.complete_cots=true"]).teacher.complete_cots


def test_a_pretrained_student_must_read_the_teachers_token_ids_and_match_widths_where_states_are_compared(
        tmp_path, tiny_model):
    from lori_ray.models import build_model
    from lori_ray.tokens import arithmetic_tokenizer
    tokenizer = arithmetic_tokenizer()
    wide = tmp_path / "wide"  # another width and depth than the tiny teacher, the same tokenizer
    build_model("llama", "small", len(tokenizer), 64, {"pad_token_id": tokenizer.pad_token_id}).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    config = load_config(Path(ROOT) / "configs/tiny.yaml", [f"student.path={wide}"])
    assert config.student.path == str(wide)
    with pytest.raises(ConfigError, match="student.method: icot_kd matches full-width hidden states, and the student "
                                          "at student.path is 128 wide, the teacher 64"):
        load_config(Path(ROOT) / "configs/tiny.yaml", [f"student.path={wide}", "student.method=icot_kd"])
    other = tiny_model(tmp_path / "other")  # another vocabulary: ids shifted by an added token
    from transformers import AutoTokenizer
    shifted = AutoTokenizer.from_pretrained(other)
    vocabulary = shifted.get_vocab()
    shifted.backend_tokenizer.model = type(shifted.backend_tokenizer.model)(
        {t: (i + 1) % len(vocabulary) for t, i in vocabulary.items()}, unk_token="<unk>")
    shifted.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"student.path: its tokenizer gives \d+ of the teacher's tokens other ids"):
        load_config(Path(ROOT) / "configs/tiny.yaml", [f"student.path={other}"])
    with pytest.raises(ConfigError, match="leave kind, init and size unset"):
        load_config(None, [f"student.path={wide}", "student.init=scratch"])
    with pytest.raises(ConfigError, match="student.path: no such directory"):
        load_config(None, [f"student.path={tmp_path / 'missing'}"])

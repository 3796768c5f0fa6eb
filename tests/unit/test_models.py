"""Model presets of every family, and reading a saved model's shape whatever its family names it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lori_ray.config import Config
from lori_ray.conversions import MARKER
from lori_ray.models import FAMILIES, SIZES, build_model, keep_layers
from lori_ray.stages.training import model_shape_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_preset_reads_back_its_width_and_depth(family, tmp_path):
    model = build_model(family, "tiny", 32, 64, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    assert model.config.model_type == family
    assert not any(p for k, p in vars(model.config).items() if k.endswith("pdrop"))  # no dropout in any preset
    model.save_pretrained(tmp_path)
    tiny = SIZES["tiny"]
    assert model_shape_of(tmp_path, Config()) == (tiny["hidden_size"], tiny["num_hidden_layers"])


def test_keep_layers_spaces_layers_evenly_and_keeps_the_ends():
    assert keep_layers(6, None) == [0, 1, 2, 3, 4, 5]
    assert keep_layers(6, 3) == [0, 2, 5]
    assert keep_layers(6, 1) == [5]


def hub_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face hub cache holding ``model_dir`` as ``repo_id`` at its main revision, in the layout
    huggingface_hub writes when it downloads one (what an offline machine with a warm cache has)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return root


def offline_hub_env(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """The job environment ``env`` with the hub offline: a hub model resolves from ``tmp_path/hub`` or not at all."""
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
            "LORI_RAY_CACHE": str(tmp_path / "cache")}


def test_a_hub_id_is_checked_before_any_work_and_an_unreachable_hub_says_so(tmp_path, job_env):
    result = subprocess.run([sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml",
                             f"output_dir={tmp_path}", "model.path=someone/no-such-model", "--dry-run"],
                            cwd=ROOT, env=offline_hub_env(tmp_path, job_env()), capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert ("error: model.path: someone/no-such-model: not a local path, and loading it as a Hugging Face hub id "
            "failed (hub unreachable, or no such repo)") in result.stderr
    assert "Traceback" not in result.stderr and not any(tmp_path.glob("tiny*"))


def test_a_hub_model_is_saved_once_as_the_local_directory_every_stage_reads(tmp_path, tiny_model, job_env):
    hub_cache(tmp_path / "hub", "lori-test/tiny-llama", tiny_model(tmp_path / "model"))
    # the config accepts the id (its shape and vocabulary read through the hub cache), then the stages' directory
    # is saved once and found by the next call
    script = ("from lori_ray.config import load_config; from lori_ray.conversions import local_model_dir; "
              "load_config('configs/tiny.yaml', ['model.path=lori-test/tiny-llama']); "
              "print(local_model_dir('lori-test/tiny-llama', log=lambda m: print('first:', m))); "
              "print(local_model_dir('lori-test/tiny-llama', log=lambda m: print('second:', m)))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=offline_hub_env(tmp_path, job_env()),
                         capture_output=True, text=True, check=True).stdout
    local = tmp_path / "cache" / "models" / "hub--lori-test--tiny-llama"
    assert out.splitlines()[-1] == out.splitlines()[-3] == str(local)
    assert "first: saving LlamaForCausalLM" in out and "second: found" in out and "nothing to do" in out
    assert json.loads((local / MARKER).read_text())["hub_id"] == "lori-test/tiny-llama"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in local.iterdir()}
    assert model_shape_of(local, Config()) == (SIZES["tiny"]["hidden_size"], SIZES["tiny"]["num_hidden_layers"])

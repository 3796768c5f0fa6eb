"""Model presets of every family, and reading a saved model's shape whatever its family names it."""

import pytest

from lori_ray.config import Config
from lori_ray.models import FAMILIES, SIZES, build_model, keep_layers
from lori_ray.pipeline import model_shape_of


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

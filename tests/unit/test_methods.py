"""Every student method through ``student_stage`` (no cluster: a tiny teacher, a trajectory store written in this
process) and one training step of the objective the worker builds from its fields: the loss terms each produces
are its spec's (``lori_ray.methods``), for both subspace kinds and for a student of another width."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lori_ray.batch import trim_padding
from lori_ray.config import ConfigError, load_config
from lori_ray.data import generate_multiplication
from lori_ray.methods import METHODS, TERMS, MethodSpec
from lori_ray.objective import LMObjective, TrajectoryProjection
from lori_ray.preflight import Splits
from lori_ray.stages.student import student_stage
from lori_ray.stages.trajectories import trajectory_segments
from lori_ray.subspace import fit_pca
from lori_ray.teacher_pool import TeacherWorker
from lori_ray.tokens import arithmetic_tokenizer
from lori_ray.trajectories import TrajectoryStore
from lori_ray.worker import Stage, _build_objective, curriculum_batch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A tiny teacher (2 layers, width 64), the data split, a complete one-shard store of each kind of unit (CoT
    steps; ``####`` for codi) and a pretrained student of another width (48) and the same depth."""
    root = tmp_path_factory.mktemp("methods")
    teacher = tiny_model(root / "teacher")
    examples = generate_multiplication(EXAMPLES + 8, 2, 2, seed=3)
    splits = Splits(train=examples[:EXAMPLES], val=examples[EXAMPLES:], held_out=[])
    stores = {}
    for segments in ("steps", "separator"):
        worker = TeacherWorker(str(teacher), [1, 2], batch_size=16, segments=segments)
        store = stores[segments] = TrajectoryStore(root / f"store-{segments}")
        store.write_subspace(fit_pca(worker.extract(store.uri, 0, list(range(EXAMPLES)), splits.train), 4))
        worker.project(store.uri, 0)
        store.finish({"shards": 1, "max_rank": 4, "layers": [1, 2], "segments": segments})
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    narrow = root / "narrow"
    LlamaForCausalLM(LlamaConfig.from_pretrained(teacher, hidden_size=48, intermediate_size=96,
                                                 head_dim=12)).save_pretrained(narrow)
    arithmetic_tokenizer().save_pretrained(narrow)
    return root, teacher, splits, stores, narrow


def case_config(root: Path, *overrides: str):
    return load_config(ROOT / "configs/tiny.yaml", [
        f"output_dir={root / 'runs'}", "name=m" + str(abs(hash(overrides))), "subspace.rank=3", "subspace.max_rank=4",
        "student.train.batch_size=8", *overrides])


CASES = (
    [pytest.param(method, kind, (), id=f"{method}-{kind}") for method in METHODS for kind in ("pca", "tucker")]
    + [pytest.param("lori", kind, (f"loss.align_at={site}",), id=f"lori-{site}-{kind}")
       for site in ("answer", "both") for kind in ("pca", "tucker")]
    # another width: the projection (or readout) is fitted by least squares, not copied from the subspace
    + [pytest.param("lori", "pca", ("student.init=scratch", "student.size=small", f"loss.align_at={site}"),
                    id=f"lori-{site}-pca-scratch-wider") for site in ("latents", "answer", "both")]
    + [pytest.param("lori", "tucker", ("student.path=<narrow>", f"loss.align_at={site}"),
                    id=f"lori-{site}-tucker-narrower") for site in ("latents", "both")]
    + [pytest.param(method, "pca", ("loss.kd=0.5", *extra), id=f"{method}-kd")
       for method, extra in (("nocot", ()), ("explicit", ()), ("icot_si", ()), ("lori", ("loss.align_at=both",)))]
)


@pytest.mark.parametrize("method, kind, overrides", CASES)
def test_every_method_trains_the_terms_its_spec_declares(world, method, kind, overrides):
    root, teacher, splits, stores, narrow = world
    overrides = tuple(o.replace("<narrow>", str(narrow)) for o in overrides)
    config = case_config(root, f"student.method={method}", f"subspace.kind={kind}", *overrides)
    spec, align_at = METHODS[method], config.loss.align_at
    terms = spec.terms(align_at, kd=bool(config.loss.kd))
    init, data_path, fields = student_stage(config, teacher, splits, stores[trajectory_segments(config)])

    assert fields["terms"] == list(terms) and list(fields["weights"]) == list(terms)
    data = load_file(data_path)
    assert ("latent_positions" in data) == spec.aligns_slots(align_at)
    assert ("answer_positions" in data) == spec.reads_answer(align_at)
    assert ("cot_start" in data) == (spec.curriculum != "none")
    assert ("projection_path" in fields) == (spec.alignment == "subspace" and spec.aligns_slots(align_at))
    assert ("readout_path" in fields) == spec.reads_answer(align_at)
    assert ("teacher_input_ids" in data) == (bool(config.loss.kd) and not spec.writes_cot)

    # the worker's objective, and one optimisation step on a batch as the curriculum shows it late in training
    stage = Stage(name=method, model_dir=str(init), data_path=str(data_path), train=config.student.train, **fields)
    objective = _build_objective(stage)
    step = config.student.train.steps - 1
    batch, _ = curriculum_batch(stage, {k: v[:8] for k, v in data.items()}, step, 0)
    batch = trim_padding(batch)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    loss, metrics = objective(batch)
    assert set(metrics) == {*terms, "loss"}
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values()), metrics
    loss.backward()
    optimizer.step()
    after, _ = objective(batch)
    assert torch.isfinite(after)


def test_a_scratch_student_of_other_depth_cannot_align_a_tucker_core(world):
    """Tucker mixes all stored layers: a 4-layer student pairs two of its layers with each teacher layer."""
    root, teacher, splits, stores, _ = world
    config = case_config(root, "subspace.kind=tucker", "student.init=scratch", "student.size=small")
    with pytest.raises(ConfigError, match="subspace.kind: tucker needs a student layer paired with each"):
        student_stage(config, teacher, splits, stores["steps"])


def test_every_term_is_declared_and_specs_are_consistent():
    assert {term for spec in METHODS.values() for site in ("latents", "answer", "both") for kd in (False, True)
            for term in spec.terms(site, kd)} == set(TERMS)
    with pytest.raises(ValueError, match="alignment needs its sites"):
        MethodSpec("broken", alignment="hidden")
    with pytest.raises(ValueError, match="curriculum removal must be among its curricula"):
        MethodSpec("broken", curriculum="removal")


def tiny_objective(weights: dict, terms, **modules) -> LMObjective:
    from lori_ray.models import build_model
    model = build_model("llama", "tiny", 32, 64, {"pad_token_id": 0})
    return LMObjective(model, [1, 2], weights=weights, terms=terms, **modules)


@pytest.mark.parametrize("weights, terms, message", [
    ({"ce": 1.0, "hidden_mse": 0.5}, ["ce"], "loss term 'hidden_mse' has a weight .* but is not computed"),
    ({"ce": 1.0, "kd": 0.0}, ["ce"], "loss term 'kd' has a weight"),
    ({"ce": 1.0, "answer": 0.5}, ["ce"], r"loss terms \['answer'\] have weights but are not computed"),
    ({"ce": 1.0}, ["ce", "hidden_mse"], "loss term 'hidden_mse' is computed but has no weight"),
    ({"ce": 1.0, "first_order": 1.0}, ["ce", "first_order", "second_order"],
     "loss term 'second_order' is computed but has no weight"),
    ({"first_order": 1.0, "second_order": 1.0}, ["first_order", "second_order"], "loss term 'ce' is always computed"),
    ({"ce": 1.0, "kd": 1.0}, ["ce", "kd"], r"need a teacher \(kd\)"),
    ({"ce": 1.0, "answer_align": 1.0}, ["ce", "answer_align"], r"need a readout \(answer_align\)"),
    ({"ce": 1.0, "first_order": 1.0, "second_order": 1.0}, ["ce", "first_order", "second_order"],
     "need a projection"),
    ({"ce": 1.0, "bogus": 1.0}, ["ce", "bogus"], r"unknown loss terms \['bogus'\]"),
])
def test_a_weight_without_its_term_or_a_term_without_its_weight_raises(weights, terms, message):
    with pytest.raises(ValueError, match=message):
        tiny_objective(weights, terms)


def test_a_module_no_term_uses_raises():
    with pytest.raises(ValueError, match="a projection is given but no loss term uses it"):
        tiny_objective({"ce": 1.0, "hidden_mse": 1.0}, ["ce", "hidden_mse"], projection=TrajectoryProjection(2, 64, 3))

"""Fresh problems every step (``student.problems: fresh``): the stream, and the teacher's targets computed online."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lori_ray.config import ConfigError, load_config, with_overrides
from lori_ray.data import generate_multiplication, multiplication_example
from lori_ray.fresh import FreshBatches, FreshProblems, fresh_problems
from lori_ray.losses import standardization, standardize
from lori_ray.subspace import fit_pca, resample_steps
from lori_ray.teacher_pool import TeacherWorker
from lori_ray.tokens import add_latent_tokens, load_tokenizer
from lori_ray.trajectories import TrajectoryStore

ROOT = Path(__file__).resolve().parents[2]


def test_a_step_draws_the_same_problems_every_time_and_other_steps_draw_others():
    first = fresh_problems(7, 64, (4, 4), seed=0)
    assert [p.question for p in first] == [p.question for p in fresh_problems(7, 64, (4, 4), seed=0)]
    assert {p.question for p in first}.isdisjoint(p.question for p in fresh_problems(8, 64, (4, 4), seed=0))
    assert {p.question for p in first}.isdisjoint(p.question for p in fresh_problems(7, 64, (4, 4), seed=1))
    assert all(p == multiplication_example(*(int(q.replace(" ", "")[::-1]) for q in p.question.split(" * ")),
                                           4, 4) for p in first)


def test_the_stream_never_draws_an_excluded_question():
    every = {multiplication_example(a, b, 1, 1).question for a in range(1, 10) for b in range(1, 10)}
    kept = "3 * 7"
    drawn = {p.question for step in range(20) for p in fresh_problems(step, 8, (1, 1), 0, frozenset(every - {kept}))}
    assert drawn == {kept}
    held_out = {p.question for step in range(5) for p in fresh_problems(step, 64, (2, 2), seed=3)}
    assert not held_out & {p.question for step in range(5)
                           for p in fresh_problems(step, 64, (2, 2), 3, frozenset(held_out))}


@pytest.fixture(scope="module")
def teacher_and_stores(tmp_path_factory, tiny_model):
    """A tiny teacher; for each kind of trajectory unit a one-shard store of 24 problems built by the trajectory
    pass's worker (the actor's class, run in this process); a student directory with 2 latent slots."""
    root = tmp_path_factory.mktemp("fresh")
    teacher = tiny_model(root / "teacher")
    examples = generate_multiplication(24, 2, 2, seed=5)
    stores = {}
    for segments in ("steps", "digits"):
        worker = TeacherWorker(str(teacher), [1, 2], batch_size=8, segments=segments)
        store = stores[segments] = TrajectoryStore(root / f"store-{segments}")
        store.write_subspace(fit_pca(worker.extract(store.uri, 0, list(range(24)), examples), 3))
        worker.project(store.uri, 0)
        store.finish({"shards": 1, "max_rank": 3, "layers": [1, 2]})
    shutil.copytree(teacher, root / "student")  # the student's initial model: the teacher plus 2 latent slots
    tokenizer = load_tokenizer(str(teacher))
    add_latent_tokens(tokenizer, 2)
    tokenizer.save_pretrained(root / "student")
    return root, examples, stores


def fresh_batches(root, store, rows: list[int], steps: int | None = 2, **fields) -> FreshBatches:
    subspace = store.subspace().truncate(2)
    _, coordinates = store.coordinates(2, steps)
    answer = coordinates[:, rows] if steps is None else coordinates[:, rows].flatten(2)
    mean, std = standardization(answer)
    save_file({"mean": subspace.mean[rows], "basis": subspace.basis[rows].contiguous(),
               "eigenvalues": subspace.eigenvalues[rows].contiguous(), "answer_mean": mean[0].float(),
               "answer_std": std[0].float()}, root / "targets.safetensors")
    fresh = FreshProblems(digits=(2, 2), seed=0, excluded=[], latent_slots=2, steps=steps, targets="coordinates",
                          teacher_dir=str(root / "teacher"), teacher_layers=[[1, 2][r] for r in rows],
                          targets_path=str(root / "targets.safetensors"), segments=store.root.rsplit("-", 1)[1],
                          **fields)
    return FreshBatches(fresh, str(root / "student"), batch_size=8)


@pytest.mark.parametrize("rows", [[0, 1], [1]])
def test_online_targets_equal_the_stores_for_the_same_problems(teacher_and_stores, rows):
    root, examples, stores = teacher_and_stores
    batch = fresh_batches(root, stores["steps"], rows, readout=True, slot_targets=True).batch(examples)
    index, stored = stores["steps"].coordinates(2, 2)
    assert index == list(range(24))
    torch.testing.assert_close(batch["targets"], stored[:, rows], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch["answer_targets"], standardize(stored[:, rows].flatten(2)), atol=1e-4, rtol=1e-4)
    assert batch["targets"].shape == (24, len(rows), 2, 2) and batch["latent_positions"].shape == (24, 2)
    assert batch["answer_positions"].shape[0] == 24 and (batch["answer_positions"][:, 0] >= 0).all()


def test_online_per_digit_targets_equal_the_stores(teacher_and_stores):
    """``trajectory.segments: digits``: answer position p reads digit p's unit; the slots its units resampled."""
    root, examples, stores = teacher_and_stores
    batch = fresh_batches(root, stores["digits"], [0, 1], steps=None, readout=True, slot_targets=True).batch(examples)
    _, stored = stores["digits"].coordinates(2, None)  # [24, 2 layers, 4 answer digits, rank 2]
    assert stored.shape == (24, 2, 4, 2) and batch["answer_positions"].shape == (24, 4)
    torch.testing.assert_close(batch["answer_targets"], standardize(stored), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch["targets"], resample_steps(stored, 2), atol=1e-5, rtol=1e-4)


def test_ranks_take_their_own_rows_of_one_global_batch(teacher_and_stores):
    root, _, stores = teacher_and_stores
    batches = fresh_batches(root, stores["steps"], [0, 1], slot_targets=True)
    whole = batches.batch(fresh_problems(3, 8, (2, 2), seed=0))
    halves = [batches(3, rank, 2) for rank in (0, 1)]
    torch.testing.assert_close(torch.cat([h["input_ids"] for h in halves]), whole["input_ids"])
    torch.testing.assert_close(torch.cat([h["targets"] for h in halves]), whole["targets"], atol=1e-5, rtol=1e-4)
    assert "answer_targets" not in whole  # no readout asked for


@pytest.mark.parametrize("override, field", [
    (["data.task=file", "data.train_file=x.jsonl", "data.eval_file=x.jsonl"], "data.task is file"),
    (["student.method=codi"], "not codi"),
    (["student.method=icot_si"], "not icot_si"),
    (["loss.kd=0.5"], "loss.kd"),
    (["subspace.kind=tucker"], "Tucker"),
    (["student.method=icot_kd", "trajectory.segments=digits"], "trajectory.segments steps"),
])
def test_fresh_problems_refuse_what_they_cannot_draw(tmp_path, override, field):
    (tmp_path / "x.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    config = load_config("configs/tiny.yaml")
    values = dict(item.split("=", 1) for item in ["student.problems=fresh", *override])
    values = {k: (str(tmp_path / v) if v == "x.jsonl" else yaml.safe_load(v)) for k, v in values.items()}
    with pytest.raises(ConfigError, match=f"student.problems: fresh .*{field}"):
        with_overrides(config, values)

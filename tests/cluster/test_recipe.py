"""The real pipeline end to end: a local Ray cluster, teacher actors, two DeepSpeed ZeRO-2 workers
per training stage, and an MLflow sqlite store, on the tiny preset."""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_prints_the_result_table(tiny_run):
    _, stdout = tiny_run
    assert "| teacher (explicit CoT) |" in stdout and "| student (lori, no CoT) |" in stdout
    assert "explained variance of the rank-4 subspace" in stdout
    # each stage says how many epochs its budget is over its training data, so memorisation can be foreseen
    assert "[tiny-teacher] 256 training examples, 6 steps x batch 16 = 0.38 epochs" in stdout
    # each step line says how long the stage has left at its pace so far
    assert re.search(r"\[tiny-student\] step 3/6 ce=.* eta=\d+s\n", stdout) and "[tiny-student] step 6/6 " in stdout
    assert "student (lori, no CoT) on 16 training problems:" in stdout
    # Ray Train's per-report lines (every metric, every rank, every log step) are not in the job's output
    assert "Reporting training result" not in stdout and "Checkpoint successfully created" not in stdout


def test_mlflow_holds_params_metrics_and_artifacts(tiny_run):
    run_dir, _ = tiny_run
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lori-ray"], output_format="list")
    parent = next(r for r in runs if r.info.run_name == "tiny")
    for key in ("teacher_accuracy", "student_accuracy", "explained_variance", "student_tokens_per_answer"):
        assert key in parent.data.metrics
    assert 0.0 <= parent.data.metrics["student_accuracy"] <= 1.0
    assert parent.data.params["subspace.rank"] == "4"
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"teacher", "trajectories", "student", "evaluate"} <= set(stages)
    client = mlflow.MlflowClient()
    ce = client.get_metric_history(stages["student"].info.run_id, "ce")
    assert [m.step for m in ce] == [3, 6]
    assert client.get_metric_history(stages["student"].info.run_id, "first_order")
    for stage in ("teacher", "student"):  # validation exact match at the end of each stage
        (val,) = client.get_metric_history(stages[stage].info.run_id, "val_accuracy")
        assert val.step == 6 and 0.0 <= val.value <= 1.0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "results.md"} <= artifacts
    # under the shared output_dir, not in the driver's working directory
    assert (run_dir / "mlartifacts" / parent.info.run_id / "artifacts" / "results.md").is_file()
    spectrum = {a.path for a in client.list_artifacts(stages["trajectories"].info.run_id)}
    assert {"subspace_spectrum.json", "subspace_spectrum.png"} <= spectrum
    assert "erank_layer_1" in stages["trajectories"].data.metrics


def test_models_are_plain_hf_directories(tiny_run):
    run_dir, _ = tiny_run
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / name)
        tokenizer = AutoTokenizer.from_pretrained(run_dir / name)
        assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert "<latent_0>" in AutoTokenizer.from_pretrained(run_dir / "student").get_vocab()
    # each carries its prompt contract and a model card with the results and a usage example
    card = (run_dir / "student" / "README.md").read_text()
    assert "| student (lori, no CoT) |" in card and 'python -m lori_ray.predict' in card
    assert json.loads((run_dir / "student" / "lori-model.json").read_text())["latent_slots"] == 2
    assert json.loads((run_dir / "teacher" / "lori-model.json").read_text())["latent_slots"] is None
    answer = subprocess.run([sys.executable, "-m", "lori_ray.predict", str(run_dir / "student"), "12 * 34"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert answer.returncode == 0 and answer.stdout.startswith("12 * 34 = "), answer.stderr
    # the final checkpoint is the HF model; no DeepSpeed state, which nothing resumes from after the last step
    checkpoint = run_dir / "ray" / "tiny-student" / "step-000006"
    assert (checkpoint / "hf" / "model.safetensors").is_file() and not (checkpoint / "ds").exists()


def test_trajectory_store_is_complete_and_consistent(tiny_run):
    run_dir, _ = tiny_run
    (store,) = [p.parent for p in (run_dir.parent / "trajectories").glob("*/manifest.json")]
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["examples"] == 256 and manifest["layers"] == [1, 2] and manifest["max_rank"] == 8
    index = sorted(i for shard in (store / "coords").glob("*.safetensors") for i in load_file(shard)["index"].tolist())
    assert index == list(range(256))  # every example exactly once


def test_tucker_fit_from_the_store_without_a_teacher_pass(tiny_run):
    from lori_ray.trajectories import TrajectoryStore

    run_dir, _ = tiny_run
    (manifest,) = (run_dir.parent / "trajectories").glob("*/manifest.json")
    store = TrajectoryStore(manifest.parent)
    extractions_before = store.extractions()
    index, coordinates, tucker = store.tucker(steps=2, layer_rank=2, step_rank=2, rank=4)
    assert sorted(index) == list(range(256)) and coordinates.shape == (256, 2, 2, 4)
    assert set(tucker.explained_variance()) == {"layer", "step", "hidden"}
    assert store.extractions() == extractions_before


def test_student_and_teacher_are_mlflow_models_that_answer_plain_questions(tiny_run):
    run_dir, stdout = tiny_run
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    uris = dict(re.findall(r"\[tracking\] (\w+) logged as an MLflow model: (models:/\S+)", stdout))
    assert set(uris) == {"student", "teacher"}
    student = mlflow.pyfunc.load_model(uris["student"])
    logged = {p.name for p in Path(mlflow.artifacts.download_artifacts(uris["student"])).iterdir()}
    assert "mlflow_model.py" in logged and "python_model.pkl" not in logged  # logged as code: nothing unpickled
    answer = subprocess.run([sys.executable, "-m", "lori_ray.predict", str(run_dir / "student"), "12 * 34"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False).stdout
    assert [f"12 * 34 = {a}\n" for a in student.predict(["12 * 34"])] == [answer]  # the same model, served
    # the transformers flavour: the same model as a text-generation pipeline, prompted as the card shows
    hf_uris = dict(re.findall(r"\[tracking\] (\w+) logged as an MLflow model: \S+ \(pyfunc[^)]*\), (models:/\S+) "
                              r"\(transformers", stdout))
    assert set(hf_uris) == {"student", "teacher"}
    from lori_ray.predict import CONTRACT_FILE, Contract, plain_prompt
    pipeline = mlflow.transformers.load_model(hf_uris["student"])
    text, special = plain_prompt(run_dir / "student", Contract.read(run_dir / "student" / CONTRACT_FILE), "12 * 34")
    generated = pipeline(text, max_new_tokens=8, do_sample=False, return_full_text=False,
                         add_special_tokens=special)[0]["generated_text"]
    model, tokenizer = (auto.from_pretrained(run_dir / "student") for auto in (AutoModelForCausalLM, AutoTokenizer))
    ids = tokenizer(text, add_special_tokens=special, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    runs = mlflow.search_runs(experiment_names=["lori-ray"], output_format="list")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    models = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    assert sorted(m.name for m in models) == ["student", "student-transformers", "teacher", "teacher-transformers"]
    assert {m.source_run_id for m in models} == {parent.info.run_id}
    # each is listed on the stage run that trained it, not only on the parent
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    by_id = {m.model_id: m.name for m in models}
    for stage in ("teacher", "student"):
        outputs = mlflow.MlflowClient().get_run(stages[stage].info.run_id).outputs.model_outputs
        assert sorted(by_id[o.model_id] for o in outputs) == [stage, f"{stage}-transformers"]


def test_parallel_runs_start_after_the_shared_store_and_one_failure_keeps_the_others(tmp_path, monkeypatch):
    """``run_sharing_teacher(parallel=3)``: the later runs wait for the first one's teacher and store, are pointed
    at its teacher, overlap each other, and a failing one leaves the others' reports (``RunsFailed``)."""
    import threading
    import time

    from lori_ray import recipe
    from lori_ray.config import load_config

    configs = {m: load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path}", f"name=tiny-{m}"])
               for m in ("lori", "nocot", "icot_kd")}
    events, running, overlapped = [], set(), threading.Event()

    def fake_run(config, teacher_result=None, on_store=None):
        method = config.name.removeprefix("tiny-")
        if on_store:  # the first run: its teacher appears, then its store
            time.sleep(0.2)
            (config.run_dir / "teacher").mkdir(parents=True)
            events.append("store")
            on_store()
        else:
            events.append(f"start {method} from {Path(config.teacher.path).relative_to(tmp_path)}")
        running.add(method)
        if len(running) == 3:
            overlapped.set()
        overlapped.wait(timeout=5)
        if method == "icot_kd":
            raise ValueError("icot_kd broke")
        return f"report {method}"

    monkeypatch.setattr(recipe, "run", fake_run)
    with pytest.raises(recipe.RunsFailed, match="icot_kd failed: ValueError: icot_kd broke") as failure:
        recipe.run_sharing_teacher(configs, parallel=3)
    assert events[0] == "store" and sorted(events[1:]) == ["start icot_kd from tiny-lori/teacher",
                                                           "start nocot from tiny-lori/teacher"]
    assert overlapped.is_set()  # all three ran at once
    assert failure.value.reports == {"lori": "report lori", "nocot": "report nocot"}
    assert list(failure.value.failed) == ["icot_kd"]


def test_a_separate_pretrained_student_of_another_width_and_depth_trains_and_answers(tmp_path, tiny_run, ray_head):
    """The user's own student (a 4-layer, 128-wide Llama saved with the teacher's tokenizer) distilled from the
    session's 2-layer, 64-wide tiny teacher: its own weights are the start, the alignment goes through a
    least-squares projection, its layers pair with the teacher's by relative depth."""
    from lori_ray.models import build_model
    from lori_ray.tokens import load_tokenizer
    teacher = tiny_run[0] / "teacher"
    tokenizer = load_tokenizer(str(teacher))
    mine = tmp_path / "my-student"
    build_model("llama", "small", len(tokenizer), 64, {"pad_token_id": tokenizer.pad_token_id},
                seed=7).save_pretrained(mine)
    tokenizer.save_pretrained(mine)
    result = subprocess.run([sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml",
                             f"output_dir={tmp_path}", ray_head.override, f"teacher.path={teacher}",
                             f"student.path={mine}",
                             "student.train.num_workers=1", "trajectory.num_actors=1"],
                            cwd=ROOT, env=ray_head.env(), capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    init = load_file(tmp_path / "tiny" / "student-init" / "model.safetensors")
    start = load_file(mine / "model.safetensors")
    assert all(torch.equal(init[k], start[k]) for k in start if "embed" not in k and "lm_head" not in k)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny" / "student")
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (128, 4)
    assert load_file(tmp_path / "tiny" / "data" / "projection.safetensors")  # the width-bridging projection
    assert "| student (lori, no CoT) |" in result.stdout

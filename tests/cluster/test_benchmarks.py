"""The benchmark scripts run end to end on CPU at tiny sizes and print their tables (figures are theirs
to report; these tests only prove the code paths work)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
from transformers import AutoModelForCausalLM

from lori_ray.provenance import MARKER

ROOT = Path(__file__).resolve().parents[2]


def run(env: dict[str, str], *args: str, timeout: int = 900) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def rate(table: str, row: str) -> float:
    (line,) = [line for line in table.splitlines() if line.startswith(f"| {row}")]
    return float(line.split("|")[2].replace(",", ""))


def test_throughput_benchmark_prints_every_measurement(tmp_path, job_env):
    out = run(job_env(), "bench/throughput.py", "--size", "tiny", "--steps", "3", "--seq", "64", "--extract", "64",
              "--generate", "8", "--new-tokens", "8", "--peak-size", "256", "--compile",  # train.compile too
              "--markdown", str(tmp_path / "throughput.md"))
    written = (tmp_path / "throughput.md").read_text()
    assert written.startswith(MARKER + "\n- command: `python bench/throughput.py --size tiny ")
    assert written.split("\n\n", 1)[1].strip() in out  # the printed table, under its provenance header
    assert re.search(r"matmul peak [\d.]+ TFLOP/s", out)
    for row in ("plain PyTorch eager step", "Ray Train + DeepSpeed step", "bare teacher forward",
                "trajectory extraction", "HF generate, batch 8", "HF generate + static cache"):
        assert rate(out, row) > 0, row


def test_loss_overhead_benchmark(job_env):
    out = run(job_env(), "bench/loss_overhead.py", "--size", "tiny", "--batch", "8", "--steps", "2")
    assert re.search(r"LoRi overhead [+-][\d.]+%", out)


def test_red_benchmark_prints_its_table_and_reruns_on_its_finished_stages(tmp_path, tiny_run, ray_head):
    """RED students through the real pipeline: pruned to half width and one layer, explicit CoT, CE + logit KD,
    on a DeepSpeed ZeRO-2 worker each, both at once, from the tiny run's teacher; each is a plain HF model and its
    eRank diagnostics reach MLflow."""
    teacher = tiny_run[0] / "teacher"
    command = ("bench/red.py", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}", ray_head.override,
               f"teacher.path={teacher}",
               "student.method=explicit", "loss.kd=1.0", "student.kind=pruned", "student.width=32",
               "student.init=activation", "student.depth=1", "student.train.num_workers=1", "--widths", "0.5",
               "--inits", "random", "activation", "--parallel", "2", "--full-width")
    out = run(ray_head.env(), *command)
    for init in ("random", "activation"):
        assert re.search(rf"\| width 32 \| {init} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \| [\d.]+x \| [\d.]+ \| "
                         rf"[\d.]+ \|", out)
    # the full-width student of the same method: the speedups above are over it and over the teacher
    assert re.search(r"\| width 64 \| teacher \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \| 1.00x \|", out)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-full" / "student").config.hidden_size == 64
    assert (tmp_path / "tiny" / "red.json").is_file()
    assert (tmp_path / "tiny" / "red.md").read_text().startswith(MARKER + "\n- command: `python bench/red.py")
    # one MLflow store for the comparison: the first student's
    assert (tmp_path / "tiny-w32-random" / "mlflow.db").is_file()
    assert not (tmp_path / "tiny-w32-activation" / "mlflow.db").exists()

    run_dir = tmp_path / "tiny-w32-activation"
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 1
    erank = json.loads((run_dir / "erank.json").read_text())
    assert set(erank) == {"teacher", "student init", "student trained"}
    assert len(erank["teacher"]) == 3 and len(erank["student trained"]) == 2  # embeddings + layers
    assert all(1.0 <= v <= 64 for values in erank.values() for v in values)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'tiny-w32-random' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lori-ray"], output_format="list")
    client = mlflow.MlflowClient()
    students = [r for r in runs if r.info.run_name == "student"]
    assert len(students) == 3 and all(client.get_metric_history(r.info.run_id, "kd") for r in students)
    diagnostics = [r for r in runs if r.info.run_name == "erank"]  # one per student: two pruned, one full width
    assert len(diagnostics) == 3 and all("erank_student_trained_layer_1" in r.data.metrics for r in diagnostics)
    assert all({"erank.png", "erank.json"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
               for r in diagnostics)
    card = (run_dir / "student" / "README.md").read_text()
    # the card names the teacher without the local absolute path: the last two parts of it
    assert "[teacher] done in" not in out and "Teacher: tiny/teacher." in card and str(teacher) not in card
    # an interrupted bench reruns on its finished stages
    rerun = run(ray_head.env(), *command)
    assert rerun.count("[student] finished model found") == 3 and "[student] done in" not in rerun


def test_milestones_give_the_first_point_past_each_threshold_and_where_a_curve_ended():
    sys.path.insert(0, str(ROOT / "bench"))
    from accuracy import milestones
    text = milestones({("lori", 0): [(500, 2.0, 0.3), (1000, 4.0, 0.55), (1500, 6.0, 0.91)],
                       ("nocot", 0): [(500, 1.5, 0.1), (1000, 3.0, 0.2)], ("codi", 1): []})
    assert "| lori | 0 | step 1,000 (4.0 min) | step 1,500 (6.0 min) | 0.910 at step 1,500 (6.0 min) |" in text
    assert "| nocot | 0 | not reached | not reached | 0.200 at step 1,000 (3.0 min) |" in text
    assert "| codi | 1 | not reached | not reached | – |" in text


def test_accuracy_benchmark_aggregates_student_seeds_and_draws_their_curves(tmp_path, tiny_run, ray_head):
    """Two seeds of one method share the teacher (the tiny run's) and the store; the table shows both seeds,
    their mean, training-problem accuracy and per-digit accuracy; the curves come from each seed's own run. Run
    again, it skips the seeds it finished and evaluates only the one whose results are gone."""
    command = ("bench/accuracy.py", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}", ray_head.override,
               f"teacher.path={tiny_run[0] / 'teacher'}", "loss.align_at=answer", "student.train.eval_every=3",
               "student.train.num_workers=1", "--methods", "lori", "--seeds", "2", "--parallel", "2")
    out = run(ray_head.env(), *command)
    assert "[teacher] done in" not in out and out.count("[student] done in") == 2
    assert "trajectory store" in out and "found, skipping extraction" in out  # the second seed reuses the store
    # and its tokenized sequences (training and validation split): tokenized once, by one of the parallel runs
    assert out.count("student sequences tokenized in") == 2, out
    assert out.count("student sequences read from the tokenized cache") == 2
    (row,) = [line for line in out.splitlines() if line.startswith("| lori |") and " ± " in line]
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    per_seed = [float(v) for v in cells[2].split(", ")]
    assert len(per_seed) == 2 and cells[1].startswith(f"{sum(per_seed) / 2:.3f} ± ")
    assert len(cells[4].split(" / ")) == 4  # 2x2 multiplication: four answer digits
    assert "| explicit CoT teacher |" in out and re.search(r"\| lori \| 1 \| (step|not reached).* at step 6 ", out)
    assert (tmp_path / "tiny" / "accuracy.md").read_text().strip() in out
    assert (tmp_path / "tiny" / "accuracy.md").read_text().startswith(MARKER + "\n- command: `python bench/accuracy.py")
    assert (tmp_path / "tiny" / "curves.png").stat().st_size > 0
    # each seed trained with its own student seed, under its own name, logged to the first run's store
    import mlflow

    from lori_ray.tracking import stage_history
    uri = f"sqlite:///{tmp_path / 'tiny-lori-s0' / 'mlflow.db'}"
    for seed in (0, 1):
        assert [step for step, _, _ in stage_history(uri, "lori-ray", f"tiny-lori-s{seed}", "student",
                                                     "val_accuracy")] == [3, 6]
        assert f"seed: {seed}" in (tmp_path / f"tiny-lori-s{seed}" / "config.yaml").read_text().split("student:")[1]
    client = mlflow.MlflowClient(uri)
    (bench,) = client.search_runs([client.get_experiment_by_name("lori-ray").experiment_id],
                                  "tags.mlflow.runName = 'tiny-benchmark'")
    assert {"accuracy.md", "curves.png"} <= {a.path for a in client.list_artifacts(bench.info.run_id)}

    (tmp_path / "tiny-lori-s1" / "report.json").unlink()  # seed 1 stopped after its student, before its results
    again = run(ray_head.env(), *command)
    assert "[student] done in" not in again and again.count("[student] finished model found") == 2
    assert again.count("evaluated before on the same models and problems") == 1  # seed 0's results, not evaluated
    assert "tiny-lori-s0: evaluated before" in again and (tmp_path / "tiny-lori-s1" / "report.json").is_file()
    (row_again,) = [line for line in again.splitlines() if line.startswith("| lori |") and " ± " in line]
    # greedy evaluation of the same models: the same accuracies (the timing columns are measured anew)
    assert row_again.split("|")[1:7] == row.split("|")[1:7]


def test_teachers_benchmark_trains_one_teacher_per_seed_and_reruns_on_the_finished_ones(tmp_path, ray_head):
    """Two seeds, trained at once: each teacher under its own name and seed, their validation curves side by side
    and each one's held-out result; run again, it trains and evaluates nothing."""
    command = ("bench/teachers.py", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}", ray_head.override,
               "teacher.train.num_workers=1", "teacher.train.eval_every=3", "--seeds", "2", "--parallel", "2")
    out = run(ray_head.env(), *command)
    assert out.count("[teacher] done in") == 2
    rows = {int(line.split("|")[1]): line for line in out.splitlines()
            if re.match(r"\| \d \| (step|not reached)", line)}
    assert set(rows) == {0, 1}
    assert all(re.search(r"\| [\d.]+ at step 6 \| [\d.]+ \| [\d.]+ \| [\d.]+ / [\d.]+ / [\d.]+ / [\d.]+ \|$", row)
               for row in rows.values())
    assert (re.search(r"^\| 3 \| [\d.]+ \| [\d.]+ \|$", out, re.MULTILINE)
            and re.search(r"^\| 6 \| [\d.]+ \| [\d.]+ \|$", out, re.MULTILINE))
    assert (tmp_path / "tiny-teachers.md").read_text().strip() in out
    assert (tmp_path / "tiny-teachers.md").read_text().startswith(MARKER + "\n- command: `python bench/teachers.py")
    for seed in (0, 1):
        assert f"\nseed: {seed}\n" in (tmp_path / f"tiny-teacher-s{seed}" / "config.yaml").read_text()
    weights = [AutoModelForCausalLM.from_pretrained(tmp_path / f"tiny-teacher-s{seed}" / "teacher").lm_head.weight
               for seed in (0, 1)]
    assert not weights[0].equal(weights[1])  # its own initial weights and data, not a copy

    again = run(ray_head.env(), *command)
    assert "[teacher] done in" not in again and again.count("[teacher] finished model found") == 2
    assert again.count("teacher evaluated before on the same problems") == 2
    assert {line.split("|")[4] for line in again.splitlines() if line.startswith("| 0 |")} == \
        {rows[0].split("|")[4]}

"""The distillation recipe: data → teacher SFT → trajectory store → LoRi student → evaluation.

Each stage is a plain function; finished stages are found on disk and skipped, so rerunning a
run with the same name continues where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch
from safetensors.torch import load_file, save_file

from . import storage
from .checkpoints import run_key
from .cluster import gpus, on_a_gpu
from .config import Config, ConfigError, shared_teacher_path
from .curriculum import cot_spans, step_starts
from .data import Example
from .evaluate import EvalResult, evaluate, format_digits
from .fingerprint import finished, inputs_digest, stage_inputs
from .losses import standardize, trajectory_scale
from .models import build_model, load_model, local_model_dir, model_shape
from .objective import AnswerReadout, TrajectoryProjection, TuckerProjection, pair_layers, slot_states
from .plots import erank_figure, spectrum_figure, spectrum_summary
from .predict import Contract, write_model_files
from .preflight import Splits, load_data
from .storage import published_directory, write_local
from .students import PrunedModel, channel_scores, hidden_erank, load_student
from .subspace import resample_steps
from .teacher import build_store, complete_missing_cots
from .tokens import Layout, add_latent_tokens, arithmetic_tokenizer, collate, load_tokenizer
from .tracking import log_model, pipeline_run, stage_run
from .train import DRIVER_TURNS, Stage, fit


def log(message: str) -> None:
    """One line of the job's output, with the credentials of any URI in it replaced by ***."""
    print(storage.redact(message), flush=True)


def initial_model_dir(config: Config) -> Path:
    """The model the teacher starts from: a pretrained directory, or a preset saved with our tokenizer."""
    if config.model.path:
        return local_model_dir(config.model.path, config.model.gguf_file, config.model.trust_remote_code, log)
    directory = config.run_dir / "init"
    if not directory.is_dir():
        tokenizer = arithmetic_tokenizer()
        special = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
        model = build_model(config.model.family, config.model.size, len(tokenizer), config.model.max_positions,
                            special, seed=config.seed)
        with published_directory(directory) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return directory


def write_tensors(sequences, pad_id: int, max_positions: int, path: Path, **extra: torch.Tensor) -> Path:
    longest = max(len(s.input_ids) for s in sequences)
    if longest > max_positions:
        raise ConfigError(f"model.max_positions: {max_positions} is shorter than the longest sequence ({longest})")
    tensors = collate(sequences, pad_id)
    tensors.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def make_stage(config: Config, name: str, model_dir: Path, data_path: Path, train_config, **fields) -> Stage:
    fields.setdefault("seed", config.seed)
    return Stage(name=f"{config.name}-{name}", model_dir=str(model_dir), data_path=str(data_path),
                 train=train_config.model_dump(), tracking_uri=config.tracking_uri(),
                 gpus_per_worker=gpus(config.cluster.gpus_per_worker), **fields)


def train_stage(config: Config, name: str, model_dir: Path, data_path: Path, train_config, **stage_fields) -> Path:
    """Train under a nested MLflow run. A stage found on disk is skipped when it was trained on the same inputs
    (``fingerprint.stage_inputs``), refused (StageChanged) when on other ones, trained again when incomplete."""
    output = config.run_dir / name
    inputs = stage_inputs(make_stage(config, name, model_dir, data_path, train_config, **stage_fields))
    if finished(output, inputs, name):
        log(f"[{name}] finished model found at {output} (same inputs), skipping")
        return output
    if output.exists():
        log(f"[{name}] {output} has no record of its inputs (interrupted, or from an older version): training again")
    with stage_run(name, train_config.model_dump()) as run:
        stage = make_stage(config, name, model_dir, data_path, train_config, run_id=run.info.run_id,
                           checkpoint_key=run_key(config.run_dir), inputs_digest=inputs_digest(inputs), **stage_fields)
        started = time.time()
        fit(stage, output, config.storage_path, fingerprint=inputs)
        mlflow.log_metric("stage_seconds", time.time() - started)
    log(f"[{name}] done in {time.time() - started:.0f}s -> {output}")
    return output


def validation_tensors(config: Config, sequences, pad_id: int, name: str) -> dict:
    """``val_path`` for a stage, when there is a validation split."""
    if not sequences:
        return {}
    path = config.run_dir / "data" / f"{name}-val.safetensors"
    return {"val_path": str(write_tensors(sequences, pad_id, config.model.max_positions, path))}


def teacher_sft(config: Config, splits: Splits) -> Path:
    if config.teacher.path:
        return Path(config.teacher.path)
    start = initial_model_dir(config)
    layout = Layout(load_tokenizer(str(start), config.model.trust_remote_code))
    data = write_tensors([layout.teacher(e) for e in splits.train], layout.pad, config.model.max_positions,
                         config.run_dir / "data" / "teacher.safetensors")
    val = validation_tensors(config, [layout.teacher(e) for e in splits.val], layout.pad, "teacher")
    return train_stage(config, "teacher", start, data, config.teacher.train, **val)


def calibration_batch(config: Config, layout: Layout, examples: list[Example], student: bool) -> dict:
    """Input tensors of the first ``student.calibration_size`` examples, as the teacher or the student sees them."""
    examples = examples[:config.student.calibration_size]
    build = layout.student if student else layout.teacher
    tensors = collate([build(e) for e in examples], layout.pad)
    return {k: tensors[k] for k in ("input_ids", "attention_mask")}


def student_init(config: Config, teacher_dir: Path, slots: int, train: list[Example]) -> Path:
    """The initial student plus ``slots`` trainable latent-slot tokens: the teacher's weights, a fresh
    preset, or (``kind: pruned``) the teacher through channel-selection or random projections."""
    directory = config.run_dir / "student-init"
    student = config.student
    tokenizer = load_tokenizer(str(teacher_dir), config.model.trust_remote_code)
    add_latent_tokens(tokenizer, slots)
    if student.kind == "pruned":
        teacher = load_model(teacher_dir, trust_remote_code=config.model.trust_remote_code).eval()
        batch = calibration_batch(config, Layout(tokenizer), train, student=False)
        with torch.no_grad():
            scores = channel_scores(teacher(**batch, output_hidden_states=True).hidden_states, batch["attention_mask"])
        model = PrunedModel.initial(teacher, student.width, student.depth, student.init, scores, len(tokenizer),
                                    seed=config.student_seed + 2)
        with published_directory(directory) as staging:
            model.save_init(staging, teacher_dir)
            tokenizer.save_pretrained(staging)
        return directory
    if student.init == "teacher":
        model = load_model(teacher_dir, trust_remote_code=config.model.trust_remote_code)
    else:
        teacher = json.loads((teacher_dir / "config.json").read_text())
        special = {f"{k}_token_id": teacher.get(f"{k}_token_id") for k in ("pad", "bos", "eos")}
        model = build_model(config.model.family, student.size or config.model.size, len(tokenizer),
                            config.model.max_positions, special, seed=config.student_seed + 2)
    model.resize_token_embeddings(len(tokenizer))
    with published_directory(directory) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return directory


def latent_slots(config: Config) -> int | None:
    """Latent slots of the student; ``None``: it writes the CoT (``explicit``)."""
    method = config.student.method
    if method == "explicit":
        return None
    if method in ("nocot", "icot_si", "codi") or (method == "lori" and config.loss.align_at == "answer"):
        return 0
    return config.student.latent_slots


def curriculum(config: Config, sequences, layout: Layout) -> tuple[dict[str, torch.Tensor], dict]:
    """The curriculum's tensors and stage fields: the CoT span of each teacher sequence (its first CoT token,
    its length up to ``####``) and the worker's schedule, for ICoT-SI removal (``icot_si``, or
    ``student.curriculum: removal``) and Coconut's stages (``coconut``: also where each CoT step starts);
    none otherwise."""
    student = config.student
    fields = {"reset_optimizer": student.reset_optimizer}
    if not (student.removes_cot or student.staged):
        return {}, {}
    starts, lengths = cot_spans(sequences)
    if student.staged:
        steps_per_stage = student.steps_per_stage or max(student.train.steps // (student.stages + 1), 1)
        log(f"[student] stages curriculum: one more CoT step becomes {student.latents_per_step} continuous "
            f"latent(s) every {steps_per_stage} steps; no language CoT left from step "
            f"{steps_per_stage * student.stages} of {student.train.steps}")
        return ({"cot_start": starts, "cot_length": lengths, "step_starts": step_starts(sequences)},
                {"stages": {"steps_per_stage": steps_per_stage, "last": student.stages,
                            "latents_per_step": student.latents_per_step, "latent_ids": layout.latent_ids,
                            "pad_id": layout.pad}, **fields})
    steps_per_token = len(sequences) / student.train.batch_size / student.removal_tokens_per_epoch
    log(f"[student] removal curriculum: {student.removal_tokens_per_epoch:g} CoT tokens per epoch (one every "
        f"{steps_per_token:.3g} steps), all {int(lengths.max())} gone by step "
        f"{math.ceil(int(lengths.max()) * steps_per_token)} of {student.train.steps}")
    return ({"cot_start": starts, "cot_length": lengths},
            {"removal": {"steps_per_token": steps_per_token,
                         "smoothing": student.removal_smoothing, "pad_id": layout.pad}, **fields})


def trajectory_segments(config: Config) -> str:
    """What one unit of the stored trajectories averages (``Layout.segments``): codi's target is the
    teacher's state at ``####``; every other method reads ``trajectory.segments``."""
    return "separator" if config.student.method == "codi" else config.trajectory.segments


def answer_positions(sequences) -> torch.Tensor:
    """Positions of ``####`` and the answer tokens of each sequence [n, P], padded with -1."""
    spans = [range(*s.answer) for s in sequences]
    positions = torch.full((len(spans), max(len(r) for r in spans)), -1, dtype=torch.long)
    for row, span in enumerate(spans):
        positions[row, :len(span)] = torch.tensor(span)
    return positions


@torch.no_grad()
def calibrated_projection(model_dir: Path, data_path: Path, layers: list[int], fit, rows: int = 256):
    """Least squares (``fit(states, targets)``) from the initial student's slot states to the teacher's
    coordinates on a calibration batch: the projection init when student and teacher widths differ."""
    data = {k: v[:rows] for k, v in load_file(data_path).items()}
    output = load_student(model_dir).eval()(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                                          output_hidden_states=True)
    return fit(slot_states(output.hidden_states, layers, data["latent_positions"]), data["targets"])


def student_stage(config: Config, teacher_dir: Path, splits: Splits, store) -> tuple[Path, Path, dict]:
    """Initial model, training tensors and stage fields of the configured method:
    ``lori`` (CE + subspace alignment), ``icot_kd`` (CE + full-width hidden MSE at the latent slots),
    ``codi`` (CE + full-width hidden MSE at ``####``), ``nocot`` (CE), ``coconut`` (CE through Coconut's
    stages) or ``explicit`` (CE on the CoT and answer); any of them plus ``kd`` with the teacher run online."""
    method, slots, loss, train = config.student.method, latent_slots(config) or 0, config.loss, splits.train
    init = on_a_gpu(config.cluster.gpus_per_actor, student_init, config, teacher_dir, slots,
                    train[:config.student.calibration_size])
    tokenizer = load_tokenizer(str(init))
    layout = Layout(tokenizer, add_latent_tokens(tokenizer, slots))
    build = layout.teacher if method == "explicit" else layout.student
    data_path = config.run_dir / "data" / "student.safetensors"
    kd = {"teacher_dir": str(teacher_dir), "kd_temperature": loss.kd_temperature} if loss.kd else {}
    # the student's own seed (batch order, fresh weights): seeds of one method share teacher and data
    common = {"seed": config.student_seed, **kd,
              **validation_tensors(config, [build(e) for e in splits.val], layout.pad, "student")}
    if config.student.continuous:
        common["continuous_latents"] = layout.latent_ids

    def with_teacher(examples: list[Example]) -> dict[str, torch.Tensor]:
        """The teacher's own sequences for the kd term (an explicit student already trains on them)."""
        if not loss.kd or method == "explicit":
            return {}
        tensors = collate([Layout(tokenizer).teacher(e) for e in examples], layout.pad)
        return {f"teacher_{k}": v for k, v in tensors.items()}

    if config.student.removes_cot or config.student.staged:
        build = Layout(tokenizer).teacher  # trained on the teacher's sequences, losing their CoT (validation has none)
    if method in ("nocot", "icot_si", "coconut", "explicit"):
        sequences = [build(e) for e in train]
        schedule, fields = curriculum(config, sequences, layout)
        data = write_tensors(sequences, layout.pad, config.model.max_positions, data_path,
                             **with_teacher(train), **schedule)
        return init, data, {"weights": {"ce": loss.ce, "kd": loss.kd}, **fields, **common}

    stored_layers = store.manifest["layers"]
    student_width, student_layers = model_shape_of(init, config)
    teacher_width, teacher_layers = model_shape_of(teacher_dir, config)
    pairs = pair_layers(student_layers, teacher_layers, config.loss.layers or stored_layers)
    rows = [stored_layers.index(t) for _, t in pairs]
    align_at = config.loss.align_at if method == "lori" else "latents"
    # digit segments (PCA): one trajectory unit per answer digit, read at the answer position that writes that
    # digit (not resampled); a Tucker core mixes the units, so every position reads all of it
    per_digit = config.trajectory.segments == "digits" and align_at != "latents" and config.subspace.kind == "pca"
    steps = None if per_digit or method == "codi" else config.student.latent_slots
    tucker = None
    if method == "lori" and config.subspace.kind == "tucker":
        if rows != list(range(len(stored_layers))):
            raise ConfigError(f"subspace.kind: tucker needs a student layer paired with each stored teacher layer "
                              f"{stored_layers}; pairs are {pairs}")
        index, targets, tucker = store.tucker(steps, *config.subspace.tucker_ranks, config.subspace.rank)
        log(f"[student] Tucker fit, explained variance per mode: {tucker.explained_variance()}")
    elif method == "lori":
        index, targets = store.coordinates(config.subspace.rank, steps)
        targets = targets[:, rows]
    else:
        index, targets = store.hidden(steps)
        targets = targets[:, rows]
    sequences = [build(train[i]) for i in index]
    student_layers = [s for s, _ in pairs]
    tensors, fields = curriculum(config, sequences, layout)
    fields.update(student_layers=student_layers, **common)
    weights = {"ce": loss.ce, "kd": loss.kd}
    tensors.update(with_teacher([train[i] for i in index]))
    if align_at != "latents":
        positions = answer_positions(sequences)
        if per_digit:  # answer position p (which writes digit p) reads digit p's column
            answer_targets, positions = targets, positions[:, :targets.shape[2]]
        else:  # every position reads the whole trajectory: [n, L, F] (a Tucker core is one for all layers)
            answer_targets = (targets.flatten(1)[:, None].expand(-1, len(pairs), -1) if tucker is not None
                              else targets.flatten(2))
        tensors.update(answer_positions=positions,
                       answer_targets=standardize(answer_targets) if loss.normalize else answer_targets.float())
        torch.manual_seed(config.student_seed + 3)
        readout = AnswerReadout(len(pairs), positions.shape[1], answer_targets.shape[-1], student_width)
        readout_path = config.run_dir / "data" / "readout.safetensors"
        save_file({k: v.detach().contiguous() for k, v in readout.state_dict().items()}, readout_path)
        fields["readout_path"] = str(readout_path)
        weights["answer_align"] = loss.answer
        log(f"[student] answer alignment: {len(pairs)} layers x {positions.shape[1]} positions read "
            f"{answer_targets.shape[-1]} trajectory features{' of their digit' if per_digit else ''}")
        if align_at == "both" and per_digit:  # the latent slots still align with K resampled units
            targets = resample_steps(targets, config.student.latent_slots)
    if align_at != "answer":  # codi: the one aligned position is ``####``
        aligned = [[s.answer[0]] if method == "codi" else [start for start, _ in s.spans] for s in sequences]
        tensors.update(latent_positions=torch.tensor(aligned),
                       targets=targets.float())
        if loss.normalize:  # Tucker cores mix layers: one scale for all of them
            fields["target_scale"] = trajectory_scale(targets, per_layer=tucker is None).tolist()
    data = write_tensors(sequences, layout.pad, config.model.max_positions, data_path, **tensors)
    if method in ("icot_kd", "codi"):
        return init, data, {"weights": {**weights, "hidden_mse": loss.first_order}, **fields}
    if align_at == "answer":
        return init, data, {"weights": weights, **fields}

    same_width = student_width == teacher_width
    if tucker is not None:
        projection = (TuckerProjection.from_tucker(tucker) if same_width else calibrated_projection(
            init, data, student_layers, lambda states, targets: TuckerProjection.fit(tucker, states, targets)))
    elif same_width:
        subspace = store.subspace().truncate(config.subspace.rank)
        selected = type(subspace)(subspace.mean[rows], subspace.basis[rows], subspace.eigenvalues[rows])
        projection = TrajectoryProjection.from_subspace(selected)
    else:
        projection = calibrated_projection(init, data, student_layers, TrajectoryProjection.fit)
    projection_path = config.run_dir / "data" / "projection.safetensors"
    save_file({k: v.detach().contiguous() for k, v in projection.state_dict().items()}, projection_path)
    weights.update(first_order=loss.first_order, second_order=loss.second_order)
    return init, data, {"weights": weights, "projection_path": str(projection_path), **fields}


def distill_student(config: Config, teacher_dir: Path, splits: Splits, store) -> tuple[Path, Path]:
    """(initial student, trained student)."""
    init, data, fields = student_stage(config, teacher_dir, splits, store)
    return init, train_stage(config, "student", init, data, config.student.train, **fields)


def erank_diagnostics(config: Config, teacher_dir: Path, init_dir: Path, student_dir: Path,
                      examples: list[Example]) -> dict[str, list[float]]:
    """eRank per layer of hidden states on calibration examples: teacher, initial and trained student
    (each on its own sequences); saved as erank.json and logged to MLflow with a plot."""
    ranks = on_a_gpu(config.cluster.gpus_per_actor, hidden_eranks, config, teacher_dir, init_dir, student_dir,
                     examples[:config.student.calibration_size])
    with stage_run("erank"):
        for label, values in ranks.items():
            mlflow.log_metrics({f"erank_{label.replace(' ', '_')}_layer_{i}": v for i, v in enumerate(values)})
        mlflow.log_dict(ranks, "erank.json")
        mlflow.log_figure(erank_figure(ranks), "erank.png")
    write_local(config.run_dir / "erank.json", json.dumps(ranks, indent=1))
    return ranks


def hidden_eranks(config: Config, teacher_dir: Path, init_dir: Path, student_dir: Path,
                  examples: list[Example]) -> dict[str, list[float]]:
    tokenizer = load_tokenizer(str(init_dir))
    slots = latent_slots(config)
    teacher_batch = calibration_batch(config, Layout(tokenizer), examples, student=False)
    latents = add_latent_tokens(tokenizer, slots) if slots is not None else None
    student_batch = teacher_batch if slots is None else calibration_batch(
        config, Layout(tokenizer, latents), examples, student=True)
    if slots is not None and config.student.continuous:
        student_batch["latent_ids"] = latents
    code = config.model.trust_remote_code
    return {"teacher": hidden_erank(load_model(teacher_dir, trust_remote_code=code).eval(), **teacher_batch),
            "student init": hidden_erank(load_student(init_dir, code).eval(), **student_batch),
            "student trained": hidden_erank(load_model(student_dir, trust_remote_code=code).eval(), **student_batch)}


@dataclass
class Report:
    teacher: EvalResult
    student: EvalResult
    explained_variance: float  # mean over layers at the configured rank
    rank: int
    method: str
    erank: dict[str, list[float]]  # per layer: teacher, initial and trained student
    student_train: EvalResult | None = None  # the student on as many training problems: memorisation shows

    def table(self) -> str:
        speedup = self.teacher.seconds / max(self.student.seconds, 1e-9)
        student = f"student ({self.method}{'' if self.method == 'explicit' else ', no CoT'})"
        rows = [("teacher (explicit CoT)", self.teacher, "1.00x"), (student, self.student, f"{speedup:.2f}x")]
        lines = ["| model | accuracy | tokens/answer | inference s | speedup | per-digit accuracy |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {r.accuracy:.3f} | {r.tokens_per_answer:.1f} | {r.seconds:.2f} | {s} | "
                  f"{format_digits(r.digit_accuracy)} |" for name, r, s in rows]
        if self.student_train:
            lines.append(f"\n{student} on {self.student_train.examples} training problems: "
                         f"{self.student_train.accuracy:.3f} (held-out {self.student.accuracy:.3f})")
        lines.append(f"\nexplained variance of the rank-{self.rank} subspace (mean over layers): {self.explained_variance:.3f}")
        return "\n".join(lines)


def completed_train(config: Config, teacher_dir: Path, train: list[Example]) -> list[Example]:
    """``teacher.complete_cots``: the training examples with the teacher's CoT where the gold one is
    missing; cached in the run directory, so a rerun does not generate again."""
    path = config.run_dir / "data" / "train-completed.jsonl"
    if path.is_file():
        return [Example(r["question"], tuple(r["steps"]), r["answer"])
                for r in map(json.loads, path.read_text().splitlines())]
    completed = complete_missing_cots(teacher_dir, train, config.trajectory.num_actors, config.trajectory.batch_size,
                                      config.eval.max_new_tokens, config.model.trust_remote_code,
                                      gpus(config.cluster.gpus_per_actor), log=log)
    staging = path.with_suffix(".partial")
    staging.write_text("".join(json.dumps(asdict(e)) + "\n" for e in completed))
    staging.replace(path)
    return completed


def model_shape_of(directory: Path, config: Config) -> tuple[int, int]:
    """(hidden size, layers) of a model directory, whatever its family calls them (GPT-2: n_embd, n_layer)."""
    return model_shape(config.model.family, config.model.size, str(directory), config.model.trust_remote_code)


def trajectory_stage(config: Config, teacher_dir: Path, train: list[Example]):
    """Build (or find) the trajectory store; log the spectrum, eRank and their plot."""
    layers = config.trajectory.layers or list(range(1, model_shape_of(teacher_dir, config)[1] + 1))
    with stage_run("trajectories"):
        store = build_store(teacher_dir, train, layers, config.subspace.max_rank, config.store_dir,
                            config.trajectory.num_actors, config.trajectory.batch_size,
                            trust_remote_code=config.model.trust_remote_code,
                            gpus_per_actor=gpus(config.cluster.gpus_per_actor), log=log,
                            segments=trajectory_segments(config))
        subspace = store.subspace()
        spectrum = spectrum_summary(subspace, layers)
        mlflow.log_dict(spectrum, "subspace_spectrum.json")
        mlflow.log_figure(spectrum_figure(spectrum), "subspace_spectrum.png")
        for rank in range(1, config.subspace.max_rank + 1):
            mlflow.log_metric("explained_variance", subspace.explained_variance(rank).mean().item(), step=rank)
        mlflow.log_metrics({f"erank_layer_{layer}": value for layer, value in zip(layers, spectrum["erank"])})
    return store


def evaluate_model(config: Config, model_dir: Path, splits: dict[str, list[Example]],
                   slots: int | None) -> dict[str, EvalResult]:
    """Each named split's result, the model loaded once (on a GPU where the cluster has them); ``slots=None``:
    the teacher, prompted with the question and writing its CoT."""
    return on_a_gpu(config.cluster.gpus_per_actor, generate_and_score, config, model_dir, splits, slots)


def generate_and_score(config: Config, model_dir: Path, splits: dict[str, list[Example]],
                       slots: int | None) -> dict[str, EvalResult]:
    tokenizer = load_tokenizer(str(model_dir), config.model.trust_remote_code)
    layout = Layout(tokenizer, add_latent_tokens(tokenizer, slots) if slots is not None else None)
    continuous = slots is not None and config.student.continuous
    model = load_model(model_dir, trust_remote_code=config.model.trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
    role = "teacher" if slots is None else "student"
    results = {}
    for split, examples in splits.items():
        started = time.perf_counter()

        def progress(done: int, total: int, split: str = split, started: float = started) -> None:
            log(f"[eval] {role}: {done}/{total} {split} answers generated ({time.perf_counter() - started:.0f}s)")

        results[split] = evaluate(model, layout, examples, with_cot=slots is None, batch_size=config.eval.batch_size,
                                  max_new_tokens=config.eval.max_new_tokens, progress=progress, continuous=continuous)
    return results


def describe_models(config: Config, teacher_dir: Path, student_dir: Path, examples: int, results: str) -> None:
    """The prompt contract and model card of the student, and of the teacher when this run trained it."""
    data = config.data
    source = (f"{examples:,} {data.digits[0]}x{data.digits[1]} multiplication problems" if data.task == "multiplication"
              else f"{examples:,} examples of {Path(data.train_file).name}")
    digits = list(data.digits) if data.task == "multiplication" else None
    slots = latent_slots(config)
    contract = Contract("student", config.student.method, data.task, digits, slots,
                        slots is not None and config.student.continuous)
    write_model_files(student_dir, contract, str(teacher_dir), source, results)
    if not config.teacher.path:
        write_model_files(teacher_dir, Contract("teacher", "explicit CoT", data.task, digits, None), "itself",
                          source, results)


STAGES = ("teacher", "student")


def forget_stages(config: Config, first: str) -> list[Path]:
    """Delete the outputs of stage ``first`` and every later one (``--restart-from``), so they train again."""
    names = STAGES[STAGES.index(first):]
    outputs = [config.run_dir / name for name in names]
    if not storage.scheme(config.storage_path):  # their checkpoints too, or the stage would resume from them
        outputs += [Path(storage.join(config.storage_path, f"{config.name}-{name}")) for name in names]
    removed = [directory for directory in outputs if directory.exists()]
    for directory in removed:
        shutil.rmtree(directory)
        log(f"[{first}] --restart-from {first}: removed {directory}")
    return removed


def run(config: Config, teacher_result: EvalResult | None = None, on_store=None) -> Report:
    """All stages of one distillation run; Ray must already be initialised.

    ``teacher_result``: the teacher's evaluation when the caller already has it (same teacher, same split).
    ``on_store``: called once the teacher and the trajectory store are on disk (runs sharing them may start).
    """
    config.run_dir.mkdir(parents=True, exist_ok=True)
    write_local(config.run_dir / "config.yaml", config.to_yaml())
    splits = load_data(config)
    log(f"[data] {len(splits.train)} training, {len(splits.val)} validation and {len(splits.held_out)} "
        "held-out examples")
    with pipeline_run(config.tracking_uri(), config.tracking.experiment, config.name,
                      config.model_dump(mode="json"), config.to_yaml(), str(config.run_dir)) as parent:
        log(f"[tracking] MLflow run {parent.info.run_id} at {storage.redact(config.tracking_uri())}")
        teacher_dir = teacher_sft(config, splits)
        if config.teacher.complete_cots:
            splits = splits._replace(train=completed_train(config, teacher_dir, splits.train))
        store = trajectory_stage(config, teacher_dir, splits.train)
        if on_store:
            on_store()
        init_dir, student_dir = distill_student(config, teacher_dir, splits, store)
        erank = erank_diagnostics(config, teacher_dir, init_dir, student_dir, splits.train)
        with stage_run("evaluate"):
            teacher_result = teacher_result or evaluate_model(config, teacher_dir, {"held-out": splits.held_out},
                                                              slots=None)["held-out"]
            student = evaluate_model(config, student_dir, {"held-out": splits.held_out,
                                                           "training": splits.train[:len(splits.held_out)]},
                                     slots=latent_slots(config))
            student_result, student_train = student["held-out"], student["training"]
            report = Report(teacher_result, student_result,
                            store.subspace().explained_variance(config.subspace.rank).mean().item(),
                            config.subspace.rank, config.student.method, erank, student_train)
            metrics = {**teacher_result.as_metrics("teacher"), **student_result.as_metrics("student"),
                       **student_train.as_metrics("student_train"), "explained_variance": report.explained_variance}
            mlflow.log_metrics(metrics)
        mlflow.log_metrics(metrics)  # on the parent run too: one place to compare runs
        mlflow.log_text(report.table(), "results.md")
        write_local(config.run_dir / "results.md", report.table() + "\n")
        describe_models(config, teacher_dir, student_dir, len(splits.train), report.table())
        if config.tracking.log_models:
            trained_here = [("student", student_dir)] + ([] if config.teacher.path else [("teacher", teacher_dir)])
            for name, directory in trained_here:
                logged = log_model(name, directory)
                log(f"[tracking] {name} logged as an MLflow model: {logged.model_uri}")
    return report


def run_sharing_teacher(configs: dict, parallel: int = 1) -> dict:
    """``run`` for each config (benchmarks comparing students): the first run trains the teacher (unless
    ``teacher.path`` is set) and builds the trajectory store; every other run reuses both and logs to the first
    one's MLflow store, so one UI compares them all. ``parallel`` > 1: that many runs at once, the others
    starting as soon as the first run's store is built (each Ray Train stage must fit the cluster beside the
    others: fewer workers, or fractional ``cluster.gpus_per_worker``); one at a time, later runs also reuse the
    first one's held-out evaluation of the teacher."""
    first = next(iter(configs.values()))
    tracking_uri = first.tracking_uri()
    for config in configs.values():
        config.tracking.uri = config.tracking.uri or tracking_uri
    if parallel <= 1:
        reports, teacher_result = {}, None
        for key, config in configs.items():
            if config is not first:
                config.teacher.path = shared_teacher_path(first)
            reports[key] = run(config, teacher_result)
            teacher_result = reports[key].teacher
        return reports
    shared_ready = threading.Event()

    def after_first(config: Config) -> Report:
        shared_ready.wait()
        if not Path(shared_teacher_path(first)).is_dir():
            raise RuntimeError(f"{config.name}: not started, the first run ({first.name}) failed before its teacher "
                               f"and trajectory store were built")
        config.teacher.path = shared_teacher_path(first)
        with DRIVER_TURNS.turn():
            return run(config)

    def first_run() -> Report:
        try:
            with DRIVER_TURNS.turn():
                return run(first, on_store=shared_ready.set)
        finally:
            shared_ready.set()

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {key: pool.submit(first_run) if config is first else pool.submit(after_first, config)
                   for key, config in configs.items()}
    reports, failed = {}, {}
    for key, future in futures.items():
        if future.exception() is None:
            reports[key] = future.result()
        else:  # the other runs' results stay: one failed student must not cost the whole benchmark
            failed[key] = future.exception()
            log("".join(traceback.format_exception(failed[key])).rstrip())
    if failed:
        raise RunsFailed(reports, failed)
    return reports


class RunsFailed(RuntimeError):
    """Some of the runs sharing a teacher failed; ``reports`` holds the others'."""

    def __init__(self, reports: dict, failed: dict):
        self.reports, self.failed = reports, failed
        super().__init__("; ".join(f"{configs_name(key)} failed: {type(error).__name__}: {error}"
                                   for key, error in failed.items()))


def configs_name(key) -> str:
    return "-".join(map(str, key)) if isinstance(key, tuple) else str(key)

"""The student: its initial model, its training tensors and objective for the configured method, its training."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..batch import answer_positions, teacher_sequences
from ..cluster import on_a_gpu
from ..config import Config, ConfigError
from ..curriculum import PhaseSchedule, RemovalSchedule, cot_spans, step_starts
from ..data import Example
from ..fresh import FreshProblems
from ..losses import standardization, trajectory_scale
from ..methods import term_weights
from ..models import build_model, load_model
from ..objective import AnswerReadout, TrajectoryProjection, TuckerProjection, pair_layers, slot_states
from ..preflight import Splits
from ..pruned import PrunedModel, channel_scores, load_student
from ..storage import published_directory
from ..subspace import resample_steps
from ..tokens import Layout, add_latent_tokens, load_tokenizer
from . import log
from .training import calibration_batch, model_shape_of, sequences_of, train_stage, validation_tensors, write_tensors


def latent_slots(config: Config) -> int | None:
    """Latent slots of the student; ``None``: it writes the CoT (``explicit``)."""
    spec = config.student.spec
    if spec.writes_cot:
        return None
    return config.student.latent_slots if spec.has_slots(config.loss.align_at) else 0


def student_init(config: Config, teacher_dir: Path, slots: int, train: list[Example]) -> Path:
    """The initial student plus ``slots`` trainable latent-slot tokens: the teacher's weights, a fresh
    preset, the user's pretrained student (``student.path``), or (``kind: pruned``) the teacher through
    channel-selection or random projections."""
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
    if student.path:  # the user's pretrained student, reading the teacher's token ids (checked by the config)
        model = load_model(Path(student.path), trust_remote_code=config.model.trust_remote_code)
    elif student.init == "teacher":
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
                {"phases": PhaseSchedule(steps_per_stage=steps_per_stage, last=student.stages,
                                         latents_per_step=student.latents_per_step, latent_ids=layout.latent_ids,
                                         pad_id=layout.pad), **fields})
    steps_per_token = len(sequences) / student.train.batch_size / student.removal_tokens_per_epoch
    log(f"[student] removal curriculum: {student.removal_tokens_per_epoch:g} CoT tokens per epoch (one every "
        f"{steps_per_token:.3g} steps), all {int(lengths.max())} gone by step "
        f"{math.ceil(int(lengths.max()) * steps_per_token)} of {student.train.steps}")
    return ({"cot_start": starts, "cot_length": lengths},
            {"removal": RemovalSchedule(steps_per_token=steps_per_token, smoothing=student.removal_smoothing,
                                        pad_id=layout.pad), **fields})


def fresh_field(config: Config, splits: Splits, slots: int, targets: str = "none", teacher_dir: Path | None = None,
                teacher_layers: list[int] = (), tensors: dict[str, torch.Tensor] | None = None, readout: bool = False,
                slot_targets: bool = False, steps: int | None = None) -> dict:
    """The stage's ``fresh`` field for ``student.problems: fresh`` (none otherwise): the stream's seed and excluded
    questions, and what the worker computes the teacher's targets with (``tensors``: the subspace of the aligned
    layers and the answer readout's standardisation, fitted on the training split)."""
    if config.student.problems != "fresh":
        return {}
    targets_path = None
    if tensors:
        targets_path = config.run_dir / "data" / "fresh-targets.safetensors"
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, targets_path)
    excluded = sorted({e.question for e in splits.val + splits.held_out})
    train = config.student.train
    log(f"[student] fresh problems: {train.steps * train.batch_size} drawn over {train.steps} steps, never one of the "
        f"{len(excluded)} validation and held-out questions" + ("; the teacher's targets computed in each step"
                                                               if targets != "none" else ""))
    return {"fresh": FreshProblems(digits=tuple(config.data.digits), seed=config.student_seed, excluded=excluded,
                                   latent_slots=slots, segments=config.trajectory.segments, steps=steps,
                                   targets=targets,
                                   teacher_dir=str(teacher_dir) if teacher_dir else None,
                                   teacher_layers=list(teacher_layers), targets_path=str(targets_path or "") or None,
                                   readout=readout, slot_targets=slot_targets)}


@torch.no_grad()
def calibrated_projection(model_dir: Path, data_path: Path, layers: list[int], fit, rows: int = 256):
    """Least squares (``fit(states, targets)``) from the initial student's slot states to the teacher's
    coordinates on a calibration batch: the projection init when student and teacher widths differ."""
    data = {k: v[:rows] for k, v in load_file(data_path).items()}
    output = load_student(model_dir).eval()(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                                          output_hidden_states=True)
    return fit(slot_states(output.hidden_states, layers, data["latent_positions"]), data["targets"])


def student_stage(config: Config, teacher_dir: Path, splits: Splits, store) -> tuple[Path, Path, dict]:
    """Initial model, training tensors and stage fields of the configured method, as its spec
    (``methods.METHODS``) declares it: its sequences and curriculum, the teacher's targets at its alignment
    site (coordinates in the subspace, or full-width hidden states), the heads that map the student's states
    there (a projection at the slots, a readout at the answer), and its loss terms with their weights; any method
    plus ``kd`` with the teacher run online (docs/method.md#methods-and-baselines)."""
    spec, slots, loss, train = config.student.spec, latent_slots(config) or 0, config.loss, splits.train
    site, subspace = spec.site(loss.align_at), spec.alignment == "subspace"
    terms = spec.terms(loss.align_at, kd=bool(loss.kd))
    losses = {"terms": list(terms), "weights": term_weights(terms, loss)}
    init = on_a_gpu(config.cluster.gpus_per_actor, student_init, config, teacher_dir, slots,
                    train[:config.student.calibration_size])
    tokenizer = load_tokenizer(str(init))
    layout = Layout(tokenizer, add_latent_tokens(tokenizer, slots))
    kind = "teacher" if spec.writes_cot else "student"
    data_path = config.run_dir / "data" / "student.safetensors"
    kd = {"teacher_dir": str(teacher_dir), "kd_temperature": loss.kd_temperature} if loss.kd else {}
    # the student's own seed (batch order, fresh weights): seeds of one method share teacher and data
    common = {"seed": config.student_seed, **kd,
              **validation_tensors(config, layout, kind, splits.val, "student")}
    if config.student.continuous:
        common["continuous_latents"] = layout.latent_ids

    # the training split's sequences of each kind, read once (a removal or staged student with kd wants the
    # teacher's sequences both as its own and for the kd term)
    train_sequences = functools.cache(lambda kind: sequences_of(config, layout, kind, train))

    def with_teacher(index=None) -> dict[str, torch.Tensor]:
        """The teacher's own sequences (of ``train[i]`` for i in ``index``) for the kd term (an explicit student
        already trains on them)."""
        if not loss.kd or spec.writes_cot:
            return {}
        sequences = train_sequences("teacher")
        return teacher_sequences(sequences if index is None else [sequences[i] for i in index], layout.pad)

    if config.student.removes_cot or config.student.staged:
        kind = "teacher"  # trained on the teacher's sequences, losing their CoT (validation has none)
    if site is None:  # no alignment: CE (and kd) on its sequences
        sequences = train_sequences(kind)
        schedule, fields = curriculum(config, sequences, layout)
        data = write_tensors(sequences, layout.pad, config.model.max_positions, data_path,
                             **with_teacher(), **schedule)
        return init, data, {**losses, **fields, **common, **fresh_field(config, splits, slots)}

    stored_layers = store.manifest["layers"]
    student_width, student_layers = model_shape_of(init, config)
    teacher_width, teacher_layers = model_shape_of(teacher_dir, config)
    pairs = pair_layers(student_layers, teacher_layers, config.loss.layers or stored_layers)
    rows = [stored_layers.index(t) for _, t in pairs]
    reads_answer, aligns_slots = spec.reads_answer(loss.align_at), spec.aligns_slots(loss.align_at)
    # digit segments (PCA): one trajectory unit per answer digit, read at the answer position that writes that
    # digit (not resampled); a Tucker core mixes the units, so every position reads all of it
    per_digit = config.trajectory.segments == "digits" and reads_answer and config.subspace.kind == "pca"
    # ``####`` alone: the store's one unit per example
    steps = None if per_digit or site == "separator" else config.student.latent_slots
    tucker = None
    if subspace and config.subspace.kind == "tucker":
        if rows != list(range(len(stored_layers))):
            raise ConfigError(f"subspace.kind: tucker needs a student layer paired with each stored teacher layer "
                              f"{stored_layers}; pairs are {pairs}")
        index, targets, tucker = store.tucker(steps, *config.subspace.tucker_ranks, config.subspace.rank)
        log(f"[student] Tucker fit, explained variance per mode: {tucker.explained_variance()}")
    elif subspace:
        index, targets = store.coordinates(config.subspace.rank, steps)
        targets = targets[:, rows]
    else:
        index, targets = store.hidden(steps)
        targets = targets[:, rows]
    every = train_sequences(kind)
    sequences = [every[i] for i in index]
    student_layers = [s for s, _ in pairs]
    tensors, fields = curriculum(config, sequences, layout)
    fields.update(student_layers=student_layers, **common)
    tensors.update(with_teacher(index))
    fresh_tensors = {}  # what fresh problems' targets are computed with (``fresh``)
    if reads_answer:
        positions = answer_positions(sequences)
        if per_digit:  # answer position p (which writes digit p) reads digit p's column
            answer_targets, positions = targets, positions[:, :targets.shape[2]]
        else:  # every position reads the whole trajectory: [n, L, F] (a Tucker core is one for all layers)
            answer_targets = (targets.flatten(1)[:, None].expand(-1, len(pairs), -1) if tucker is not None
                              else targets.flatten(2))
        if loss.normalize:  # fresh problems' targets are standardised with the same statistics
            mean, std = standardization(answer_targets)
            answer_targets = (answer_targets.double() - mean) / std
            fresh_tensors.update(answer_mean=mean[0], answer_std=std[0])
        tensors.update(answer_positions=positions, answer_targets=answer_targets.float())
        torch.manual_seed(config.student_seed + 3)
        readout = AnswerReadout(len(pairs), positions.shape[1], answer_targets.shape[-1], student_width)
        readout_path = config.run_dir / "data" / "readout.safetensors"
        save_file({k: v.detach().contiguous() for k, v in readout.state_dict().items()}, readout_path)
        fields["readout_path"] = str(readout_path)
        log(f"[student] answer alignment: {len(pairs)} layers x {positions.shape[1]} positions read "
            f"{answer_targets.shape[-1]} trajectory features{' of their digit' if per_digit else ''}")
        if aligns_slots and per_digit:  # the latent slots still align with K resampled units
            targets = resample_steps(targets, config.student.latent_slots)
    if aligns_slots:
        aligned = [[s.answer[0]] if site == "separator" else [start for start, _ in s.spans] for s in sequences]
        tensors.update(latent_positions=torch.tensor(aligned),
                       targets=targets.float())
        if loss.normalize:  # Tucker cores mix layers: one scale for all of them
            fields["target_scale"] = trajectory_scale(targets, per_layer=tucker is None).tolist()
    data = write_tensors(sequences, layout.pad, config.model.max_positions, data_path, **tensors)
    if config.student.problems == "fresh":
        if subspace:
            fitted = store.subspace().truncate(config.subspace.rank)
            fresh_tensors.update(mean=fitted.mean[rows], basis=fitted.basis[rows],
                                 eigenvalues=fitted.eigenvalues[rows])
        fields.update(fresh_field(config, splits, slots, "coordinates" if subspace else "hidden",
                                  teacher_dir, [t for _, t in pairs], fresh_tensors, readout=reads_answer,
                                  slot_targets=aligns_slots, steps=steps))
    if not (subspace and aligns_slots):  # full-width states need no projection; a readout alone neither
        return init, data, {**losses, **fields}

    same_width = student_width == teacher_width
    if tucker is not None:
        projection = (TuckerProjection.from_tucker(tucker) if same_width else calibrated_projection(
            init, data, student_layers, lambda states, targets: TuckerProjection.fit(tucker, states, targets)))
    elif same_width:
        fitted = store.subspace().truncate(config.subspace.rank)
        selected = type(fitted)(fitted.mean[rows], fitted.basis[rows], fitted.eigenvalues[rows])
        projection = TrajectoryProjection.from_subspace(selected)
    else:
        projection = calibrated_projection(init, data, student_layers, TrajectoryProjection.fit)
    projection_path = config.run_dir / "data" / "projection.safetensors"
    save_file({k: v.detach().contiguous() for k, v in projection.state_dict().items()}, projection_path)
    return init, data, {**losses, "projection_path": str(projection_path), **fields}


def distill_student(config: Config, teacher_dir: Path, splits: Splits, store) -> tuple[Path, Path]:
    """(initial student, trained student)."""
    init, data, fields = student_stage(config, teacher_dir, splits, store)
    return init, train_stage(config, "student", init, data, config.student.train, **fields)

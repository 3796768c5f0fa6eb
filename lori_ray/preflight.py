"""Preflight: every input a run consumes, read and checked before Ray starts or any file is written.

Every entry point (``jobs/``, ``bench/``) calls :func:`preflight` through ``cli.config_or_exit``; a bad data
line, too few examples for the splits or a sequence longer than the context is a :class:`ConfigError` naming
the file:line or the field, and the run exits 2 with nothing written. The splits it reads are the ones the
pipeline trains on (read once per process).
"""

from __future__ import annotations

import os
import random
import warnings
from functools import lru_cache
from typing import NamedTuple

import yaml

from .config import Config, ConfigError, DataConfig
from .data import (
    ARITHMETIC_JOINER,
    ARITHMETIC_SYMBOLS,
    DataFormatError,
    Example,
    generate_multiplication,
    read_examples,
)
from .storage import redact, scheme, unreachable
from .tokens import Layout, arithmetic_tokenizer, load_tokenizer


class Splits(NamedTuple):
    train: list[Example]
    val: list[Example]  # from the training data: validation accuracy while training (and for Tune)
    held_out: list[Example]  # never trained or tuned on: the reported accuracy


def load_data(config: Config) -> Splits:
    """Train, validation and held-out examples; no held-out question appears in the other two."""
    # a model built from a preset reads only the arithmetic symbols (one word-level token each)
    preset_vocabulary = not (config.model.path or config.teacher.path)
    return _splits(config.data.model_dump_json(), config.seed, preset_vocabulary)


@lru_cache(maxsize=4)
def _splits(data_json: str, seed: int, preset_vocabulary: bool = False) -> Splits:
    data = DataConfig.model_validate_json(data_json)
    fields = data.fields.model_dump() if data.fields else None
    symbols = frozenset(ARITHMETIC_SYMBOLS) if preset_vocabulary else None
    joiner = data.step_joiner
    if symbols and joiner is None:  # the data's own joiner (a newline) is no word of the arithmetic vocabulary
        joiner = ARITHMETIC_JOINER
    elif symbols and (not joiner.split() or not set(joiner.split()) <= symbols):
        raise ConfigError(f"data.step_joiner: {joiner!r} writes no word, or one outside the vocabulary of a model "
                          f"built from a preset ({' '.join(sorted(symbols))}); set model.path to a pretrained model "
                          "for other text")

    def read(path: str) -> list[Example]:
        return read_examples(path, data.on_bad_line == "skip", fields, data.step_separator, symbols, joiner)

    try:
        rows = read(data.train_file) if data.task == "file" else []
        if data.eval_file:
            supplied = read(data.eval_file)
            held_out = supplied[:data.eval_size]
            dropped("data.eval_size", data.eval_file, len(supplied), len(held_out))
        elif data.task == "file":  # carved from the training file: a seeded draw, never trained on
            order = random.Random(f"held-out-{seed}").sample(range(len(rows)), min(data.eval_size, len(rows) - 1))
            held_out = [rows[i] for i in sorted(order)]
        else:
            held_out = _generated("data.eval_size", data.eval_size, data.digits, seed + HELD_OUT_SEED_OFFSET)
        questions = {e.question for e in held_out}
        if data.task == "multiplication":
            train = _generated("data.train_size", data.train_size, data.digits, seed, exclude=questions)
        else:
            candidates = [e for e in rows if e.question not in questions]
            train = candidates[:data.train_size]
            dropped("data.train_size", data.train_file, len(candidates), len(train), data.eval_file is None)
    except DataFormatError as error:
        raise ConfigError(str(error)) from None
    if len(train) <= data.val_size:
        source = data.train_file or f"{data.digits[0]}x{data.digits[1]} multiplication"
        raise ConfigError(f"data.val_size: {data.val_size} validation examples leave none to train on: {source} "
                          f"gives {len(train)} training examples once the held-out questions are removed")
    cut = len(train) - data.val_size
    return Splits(train[:cut], train[cut:], held_out)


def dropped(field: str, path: str, supplied: int, used: int, carved: bool = False) -> None:
    """A warning when a size setting leaves out rows the user supplied (a preset's sizes are a cap, not a sample)."""
    if used < supplied:
        warnings.warn(f"{field}: {used} of the {supplied} {'remaining ' if carved else ''}rows of {path} are used "
                      f"({supplied - used} left out); raise {field} to use them all", UserWarning, stacklevel=2)


HELD_OUT_SEED_OFFSET = 1  # generated held-out problems: a seed of their own, next to the training set's


def _generated(field: str, count: int, digits: tuple[int, int], seed: int, exclude=frozenset()) -> list[Example]:
    try:
        return generate_multiplication(count, *digits, seed=seed, exclude=exclude)
    except ValueError as error:
        raise ConfigError(f"{field}: {error}") from None


def check_lengths(config: Config, splits: Splits) -> None:
    """Every teacher sequence (question, CoT, answer) and student sequence (question, latent slots, answer)
    fits in ``model.max_positions``. Generated multiplication has one shape per task, so its held-out
    problems stand for all; data files are checked line by line."""
    model = config.model
    tokenizer = (load_tokenizer(model.path, model.trust_remote_code, model.gguf_file) if model.path
                 else arithmetic_tokenizer())
    layout = Layout(tokenizer)
    examples = splits.held_out if config.data.task == "multiplication" else [*splits.train, *splits.val,
                                                                              *splits.held_out]
    slots = config.student.latent_slots
    longest, worst, too_long, generated, widest = 0, None, 0, 0, None
    for example in examples:
        sequence = layout.teacher(example)
        prompt = len(layout.question(example))
        length = max(len(sequence.input_ids), len(sequence.input_ids) - (sequence.answer[0] - prompt) + slots)
        too_long += length > model.max_positions
        if length > longest:
            longest, worst = length, example
        if len(sequence.input_ids) - prompt > generated:  # what the teacher writes: CoT, answer and <eos>
            generated, widest = len(sequence.input_ids) - prompt, example
    if too_long:
        raise ConfigError(f"model.max_positions: {model.max_positions} is shorter than {too_long} of the "
                          f"{len(examples)} sequences checked (the longest, {longest} tokens: "
                          f"'{worst.question[:60]}'); raise it or drop those examples")
    if config.eval.max_new_tokens < generated:  # the teacher's answers would be cut short and scored wrong
        raise ConfigError(f"eval.max_new_tokens: {config.eval.max_new_tokens} is fewer than the {generated} tokens "
                          f"the teacher writes for '{widest.question[:60]}' (CoT, answer and end of sequence); "
                          f"raise it to at least {generated}")


def check_local_cluster(config: Config) -> None:
    """A new local cluster (no ``cluster.address``, no $RAY_ADDRESS) has ``cluster.num_cpus`` CPUs, or this
    machine's cores: a stage needing more would wait for them forever (Ray Train retries without end)."""
    if config.cluster.address or os.environ.get("RAY_ADDRESS"):
        return
    cpus = config.cluster.num_cpus or os.cpu_count() or 1
    for section in ("student",) if config.teacher.path else ("teacher", "student"):
        train = getattr(config, section).train
        need = train.num_workers * train.cpus_per_worker
        if need > cpus:
            have = f"cluster.num_cpus is {cpus}" if config.cluster.num_cpus else f"this machine has {cpus} cores"
            raise ConfigError(f"{section}.train.num_workers: {train.num_workers} workers x {train.cpus_per_worker} "
                              f"CPU each need {need} CPUs, and the local cluster would have {cpus} ({have}): lower "
                              f"num_workers or cpus_per_worker, or raise cluster.num_cpus")


def check_storage(config: Config, timeout_s: float = 30.0) -> None:
    """An object store named for the checkpoints or the trajectory store answers: a small object written, read back
    and deleted (``storage.unreachable``). A plain path is the local filesystem's, and needs no probe."""
    for field, location in (("cluster.storage_path", config.cluster.storage_path),
                            ("trajectory.store_dir", config.trajectory.store_dir)):
        if location and scheme(location) and (why := unreachable(location, timeout_s)):
            raise ConfigError(f"{field}: cannot write to {redact(location)} ({redact(why)}); the "
                              f"run's {'checkpoints' if field.startswith('cluster') else 'teacher trajectories'} go "
                              f"there. Check the endpoint and the credentials (for S3 the AWS_* variables)")


def check_tracking(config: Config, timeout_s: float = 10.0) -> None:
    """An MLflow tracking server answers before the run starts: the parent run is opened first thing, and a
    server that is down would otherwise be found there after MLflow's retries, as a traceback."""
    from .tracking import server_unanswering  # MLflow's import (seconds) only when a run checks its server
    uri = config.tracking_uri()
    if why := server_unanswering(uri, timeout_s):
        field = "tracking.uri" if config.tracking.uri else "MLFLOW_TRACKING_URI"
        raise ConfigError(f"{field}: the MLflow server at {redact(uri)} cannot be used ({why}); start it, or leave "
                          f"tracking.uri unset for a sqlite store in the run directory")


def preflight(config: Config) -> Splits:
    """The run's splits, after every check that needs no cluster; raises ConfigError."""
    check_local_cluster(config)
    check_storage(config)
    check_tracking(config)
    splits = load_data(config)
    for section in ("teacher", "student"):
        batch = getattr(config, section).train.batch_size
        if len(splits.train) < batch:
            raise ConfigError(f"{section}.train.batch_size: {batch} is more than the {len(splits.train)} training "
                              f"examples")
    check_lengths(config, splits)
    return splits


def _starting_point(config: Config, name: str) -> str:
    """What a stage trains from: the pretrained model, the teacher's copy, a pruned teacher or a preset."""
    model, student = config.model, config.student
    if name == "teacher":
        return f"from {model.path}" if model.path else f"from a random {model.family} '{model.size}' preset"
    if student.path:
        return f"from {student.path} (student.path)"
    if student.kind == "pruned":
        return f"from the teacher pruned to width {student.width} ({student.init} init)"
    if student.init == "scratch":
        return f"from a random {model.family} '{student.size or model.size}' preset"
    return "from the teacher's weights"


def _stage_line(config: Config, name: str, section, splits: Splits) -> str:
    output = config.run_dir / name
    train = section.train
    how = f"LoRA rank {train.lora.rank} on {train.lora.target_modules}" if train.lora else "full fine-tuning"
    work = (f"{_starting_point(config, name)}, {how}, {train.steps} steps x batch {train.batch_size} = "
            f"{train.steps * train.batch_size / len(splits.train):.2f} epochs on {max(train.num_workers, 1)} "
            f"worker(s), ZeRO-{train.zero_stage} -> {output}")
    if (output / "lori-stage.json").is_file():
        return (f"{name}: finished on disk: reused if its inputs are unchanged "
                f"(else refused: --restart-from {name}); {work}")
    return f"{name}: to train, {work}"


def search_line(config: Config) -> str:
    """A Tune search's size (``--dry-run``): its trials, what they vary and the student steps they train in all."""
    tune, train = config.tune, config.student.train
    varied = "; ".join(f"{key} {values}" if kind == "grid" else f"{key} {kind} {values}"
                       for key, spec in tune.space.items() for kind, values in spec.items())
    stopping = (f"ASHA may stop a trial after {tune.grace_period * train.log_every} steps"
                if tune.scheduler == "asha" else "every trial runs to its end")
    gridded = any("grid" in spec for spec in tune.space.values())  # a sampled space's trials are its samples
    repeats = f"; each {tune.num_samples} times" if gridded and tune.num_samples > 1 else ""
    return (f"search '{config.name}': {tune.trials} trials ({varied}{repeats}), "
            f"{max(train.num_workers, 1)} worker(s) per trial, {train.steps} steps each ({stopping}): up to "
            f"{tune.trials * train.steps:,} student steps in all -> {config.run_dir / 'tune'}")


def plan(config: Config, splits: Splits) -> str:
    """What a run will do (``--dry-run``): each stage, whether it is found finished or will run, its size and
    where its outputs go."""
    data = config.data
    source = data.train_file or f"{data.digits[0]}x{data.digits[1]} multiplication, generated"
    if data.eval_file:
        source += f"; held out: {data.eval_file}"
    elif data.task == "file":
        source += "; held out: carved from it"
    teacher = (f"teacher: given (teacher.path={config.teacher.path})" if config.teacher.path
               else _stage_line(config, "teacher", config.teacher, splits))
    student = config.student
    return "\n".join([
        (f"run '{config.name}' in {config.run_dir}; MLflow {redact(config.tracking_uri())}; Ray "
         f"{config.cluster.address or 'a new local cluster (or RAY_ADDRESS)'}"),
        (f"data: {len(splits.train)} training, {len(splits.val)} validation, {len(splits.held_out)} held-out "
         f"examples ({source})"),
        teacher,
        (f"trajectories: the teacher over {len(splits.train)} training examples, subspace rank "
         f"{config.subspace.rank} of {config.subspace.max_rank} -> {config.store_dir} (a store of the same teacher "
         f"and data is reused)"),
        _stage_line(config, "student", student, splits).replace("student:", f"student ({student.method}):", 1),
        *([search_line(config)] if config.tune.space else []),
        (f"evaluate: {len(splits.held_out)} held-out problems (teacher with its CoT, student without) and as many "
         f"training problems -> {config.run_dir / 'results.md'}"),
    ])


# sections that change what a run computes (tune: a search restored under another space would mix two
# searches); tracking, cluster and eval may differ on a rerun
_RUN_DEFINING = ("seed", "data", "model", "teacher", "trajectory", "subspace", "student", "loss", "tune")
# how the work is spread or saved, not what it computes: the actor pool is sized to a smaller cluster on a rerun,
# a long stage checkpoints more or less often
_EXECUTION_ONLY = ("trajectory.num_actors", "teacher.train.checkpoint_minutes", "student.train.checkpoint_minutes")


_ABSENT = object()


def differences(before, now, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config dicts, as 'key: old -> new'. A key the saved
    config does not have is a setting added since that run, which ran as its default does."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [line for key in dict.fromkeys([*before, *now])
                for line in differences(before.get(key, _ABSENT), now.get(key, _ABSENT), f"{prefix}{key}.")]
    key = prefix.rstrip(".")
    if before is _ABSENT or before == now or key in _EXECUTION_ONLY:
        return []
    return [f"{key}: {before!r} -> {'(unset)' if now is _ABSENT else repr(now)}"]


def shared_teacher_path(first: Config) -> str:
    """The teacher of runs that share the first one's (benchmarks comparing students): its ``teacher.path``,
    or the teacher it trains."""
    return first.teacher.path or str(first.run_dir / "teacher")


def check_rerun(config: Config, teacher_path: str | None = None) -> None:
    """A run directory is reused (finished stages are skipped) only for the same run-defining config.
    ``teacher_path``: the teacher the run will be given when another run trains it (``shared_teacher_path``)."""
    saved = config.run_dir / "config.yaml"
    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text())
    now = yaml.safe_load(redact(config.to_yaml()))  # as it was saved: credentials are not part of what a run is
    if teacher_path:
        now["teacher"]["path"] = teacher_path
    changed = differences({key: before.get(key) for key in _RUN_DEFINING}, {key: now.get(key) for key in _RUN_DEFINING})
    if changed:
        raise ConfigError(f"name: {config.run_dir} holds a run of '{config.name}' with a different "
                          f"{'; '.join(changed)}; pick another name= or delete that directory")

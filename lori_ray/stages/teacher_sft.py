"""The CoT teacher: fine-tuned from a preset or a pretrained model (or given), and CoTs it completes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..cluster import gpus
from ..config import Config
from ..conversions import local_model_dir
from ..data import Example
from ..models import build_model
from ..preflight import Splits
from ..progress import bars_wanted
from ..storage import published_directory
from ..teacher_pool import complete_missing_cots
from ..tokens import Layout, arithmetic_tokenizer, load_tokenizer
from . import log
from .training import sequences_of, train_stage, validation_tensors, write_tensors


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


def teacher_sft(config: Config, splits: Splits) -> Path:
    if config.teacher.path:
        return Path(config.teacher.path)
    start = initial_model_dir(config)
    layout = Layout(load_tokenizer(str(start), config.model.trust_remote_code))
    data = write_tensors(sequences_of(config, layout, "teacher", splits.train), layout.pad,
                         config.model.max_positions, config.run_dir / "data" / "teacher.safetensors")
    val = validation_tensors(config, layout, "teacher", splits.val, "teacher")
    return train_stage(config, "teacher", start, data, config.teacher.train, **val)


def completed_train(config: Config, teacher_dir: Path, train: list[Example]) -> list[Example]:
    """``teacher.complete_cots``: the training examples with the teacher's CoT where the gold one is
    missing; cached in the run directory, so a rerun does not generate again."""
    path = config.run_dir / "data" / "train-completed.jsonl"
    if path.is_file():
        return [Example(r["question"], tuple(r["steps"]), r["answer"], r.get("joiner"))  # none in older caches
                for r in map(json.loads, path.read_text().splitlines())]
    completed = complete_missing_cots(teacher_dir, train, config.trajectory.num_actors, config.trajectory.batch_size,
                                      config.eval.max_new_tokens, config.model.trust_remote_code,
                                      gpus(config.cluster.gpus_per_actor), log=log, bars=bars_wanted())
    staging = path.with_suffix(".partial")
    staging.write_text("".join(json.dumps(asdict(e)) + "\n" for e in completed))
    staging.replace(path)
    return completed

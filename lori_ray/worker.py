"""The worker side of a training stage: Ray Train runs ``train_loop`` on every worker (or in the driver with
``num_workers=0``), a DeepSpeed ZeRO engine around the stage's objective.

Every worker reads the stage directory the driver wrote (initial HF model, tokenized tensors, optional projection),
trains, and reports metrics and checkpoints through ``ray.train`` (what a checkpoint holds and how a restarted
worker finds it: ``checkpoints``). The driver's side, ``fit``, is in ``driver``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .adapters import lora_token_ids, with_lora
from .batch import Batch, trim_padding
from .checkpoints import report_checkpoint, resume_checkpoint, verify
from .config import MIN_LR, TrainConfig
from .curriculum import (
    PhaseSchedule,
    RemovalSchedule,
    latent_phase,
    remove_cot_tokens,
    replace_cot_steps,
    sample_removals,
    scheduled_removal,
)
from .evaluate import exact_match
from .fresh import FreshBatches, FreshProblems
from .models import load_model
from .objective import LMObjective, load_projection
from .progress import progress_bar
from .pruned import load_student
from .tracking import StepLogger

ADAMW_BETAS = (0.9, 0.95)  # the optimizer's moment decays (a shorter second-moment memory than torch's 0.999)
# a run's seed times a large prime plus the epoch (or the step): draws of neighbouring seeds never coincide
SEED_STRIDE = 1_000_003
STEP_SEED_STRIDE = 7  # the curriculum's per-step draw: step x 7 + rank, distinct for up to 7 ranks


@dataclass
class Stage:
    """Everything a worker needs (it travels in ``train_loop_config``; the typed settings pickle as they are)."""

    name: str
    model_dir: str  # initial HF model (and tokenizer)
    data_path: str  # safetensors: input_ids, labels, attention_mask [, latent_positions, targets, answer_*, cot_*]
    train: TrainConfig
    seed: int = 0
    weights: dict = field(default_factory=lambda: {"ce": 1.0})  # a factor per loss term, one for each of ``terms``
    terms: list[str] | None = None  # the loss terms the objective computes (``methods``); None: ce alone
    student_layers: list[int] = field(default_factory=list)
    projection_path: str | None = None  # safetensors with weight, bias
    readout_path: str | None = None  # safetensors with the answer readout's initial weight, bias
    gpus_per_worker: float = 0.0
    val_path: str | None = None  # safetensors with input_ids, labels, attention_mask of validation sequences
    teacher_dir: str | None = None  # frozen teacher run online for the ``kd`` term
    kd_temperature: float = 1.0
    target_scale: list[float] | None = None  # per aligned layer: trajectories are divided by it in the loss
    tracking_uri: str | None = None
    run_id: str | None = None  # MLflow run that rank 0 logs step metrics to
    removal: RemovalSchedule | None = None  # ICoT-SI's removal curriculum
    phases: PhaseSchedule | None = None  # Coconut's curriculum (the config's ``stages``)
    reset_optimizer: bool = False  # clear the optimizer's moments at each removal increment or phase
    continuous_latents: list[int] | None = None  # token ids of the latent slots, when they are continuous thoughts
    fresh: FreshProblems | None = None  # new problems every step instead of the rows of ``data_path``
    progress_bar: bool = False  # rank 0 advances a bar the driver draws (``progress``: its output is a terminal)
    # checkpoints (see ``checkpoints``): the HMAC key (a secret; never written to storage), the digest of the
    # stage's inputs they must match, and their folder when storage is a filesystem path (set by ``fit``)
    checkpoint_key: str | None = None
    inputs_digest: str = ""
    checkpoint_root: str | None = None


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> torch.Tensor:
    """The global batch of ``step``: a fresh permutation per epoch, so a resumed run sees the same data."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    return epoch_order(num_examples, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    # once per epoch, not per step: a permutation of 300,000 rows costs milliseconds, a GPU step about as much
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + epoch))


def budget_spent(started: float, max_minutes: float | None) -> float:
    """The fraction of a wall-clock budget spent since ``started`` (0 without one), the same on every rank: they
    decay their learning rate alike, stop at the same step (``train.max_minutes``) and checkpoint together
    (``train.checkpoint_minutes``)."""
    if max_minutes is None:
        return 0.0
    spent = torch.tensor([(time.time() - started) / (max_minutes * 60)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(spent, op=dist.ReduceOp.MAX)
    return spent.item()


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (all ranks must agree to skip a step)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def lr_factor(step: int, warmup: int, total: int, budget_spent: float = 0.0, schedule: str = "linear",
              min_lr: float = MIN_LR) -> float:
    """Linear warmup, then a linear or cosine decay to ``min_lr`` over the steps or the wall-clock budget, whichever
    ends first."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(total - warmup, 1), budget_spent))
    left = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (1.0 - min_lr) * left


def deepspeed_config(train: TrainConfig, world_size: int) -> dict:
    micro = train.batch_size // (world_size * train.grad_accumulation)
    config = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": train.grad_accumulation,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage,
                              # on GPU: overlap gradient reduction with backward, no fragmentation
                              **({"overlap_comm": True, "contiguous_gradients": True} if torch.cuda.is_available()
                                 else {})},
        "zero_allow_untested_optimizer": True,  # torch AdamW: identical math on CPU and GPU
        "steps_per_print": 10**9,
    }
    if train.precision == "bf16" or (train.precision == "auto" and torch.cuda.is_available()):
        config["bf16"] = {"enabled": True}
    return config


def _import_deepspeed():
    """DeepSpeed, imported on a worker only (the driver never needs it), set up for this process's device."""
    # DeepSpeed picks its accelerator once, as it is first imported: from the GPUs Ray gave this worker
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import deepspeed
    # the shared-memory comm op is JIT-compiled on first use (~40 s on CPU); gloo suffices here
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


@contextmanager
def _process_group(deepspeed):
    """``num_workers=0`` runs in the driver with no process group: a world of one for the stage (its store in
    memory: a TCP store would listen on every interface for the rest of the driver's life), ended through
    DeepSpeed however the stage ends. DeepSpeed keeps clones of the world group; Ray's in-driver mode ends the
    group with torch alone (after a stage that returned; after one that raised, not at all), and the next stage
    in that driver failed on the stale clone ("Group ... is not registered")."""
    if dist.is_initialized():  # a Ray Train worker's, or a caller's
        yield
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if deepspeed.comm.is_initialized():  # DeepSpeed took it up, and forgets its clones as it ends it
            deepspeed.comm.destroy_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group()


def _build_objective(stage: Stage):
    model = load_student(stage.model_dir)
    if stage.train.lora:
        model = with_lora(model, stage.train.lora, lora_token_ids(stage.model_dir))
    projection = load_projection(load_file(stage.projection_path)) if stage.projection_path else None
    readout = load_projection(load_file(stage.readout_path)) if stage.readout_path else None
    teacher = load_model(stage.teacher_dir) if stage.teacher_dir else None
    return LMObjective(model, stage.student_layers, projection, stage.weights, teacher, stage.kd_temperature,
                       stage.target_scale, readout, stage.continuous_latents, terms=stage.terms or ("ce",))


def curriculum_level(stage: Stage, step: int) -> int:
    """How far the curriculum has gone at ``step`` (CoT tokens removed, or Coconut's phase); 0 without one."""
    if stage.removal:
        return scheduled_removal(step, stage.removal.steps_per_token)
    if stage.phases:
        return latent_phase(step, stage.phases.steps_per_stage, stage.phases.last)
    return 0


def curriculum_batch(stage: Stage, batch: Batch, step: int, rank: int) -> tuple[Batch, dict[str, float]]:
    """The batch as the curriculum shows it at ``step`` (seeded by step, so a resumed run sees the same), and
    the curriculum's own metric (``cot_removed`` per row, or ``latent_stage``)."""
    level = curriculum_level(stage, step)
    if stage.removal:
        generator = torch.Generator().manual_seed(stage.seed * SEED_STRIDE + step * STEP_SEED_STRIDE + rank)
        counts = sample_removals(level, batch["cot_length"], stage.removal.smoothing, generator)
        return remove_cot_tokens(batch, counts, stage.removal.pad_id), {"cot_removed": counts.float().mean().item()}
    if stage.phases:  # its metric keeps the name earlier runs logged it under
        latents = stage.phases.latent_ids[:level * stage.phases.latents_per_step]
        return replace_cot_steps(batch, level, latents, stage.phases.pad_id), {"latent_stage": float(level)}
    return batch, {}


def reset_optimizer_state(engine) -> None:
    """Clear the moments of the torch optimizer inside DeepSpeed's wrappers; AdamW starts them afresh."""
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    optimizer.state.clear()


def quiet_ray_train() -> None:
    """Ray Train's per-report and per-checkpoint INFO lines (a dict of every metric, from every rank, at every
    log step) drowned the job's own progress lines; ``LORI_VERBOSE=1`` keeps them."""
    if os.environ.get("LORI_VERBOSE") == "1":
        return
    # Ray's internals, imported only where they are used: the rest of the module does not depend on them
    from ray.train.v2._internal.execution import context, storage
    for name in (context.__file__, storage.__name__):  # Ray names the first logger by its file path
        logging.getLogger(name).setLevel(logging.WARNING)


def train_loop(config: dict) -> None:
    """Ray Train worker loop (also runs in-process with ``num_workers=0``)."""
    stage = Stage(**config)
    if stage.train.num_workers and not torch.cuda.is_available():
        torch.set_num_threads(stage.train.cpus_per_worker)  # the cores Ray gave this worker
    quiet_ray_train()
    deepspeed = _import_deepspeed()
    with _process_group(deepspeed):
        _train(stage, deepspeed)


def _train(stage: Stage, deepspeed) -> None:
    """The stage's training loop; ``train_loop`` has set up the process (threads, logging, process group). The step
    keeps its loss terms as tensors: the host waits for the device only at the finiteness check (one flag per
    micro-batch, which the NaN guard needs before backward) and at the log interval."""
    run = _setup(stage, deepspeed)
    train, engine = stage.train, run.engine
    step, end, bad_steps, interval = run.step, train.steps, 0, Interval()
    last, saved = {"step": step}, run.began  # saved: when this attempt last saved a resumable checkpoint
    bar = progress_bar(stage.progress_bar and run.rank == 0, stage.name, train.steps, "step", done=step)
    engine.train()
    while step < end:
        batch, shown = run.batch(step)
        if stage.reset_optimizer and step > 0 and curriculum_level(stage, step) != curriculum_level(stage, step - 1):
            reset_optimizer_state(engine)
            run.say(f"optimizer reset at step {step} (curriculum level {curriculum_level(stage, step)})")
        finite, terms = train_step(engine, batch, train.grad_accumulation)
        step += 1
        bar.update()
        if not finite:  # no gradient of it was applied; too many in a row end the stage
            bad_steps += 1
            if bad_steps >= train.max_bad_steps:
                raise FloatingPointError(
                    f"[{stage.name}] loss was NaN/Inf for {bad_steps} consecutive steps (last: step {step}, "
                    f"{synced({**terms, **shown})}); no non-finite gradient was applied, the last checkpoint is "
                    f"intact. Lower the learning rate or the loss weights.")
            continue
        bad_steps = 0
        interval.add({**terms, **shown})
        if step % train.log_every == 0 or step == end:
            last, end = log_interval(run, interval, step, end)
            # Ray Train's local mode (num_workers=0) persists no checkpoint: one would stay in /tmp, never read
            if step < end and train.num_workers and ((train.checkpoint_every and step % train.checkpoint_every == 0)
                                                     or budget_spent(saved, train.checkpoint_minutes) >= 1):
                report_checkpoint(engine, run.objective, last, stage, step, run.restarts, final=False)
                saved = time.time()
            elif step < end:
                ray.train.report(last)
    bar.close()
    if run.logger:
        run.logger.close()
    report_checkpoint(engine, run.objective, last, stage, step, run.restarts, final=True)


def train_step(engine, batch: Batch, micro_batches: int) -> tuple[bool, dict[str, torch.Tensor]]:
    """One optimizer step on ``batch`` in ``micro_batches`` parts (``train.grad_accumulation``); DeepSpeed scales
    each loss and steps the optimizer at the last. A non-finite micro-batch is left out of the gradient (its
    backward skipped, on every rank together): no NaN reaches the weights. Returns whether every micro-batch was
    finite, and the loss terms averaged over them (detached, not synchronised)."""
    finite, terms = True, {}
    parts = [batch] if micro_batches == 1 else [{k: v[chunk::micro_batches] for k, v in batch.items()}
                                                for chunk in range(micro_batches)]
    for part in parts:
        loss, metrics = engine({k: v.to(engine.device) for k, v in trim_padding(part).items()})
        for name, value in metrics.items():
            terms[name] = terms.get(name, 0.0) + value / micro_batches
        if all_finite(loss):  # the step's one wait for the device: every rank must agree before backward
            engine.backward(loss)
        else:
            finite = False
        if micro_batches > 1 or finite:  # with one micro-batch a bad step skips the update whole
            engine.step()
    return finite, terms


def synced(values: dict) -> dict[str, float]:
    """``values`` as floats, the tensors among them brought to the host together (one wait for the device)."""
    tensors = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    read = dict(zip(tensors, torch.stack([values[k].float() for k in tensors]).tolist(), strict=True)
                if tensors else ())
    return {k: read.get(k, v) for k, v in values.items()}


@dataclass
class Interval:
    """What a log interval sums: the steps' metrics (loss terms as device tensors until ``means``), their count,
    and when it began."""

    sums: dict = field(default_factory=dict)
    count: int = 0
    started: float = field(default_factory=time.time)

    def add(self, metrics: dict) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {name: value / self.count for name, value in synced(self.sums).items()}

    def restart(self) -> None:
        self.sums, self.count, self.started = {}, 0, time.time()


@dataclass
class Run:
    """A worker's stage once set up (``_setup``): what the loop and the log interval share."""

    stage: Stage
    engine: Any
    objective: LMObjective
    rank: int
    world: int
    data: dict[str, torch.Tensor]
    validation: dict[str, torch.Tensor] | None
    fresh: FreshBatches | None
    logger: StepLogger | None
    scheduler: torch.optim.lr_scheduler.LRScheduler
    spent: list[float]  # of train.max_minutes, as of the last log interval (the learning rate schedule reads it)
    step: int = 0  # where this attempt starts: 0, or the step resumed from
    restarts: int = 0
    resumed: dict = field(default_factory=dict)
    began: float = field(default_factory=time.time)  # for the time left: this attempt's pace, validation included

    @property
    def per_rank(self) -> int:
        return self.stage.train.batch_size // self.world

    def say(self, message: str) -> None:
        """One line of the job's output, from rank 0."""
        if self.rank == 0:
            print(f"[{self.stage.name}] {message}", flush=True)

    def batch(self, step: int) -> tuple[Batch, dict[str, float]]:
        """This rank's rows of ``step``'s batch, as the curriculum shows them, and the curriculum's metric."""
        if self.fresh is None:
            rows = batch_indices(step, self.data["input_ids"].shape[0], self.stage.train.batch_size, self.stage.seed)
            rows = rows[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            batch = {k: v[rows] for k, v in self.data.items()}
        else:
            batch = self.fresh(step, self.rank, self.world)
        return curriculum_batch(self.stage, batch, step, self.rank)


def _setup(stage: Stage, deepspeed) -> Run:
    """The objective inside a DeepSpeed engine with its optimizer and schedule, the data, the checkpoint this
    attempt resumes from, and the step logger."""
    train = stage.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(stage.seed)
    objective = _build_objective(stage)
    data = load_file(stage.data_path)
    validation = load_file(stage.val_path) if stage.val_path else None
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=train.lr,
                                  weight_decay=train.weight_decay, betas=ADAMW_BETAS)
    spent = [0.0]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train.warmup, train.steps, spent[0], train.schedule, train.min_lr))
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(train, world))
    if train.compile:
        engine.compile()
    logger = StepLogger(stage.tracking_uri, stage.run_id) if rank == 0 and stage.run_id else None
    fresh = FreshBatches(stage.fresh, stage.model_dir, train.batch_size) if stage.fresh else None
    run = Run(stage, engine, objective, rank, world, data, validation, fresh, logger, scheduler, spent)

    checkpoint, verified = resume_checkpoint(stage, world, ray.train.get_checkpoint())
    if checkpoint:
        with checkpoint.as_directory() as directory:
            if verified or verify(Path(directory) / "ds", world, stage.inputs_digest, stage.checkpoint_key) is not None:
                _, client_state = engine.load_checkpoint(os.path.join(directory, "ds"), tag="state")
                run.step, run.restarts = client_state["step"], client_state.get("restarts", 0) + 1
                run.resumed = {"restarts": run.restarts, "resumed_from_step": run.step}
        run.say(f"resumed from step {run.step} (restart {run.restarts})" if run.resumed else
                f"{checkpoint.path} is incomplete or from other inputs: starting afresh")
    if logger:  # per-run constants: params of the stage's run (the step lines still show them)
        logger.log_params({"workers": world, "threads_per_worker": torch.get_num_threads()})
    if logger and run.resumed:
        logger.log(run.resumed, run.step, replayed_too=True)
    # a student that sees its problems many times memorises them instead of learning to compute
    threads, examples = torch.get_num_threads(), data["input_ids"].shape[0]
    each = (f"{stage.gpus_per_worker:g} GPU" if torch.cuda.is_available()
            else f"{threads} CPU thread{'s' if threads > 1 else ''}")
    seen = (f"{examples} training examples, {train.steps} steps x batch {train.batch_size} = "
            f"{train.steps * train.batch_size / examples:.2f} epochs" if fresh is None else
            f"{train.steps} steps x batch {train.batch_size} of fresh {stage.fresh.digits[0]}x"
            f"{stage.fresh.digits[1]} problems" + (", their teacher targets computed in the step"
                                                   if stage.fresh.targets != "none" else ""))
    run.say(f"{seen} on {world} worker{'s' if world > 1 else ''} x {each}")
    run.began = time.time()
    return run


def log_interval(run: Run, interval: Interval, step: int, end: int) -> tuple[dict, int]:
    """The report of the interval that ends at ``step`` (its metrics' means, the learning rate, the pace, validation
    when due), logged and printed; and the stage's end, brought forward to ``step`` when ``train.max_minutes`` is
    spent or validation reached ``train.until_val``. Starts the next interval."""
    stage, train, engine = run.stage, run.stage.train, run.engine
    run.spent[0] = budget_spent(run.began, train.max_minutes)
    if step < end and run.spent[0] >= 1:
        run.say(f"stopped at step {step} of {train.steps}: train.max_minutes ({train.max_minutes:g}) spent")
        end = step  # this interval is the last: validated, checkpointed, published
    report = interval.means()
    report.update(step=step, lr=run.scheduler.get_last_lr()[0],
                  steps_per_s=interval.count / (time.time() - interval.started), **run.resumed)
    if train.max_minutes:
        report["budget_spent"] = run.spent[0]  # fraction of train.max_minutes
    if torch.cuda.is_available():
        report["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:  # steps_per_s compares across runs only with the cores behind it
        report["threads_per_worker"] = torch.get_num_threads()
    if run.validation is not None and (step == end or (train.eval_every and step % train.eval_every == 0)):
        engine.eval()
        report["val_accuracy"] = exact_match(engine.module.model, run.validation, run.rank, run.world, run.per_rank,
                                             stage.continuous_latents)
        engine.train()
        if step < end and train.until_val is not None and report["val_accuracy"] >= train.until_val:
            # every rank has the same all-reduced accuracy, so all stop here
            run.say(f"stopped at step {step} of {train.steps}: validation {report['val_accuracy']:.3f} reached "
                    f"train.until_val ({train.until_val:g})")
            end = step
    interval.restart()
    if run.logger:
        run.logger.log({k: v for k, v in report.items() if k not in ("step", "threads_per_worker")}, step)
    run.say(f"step {step}/{train.steps} " + " ".join(f"{k}={v:.4g}" for k, v in report.items() if k != "step") +
            f" eta={time_left(time.time() - run.began, step - run.step, train.steps - step)}")
    return report, end


def time_left(elapsed: float, done: int, remaining: int) -> str:
    """The time ``remaining`` steps take at the pace of the ``done`` ones so far, as 1h02m, 4m05s or 9s."""
    seconds = round(elapsed / max(done, 1) * remaining)
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds % 60:02d}s" if minutes else f"{seconds}s"

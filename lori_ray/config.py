"""One typed config for a whole run, loaded from YAML plus ``a.b=value`` overrides.

Everything that can be checked without a cluster is checked here, so a bad config fails with
the field named before Ray starts. Longer than the project's ~250 lines because it is the one schema: every
section with its fields' comments (which ``--help`` prints) and the validators that tie fields together; the
checks that read data or earlier runs are in ``preflight``, the help text is built in ``cli``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from . import storage
from .data import source_problem
from .methods import METHODS, MethodSpec
from .model_sources import ModelSourceError, is_hub_id
from .models import FAMILIES, PRUNABLE, SIZES, model_shape, pretrained_config
from .tokens import arithmetic_tokenizer, load_tokenizer

# no bool or float where an integer is meant (YAML `true` or `8.0` is a mistake, not 1 or 8); ints pass as floats;
# no .inf or .nan anywhere (an infinite learning rate trained a model of NaNs)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]


# the student methods (their specs: ``methods.METHODS``) and RED's projection inits (``pruned.initial_projection``),
# declared once: benchmarks and the pruned students take their lists from here
Method = Literal[tuple(METHODS)]
PrunedInit = Literal["activation", "random", "random_orthogonal"]
PRUNED_INITS: tuple[str, ...] = get_args(PrunedInit)


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_location(field: str, location: str | None) -> None:
    """A location every node can reach: a path (on a shared filesystem) or a URI pyarrow opens."""
    problem = location and storage.uri_problem(location)
    if problem:
        raise ValueError(f"{field}: {problem}")


class TableFields(Section):
    """The columns of a table data file that hold each part of an example."""
    question: str = Field("question", description="the column that holds the question")
    # None: no CoT column (answer-only data; the teacher can write CoTs: complete_cots); a column of lists is one
    # step per item
    cot: str | None = "cot"
    answer: str = Field("answer", description="the column that holds the answer")
    # a chat column instead of the three above: a list of {role, content} turns, the question the last user turn,
    # the last assistant turn the CoT (one step per line, or data.step_separator) then answer_marker and the answer
    messages: str | None = None
    answer_marker: str = Field("####", min_length=1, description="with messages: the text in the last assistant turn "
                                                                 "between the CoT and the answer")


class DataConfig(Section):
    task: Literal["multiplication", "file"] = Field(
        "multiplication", description="multiplication: problems generated in the iCoT line format (data.digits); file:"
                                      " read data.train_file")
    digits: tuple[Int, Int] = (3, 3)  # multiplication: digits of each factor
    train_size: Int = Field(8000, gt=0, description="training examples: generated problems, or a cap on a file's rows "
                                                    "(a warning says how many it leaves out)")
    val_size: Int = Field(256, ge=0)  # taken from the training examples; validation accuracy during training
    eval_size: Int = Field(200, gt=0, description="held-out examples: generated, or carved from train_file without "
                                                  "eval_file; a cap on a file's rows")
    # task=file: iCoT .txt or GSM8K .jsonl; with data.fields also a table (below)
    train_file: str | None = None
    # held-out split (any task); unset with task=file: data.eval_size rows carved from train_file (seeded), never
    # trained on; multiplication then trains on generated data
    eval_file: str | None = None
    on_bad_line: Literal["fail", "skip"] = "fail"  # a malformed line stops the run (file:line), or is skipped
    # read train_file/eval_file as tables through Hugging Face datasets (.jsonl, .json, .csv, .parquet, a folder or
    # glob of .parquet shards, a folder saved by datasets' save_to_disk (PATH@SPLIT: a DatasetDict's split), or
    # hf:OWNER/NAME[/CONFIG][@SPLIT]; a .txt stays iCoT lines) with these columns, e.g. {question: q, cot: why}
    fields: TableFields | None = None
    step_separator: str | None = None  # with fields: a regex between CoT steps; unset: '<<..>>' equations, else ' + '
    # with fields: the text between steps in the teacher's CoT, e.g. "\n"; unset: the data's own (a newline between
    # a list's items or a chat's lines, what step_separator first matches, else the format's ' + '); a model built
    # from a preset keeps ' + ' (its vocabulary has no newline)
    step_joiner: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _files(self):
        if self.task == "file" and not self.train_file:
            raise ValueError("train_file: required when task is 'file'")
        for field in ("train_file", "eval_file"):
            path = getattr(self, field)
            problem = path and source_problem(path)
            if problem:
                raise ValueError(f"{field}: {problem}")
        if self.step_separator is not None:
            if not self.fields:
                raise ValueError("step_separator: applies to table data only (set data.fields)")
            try:
                re.compile(self.step_separator)
            except re.error as error:
                raise ValueError(f"step_separator: not a regular expression ({error})") from None
        if self.step_joiner is not None and not self.fields:
            raise ValueError("step_joiner: applies to table data only (set data.fields)")
        if self.fields and not (self.train_file or self.eval_file):
            raise ValueError("fields: applies to data files (data.train_file, data.eval_file)")
        if self.val_size >= self.train_size:
            raise ValueError(f"val_size: {self.val_size} leaves no training examples (train_size {self.train_size})")
        if min(self.digits) < 1:
            raise ValueError("digits: each factor needs at least one digit")
        return self


class ModelConfig(Section):
    family: str = Field("llama", description="the family of a model built from config: llama, qwen2, qwen3, mistral, "
                                             "gemma, phi3, gpt2 (RED's pruned students: llama, qwen2); with model.path"
                                             " or teacher.path it must be their config.json's model_type")
    size: str = Field("small", description="the size preset of a model built from config: tiny, small, base, 135m, 1b")
    # a pretrained model (its tokenizer is used): a local HF directory, a .gguf file, or a hub id (owner/name); a
    # GGUF or hub model is saved once as a local HF directory under $LORI_RAY_CACHE (~/.cache/lori-ray)/models
    path: str | None = None
    gguf_file: str | None = None  # the GGUF file's name when model.path is the directory that holds it
    max_positions: Int = Field(256, gt=0, description="the longest sequence in tokens (question, CoT or latent slots, "
                                                      "answer); a longer one is refused by the preflight")
    trust_remote_code: bool = Field(False, description="run a pretrained model's own Python code (off: transformers' "
                                                       "built-in classes only)")

    @field_validator("path")
    @classmethod
    def _expand(cls, path: str | None) -> str | None:
        return os.path.expandvars(os.path.expanduser(path)) if path else path

    @model_validator(mode="after")
    def _known(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family: must be one of {list(FAMILIES)}")
        if self.size not in SIZES:
            raise ValueError(f"size: must be one of {sorted(SIZES)}")
        if self.path and not Path(self.path).exists() and not is_hub_id(self.path):
            raise ValueError(f"path: no such file or directory, and not a Hugging Face hub id: {self.path}")
        if self.gguf_file and not self.path:
            raise ValueError("gguf_file: needs model.path, the directory that holds it")
        return self


class LoraConfig(Section):
    """LoRA adapters (peft) instead of full fine-tuning: low-rank updates of ``target_modules`` train, the HF model's
    own weights stay frozen except a student's latent-slot token rows; alignment heads train as always."""
    rank: Int = Field(gt=0, description="the adapters' rank (required once lora is set)")
    alpha: Float | None = Field(None, gt=0)  # the update is scaled by alpha / rank; default 2 x rank
    dropout: Float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    # module names (suffixes) of the linear layers that get updates, or all-linear (every linear layer but the
    # output head)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # the published model always has the updates merged (every later stage, plain transformers and MLflow read it
    # as it is); save_adapter also keeps the adapter in its adapter/ folder, for serving the base with adapters
    save_adapter: bool = False

    @property
    def lora_alpha(self) -> float:
        return self.alpha or 2.0 * self.rank


MIN_LR = 0.1  # the default end of the learning rate's decay, a fraction of train.lr


class TrainConfig(Section):
    steps: Int = Field(500, gt=0, description="optimizer steps (the cap when max_minutes or until_val ends the stage "
                                              "sooner)")
    batch_size: Int = Field(64, gt=0)  # global, split over workers
    lr: Float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup: Int = Field(50, ge=0)  # steps of linear warmup from lr/warmup to lr
    # after the warmup the learning rate decays to min_lr x lr over the steps (or train.max_minutes, whichever
    # ends first): linearly, or along a half cosine
    schedule: Literal["linear", "cosine"] = "linear"
    # micro-batches per optimizer step: each worker runs batch_size / (num_workers x grad_accumulation) rows at a
    # time, for the same global batch in less memory
    grad_accumulation: Int = Field(1, gt=0)
    min_lr: Float = Field(MIN_LR, ge=0, le=1)  # the end of the decay, a fraction of lr
    weight_decay: Float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: Float = Field(1.0, gt=0, description="gradient norm clipping")
    zero_stage: Int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage, 0-3")
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the objective (pays on GPU; minutes of compilation on CPU)
    # 0 runs the loop in the driver process (Ray Train's local mode: no periodic checkpoints, a rerun starts over)
    num_workers: Int = Field(2, ge=0)
    # CPU cores (torch threads) each worker takes: on a many-core node, fewer workers with more threads each (on
    # the 2-core dev machine two workers x 1 thread ran 4.7 steps/s, one worker x 2 threads 3.9: docs/results/demo.md)
    cpus_per_worker: Int = Field(1, gt=0)
    checkpoint_every: Int = Field(0, ge=0)  # resumable (DeepSpeed) checkpoints; 0: none, only the final model
    # also a resumable checkpoint at the first log interval N minutes after the last one: a stage longer than a
    # sitting continues from there when the same command runs again (how often it saves, not what it computes:
    # may differ on a rerun)
    checkpoint_minutes: Float | None = Field(None, gt=0)
    log_every: Int = Field(25, gt=0, description="steps between progress lines and logged metrics (and Tune reports)")
    max_bad_steps: Int = Field(10, gt=0)  # consecutive NaN/Inf losses (updates skipped) before the stage stops
    eval_every: Int = Field(0, ge=0)  # validation exact match every N steps (a multiple of log_every); 0: at the end
    # a wall-clock budget for this attempt: the stage ends at the first log interval past it (validated,
    # checkpointed, published), the learning rate decaying over steps or minutes, whichever ends first. For
    # learning curves in minutes (a ladder) on a machine of unknown pace, not for equal-step comparisons
    max_minutes: Float | None = Field(None, gt=0)
    # stop at the first validation whose exact match reaches this (steps is then the cap, over which the learning
    # rate still decays): a stage that trains until it has learned, e.g. a CoT teacher until 0.99
    until_val: Float | None = Field(None, gt=0, le=1)
    lora: LoraConfig | None = None  # train LoRA adapters (peft) of the stage's model instead of all its weights

    @model_validator(mode="after")
    def _batch(self):
        if self.batch_size % (max(self.num_workers, 1) * self.grad_accumulation):
            raise ValueError(f"batch_size: {self.batch_size} does not split over {self.num_workers} workers"
                             + (f" x {self.grad_accumulation} micro-batches (grad_accumulation)"
                                if self.grad_accumulation > 1 else ""))
        if self.eval_every % self.log_every:
            raise ValueError(f"eval_every: {self.eval_every} is not a multiple of log_every ({self.log_every})")
        if self.until_val is not None and not self.eval_every:
            raise ValueError("until_val: needs eval_every (validation during training; 0 validates only at the end)")
        return self


class TeacherConfig(Section):
    path: str | None = None  # a trained teacher (HF directory); when unset the SFT stage trains one
    # training examples without a gold CoT get the teacher's own (greedy, eval.max_new_tokens), kept
    # where its answer is right; needs a teacher that writes CoTs (teacher.path, or gold CoTs to learn from)
    complete_cots: bool = False
    train: TrainConfig = TrainConfig(steps=1500, lr=2e-3)

    @model_validator(mode="after")
    def _exists(self):
        if self.path and not Path(self.path).is_dir():
            raise ValueError(f"path: no such directory: {self.path}")
        return self


class TrajectoryConfig(Section):
    layers: list[Int] | None = None  # teacher layers (1-based); None = all
    num_actors: Int = Field(2, gt=0, description="Ray actors that hold the frozen teacher for the trajectory pass; the"
                                                 " pool starts with those Ray can place, the others join when placed")
    batch_size: Int = Field(64, gt=0, description="examples per teacher forward in the trajectory pass")
    store_dir: str | None = None  # a path or URI (s3://, gs://, ...); default: <output_dir>/trajectories
    # what one trajectory unit averages: each CoT step's tokens, or (multiplication) for each answer digit the
    # states that write that digit's place in every CoT number; with loss.align_at answer, answer position p
    # then reads unit p alone
    segments: Literal["steps", "digits"] = "steps"

    @model_validator(mode="after")
    def _location(self):
        _check_location("store_dir", self.store_dir)
        return self


class SubspaceConfig(Section):
    rank: Int = Field(8, gt=0, description="r: the rank of the subspace the student is aligned in (at most max_rank)")
    max_rank: Int = Field(16, gt=0)  # coordinates are stored at max_rank; any rank <= max_rank reuses them
    # pca: a basis per layer; tucker: shared layer × step × hidden factors (HOSVD), core ranks
    # (tucker_ranks[0], tucker_ranks[1], rank), fitted from the stored trajectories at K = student.latent_slots
    kind: Literal["pca", "tucker"] = "pca"
    tucker_ranks: tuple[Int, Int] = Field((2, 2), description="kind=tucker: the core ranks of the layer and step "
                                                              "factors")

    @model_validator(mode="after")
    def _order(self):
        if self.rank > self.max_rank:
            raise ValueError(f"rank: {self.rank} is larger than max_rank ({self.max_rank})")
        return self


class StudentConfig(Section):
    # lori: CE + low-rank trajectory alignment; icot_kd: CE + full-width hidden-state MSE at the
    # latent slots (weight loss.first_order); codi: no latent slots, CE + full-width hidden-state MSE
    # between the student's and the teacher's states at `####`, the token before the answer (weight
    # loss.first_order; CODI's self-distillation with the frozen teacher); nocot: CE only, question ->
    # answer with no latent slots; icot_si: nocot with curriculum removal (ICoT-SI); explicit: the
    # student writes the CoT like the teacher (CE, plus loss.kd for logit distillation); coconut: CE only,
    # continuous latents and the stages curriculum (Coconut). Each is declared in lori_ray/methods.py
    method: Method = "lori"
    # full: the teacher's shape (init teacher) or a preset (init scratch); pruned: RED, the teacher at
    # residual width `width` (and `depth` layers) through projections initialised by `init`
    kind: Literal["full", "pruned"] = "full"
    init: Literal["teacher", "scratch"] | PrunedInit = Field(
        "teacher", description="kind=full: teacher (its weights) or scratch (a fresh preset, student.size); "
                               "kind=pruned: activation (RED channel selection), random or random_orthogonal "
                               "projections")
    size: str | None = None  # init=scratch: a size preset (another width → least-squares projection init)
    # a pretrained student (a local HF directory): its own weights, width and depth, the teacher's tokenizer (the
    # same token ids; its extra tokens kept); aligned through a least-squares projection when its width differs,
    # its layers paired with the teacher's by relative depth
    path: str | None = None
    width: Int | None = Field(None, gt=0)  # kind=pruned: residual width d_s
    depth: Int | None = Field(None, gt=0)  # kind=pruned: layers kept, evenly spaced (default: all)
    calibration_size: Int = Field(256, gt=0)  # kind=pruned: training examples that score channels
    latent_slots: Int = Field(3, gt=0, description="K: latent slots between the question and ####; the teacher's "
                                                   "trajectory is resampled to K steps")
    # pause: the latent slots are trained input tokens (parallel positions); continuous: each slot's input is
    # the last-layer state at the position before it (Coconut's continuous thoughts: K serial passes)
    latent: Literal["pause", "continuous"] = "pause"
    # removal (ICoT-SI): train on the teacher's CoT sequences and remove their first CoT tokens,
    # removal_tokens_per_epoch per pass over the training data, plus o more with probability ∝
    # exp(-removal_smoothing·o) (0: none); for nocot and lori with loss.align_at answer.
    # stages (Coconut; the coconut method): stage s replaces the first s CoT steps with s·latents_per_step
    # latents, one more stage every steps_per_stage steps (default: the budget split evenly over the stages
    # 0..latent_slots/latents_per_step), the last stage being the student's own layout
    curriculum: Literal["none", "removal", "stages"] = "none"
    removal_tokens_per_epoch: Float = Field(8.0, gt=0, description="curriculum=removal: CoT tokens removed per pass "
                                                                   "over the training data")
    removal_smoothing: Float = Field(4.0, ge=0, description="curriculum=removal: o more tokens removed with "
                                                            "probability ∝ exp(-removal_smoothing·o); 0: none")
    latents_per_step: Int = Field(1, gt=0, description="curriculum=stages: latents that replace each CoT step")
    steps_per_stage: Int | None = Field(None, gt=0, description="curriculum=stages: steps per stage; default: the "
                                                                "budget split evenly over the stages")
    reset_optimizer: bool = False  # clear AdamW's moments at each curriculum increment (ICoT-SI and Coconut do)
    seed: Int | None = None  # batch order and fresh weights of the student; default: the run's seed
    # split: the training split, its trajectories from the store; fresh (generated multiplication): new problems
    # every step, seeded by the step, never a validation or held-out question, their teacher targets computed in
    # the training step (the subspace is the store's, fitted on the training split); for lori, icot_kd, nocot
    problems: Literal["split", "fresh"] = "split"
    train: TrainConfig = TrainConfig(steps=500)

    @property
    def spec(self) -> MethodSpec:
        """What the method is made of (``methods.MethodSpec``)."""
        return METHODS[self.method]

    @property
    def removes_cot(self) -> bool:
        """Trained with the removal curriculum (``icot_si`` is nocot with it)."""
        return "removal" in (self.spec.curriculum, self.curriculum)

    @property
    def staged(self) -> bool:
        """Trained with Coconut's stages (``coconut`` is CE with them)."""
        return "stages" in (self.spec.curriculum, self.curriculum)

    @property
    def continuous(self) -> bool:
        """The latent slots are continuous thoughts."""
        return self.spec.latent == "continuous" or self.latent == "continuous"

    @property
    def stages(self) -> int:
        """The last stage of the stages curriculum: every CoT step replaced."""
        return self.latent_slots // self.latents_per_step

    @model_validator(mode="after")
    def _shape(self):
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"size: must be one of {sorted(SIZES)}")
        if self.size is not None and self.init != "scratch":
            raise ValueError("size: only with init 'scratch' (init 'teacher' copies the teacher's shape)")
        if self.path is not None:
            if self.kind == "pruned" or self.init != "teacher" or self.size is not None:
                raise ValueError("path: a pretrained student starts from its own weights; leave kind, init and size "
                                 "unset")
            if not Path(self.path).is_dir():
                raise ValueError(f"path: no such directory: {self.path}")
        if self.train.lora and (self.kind == "pruned" or self.init == "scratch"):
            raise ValueError("train.lora: adapters update pretrained weights; a pruned student's weights are "
                             "projections of the teacher's, a scratch one's are random (train it whole)")
        if self.kind == "pruned":
            if self.init not in PRUNED_INITS:
                raise ValueError(f"init: a pruned student starts from projections: one of {list(PRUNED_INITS)}")
            if self.width is None:
                raise ValueError("width: required when kind is 'pruned'")
            if self.train.zero_stage == 3:
                raise ValueError("train.zero_stage: a pruned student computes its weights from frozen teacher "
                                 "weights in its forward; use ZeRO stage 0-2")
        else:
            if self.init in PRUNED_INITS:
                raise ValueError(f"init: '{self.init}' initialises projections; set kind: pruned")
            if self.width is not None or self.depth is not None:
                raise ValueError("width: only with kind 'pruned'")
        return self


class LossConfig(Section):
    ce: Float = Field(1.0, ge=0, description="weight of the cross-entropy on the labelled tokens")
    # lori: where the student's states meet the teacher's trajectory. latents: slot k ↔ teacher step k
    # (first/second order in the subspace); answer: at ``####`` and each answer token a learned readout per
    # (layer, position) predicts the whole trajectory (student.latent_slots steps × subspace.rank), weight
    # ``answer``, and the student has no latent slots; both: the two together
    align_at: Literal["latents", "answer", "both"] = "latents"
    answer: Float = Field(0.5, ge=0, description="λ_answer: weight of the answer-position readout (align_at answer or "
                                                 "both)")
    first_order: Float = Field(1.0, ge=0, description="λ1: first-order alignment (lori), or the weight of icot_kd's "
                                                      "and codi's full-width MSE")
    second_order: Float = Field(1.0, ge=0, description="λ2: second-order (covariance) alignment (lori)")
    layers: list[Int] | None = None  # teacher layers to align (a subset of trajectory.layers); None = all stored
    # divide student and teacher trajectories by the teacher's RMS deviation per layer (one value for Tucker
    # cores), so λ1/λ2 mean the same for a 1M-parameter model and a pretrained LLM with large hidden states
    normalize: bool = True
    kd: Float = Field(0.0, ge=0)  # KL(teacher ‖ student) on the student's labelled tokens, teacher run online
    kd_temperature: Float = Field(1.0, gt=0, description="temperature of loss.kd's KL")


class EvalConfig(Section):
    batch_size: Int = Field(100, gt=0, description="questions generated at a time in evaluation")
    max_new_tokens: Int = Field(64, gt=0, description="tokens generated per answer at most (the teacher's CoT "
                                                      "included; shorter than its longest CoT and answer is refused)")


class TrackingConfig(Section):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite under the run directory
    experiment: str = Field("lori-ray", description="the MLflow experiment")
    # the student (and a teacher the run trained) as MLflow models, pyfunc and transformers flavours, on the parent
    # run and on the stage run that trained each
    log_models: bool = True


SEARCH_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")  # grid: every value, each num_samples times


class TuneConfig(Section):
    """A Ray Tune search over student hyperparameters; ``space`` maps config fields to distributions:
    ``subspace.rank: {choice: [2, 4, 8]}``, ``loss.first_order: {loguniform: [0.1, 10]}``."""

    num_samples: Int = Field(4, gt=0, description="trials")
    metric: str = Field("val_accuracy", description="what trials report and the scheduler reads: val_accuracy is exact"
                                                    " match on the validation split")
    mode: Literal["max", "min"] = Field("max", description="whether metric is maximised or minimised")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha: stop weak trials early (after grace_period "
                                                                   "reports); fifo: every trial runs to its end")
    grace_period: Int = Field(1, gt=0)  # reports (log_every steps) before ASHA may stop a trial
    search: Literal["random", "optuna"] = Field("random", description="random sampling, or optuna (needs the optuna "
                                                                      "package)")
    max_concurrent_trials: Int | None = Field(None, gt=0)  # default: cluster CPUs // workers per trial
    evaluate: Literal["best", "all"] = "best"  # which finished trials' students are scored on the held-out split
    space: dict[str, dict[str, list]] = Field({}, description="config key → one distribution: {choice: [...]}, "
                                                              "{grid: [...]} (every value, each num_samples times), "
                                                              "{uniform: [low, high]}, {loguniform: [low, high]} or "
                                                              "{randint: [low, high]}; every value it can take is "
                                                              "validated before Ray starts")

    @property
    def trials(self) -> int:
        """``num_samples`` for each combination of the grid values (one combination when the space has no grid)."""
        return self.num_samples * math.prod(len(spec["grid"]) for spec in self.space.values() if "grid" in spec)

    @model_validator(mode="after")
    def _space(self):
        for key, spec in self.space.items():
            if len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
                raise ValueError(f"space: {key} needs exactly one of {list(SEARCH_KINDS)}, got {spec}")
            kind, values = next(iter(spec.items()))
            if kind not in ("choice", "grid") and len(values) != 2:
                raise ValueError(f"space: {key}: {kind} takes [low, high], got {values}")
            if not values:
                raise ValueError(f"space: {key}: {kind} needs at least one value")
        return self


class ClusterConfig(Section):
    address: str | None = None  # None: $RAY_ADDRESS or a new local cluster bound to 127.0.0.1
    num_cpus: Int | None = Field(None, gt=0)  # local cluster only; default: this machine's cores
    # GPUs per train worker / teacher actor; None: 1 when the cluster has GPUs, else 0 (CPU)
    gpus_per_worker: Float | None = Field(None, ge=0)
    gpus_per_actor: Float | None = Field(None, ge=0, description="GPUs per teacher actor (and per task of the "
                                                                 "student's initialisation, evaluation and eRank); "
                                                                 "None: 1 when the cluster has GPUs, else 0 (CPU)")
    storage_path: str | None = None  # Ray Train checkpoints: a path or URI (s3://, gs://, ...); default: <run dir>/ray
    # how long a training stage waits for its workers' CPUs (and GPUs) to be free on the cluster, saying what it
    # waits for, before it fails; None: without limit
    wait_minutes: Float | None = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _location(self):
        _check_location("storage_path", self.storage_path)
        return self


class Config(Section):
    name: str = Field("run", description="the run's name: its directory under output_dir (letters, digits, '.', '_', "
                                         "'-')")
    output_dir: str = Field("runs", description="where runs are written (runs/<name>/: models, trajectory store, "
                                                "checkpoints, MLflow store); on a cluster, a path every node shares")
    seed: Int = Field(0, description="the run's seed: generated data and its split, initial weights, batch order")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    teacher: TeacherConfig = TeacherConfig()
    trajectory: TrajectoryConfig = TrajectoryConfig()
    subspace: SubspaceConfig = SubspaceConfig()
    student: StudentConfig = StudentConfig()
    loss: LossConfig = LossConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()
    tune: TuneConfig = TuneConfig()

    @field_validator("output_dir")
    @classmethod
    def _a_directory(cls, output_dir: str) -> str:
        found = next((p for p in (Path(output_dir), *Path(output_dir).parents) if p.exists()), None)
        if found is not None and not found.is_dir():
            raise ValueError(f"{found} is a file, not a directory: runs are written under output_dir")
        return output_dir

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _PLAIN_NAME.match(name) or ".." in name:
            raise ValueError(f"{name!r} is not a plain name (letters, digits, '.', '_', '-'; no '/' or '..'): it "
                             "names the run directory under output_dir")
        return name

    @model_validator(mode="after")
    def _lora_on_pretrained(self):
        if self.teacher.train.lora and not self.model.path and not self.teacher.path:
            raise ValueError("teacher.train.lora: the teacher starts from a fresh preset (no model.path), whose "
                             "random weights adapters cannot make a teacher of; train it whole or set model.path")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).absolute() / self.name

    @property
    def student_seed(self) -> int:
        return self.seed if self.student.seed is None else self.student.seed

    @property
    def store_dir(self) -> str:
        return storage.absolute(self.trajectory.store_dir or str(Path(self.output_dir) / "trajectories"))

    @property
    def tokenized_dir(self) -> Path:
        """Token sequences cached by what they depend on (``tokenized``), shared by the runs of one output_dir."""
        return Path(self.output_dir).absolute() / "tokenized"

    @property
    def storage_path(self) -> str:
        return storage.absolute(self.cluster.storage_path or str(self.run_dir / "ray"))

    def tracking_uri(self) -> str:
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.run_dir / 'mlflow.db'}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{dotted}: '{key}' is not a section")
    tree[leaf] = value


def _check_against_model(config: Config) -> None:
    """Checks that need the model's shape and vocabulary (its config and tokenizer, no weights loaded)."""
    model = config.model
    read = {}
    for field, path, gguf_file in (("model.path", model.path, model.gguf_file),
                                   ("teacher.path", config.teacher.path, None)):
        if path:
            try:
                read[field] = pretrained_config(path, model.trust_remote_code, gguf_file)
                tokens = len(load_tokenizer(path, model.trust_remote_code, gguf_file))
            except (ModelSourceError, ImportError) as error:
                raise ConfigError(f"{field}: {error}") from None
            if tokens > read[field].vocab_size:  # token ids past the embedding rows would index out of range
                raise ConfigError(f"{field}: the tokenizer in {path} has {tokens} tokens but the model's vocabulary "
                                  f"has {read[field].vocab_size} rows")
    if "family" in model.model_fields_set:  # a family the user names must be the one the weights are
        for field, found in read.items():
            if getattr(found, "model_type", model.family) != model.family:
                raise ConfigError(f"model.family: {model.family!r}, but {field}'s config.json says model_type "
                                  f"{found.model_type!r}; set model.family: {found.model_type} or leave it unset")
    if config.student.path:
        _check_student_path(config, read.get("teacher.path") or read.get("model.path"))
    source = read.get("teacher.path") or read.get("model.path")
    hidden, layers = ((source.hidden_size, source.num_hidden_layers) if source
                      else model_shape(model.family, model.size, None))
    if config.student.kind == "pruned" and not source and config.model.family not in PRUNABLE:
        raise ConfigError(f"student.kind: width-pruned (RED) students are built for the {list(PRUNABLE)} layouts, "
                          f"not {config.model.family!r}")
    if config.subspace.max_rank > hidden:
        raise ConfigError(f"subspace.max_rank: {config.subspace.max_rank} is larger than the hidden size ({hidden})")
    bad = [layer for layer in config.trajectory.layers or [] if not 1 <= layer <= layers]
    if bad:
        raise ConfigError(f"trajectory.layers: {bad} outside 1..{layers}")
    stored = config.trajectory.layers or range(1, layers + 1)
    if config.subspace.kind == "tucker":
        layer_rank, step_rank = config.subspace.tucker_ranks
        if layer_rank > len(stored):
            raise ConfigError(f"subspace.tucker_ranks: layer rank {layer_rank} exceeds the {len(stored)} stored layers")
        if step_rank > config.student.latent_slots:
            raise ConfigError(f"subspace.tucker_ranks: step rank {step_rank} exceeds student.latent_slots "
                              f"({config.student.latent_slots})")
        if config.loss.layers:
            raise ConfigError("loss.layers: a Tucker fit mixes all stored layers; select them with trajectory.layers")
    missing = [layer for layer in config.loss.layers or [] if layer not in stored]
    if missing:
        raise ConfigError(f"loss.layers: {missing} are not among the stored trajectory layers {list(stored)}")
    student = config.student
    if student.kind == "pruned":
        if student.width > hidden:
            raise ConfigError(f"student.width: {student.width} is larger than the teacher's hidden size ({hidden})")
        if student.depth and student.depth > layers:
            raise ConfigError(f"student.depth: {student.depth} is more than the teacher's {layers} layers")
    spec, align_at = student.spec, config.loss.align_at
    fields = config.data.fields
    if (spec.alignment != "none" and fields is not None and fields.cot is None and not fields.messages
            and not config.teacher.complete_cots):
        raise ConfigError(f"student.method: {student.method} aligns the student with the teacher's CoT, and the data "
                          f"has none (data.fields.cot is null): set teacher.complete_cots: true for the teacher to "
                          f"write them, or train student.method nocot")
    if spec.writes_cot and not (config.loss.ce or config.loss.kd):
        raise ConfigError("loss: an explicit student needs loss.ce or loss.kd above 0")
    if config.trajectory.segments == "digits" and (config.data.task != "multiplication" or config.model.path):
        raise ConfigError("trajectory.segments: 'digits' needs the multiplication task and its one-token-per-digit "
                          "tokenizer (no model.path)")
    if student.removes_cot and not ("removal" in spec.curricula and not spec.has_slots(align_at)):
        raise ConfigError(f"student.curriculum: removal trains {_trained_with('removal')}, not {student.method}"
                          + (f" aligned at {align_at}" if len(spec.sites) > 1 else ""))
    if student.staged and "stages" not in spec.curricula:
        raise ConfigError(f"student.curriculum: stages trains {_trained_with('stages')} (CE on what is left of the "
                          f"CoT), not {student.method}")
    if student.staged and student.latent_slots % student.latents_per_step:
        raise ConfigError(f"student.latents_per_step: {student.latents_per_step} does not divide "
                          f"student.latent_slots ({student.latent_slots}); the last stage has latent_slots latents")
    if student.continuous and not spec.has_slots(align_at):
        raise ConfigError(f"student.latent: continuous needs latent slots; student.method {student.method}"
                          + (f" with loss.align_at {align_at}" if len(spec.sites) > 1 else "") + " has none")
    if student.continuous and student.kind == "pruned":
        raise ConfigError("student.latent: continuous is for kind full students (a pruned student's forward "
                          "has no separate decoder to run in chunks)")
    if spec.site(align_at) == "separator" and config.trajectory.segments != "steps":
        raise ConfigError(f"trajectory.segments: {config.trajectory.segments!r} does not apply to student.method "
                          f"{student.method}, which aligns the teacher's state at `####` alone")
    if student.problems == "fresh":
        _check_fresh(config)
    if config.student.latent_slots >= config.model.max_positions:
        raise ConfigError(f"student.latent_slots: {config.student.latent_slots} does not fit in "
                          f"model.max_positions ({config.model.max_positions})")


def _trained_with(curriculum: str) -> str:
    """The methods a curriculum trains, for an error message."""
    names = []
    for name, spec in METHODS.items():
        if curriculum in spec.curricula:
            slotless = [site for site in spec.sites if not spec.has_slots(site)]  # removal needs no slots
            narrowed = curriculum == "removal" and spec.sites and len(slotless) < len(spec.sites)
            names.append(f"{name} with loss.align_at {' or '.join(slotless)}" if narrowed else name)
    return _listed(names)


def _listed(names: list[str]) -> str:
    """'a, b and c'."""
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def _check_student_path(config: Config, teacher_config) -> None:
    """A pretrained student reads the teacher's token ids: each of the teacher tokenizer's tokens has the same id in
    its tokenizer; a method that matches full-width states needs the teacher's width."""
    path, model = config.student.path, config.model
    try:
        student = pretrained_config(path, model.trust_remote_code)
        student_vocabulary = load_tokenizer(path, model.trust_remote_code).get_vocab()
    except (ModelSourceError, ImportError, OSError) as error:
        raise ConfigError(f"student.path: {error}") from None
    teacher_source = config.teacher.path or model.path
    teacher_tokenizer = (load_tokenizer(teacher_source, model.trust_remote_code, None if config.teacher.path else
                                        model.gguf_file) if teacher_source else arithmetic_tokenizer())
    differ = [token for token, i in teacher_tokenizer.get_vocab().items() if student_vocabulary.get(token) != i]
    if differ:
        raise ConfigError(f"student.path: its tokenizer gives {len(differ)} of the teacher's tokens other ids (e.g. "
                          f"{differ[:3]}); the student must read the teacher's token ids (save it with the teacher's "
                          f"tokenizer)")
    teacher_width = (teacher_config.hidden_size if teacher_config
                     else model_shape(model.family, model.size, None)[0])
    if config.student.spec.alignment == "hidden" and student.hidden_size != teacher_width:
        raise ConfigError(f"student.method: {config.student.method} matches full-width hidden states, and the student "
                          f"at student.path is {student.hidden_size} wide, the teacher {teacher_width}: use lori "
                          f"(a learned projection) or a student of the teacher's width")


def _check_fresh(config: Config) -> None:
    """``student.problems: fresh`` draws generated multiplication problems and computes the teacher's step
    trajectories (PCA coordinates or hidden states) for them in the training step; nothing else is drawn."""
    student, why = config.student, None
    if config.data.task != "multiplication":
        why = f"draws generated multiplication problems; data.task is {config.data.task}"
    elif not student.spec.fresh:
        why = f"trains {_listed([m for m, spec in METHODS.items() if spec.fresh])} students, not {student.method}"
    elif student.removes_cot or student.staged:
        why = f"has no CoT sequences for student.curriculum {student.curriculum}"
    elif config.loss.kd:
        why = "has no teacher sequences for loss.kd"
    elif student.spec.alignment == "subspace" and config.subspace.kind != "pca":
        why = "computes PCA coordinates (subspace.kind pca), not a Tucker core"
    elif student.spec.alignment == "hidden" and config.trajectory.segments != "steps":
        why = (f"aligns {student.method}'s latent slots with the teacher's CoT steps (trajectory.segments "
               f"steps)")
    if why:
        raise ConfigError(f"student.problems: fresh {why}")


def validate(tree: dict) -> Config:
    """A config tree → ``Config``, with every error named by its dotted field."""
    try:
        config = Config.model_validate(tree)
    except ValidationError as error:
        lines = []
        for e in error.errors():
            field = ".".join(str(p) for p in e["loc"])
            message = e["msg"].removeprefix("Value error, ")
            # section validators name their own field as "field: ..."; fold it into the dotted path
            own = re.match(r"([\w.]+): (.*)", message, re.DOTALL)
            if own and e["type"] == "value_error":
                field, message = f"{field}.{own[1]}" if field else own[1], own[2]
            lines.append(f"{field}: {message}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
    _check_against_model(config)
    return config


def with_overrides(config: Config, values: dict) -> Config:
    """A copy of ``config`` with dotted ``values`` applied, validated like a loaded file."""
    tree = config.model_dump(mode="json")
    for key, value in values.items():
        # a Tune sample may be a numpy scalar (randint): its Python value
        _set_dotted(tree, key, value.item() if hasattr(value, "item") else value)
    return validate(tree)


def _check_search_space(config: Config) -> None:
    """Every key of tune.space is a config field and every value it can take is valid."""
    for key, spec in config.tune.space.items():
        (kind, values), = spec.items()
        # range bounds, and a float inside a continuous range (an integer field cannot take it)
        candidates = values if kind in ("choice", "grid", "randint") else [*values[:2], (values[0] + values[1]) / 2]
        for value in candidates:
            try:
                with_overrides(config.model_copy(update={"tune": TuneConfig()}), {key: value})
            except ConfigError as error:
                raise ConfigError(f"tune.space.{key}: value {value!r} is invalid: "
                                  f"{str(error).removeprefix('invalid config:').strip()}") from None


class YamlLoader(yaml.SafeLoader):
    """YAML with 1.2's floats: ``lr: 3e-4`` is a number (PyYAML's 1.1 rules read it as the string '3e-4')."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def read_yaml(text: str, source: str):
    """Plain data from YAML text (a SafeLoader); a syntax error names ``source`` (the file, or the override)."""
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    tree = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        tree = read_yaml(path.read_text(), str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        _set_dotted(tree, key, read_yaml(value, f"override {item!r}"))
    config = validate(tree)
    _check_search_space(config)
    return config

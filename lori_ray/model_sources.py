"""Where a model comes from: a local HF directory (safetensors only), a GGUF file, or a Hugging Face hub id;
resolved and checked before anything loads, so a wrong ``model.path`` fails with a message that names it."""

from __future__ import annotations

import importlib.util
import re
from contextlib import contextmanager
from pathlib import Path


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


def require_gguf() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading a GGUF file needs the packages {missing}: pip install 'lori-ray[gguf]'")


def dequantize_options() -> dict:
    """Unpack GGUF weights into a plain dense, trainable and saveable model. Recent transformers
    can keep them packed (GgufConfig) where a kernel exists; older ones always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}

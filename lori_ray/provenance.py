"""Where a result came from: the header every benchmark writes at the top of its results markdown.

The header names the exact command line, the UTC date, the git commit (marked when the tree had uncommitted
changes) and the machine (OS, CPU model and cores, GPUs), so a results page can be quoted without a diary beside it:

    text = provenance.header() + table
    provenance.write_results(path, table)          # the same, written to path

Shell scripts use the command line form: ``python -m lori_ray.provenance -- bash bench/gpu_suite.sh``.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- provenance: written by lori_ray/provenance.py -->"
GIT_TIMEOUT_S = 10


def command_line(argv: list[str] | None = None) -> str:
    """The command as it was typed, as near as argv tells: ``python bench/accuracy.py --config ...``."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        script = Path(argv[0])
        if script.is_absolute() and script.is_relative_to(Path.cwd()):
            script = script.relative_to(Path.cwd())
        argv = ["python", str(script), *argv[1:]]
    return shlex.join(argv)


def git_commit(root: Path = ROOT) -> str:
    """The short commit of the checkout, ``+ uncommitted changes`` when tracked files differ; ``unknown`` outside
    a git checkout."""
    git = shutil.which("git")
    if not git:
        return "unknown (no git)"
    try:
        commit = subprocess.run([git, "-C", str(root), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                                text=True, timeout=GIT_TIMEOUT_S, check=True).stdout.strip()
        dirty = subprocess.run([git, "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpus() -> list[str]:
    """The GPUs' names: torch's view when torch is already imported, else ``nvidia-smi``'s; empty without one."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001 - a broken CUDA setup is reported as no GPU, not raised
            return []
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        found = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=GIT_TIMEOUT_S, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in found.splitlines() if line.strip()]


def machine() -> str:
    """``Linux x86_64, AMD EPYC 7B13 (2 cores), no GPU``; several GPUs of one kind are counted."""
    names = gpus()
    if not names:
        gpu = "no GPU"
    elif len(set(names)) == 1:
        gpu = f"{len(names)} x {names[0]}" if len(names) > 1 else names[0]
    else:
        gpu = ", ".join(names)
    return f"{platform.system()} {platform.machine()}, {cpu_model()} ({os.cpu_count()} cores), {gpu}"


def header(argv: list[str] | None = None, now: datetime | None = None) -> str:
    """The provenance block for the top of a results markdown file, ending in a blank line."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return "\n".join([
        MARKER,
        f"- command: `{command_line(argv)}`",
        f"- date: {now:%Y-%m-%d %H:%M:%S} UTC",
        f"- commit: {git_commit()}",
        f"- machine: {machine()}",
        "", "",
    ])


def write_results(path: Path, text: str, argv: list[str] | None = None) -> str:
    """Write ``header() + text`` to ``path`` (its folder made) and return what was written."""
    content = header(argv) + text.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return content


if __name__ == "__main__":  # python -m lori_ray.provenance -- COMMAND ...: print the header for that command
    arguments = sys.argv[1:]
    print(header(arguments[1:] if arguments[:1] == ["--"] else arguments), end="")

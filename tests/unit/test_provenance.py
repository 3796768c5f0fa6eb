"""The header every benchmark writes above its results: the exact command, the UTC date, the commit, the machine."""

import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from lori_ray import provenance


def test_the_header_names_command_date_commit_and_machine(monkeypatch):
    monkeypatch.setattr(provenance, "gpus", list)
    now = datetime(2026, 12, 7, 9, 30, 5, tzinfo=timezone(timedelta(hours=2)))
    text = provenance.header(["bench/accuracy.py", "--config", "configs/implicit 3x3.yaml", "--seeds", "3"], now=now)
    lines = text.splitlines()
    assert lines[0] == provenance.MARKER and text.endswith("\n\n")
    assert lines[1] == "- command: `python bench/accuracy.py --config 'configs/implicit 3x3.yaml' --seeds 3`"
    assert lines[2] == "- date: 2026-12-07 07:30:05 UTC"  # converted to UTC
    assert lines[3] == f"- commit: {provenance.git_commit()}"
    assert lines[4].startswith("- machine: ") and f"({os.cpu_count()} cores), no GPU" in lines[4]
    assert provenance.cpu_model() in lines[4]


def test_gpus_are_named_and_counted(monkeypatch):
    monkeypatch.setattr(provenance, "gpus", lambda: ["NVIDIA H100 80GB HBM3"] * 2)
    assert provenance.machine().endswith(f"({os.cpu_count()} cores), 2 x NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(provenance, "gpus", lambda: ["NVIDIA H100 80GB HBM3"])
    assert provenance.machine().endswith("cores), NVIDIA H100 80GB HBM3")


def test_the_command_line_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert provenance.command_line([str(tmp_path / "bench" / "red.py"), "a=b c"]) == "python bench/red.py 'a=b c'"
    assert provenance.command_line(["bash", "bench/gpu_suite.sh"]) == "bash bench/gpu_suite.sh"


@pytest.mark.skipif(not shutil.which("git"), reason="needs git")
def test_the_commit_is_marked_when_the_tree_has_changes(tmp_path):
    assert provenance.git_commit(tmp_path).startswith("unknown")
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)
    git("init", "-q")
    (tmp_path / "f.txt").write_text("one")
    git("add", "f.txt")
    git("commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("not counted")
    assert provenance.git_commit(tmp_path) == head
    (tmp_path / "f.txt").write_text("two")
    assert provenance.git_commit(tmp_path) == f"{head} + uncommitted changes"


def test_write_results_puts_the_header_on_top(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "gpus", list)
    path = tmp_path / "out" / "red.md"
    written = provenance.write_results(path, "| a | b |\n|---|---|\n\n", argv=["bench/red.py"])
    assert path.read_text() == written and written.endswith("| a | b |\n|---|---|\n")
    assert written.startswith(provenance.MARKER + "\n- command: `python bench/red.py`\n")


def test_the_command_line_form_prints_the_header():
    result = subprocess.run([sys.executable, "-m", "lori_ray.provenance", "--", "bash", "bench/gpu_suite.sh"],
                            capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.startswith(provenance.MARKER + "\n- command: `bash bench/gpu_suite.sh`\n- date: ")

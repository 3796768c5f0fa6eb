"""The code passes the linter as configured in pyproject.toml (ruff, its version pinned in the test extras), and
that configuration keeps the rules it claims: a weakened config fails here, not silently."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUFF = Path(sys.executable).with_name("ruff")
# rule prefixes pyproject.toml selects on top of the pinned version's defaults
SELECTED = ("E4", "E7", "E9", "F", "E501", "I", "B", "UP")


def ruff(*args: str) -> str:
    result = subprocess.run([str(RUFF), *args], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_ruff_finds_nothing():
    ruff("check", "--no-cache", "--output-format", "concise", ".")


def test_ruff_is_the_pinned_version():
    pin = re.search(r'"ruff==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert ruff("--version").split() == ["ruff", pin]


def test_config_selects_the_rules_and_python_it_says():
    settings = ruff("check", "--show-settings", "lori_ray/__init__.py")
    enabled_block = re.search(r"^linter\.rules\.enabled = \[\n(.*?)^\]", settings, re.MULTILINE | re.DOTALL).group(1)
    enabled = set(re.findall(r"\(([A-Z]+[0-9]+)\),?$", enabled_block, re.MULTILINE))
    stable = [rule["code"] for rule in json.loads(ruff("rule", "--all", "--output-format", "json"))
              if "Stable" in rule["status"]]
    for prefix in SELECTED:  # every stable rule of each family, none ignored ("F" is not "FURB")
        family = {code for code in stable if re.fullmatch(re.escape(prefix) + r"[0-9]*", code)}
        assert family and family <= enabled, f"{prefix}: not enabled: {sorted(family - enabled)}"
    assert re.search(r"^linter\.line_length = 120$", settings, re.MULTILINE)
    floor = re.search(r'^requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert re.search(rf"^linter\.unresolved_target_version = {floor[1]}\.{floor[2]}$", settings, re.MULTILINE)


def test_tests_take_shared_helpers_as_fixtures_not_imports():
    """tests/conftest.py's helpers reach a test as fixture arguments; importing conftest would bind a test to
    pytest's import mode and path (and to a module pytest also loads as a plugin)."""
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in sorted((ROOT / "tests").rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if re.match(r"\s*(from\s+conftest\s+import|import\s+conftest\b)", line)]
    assert not found, "use the fixture instead:\n" + "\n".join(found)

"""The method is cited from the repository's own docs/method.md: no citation of a document outside it, and every
``docs/method.md#<anchor>`` the code, tests or docs cite is a heading there."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SOURCES = ("lori_ray", "jobs", "bench", "scripts", "tests")
SUFFIXES = {".py", ".sh", ".md", ".yaml", ".yml", ".toml", ".txt"}
OUTSIDE = re.compile(r"\b" + "SP" + r"EC\b")  # split: this file must not cite it either
CITATION = re.compile(r"docs/method\.md#([\w-]+)")


def cited_files() -> list[Path]:
    files = [p for d in SOURCES for p in sorted((ROOT / d).rglob("*")) if p.is_file() and p.suffix in SUFFIXES]
    return [*files, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)  # a '#' in a code block is no heading
    return {anchor(m[1]) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.MULTILINE)}


def test_anchor_follows_github():
    assert anchor("Latent slots: pause and continuous") == "latent-slots-pause-and-continuous"
    assert anchor("RED students") == "red-students"
    assert anchor("Where in the `code`") == "where-in-the-code"


def test_no_citation_of_a_document_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in cited_files()
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, "cite docs/method.md#<section> instead:\n" + "\n".join(found)


def test_every_cited_section_of_the_method_exists():
    headings = anchors(METHOD.read_text())
    cited = {(str(path.relative_to(ROOT)), name) for path in cited_files()
             for name in CITATION.findall(path.read_text(errors="replace"))}
    assert cited, "nothing cites docs/method.md"
    missing = sorted(f"{path}: docs/method.md#{name}" for path, name in cited if name not in headings)
    assert not missing, "no such heading in docs/method.md:\n" + "\n".join(missing)


def test_the_configuration_reference_is_generated_from_the_schema():
    """docs/configuration.md is what scripts/config_reference.py writes from lori_ray/config.py today."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "configuration.md").read_text() == module.render(), \
        "docs/configuration.md is stale: run python scripts/config_reference.py"
    from lori_ray.cli import config_reference
    keys = [line.split()[0] for line in config_reference()]
    text = module.render()
    assert all(f"| `{key.rsplit('.', 1)[-1]}` |" in text for key in keys)  # every key has its row
    assert "| `rank` | `int` | `required` |" in text and "| `answer_marker` | `str` | `####` | with messages" in text

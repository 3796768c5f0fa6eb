"""The docs hold together: the method is cited from the repository's own docs/method.md (no citation of a document
outside it, and every ``docs/method.md#<anchor>`` the code, tests or docs cite is a heading there); every relative
link of README.md and docs/ resolves, to a heading where it names one; README.md stays a short front page; the
configuration reference is what the schema generates."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHOD = ROOT / "docs" / "method.md"
SOURCES = ("lori_ray", "jobs", "bench", "scripts", "tests")
SUFFIXES = {".py", ".sh", ".md", ".yaml", ".yml", ".toml", ".txt"}
OUTSIDE = re.compile(r"\b" + "SP" + r"EC\b")  # split: this file must not cite it either
CITATION = re.compile(r"docs/method\.md#([\w-]+)")


def cited_files() -> list[Path]:
    files = [p for d in SOURCES for p in sorted((ROOT / d).rglob("*")) if p.is_file() and p.suffix in SUFFIXES]
    return [*files, ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


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


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
README_MAX_LINES = 300


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def links(markdown: str) -> list[str]:
    """The targets of a markdown file's links, outside code blocks and inline code."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: — not checked offline
            continue
        file, _, name = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{shown(path)}: {target}: no such file")
        elif name and resolved.suffix == ".md" and name not in anchors(resolved.read_text()):
            broken.append(f"{shown(path)}: {target}: no such heading in {shown(resolved)}")
    return broken


def test_links_are_found_and_checked(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n[a](page.md#top) [b](#top) [c](missing.md) [d](page.md#nowhere) `[e](x.md)`\n"
                    "[f](https://example.com) ![g](img.png)\n```\n[h](gone.md)\n```\n")
    assert links(page.read_text()) == ["page.md#top", "#top", "missing.md", "page.md#nowhere", "https://example.com"]
    assert broken_links(page) == [f"{page}: missing.md: no such file",
                                  f"{page}: page.md#nowhere: no such heading in {page.resolve()}"]


def test_every_relative_link_in_the_docs_resolves():
    files = markdown_files()
    assert len(files) > 10 and all(links(path.read_text()) for path in files[:2])
    broken = [problem for path in files for problem in broken_links(path)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    for command in ("make demo", "make test", "docs/own-models.md", "docs/configuration.md"):
        assert command in text
    assert max(len(line) for line in lines if not line.startswith("|")) <= 120


def test_every_docs_page_is_reachable_from_the_readme():
    """No orphan page: each file under docs/ is linked from README.md or from a page linked from it."""
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        path = todo.pop()
        if path in seen or path.suffix != ".md" or not path.exists():
            continue
        seen.add(path)
        todo += [(path.parent / target.partition("#")[0]).resolve() for target in links(path.read_text())
                 if not re.match(r"[a-z][a-z0-9+.-]*:", target) and target.partition("#")[0]]
    orphans = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md") if p.resolve() not in seen)
    assert not orphans, f"not linked from README.md or its pages: {orphans}"

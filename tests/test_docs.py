"""The repository's documents stay self-contained: every citation and link resolves inside the clone.

Code cites ``docs/moonshot-api.md §N`` (and its source keys, such as ``X1``); the Markdown pages
link each other by relative path. A renamed section or a moved file breaks a reader's path
silently, so these tests find it first. No network, no servers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Where citations of the docs may appear: the packages, the tests, the benchmarks and the pages.
CITING = ("moonq", "producers", "worker", "gateway", "console", "harness", "simulator", "bench", "tests", "ops")
PAGES = [ROOT / name for name in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md", "BENCHMARKS.md")]
PAGES += [*sorted(DOCS.glob("*.md")), ROOT / "ops" / "README.md"]

SECTION_CITE = re.compile(r"docs/moonshot-api\.md §(\d+)")
SOURCE_CITE = re.compile(r"docs/moonshot-api\.md §\d+[^)\n]*?\b([SIXH]\d{1,2})\b")
DOC_CITE = re.compile(r"\b(docs/[\w./-]+\.md|CONTRIBUTING\.md|CHANGELOG\.md)\b")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def citing_files() -> list[Path]:
    files: list[Path] = []
    for top in CITING:
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in (".py", ".md", ".yml", ".toml")]
    return [*files, ROOT / "pyproject.toml", ROOT / "Makefile", *PAGES]


def api_sections() -> set[int]:
    text = (DOCS / "moonshot-api.md").read_text(encoding="utf-8")
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.MULTILINE)}


def api_sources() -> set[str]:
    text = (DOCS / "moonshot-api.md").read_text(encoding="utf-8")
    listed = text.split("\n## Sources\n", 1)[1]
    return set(re.findall(r"\*\*([SIXH]\d{1,2})\*\*", listed))


def test_the_api_notes_keep_sections_1_to_13_in_order() -> None:
    text = (DOCS / "moonshot-api.md").read_text(encoding="utf-8")
    numbers = [int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.MULTILINE)]
    assert numbers == list(range(1, 14))


def test_every_cited_section_of_the_api_notes_exists() -> None:
    sections = api_sections()
    missing = [
        f"{path.relative_to(ROOT)}: §{n}"
        for path in citing_files()
        for n in SECTION_CITE.findall(path.read_text(encoding="utf-8", errors="replace"))
        if int(n) not in sections
    ]
    assert not missing


def test_every_source_key_the_code_cites_is_listed() -> None:
    sources = api_sources()
    cited = {
        (str(path.relative_to(ROOT)), key)
        for path in citing_files()
        if path.parent != DOCS
        for key in SOURCE_CITE.findall(path.read_text(encoding="utf-8", errors="replace"))
    }
    assert cited, "the simulator cites X1 and I9; the pattern no longer finds them"
    assert {(where, key) for where, key in cited if key not in sources} == set()


def test_every_key_used_in_the_api_notes_is_listed_under_sources() -> None:
    text = (DOCS / "moonshot-api.md").read_text(encoding="utf-8")
    body = text.split("\n## Sources\n", 1)[0]
    used = set(re.findall(r"\b([SIXH]\d{1,2})\b", body))
    assert used - api_sources() == set()


def test_every_document_the_code_cites_exists() -> None:
    missing = {
        (str(path.relative_to(ROOT)), name)
        for path in citing_files()
        for name in DOC_CITE.findall(path.read_text(encoding="utf-8", errors="replace"))
        if not (ROOT / name).is_file()
    }
    assert missing == set()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    targets = [t for t in LINK.findall(text) if "://" not in t and not t.startswith("mailto:")]
    assert [t for t in targets if not (page.parent / t).exists()] == []
    # A clone must be self-contained: no link leaves the repository.
    assert [t for t in targets if not (page.parent / t).resolve().is_relative_to(ROOT)] == []

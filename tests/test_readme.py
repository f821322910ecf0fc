"""The documentation's Python examples run as written, and its links resolve.

The pages are README.md and every docs/*.md; BENCHMARKS.md, which the README links, is
link-checked too.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, ROOT / "BENCHMARKS.md"]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", flags=re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def _prose(page: Path) -> str:
    """The page without its code: fenced blocks and inline code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", page.read_text()))


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: the rendered text lowercased,
    punctuation dropped, spaces to '-', repeats suffixed -1, -2, ..."""
    seen: Counter[str] = Counter()
    anchors = set()
    for title in HEADING.findall(FENCE.sub("", page.read_text())):
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link renders as its text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


EXAMPLES = [page for page in PAGES if _python_blocks(page)]


def test_readme_holds_a_python_example():
    assert README in EXAMPLES, "the README must hold a runnable Python example"


@pytest.mark.parametrize("page", EXAMPLES, ids=_name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """A page's ```python blocks run in order, in one fresh namespace per page."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KMEM_CACHE", str(tmp_path / "features"))  # the examples' feature cache
    namespace: dict = {}
    for block in _python_blocks(page):
        exec(compile(block, _name(page), "exec"), namespace)


@pytest.mark.parametrize("page", LINKED, ids=_name)
def test_relative_links_resolve(page):
    """Every relative link names an existing file, and its #anchor an existing heading."""
    broken = []
    for target in LINK.findall(_prose(page)):
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not markdown")
        elif anchor and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_name(dest)}")
    assert not broken, f"{_name(page)}:\n" + "\n".join(broken)


def test_link_check_sees_links_and_anchors():
    """The checker itself: it finds the README's links and the headings they name."""
    links = LINK.findall(_prose(README))
    assert "docs/memory.md" in links and "BENCHMARKS.md" in links
    assert {"using-it", "documentation", "layout"} <= _anchors(README)
    assert "exact-mode-forgetting-equal-to-retraining-bit-for-bit" in _anchors(ROOT / "docs" / "models.md")
    assert "leave-batch-out-query-i-must-not-retrieve-the-ids-in-row-i--1--none" not in _anchors(
        README
    )  # a comment inside a code block is not a heading

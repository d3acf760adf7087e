"""Every pointer into the docs resolves: `docs/<page>.md#<anchor>` in the code, tests and pages, and every
relative link of README.md and docs/*.md names a file that exists and, with `#anchor`, a heading in it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SOURCES = [*sorted((REPO / "mmprep").rglob("*.py")), *sorted((REPO / "tests").rglob("*.py")),
           *sorted((REPO / "benchmarks").rglob("*.py")), REPO / "setup.py", REPO / "pyproject.toml", *PAGES]  # fmt: skip
POINTER = re.compile(r"((?:docs/[\w.-]+|README)\.md)(?:#([\w-]+))?")  # as written in code: docs/cli.md#exit-codes
LINK = re.compile(r"\]\(([^)\s]*)\)")  # a markdown link's target


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings (outside code fences), with GitHub's -1, -2 for repeats."""
    found: set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            base = slug(m.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def test_slug_follows_githubs_rule() -> None:
    assert slug("`mmprep encode MANIFEST... [options]`") == "mmprep-encode-manifest-options"
    assert slug("Serving: pre-warm vLLM's encoder cache") == "serving-pre-warm-vllms-encoder-cache"
    assert slug("`to_vllm`: one image's embeddings") == "to_vllm-one-images-embeddings"


def broken_pointers(files: list[Path]) -> list[str]:
    """`file:line: pointer` for each docs pointer or relative link that names a missing page or heading."""
    broken = []
    for source in files:
        for number, line in enumerate(source.read_text().splitlines(), 1):
            targets = [(REPO / m.group(1), m.group(2)) for m in POINTER.finditer(line)]
            if source.suffix == ".md":
                for m in LINK.finditer(line):
                    target = m.group(1)
                    if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not ours to check
                        continue
                    path, _, anchor = target.partition("#")
                    targets.append(((source.parent / path) if path else source, anchor or None))
            for path, anchor in targets:
                if not path.exists() or (anchor and anchor not in anchors(path)):
                    broken.append(f"{source.name}:{number}: {os.path.relpath(path, REPO)}#{anchor or ''}")
    return broken


def test_every_docs_pointer_and_link_resolves() -> None:
    assert len(PAGES) >= 9  # README and the docs pages
    assert (
        broken_pointers([s for s in SOURCES if s != Path(__file__).resolve()]) == []
    )  # this file's are bad on purpose


def test_a_broken_pointer_is_found(tmp_path: Path) -> None:
    """The check can fail: a missing page, a missing anchor and a bad link are each reported."""
    page = REPO / "docs" / "cli.md"
    bad = tmp_path / "bad.md"
    bad.write_text(f"see docs/cli.md#no-such-heading and docs/nowhere.md\n[x]({page}#exit-codes) [y](#missing)\n")
    found = broken_pointers([bad])
    assert len(found) == 3, found


@pytest.mark.parametrize("page", ["cli.md", "manifests.md", "cache.md", "serving.md", "operations.md",
                                  "performance.md", "architecture.md"])  # fmt: skip
def test_readme_links_every_docs_page(page: str) -> None:
    assert f"](docs/{page})" in (REPO / "README.md").read_text()

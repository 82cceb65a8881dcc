"""Every relative link in README.md and docs/**/*.md resolves: the file exists and, for `#anchor`, a heading
of the target has that anchor under GitHub's rule. Moving a page or renaming a heading breaks links
silently on GitHub; this makes it break a test instead."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def prose_lines(text: str, *, keep_code_spans: bool = False) -> list[str]:
    """The lines outside fenced code blocks; inline code spans blanked unless kept (links there are
    examples, but a heading's anchor includes their text)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line if keep_code_spans else CODE_SPAN.sub("", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link markup reduced to its text, lower-case, punctuation other than
    hyphens and underscores removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8"), keep_code_spans=True):
        if match := HEADING.match(line):
            base = slug(match.group(2))
            found.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def links(path: Path) -> list[str]:
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        targets += INLINE_LINK.findall(line)
        if match := REFERENCE_DEFINITION.match(line):
            targets.append(match.group(1))
    return targets


def broken_links(path: Path) -> list[str]:
    """The relative links of one markdown file that do not resolve, each with the reason."""
    broken = []
    for target in links(path):
        if EXTERNAL.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.name}")
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(document):
    assert links(document) or document.name != "README.md", "no link found: the parser is broken"
    broken = broken_links(document)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.md").write_text("# Notes\n\n## The paper's recipe, and where we differ\n")
    page = tmp_path / "a.md"
    page.write_text(
        "# Page\n\n## Run `--official` (twice)\n\n"
        "[ok](notes/b.md) [ok](notes/b.md#the-papers-recipe-and-where-we-differ) [ok](#run---official-twice)\n"
        "[web](https://example.org/x.md) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](notes/c.md) ![gone](pic.png) [bad anchor](notes/b.md#recipe) [bad](#nowhere)\n")
    assert [reason.split(":")[0] for reason in broken_links(page)] == [
        "notes/c.md", "pic.png", "notes/b.md#recipe", "#nowhere"]

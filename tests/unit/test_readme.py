"""The README's table of contents lists every section heading, in order, with working anchors."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
TOC_START, TOC_END = "<!-- contents -->", "<!-- /contents -->"


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of each ## and ### heading outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(##|###) (.+)$", line)):
            out.append((len(m[1]), m[2].strip()))
    return out


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def contents(text: str) -> str:
    return "\n".join(f"{'  ' * (level - 2)}- [{title.replace('`', '')}](#{anchor(title)})"
                     for level, title in headings(text))


def test_table_of_contents_matches_the_headings():
    text = README.read_text()
    assert TOC_START in text and TOC_END in text
    toc = text[text.index(TOC_START) + len(TOC_START):text.index(TOC_END)].strip()
    assert toc == contents(text), "regenerate it: python tests/unit/test_readme.py"


if __name__ == "__main__":  # rewrite the README's table of contents
    text = README.read_text()
    head, rest = text.split(TOC_START, 1)
    _, tail = rest.split(TOC_END, 1)
    README.write_text(f"{head}{TOC_START}\n{contents(text)}\n{TOC_END}{tail}")

"""Shared by the bench scripts: rewrite one section of docs/benchmarks.md, leaving the others."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def replace_section(heading: str, lines: list[str]) -> None:
    """Replace what follows `heading` up to the next `## ` heading with `lines`."""
    text = DOCS.read_text(encoding="utf-8")
    start = text.index(heading) + len(heading)
    end = text.find("\n## ", start)
    end = len(text) if end == -1 else end
    DOCS.write_text(text[:start] + "\n".join(["", "", *lines]) + text[end:], encoding="utf-8")

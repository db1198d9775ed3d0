"""The docs name only files that exist: every repository path they mention is checked."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

# Written by a run or by the user, never committed: a doc may name them freely.
GENERATED = {"data", "models", "runs", "dataset", "demo-output", ".env", ".venv"}
# Top-level folders and files of the repository: a path starting with one must exist.
TRACKED = {"bench", "bot", "deploy", "docs", "pipeline", "tests", "trainer", ".ci"}
# Source-like names: a path ending so must exist whatever it starts with (`ntqq/decode.py`).
SOURCE_SUFFIXES = (".py", ".proto", ".toml", ".md", ".yaml", ".yml", ".sh")
TOP_FILES = {"bot.py", ".env.example", "Makefile", "pyproject.toml", "README.md"}

_BACKTICKED = re.compile(r"`([A-Za-z0-9_.][\w./-]*)(?:::[\w\[\]-]+|:\w+)?`")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def mentioned_paths(text: str) -> set[str]:
    """Backticked repository paths (`bot/runtime.py`, `pipeline/ntqq/`), `::test` and `:name` cut."""
    found = set()
    for path in _BACKTICKED.findall(text):
        first = path.split("/")[0]
        if first in GENERATED or path.rstrip("/") in GENERATED:
            continue
        in_repo = "/" in path and (first in TRACKED or path.endswith(SOURCE_SUFFIXES))
        if in_repo or path in TOP_FILES:
            found.add(path)
    return found


def test_every_repository_path_in_the_docs_exists() -> None:
    missing = [
        f"{doc.relative_to(ROOT)}: `{path}`"
        for doc in DOCS
        for path in sorted(mentioned_paths(doc.read_text(encoding="utf-8")))
        if not (ROOT / path).exists()
    ]
    assert not missing, "the docs name files that do not exist:\n" + "\n".join(missing)


def test_every_relative_link_in_the_docs_resolves() -> None:
    missing = [
        f"{doc.relative_to(ROOT)}: ({target})"
        for doc in DOCS
        for target in _LINK.findall(doc.read_text(encoding="utf-8"))
        if "://" not in target and not target.startswith("mailto:") and not (doc.parent / target).exists()
    ]
    assert not missing, "the docs link to files that do not exist:\n" + "\n".join(missing)


def test_the_architecture_is_self_contained() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert "ARCHITECTURE" not in text, "docs/architecture.md is the contract: it defers to no other file"


def test_the_path_check_sees_what_it_must() -> None:
    text = "see `pipeline/ntqq/decode.py`, `bot/`, `ntqq/x.py`, `data/bot.db`, `tests/a.py::test_b`, `bot.py`"
    assert mentioned_paths(text) == {"pipeline/ntqq/decode.py", "bot/", "ntqq/x.py", "tests/a.py", "bot.py"}

"""Expected failures that the CLI reports as one line and exit status 2."""

from __future__ import annotations

from pathlib import Path


class TwinError(Exception):
    """A failure the user can act on; its message is the whole story (no traceback)."""


class InputError(TwinError):
    """Bad input: names the file and the likely cause."""

    def __init__(self, path: str | Path, cause: str) -> None:
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")

"""Secrets never reach a log: every secret setting's value is written as `***`, at every level.

Which settings are secret is decided by name (`…_KEY`, `…_TOKEN`, `…_SECRET`, `…_PASSWORD`:
`ONEBOT_ACCESS_TOKEN`, `ONEBOT_SECRET`, `TWIN_DB_KEY`, `TWIN_OPENAI_API_KEY`…); bot.py builds
one `SecretMask` from the environment and `.env` before NoneBot logs its configuration, and
masks both what every sink writes (`MaskedStream`) and each record (`SecretMask.patch_record`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO
from urllib.parse import quote

MASK = "***"
SECRET_NAME_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
# Values that stand for "no secret": the openai client's placeholder key.
PLACEHOLDER_VALUES = frozenset({"EMPTY"})
# Shorter values are not masked: replacing every "abc" in the log would garble it, and a
# secret that short protects nothing (the bot refuses a short token off loopback).
MIN_MASKED_LENGTH = 4


def is_secret_setting(name: str) -> bool:
    """`TWIN_DB_KEY`, `onebot_access_token`…: a setting whose value must never be logged."""
    return name.upper().endswith(SECRET_NAME_SUFFIXES)


# The password of a URL with credentials (`scheme://user:password@host`), in any setting's value.
_URL_PASSWORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:\"',\]]*:([^\s/@\"',\]]+)@")


def secret_values(settings: Mapping[str, object]) -> set[str]:
    """The values of the secret settings among `settings` (names in any case), placeholders left
    out; and the password inside any setting's URL (`TWIN_OPENAI_BASE_URL=http://u:pw@host/v1`)."""
    values = set()
    for name, value in settings.items():
        if isinstance(value, str) and is_secret_setting(name):
            value = value.strip()
            if len(value) >= MIN_MASKED_LENGTH and value not in PLACEHOLDER_VALUES:
                values.add(value)
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        for password in _URL_PASSWORD_RE.findall(text):
            if len(password) >= MIN_MASKED_LENGTH:
                values.add(password)
    return values


def spellings(value: str) -> set[str]:
    """How `value` can appear in a log line: as is, inside a repr or JSON, URL-quoted, tag-escaped."""
    return {
        value,
        repr(value)[1:-1],
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        quote(value, safe=""),
        value.replace("<", r"\<"),  # nonebot.utils.escape_tag, as in its "Loaded Config" line
    }


class SecretMask:
    """Replaces every known secret in a text (and in a loguru record) with `***`."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(*values)

    def add(self, *values: str) -> None:
        """Mask these values too (e.g. a token generated after the mask was built)."""
        new = {v for v in values if len(v) >= MIN_MASKED_LENGTH and v not in PLACEHOLDER_VALUES}
        if new - self._values:
            self._values |= new
            forms = {form for value in self._values for form in spellings(value)}
            # Longest first, so that a secret containing another is masked whole.
            alternatives = sorted(forms, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(form) for form in alternatives))

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(MASK, text)

    def _masked(self, value: Any) -> Any:
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {key: self._masked(item) for key, item in value.items()}
        if type(value) in (list, tuple, set, frozenset):
            return type(value)(self._masked(item) for item in value)
        if isinstance(value, (int, float, bool)) or value is None:
            return value
        shown = str(value)  # an object a format string would print: keep it unless it shows a secret
        masked = self(shown)
        return value if masked == shown else masked

    def patch_record(self, record: Any) -> None:
        """A loguru patcher: mask the record's message and extra fields before any sink sees them."""
        record["message"] = self(record["message"])
        for key, value in list(record["extra"].items()):
            record["extra"][key] = self._masked(value)

    def chain(self, patcher: Callable[[Any], None] | None) -> Callable[[Any], None]:
        """A patcher that runs `patcher` (NoneBot's own, say) and then masks the record."""

        def patch(record: Any) -> None:
            if patcher is not None:
                patcher(record)
            self.patch_record(record)

        return patch


class MaskedStream:
    """A text stream for a loguru sink that masks everything written, tracebacks included."""

    def __init__(self, stream: TextIO, mask: SecretMask) -> None:
        self._stream = stream
        self._mask = mask

    def write(self, text: str) -> None:
        self._stream.write(self._mask(text))

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

"""JSON log lines (`TWIN_LOG_FORMAT=json`): one object per line for journald, Docker or a log shipper.

Each line is `{"time", "level", "name", "message"}` (plus `"exception"` with a traceback). The
record passes the same filter as the text log (no message text at INFO) and the line goes
through the same `MaskedStream`, so a secret is `***` in JSON too.
"""

from __future__ import annotations

import json
import traceback
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")


def json_line(record: Any) -> str:
    """A loguru record as one JSON line (no colour markup, which loguru strips from the message)."""
    line = {
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "name": record["name"],
        "message": record["message"],
    }
    if record["exception"] is not None:
        kind, value, tb = record["exception"]
        # The stdlib's traceback, not loguru's "diagnose" one, which would print variables' values.
        line["exception"] = "".join(traceback.format_exception(kind, value, tb)).rstrip()
    return json.dumps(line, ensure_ascii=False) + "\n"


class JsonLines:
    """A loguru sink writing each record as one JSON line to `stream` (a `MaskedStream`)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, message: Any) -> None:
        self._stream.write(json_line(message.record))
        self._stream.flush()


def log_format(settings: dict[str, str | None]) -> str:
    """`TWIN_LOG_FORMAT` from the merged settings (names lower-cased); an unknown value reads as
    `text` here and is reported in one line when the plugin validates its settings."""
    value = (settings.get("twin_log_format") or "text").strip()
    return value if value in LOG_FORMATS else "text"

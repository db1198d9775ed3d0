"""The normalised message record (`messages.jsonl`), a contract of docs/architecture.md."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.chatformat import CHAT_TYPES, ChatType
from pipeline.errors import InputError
from pipeline.files import atomic_path

ELEMENT_KINDS = (
    "text",
    "face",
    "sticker",
    "image",
    "voice",
    "video",
    "file",
    "at",
    "reply",
    "forward",
    "card",
)


@dataclass(slots=True)
class Message:
    """One visible QQ message, with its elements already rendered to placeholder text."""

    msg_id: str
    chat_type: ChatType
    chat: str
    sender: str
    sender_name: str
    is_self: bool
    time: int
    text: str
    reply_to: str | None = None
    kinds: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> Message:
        try:
            # Positional, in field order: build-dataset reads every message through here.
            msg = cls(
                str(data["msg_id"]),
                data["chat_type"],
                str(data["chat"]),
                str(data["sender"]),
                str(data.get("sender_name") or ""),
                bool(data["is_self"]),
                int(data["time"]),
                str(data["text"]),
                None if data.get("reply_to") is None else str(data["reply_to"]),
                list(map(str, data.get("kinds") or ())),
            )
        except KeyError as exc:
            raise ValueError(f"missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad field value ({exc})") from None
        if msg.chat_type not in CHAT_TYPES:
            expected = " or ".join(map(repr, CHAT_TYPES))
            raise ValueError(f"chat_type must be {expected}, not {msg.chat_type!r}")
        return msg


_DECODER = json.JSONDecoder()


def _loads_line(line: str) -> Any:
    """`json.loads(line)`, minus its per-call checks for the usual `{...}` + newline line.

    Anything else (leading space or BOM, trailing text, a syntax error) goes through
    `json.loads` itself, so results and error messages are exactly its own.
    """
    if line.startswith("{"):
        try:
            value, end = _DECODER.raw_decode(line)
        except json.JSONDecodeError:
            pass
        else:
            if end == len(line) or line[end:] == "\n":
                return value
    return json.loads(line)


def iter_messages(
    path: str | Path, *, skip_bad: bool = False, bad_lines: list[int] | None = None
) -> Iterator[Message]:
    """Stream records from a JSONL file; a malformed line raises InputError naming its number.

    With `skip_bad`, malformed lines are skipped and their numbers appended to `bad_lines`.
    """
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a messages.jsonl file") from None
    except PermissionError:
        raise InputError(path, "permission denied") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield Message.from_dict(_loads_line(line))
                except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
                    if not skip_bad:
                        raise InputError(
                            path,
                            f"line {number}: not a message record ({exc}); use --skip-bad to skip such lines",
                        ) from None
                    if bad_lines is not None:
                        bad_lines.append(number)
        except UnicodeDecodeError:
            raise InputError(path, "not UTF-8 text (is this really a messages.jsonl file?)") from None


def write_messages(path: str | Path, messages: Iterable[Message]) -> int:
    """Write records atomically; returns how many were written."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        for msg in messages:
            out.write(msg.to_json())
            out.write("\n")
            count += 1
    return count

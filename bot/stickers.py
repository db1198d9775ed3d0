"""Market stickers (QQ's 商城表情): their send data as the QQ side reports it, and which one a
`[名字]` in a reply may stand for. Pure; the store keeps them (`bot/store.py`, table `stickers`).

A sticker can only be sent with the data QQ itself gave out (`emoji_package_id`, `emoji_id`,
`key`), so the bot learns it whenever one passes by. Everything here comes from the QQ side and
is hostile until checked: a field of the wrong type or shape means the sticker is not learned.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.chatformat import FACE_NAMES, MAX_STICKER_NAME_CHARS, PLACEHOLDERS, sticker_name

StickerSource = Literal["owner", "friend"]
StickerMode = Literal["owner", "any", "off"]  # TWIN_STICKERS

# QQ's ids and keys are short ASCII tokens (an md5 in hex, a 16-character key); anything else
# is not something QQ gave out.
_TOKEN_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
_PACKAGE_ID_RE = re.compile(r"[0-9]{1,15}")
MAX_SUMMARY_CHARS = MAX_STICKER_NAME_CHARS + 8  # `[名字]` with some room for spaces
# A name that is a placeholder would make `[图片]` send a picture chosen by whoever sent it first.
_RESERVED_NAMES = frozenset(sticker_name(p) for p in PLACEHOLDERS)
_FACE_NAMES = frozenset(FACE_NAMES.values())


@dataclass(slots=True, frozen=True)
class Sticker:
    """One market sticker's send data, by name (`贴贴` for `[贴贴]`), and whose the store keeps it as."""

    name: str
    emoji_package_id: int
    emoji_id: str
    key: str
    summary: str
    source: StickerSource = "friend"

    def segment_data(self) -> dict[str, Any]:
        """The data of the `mface` segment that sends it (NapCat's shape)."""
        return {
            "emoji_package_id": self.emoji_package_id,
            "emoji_id": self.emoji_id,
            "key": self.key,
            "summary": self.summary,
        }


def is_market_sticker(kind: str, data: Mapping[str, Any]) -> bool:
    """An `mface` segment (the send shape; LLOneBot and Lagrange report it too), or NapCat's report
    of one: an `image` segment carrying the market face's `emoji_id` / `emoji_package_id`."""
    return kind == "mface" or (kind == "image" and ("emoji_id" in data or "emoji_package_id" in data))


def _package_id(value: object) -> int | None:
    if isinstance(value, bool):  # a bool is an int to Python, never an id to QQ
        return None
    if isinstance(value, int):
        return value if 0 < value < 10**15 else None
    if isinstance(value, str) and _PACKAGE_ID_RE.fullmatch(value):  # CQ codes carry strings
        return int(value) or None
    return None


def _token(value: object) -> str | None:
    return value if isinstance(value, str) and _TOKEN_RE.fullmatch(value) else None


def sticker_from_segment(kind: str, data: Mapping[str, Any]) -> Sticker | None:
    """The sendable sticker a segment carries, or None (not a market sticker, or any field missing,
    of the wrong type, too long, or a name that cannot be written as `[名字]`)."""
    if not is_market_sticker(kind, data):
        return None
    package_id = _package_id(data.get("emoji_package_id"))
    emoji_id, key, summary = _token(data.get("emoji_id")), _token(data.get("key")), data.get("summary")
    if package_id is None or emoji_id is None or key is None or not isinstance(summary, str):
        return None
    if len(summary) > MAX_SUMMARY_CHARS:
        return None
    name = sticker_name(summary)
    if (
        not name
        or len(name) > MAX_STICKER_NAME_CHARS
        or not name.isprintable()
        or any(c in name for c in "[]")
        or name in _RESERVED_NAMES
    ):
        return None
    return Sticker(name, package_id, emoji_id, key, f"[{name}]")


def stickers_in(segments: Iterable[tuple[str, Mapping[str, Any]]]) -> list[Sticker]:
    """Every sendable sticker among a message's segments (whose they are, the store decides)."""
    found = (sticker_from_segment(kind, data) for kind, data in segments)
    return [sticker for sticker in found if sticker is not None]


def sendable(stickers: Iterable[Sticker], mode: StickerMode) -> dict[str, Sticker]:
    """The stickers a reply may send, by name: none when `off`; the owner's own; with `any` also
    friends' — but never one named like a QQ face, which a friend could otherwise replace for
    every chat (`[微笑]` stays the face unless the owner sends a sticker of that name)."""
    if mode == "off":
        return {}
    return {
        s.name: s for s in stickers if s.source == "owner" or (mode == "any" and s.name not in _FACE_NAMES)
    }

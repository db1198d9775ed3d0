"""Live OneBot v11 segments → `pipeline.chatformat` elements → the text the model reads.

The live bot must show the model exactly what the dataset builder showed it, so this module
only maps OneBot's segment types onto chatformat's element kinds; the rendering itself (face
names, `[图片]`, `@名字`) is chatformat's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.chatformat import (
    ANIMATED_STICKER,
    FACE_NAMES,
    PLACEHOLDERS,
    Element,
    face_placeholder,
    render_elements,
)

# Segment types that are cards of some sort (shares, mini-apps, music, contacts, locations).
_CARD_TYPES = {"json", "xml", "share", "music", "contact", "location", "markdown", "ark"}
_SIMPLE_KINDS = {"record": "voice", "video": "video", "file": "file", "forward": "forward", "node": "forward"}


@dataclass(slots=True)
class RenderedMessage:
    """A live message as the store and the prompt see it."""

    text: str
    kinds: list[str] = field(default_factory=list)
    reply_to: str | None = None
    mentions: list[str] = field(default_factory=list)  # uins @-mentioned ("all" for @全体成员)


def segment_element(kind: str, data: Mapping[str, Any], names: Mapping[str, str]) -> Element | None:
    """One OneBot segment as a chatformat element; None for kinds that show nothing (poke…)."""
    if kind == "text":
        return Element("text", text=str(data.get("text", "")))
    if kind == "face":
        return Element("face", ref=str(data.get("id", "")))
    if kind == "mface":  # NapCat's market sticker: its summary is the sticker's text
        return Element("sticker", text=str(data.get("summary", "")))
    if kind == "image":
        summary = str(data.get("summary", "")).strip()
        animated = summary == ANIMATED_STICKER or str(data.get("sub_type", "0")) == "1"
        return Element("image", text=ANIMATED_STICKER if animated else "")
    if kind == "at":
        target = str(data.get("qq", ""))
        name = "全体成员" if target == "all" else names.get(target) or str(data.get("name", ""))
        return Element("at", text=name, ref=target)
    if kind == "reply":
        return Element("reply", ref=str(data.get("id", "")))
    if kind in _SIMPLE_KINDS:
        return Element(_SIMPLE_KINDS[kind])  # type: ignore[arg-type]
    if kind in _CARD_TYPES:
        return Element("card")
    return None


def render_segments(
    segments: Iterable[tuple[str, Mapping[str, Any]]], names: Mapping[str, str] | None = None
) -> RenderedMessage:
    """Render `(type, data)` segments; `names` maps uins to display names for @-mentions."""
    names = names or {}
    elements = [e for kind, data in segments if (e := segment_element(kind, data, names)) is not None]
    text, kinds, reply_to = render_elements(elements)
    mentions = [e.ref for e in elements if e.kind == "at" and e.ref]
    return RenderedMessage(text=text, kinds=kinds, reply_to=reply_to, mentions=mentions)


_FACE_IDS = {name: face_id for face_id, name in sorted(FACE_NAMES.items(), reverse=True)}
_BRACKET_RE = re.compile(r"\[([^\[\]\n]{1,12})\]")


def outgoing_parts(text: str) -> list[tuple[str, str]]:
    """A reply bubble → `("text", s)` and `("face", id)` parts: `[微笑]` goes back out as face 14.

    Media placeholders (`[图片]`, `[动画表情]`…) cannot be sent as what they stand for, so they
    are dropped; an empty list means there is nothing left to send.
    """
    parts: list[tuple[str, str]] = []
    position = 0
    for match in _BRACKET_RE.finditer(text):
        name = match.group(1)
        if name in _FACE_IDS or match.group(0) in PLACEHOLDERS:
            parts.append(("text", text[position : match.start()]))
            if name in _FACE_IDS:
                parts.append(("face", str(_FACE_IDS[name])))
            position = match.end()
    parts.append(("text", text[position:]))
    parts = [(kind, value) for kind, value in parts if kind != "text" or value.strip()]
    return parts


def outgoing_text(parts: Iterable[tuple[str, str]]) -> str:
    """What a bubble looks like once sent (faces back as `[名字]`, dropped placeholders gone):
    the twin's row in the store and the text its echo is recognised by."""
    return "".join(face_placeholder(value) if kind == "face" else value for kind, value in parts).strip()

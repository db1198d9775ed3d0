"""Live OneBot v11 segments → `pipeline.chatformat` elements → the text the model reads.

The live bot must show the model exactly what the dataset builder showed it, so this module
only maps OneBot's segment types onto chatformat's element kinds; the rendering itself (face
names, `[图片]`, `@名字`) is chatformat's. The way back: a reply's `[名字]` become QQ faces and
market stickers again, and placeholders that cannot be sent are dropped (`outgoing_parts`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.stickers import Sticker, is_market_sticker
from pipeline.chatformat import (
    ANIMATED_STICKER,
    FACE_NAMES,
    MAX_STICKER_NAME_CHARS,
    PLACEHOLDERS,
    Element,
    face_placeholder,
    render_elements,
    sticker_placeholder,
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
    if is_market_sticker(kind, data):  # its summary is the sticker's text, as in QQ NT's bodies
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
_BRACKET_RE = re.compile(rf"\[([^\[\]\n]{{1,{MAX_STICKER_NAME_CHARS}}})\]")

PartKind = Literal["text", "face", "sticker"]
Part = tuple[PartKind, str]  # ("text", s), ("face", QQ face id), ("sticker", sticker name)


def _parts_once(text: str, stickers: Mapping[str, Sticker]) -> list[Part]:
    parts: list[Part] = []
    position = 0
    for match in _BRACKET_RE.finditer(text):
        name = match.group(1)
        parts.append(("text", text[position : match.start()]))
        position = match.end()
        if match.group(0) in PLACEHOLDERS:
            continue  # `[图片]`, `[语音]`…: what they stand for cannot be sent
        if name in stickers:  # the owner's own sticker wins over a QQ face of the same name
            parts.append(("sticker", name))
        elif name in _FACE_IDS:
            parts.append(("face", str(_FACE_IDS[name])))
        # any other `[名字]` is a sticker the twin cannot send: dropped, never sent as text
    parts.append(("text", text[position:]))
    return [(kind, value) for kind, value in parts if kind != "text" or value.strip()]


def outgoing_parts(text: str, stickers: Mapping[str, Sticker] | None = None) -> list[Part]:
    """A reply bubble → text, QQ face and market sticker parts: `[微笑]` goes back out as face 14,
    `[贴贴]` as the sticker when `stickers` (the sendable ones, by name) has it.

    Placeholders (`[图片]`, `[动画表情]`…) and unknown `[名字]` are dropped; an empty list means
    there is nothing left to send. What is kept renders back to itself (`outgoing_text`).
    """
    stickers = stickers or {}
    while True:  # dropping `[b]` from `[a[b]c]` leaves `[ac]`, which must go too
        parts = _parts_once(text, stickers)
        shown = outgoing_text(parts)
        if shown == text.strip():
            return parts
        text = shown


def outgoing_bubbles(parts: list[Part]) -> list[list[Part]]:
    """The bubbles a reply bubble's parts go out as: each sticker alone (QQ shows a market sticker
    only as a message of its own), the text and faces around it as they were."""
    bubbles: list[list[Part]] = []
    current: list[Part] = []
    for part in parts:
        if part[0] == "sticker":
            bubbles += [b for b in (current, [part]) if b]
            current = []
        else:
            current.append(part)
    return [*bubbles, current] if current else bubbles


def outgoing_text(parts: Iterable[Part]) -> str:
    """What a bubble looks like once sent (faces and stickers back as `[名字]`, dropped
    placeholders gone): the twin's row in the store and the text its echo is recognised by."""
    shown = {"face": face_placeholder, "sticker": sticker_placeholder}
    return "".join(shown[kind](value) if kind in shown else value for kind, value in parts).strip()

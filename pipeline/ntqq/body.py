"""Decoding a QQ NT message body (column 40800) into chat-format elements; pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from pipeline.chatformat import Element
from pipeline.ntqq import ntqq_body_pb2

# Element types (field 45002), from docs/ntqq.md.
TEXT = 1
IMAGE = 2
FILE = 3
VOICE = 4
VIDEO = 5
FACE = 6
REPLY = 7
GRAY_TIP = 8
ARK = 10
MARKET_STICKER = 11
FORWARD = 16

AT_ONE = 1
AT_ALL = 2
AT_ALL_TEXT = "@全体成员"


class BodyError(ValueError):
    """The body is not a well-formed QQ NT element list."""


@dataclass(slots=True)
class DecodedBody:
    """What one body says: visible elements, whether it is a gray tip / revoke, unknown types."""

    elements: list[Element]
    gray_tip: bool = False
    revoked: bool = False
    reply_seq: int = 0
    unknown_types: tuple[int, ...] = ()


def decode_body(body: bytes | None) -> DecodedBody:
    """Parse column 40800; raises BodyError on a truncated or mistyped body."""
    if not body:
        return DecodedBody([])
    parsed = ntqq_body_pb2.MsgBody()
    try:
        parsed.ParseFromString(body)
    except DecodeError as exc:  # truncated, bad varint, invalid UTF-8 in a text field, ...
        raise BodyError(f"not a protobuf element list ({exc})") from None
    raw_elements = parsed.elements
    if not raw_elements:
        # Non-empty bytes but no field 40800 of the right wire type: not a body we understand.
        raise BodyError("no elements (field 40800 missing or of the wrong wire type)")
    result = DecodedBody([])
    append = result.elements.append
    unknown: list[int] = []
    for raw in raw_elements:
        kind = raw.element_type
        if not kind:  # 0 is no element type: field 45002 missing or of the wrong wire type
            raise BodyError("element without a type (field 45002 missing or of the wrong wire type)")
        # Plain text first: it is most elements of most bodies.
        if kind == TEXT and not raw.sub_type:
            append(Element("text", raw.text))
            continue
        render = _RENDERERS.get(kind)
        if render is not None:
            append(render(raw))
        elif kind == GRAY_TIP:
            result.gray_tip = True
            if raw.HasField("revoke_operator_uid") or raw.HasField("revoke_suggestion"):
                result.revoked = True
        elif kind == REPLY:
            append(Element("reply"))
            result.reply_seq = raw.reply_seq
        else:
            unknown.append(kind)
    if unknown:
        result.unknown_types = tuple(unknown)
    return result


def _text_or_at(raw: ntqq_body_pb2.MsgElement) -> Element:
    if raw.sub_type == AT_ONE:
        return Element("at", text=raw.text, ref=raw.at_uid)
    if raw.sub_type == AT_ALL:
        return Element("at", text=raw.text or AT_ALL_TEXT)
    return Element("text", text=raw.text)


def _face(raw: ntqq_body_pb2.MsgElement) -> Element:
    return Element("face", text=raw.face_text, ref=str(raw.face_id) if raw.HasField("face_id") else "")


# Element type → how it becomes a chat-format Element (gray tips and replies are handled inline).
_RENDERERS = {
    TEXT: _text_or_at,
    FACE: _face,
    MARKET_STICKER: lambda raw: Element("sticker", text=raw.sticker_text),
    IMAGE: lambda raw: Element("image", text=raw.image_summary),
    VOICE: lambda raw: Element("voice", text=raw.voice_text),
    VIDEO: lambda raw: Element("video"),
    FILE: lambda raw: Element("file"),
    FORWARD: lambda raw: Element("forward"),
    ARK: lambda raw: Element("card"),
}

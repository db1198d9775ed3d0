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
    try:
        parsed = _parse(body)
    except DecodeError as exc:  # truncated, bad varint, wrong wire type for a sub-message, ...
        raise BodyError(f"not a protobuf element list ({exc})") from None
    raw_elements = parsed.elements
    if not raw_elements:
        # Non-empty bytes but no field 40800 of the right wire type: not a body we understand.
        raise BodyError("no elements (field 40800 missing or of the wrong wire type)")
    # This runs once per stored message: locals and a flat dispatch, no per-element objects
    # beyond the Elements themselves (the fixed kinds are shared singletons).
    elements: list[Element] = []
    append = elements.append
    gray_tip = revoked = False
    reply_seq = 0
    unknown: list[int] | None = None
    try:
        for raw in raw_elements:
            kind = raw.element_type
            if kind == TEXT:
                sub_type = raw.sub_type
                if sub_type == AT_ONE:
                    append(Element("at", raw.text.decode(), raw.at_uid.decode()))
                elif sub_type == AT_ALL:
                    append(Element("at", raw.text.decode() or AT_ALL_TEXT))
                else:
                    append(Element("text", raw.text.decode()))
            elif kind in _FIXED:
                append(_FIXED[kind])
            elif kind == FACE:
                face_id = str(raw.face_id) if raw.HasField("face_id") else ""
                append(Element("face", raw.face_text.decode(), face_id))
            elif kind == MARKET_STICKER:
                append(Element("sticker", raw.sticker_text.decode()))
            elif kind == IMAGE:
                summary = raw.image_summary
                append(Element("image", summary.decode()) if summary else _PLAIN_IMAGE)
            elif kind == VOICE:
                append(Element("voice", raw.voice_text.decode()))
            elif kind == REPLY:
                append(_REPLY)
                reply_seq = raw.reply_seq
            elif kind == GRAY_TIP:
                gray_tip = True
                if raw.HasField("revoke_operator_uid") or raw.HasField("revoke_suggestion"):
                    revoked = True
            elif not kind:  # 0 is no element type: field 45002 missing or of the wrong wire type
                raise BodyError("element without a type (field 45002 missing or of the wrong wire type)")
            else:
                if unknown is None:
                    unknown = []
                unknown.append(kind)
    except UnicodeDecodeError:
        raise BodyError("a text field of a rendered element is not UTF-8") from None
    return DecodedBody(elements, gray_tip, revoked, reply_seq, tuple(unknown) if unknown else ())


_parse = ntqq_body_pb2.MsgBody.FromString

# Elements that carry nothing but their kind.
_FIXED: dict[int, Element] = {
    VIDEO: Element("video"),
    FILE: Element("file"),
    FORWARD: Element("forward"),
    ARK: Element("card"),
}
_PLAIN_IMAGE = Element("image")
_REPLY = Element("reply")

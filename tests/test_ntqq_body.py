"""Decoding column 40800 with the protobuf schema: every element kind, unknown fields, damage."""

from __future__ import annotations

import pytest

from pipeline.chatformat import Element, render_elements
from pipeline.ntqq import sampledb as S
from pipeline.ntqq.body import BodyError, decode_body
from tests.ntqq_helpers import field_bytes, field_varint


def render(body: bytes) -> tuple[str, list[str]]:
    text, kinds, _ = render_elements(decode_body(body).elements)
    return text, kinds


@pytest.mark.parametrize(
    ("elements", "text", "kinds"),
    [
        ([S.text("晚上吃啥")], "晚上吃啥", ["text"]),
        ([S.at("小林", "u_x"), S.text(" 来不来")], "@小林 来不来", ["at", "text"]),
        ([S.at_all(), S.text(" 开会")], "@全体成员 开会", ["at", "text"]),
        ([S.face(14, "/微笑")], "[微笑]", ["face"]),
        ([S.face(179)], "[doge]", ["face"]),  # id only: named from the face table
        ([S.face(99999)], "[表情]", ["face"]),
        ([S.sticker("[贴贴]")], "[贴贴]", ["sticker"]),
        ([S.image()], "[图片]", ["image"]),
        ([S.image("[动画表情]")], "[动画表情]", ["sticker"]),
        ([S.voice()], "[语音]", ["voice"]),
        ([S.voice("明天见")], "明天见", ["voice"]),
        ([S.video()], "[视频]", ["video"]),
        ([S.file()], "[文件]", ["file"]),
        ([S.forward()], "[聊天记录]", ["forward"]),
        ([S.ark_card()], "[卡片]", ["card"]),
        ([S.reply(7, 1001, "被引用的话"), S.text("同意")], "同意", ["reply", "text"]),
        (
            [S.text("好耶"), S.face(264, "/捂脸"), S.sticker("[贴贴]")],
            "好耶[捂脸][贴贴]",
            ["text", "face", "sticker"],
        ),
    ],
)
def test_every_element_kind_renders_its_placeholder(elements, text, kinds):
    assert render(S.encode_body(elements)) == (text, kinds)


def test_quoted_text_of_a_reply_belongs_to_the_quoted_message():
    decoded = decode_body(S.encode_body([S.reply(42, 1001, "原话在这里"), S.text("对")]))
    assert decoded.reply_seq == 42
    assert "原话" not in render_elements(decoded.elements)[0]


def test_revoke_and_gray_tips_are_flagged_not_rendered():
    revoked = decode_body(S.encode_body([S.revoke("u_x", "对方撤回了一条消息")]))
    assert revoked.revoked and revoked.gray_tip and revoked.elements == []
    tip = decode_body(S.encode_body([S.gray_tip("阿杰 加入了群聊")]))
    assert tip.gray_tip and not tip.revoked and tip.elements == []


def test_unknown_fields_are_skipped_not_scanned_for_text():
    # A text element carrying fields the schema does not name, one of them UTF-8 looking
    # metadata: a byte scanner would mix it into the text, the schema must not.
    element = (
        field_varint(45002, 1)
        + field_bytes(45101, "你好".encode())
        + field_bytes(45102, "内部元数据 metadata".encode())
        + field_varint(45999, 123)
    )
    body = field_bytes(40800, element) + field_bytes(40900, "另一个未知字段".encode())
    assert render(body) == ("你好", ["text"])


def test_non_utf8_bytes_in_an_element_that_is_not_rendered_do_not_sink_the_body():
    odd = field_bytes(40800, field_varint(45002, 99) + field_bytes(45101, b"\xff\xfe binary"))
    text = field_bytes(40800, field_varint(45002, 1) + field_bytes(45101, "还在".encode()))
    assert render(odd + text) == ("还在", ["text"])


def test_unknown_element_types_are_counted_and_add_nothing():
    body = S.encode_body([{"element_type": 99}, S.text("还在")])
    decoded = decode_body(body)
    assert decoded.unknown_types == (99,)
    assert render_elements(decoded.elements)[0] == "还在"


def test_elements_decode_to_chatformat_elements():
    decoded = decode_body(S.encode_body([S.at("小林", "u_owner"), S.face(14, "/微笑")]))
    assert decoded.elements == [
        Element("at", text="@小林", ref="u_owner"),
        Element("face", text="/微笑", ref="14"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        S.truncated_body([S.text("这条消息被截断了")]),
        S.wrong_wire_type_body(),
        field_bytes(40800, field_bytes(45002, b"\x01")),  # element type as bytes, not a varint
        field_bytes(40800, field_varint(45002, 1) + field_bytes(45101, b"\xff\xfe bad utf-8")),
        b"\x00\x01\x02garbage",
    ],
    ids=["truncated", "wrong-wire-type", "element-type-wrong-wire-type", "invalid-utf8-text", "garbage"],
)
def test_malformed_bodies_raise_body_error(body):
    with pytest.raises(BodyError):
        decode_body(body)


def test_empty_body_has_no_elements():
    assert decode_body(b"").elements == []
    assert decode_body(None).elements == []

"""Market stickers and faces: learned from NapCat's segment shapes, kept with the owner's first,
sent back as the real sticker in a bubble of its own, and no `[名字]` ever sent as text."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from bot.admin import run_admin
from bot.config import Config
from bot.runtime import Twin
from bot.segments import outgoing_bubbles, outgoing_parts, outgoing_text, render_segments
from bot.stickers import Sticker, sendable, sticker_from_segment, stickers_in
from bot.store import Store, StoredMessage
from deploy.onebot_client import market_face
from pipeline.chatformat import PLACEHOLDERS, render_elements
from pipeline.ntqq import sampledb as S
from pipeline.ntqq.body import decode_body
from tests.bot_helpers import ScriptedBackend

HUG = market_face(241904, "3c4a6e0b2f1d7e8a9b0c1d2e3f4a5b6c", "a1b2c3d4e5f6a7b8", "[贴贴]")
PAT = market_face(241904, "9f8e7d6c5b4a39281706f5e4d3c2b1a0", "0123456789abcdef", "[摸摸头]")


def segments(*raw: dict) -> list[tuple[str, dict]]:
    return [(s["type"], s["data"]) for s in raw]


def known(name: str, source: str = "owner", emoji_id: str = "abc123") -> Sticker:
    return Sticker(name, 1, emoji_id, "k0", f"[{name}]", source)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ incoming


def test_napcat_reports_a_market_sticker_as_an_image_that_renders_like_qq_nt_bodies() -> None:
    napcat = render_segments(segments(HUG))
    mface = render_segments(segments(market_face(1, "ab", "k", "[贴贴]", shape="mface")))
    stored_body = render_elements(decode_body(S.encode_body([S.sticker("[贴贴]")])).elements)
    assert (
        (napcat.text, napcat.kinds) == (mface.text, mface.kinds) == stored_body[:2] == ("[贴贴]", ["sticker"])
    )
    # an ordinary picture and a saved animated one stay what they were
    assert render_segments([("image", {"file": "a.jpg", "summary": ""})]).text == "[图片]"
    assert render_segments([("image", {"file": "b.gif", "summary": "[动画表情]"})]).text == "[动画表情]"


@pytest.mark.parametrize("shape", ["napcat", "mface"])
def test_a_sticker_segment_yields_its_send_data(shape: str) -> None:
    (sticker,) = stickers_in(
        segments(
            {"type": "text", "data": {"text": "哈"}},
            market_face(241904, "3c4a6e0b", "a1b2c3d4e5f6a7b8", "[贴贴]", shape=shape),
        )
    )
    assert sticker == Sticker("贴贴", 241904, "3c4a6e0b", "a1b2c3d4e5f6a7b8", "[贴贴]")
    assert sticker.segment_data() == {
        "emoji_package_id": 241904, "emoji_id": "3c4a6e0b", "key": "a1b2c3d4e5f6a7b8", "summary": "[贴贴]"
    }  # fmt: skip
    # CQ codes (LLOneBot's string messages) carry every field as a string
    cq = {
        "emoji_package_id": "241904",
        "emoji_id": "3c4a6e0b",
        "key": "a1b2c3d4e5f6a7b8",
        "summary": "[贴贴]",
    }
    assert sticker_from_segment("mface", cq) == sticker


@pytest.mark.parametrize(
    "change",
    [
        {"key": 12345},  # not a string
        {"key": ["a"]},
        {"key": "k" * 65},
        {"key": "a b"},
        {"emoji_id": None},
        {"emoji_id": "../../etc"},
        {"emoji_package_id": True},
        {"emoji_package_id": -3},
        {"emoji_package_id": "12a"},
        {"emoji_package_id": 10**20},
        {"summary": "[" + "长" * 5000 + "]"},  # huge
        {"summary": 7},
        {"summary": "[]"},
        {"summary": "[a]b]"},
        {"summary": "[图片]"},  # a placeholder must never become a picture someone chose
        {"summary": "[表情]"},
        {"summary": "[贴\n贴]"},
        {"summary": "[贴\x00贴]"},
    ],
)
def test_hostile_or_incomplete_sticker_fields_are_not_learned(change: dict) -> None:
    data = {**HUG["data"], **change}
    assert sticker_from_segment("image", data) is None
    assert (
        sticker_from_segment(
            "mface", {k: data[k] for k in ("emoji_package_id", "emoji_id", "key", "summary")}
        )
        is None
    )
    render_segments([("mface", data)])  # still renders, whatever it carries


def test_missing_ids_are_not_learned() -> None:
    for missing in ("emoji_package_id", "emoji_id", "key", "summary"):
        data = {k: v for k, v in HUG["data"].items() if k != missing}
        assert sticker_from_segment("image", data) is None


# ------------------------------------------------------------------------ outgoing


def test_faces_still_go_out_as_faces_and_placeholders_never_go_out() -> None:
    assert outgoing_parts("好的[微笑][图片]哈哈") == [("text", "好的"), ("face", "14"), ("text", "哈哈")]
    for placeholder in PLACEHOLDERS:
        assert outgoing_parts(f"看{placeholder}") == [("text", "看")]
        assert outgoing_parts(placeholder, {"图片": known("图片")}) == []


def test_an_unknown_bracket_is_dropped_not_sent_as_text() -> None:
    assert outgoing_parts("[摸摸头]") == []
    assert outgoing_parts("好呀[摸摸头]") == [("text", "好呀")]
    assert outgoing_text(outgoing_parts("[a[摸摸头]c]好")) == "好"  # dropping one cannot assemble another
    assert outgoing_parts("[这是一段很长很长很长很长很长的括号里的话]") != []  # not a name: plain text


def test_a_known_sticker_goes_out_alone_in_its_own_bubble() -> None:
    stickers = {"摸摸头": known("摸摸头")}
    parts = outgoing_parts("好呀[摸摸头]乖[微笑]", stickers)
    assert parts == [("text", "好呀"), ("sticker", "摸摸头"), ("text", "乖"), ("face", "14")]
    bubbles = outgoing_bubbles(parts)
    assert bubbles == [[("text", "好呀")], [("sticker", "摸摸头")], [("text", "乖"), ("face", "14")]]
    assert [outgoing_text(b) for b in bubbles] == ["好呀", "[摸摸头]", "乖[微笑]"]
    # what is recorded as sent parses back to the same parts (the sender sends exactly that)
    assert all(outgoing_parts(outgoing_text(b), stickers) == b for b in bubbles)


def test_the_owners_sticker_wins_over_a_face_of_that_name_a_friends_never_does() -> None:
    assert outgoing_parts("[贴贴]") == [("face", "350")]  # QQ face 350 is also called 贴贴
    assert outgoing_parts("[贴贴]", sendable([known("贴贴", "owner")], "owner")) == [("sticker", "贴贴")]
    assert outgoing_parts("[贴贴]", sendable([known("贴贴", "friend")], "any")) == [("face", "350")]


def test_which_stickers_a_reply_may_send_follows_twin_stickers() -> None:
    kept = [known("摸摸头", "owner"), known("哈哈哈", "friend"), known("微笑", "friend")]
    assert set(sendable(kept, "owner")) == {"摸摸头"}
    assert set(sendable(kept, "any")) == {"摸摸头", "哈哈哈"}  # a friend's never shadows a face
    assert sendable(kept, "off") == {}


# ------------------------------------------------------------------------ the store


async def test_the_owners_sticker_wins_and_a_friend_never_replaces_one(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "bot.db")
    try:
        owners = known("贴贴", emoji_id="owner1")
        forged = known("贴贴", emoji_id="forged")
        assert (await store.learn_sticker(forged, "friend", 1)).emoji_id == "forged"
        assert await store.learn_sticker(owners, "owner", 2) == Sticker(
            "贴贴", 1, "owner1", "k0", "[贴贴]", "owner"
        )
        assert (await store.learn_sticker(forged, "friend", 3)).emoji_id == "owner1"  # never overwritten
        # friends' stickers: the first of a name stays, the same one seen again only counts
        await store.learn_sticker(known("哈哈", emoji_id="first"), "friend", 4)
        await store.learn_sticker(known("哈哈", emoji_id="second"), "friend", 5)
        await store.learn_sticker(known("哈哈", emoji_id="first"), "friend", 6)
        # the owner's newest sticker of a name is the one sent
        await store.learn_sticker(known("贴贴", emoji_id="owner2"), "owner", 7)
        assert [(s.name, s.emoji_id, s.source) for s in await store.stickers()] == [
            ("哈哈", "first", "friend"),
            ("贴贴", "owner2", "owner"),
        ]
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "bot.db") as conn:
        rows = conn.execute("SELECT name, first_seen, last_seen, uses FROM stickers ORDER BY name").fetchall()
    assert rows == [("哈哈", 4, 6, 2), ("贴贴", 1, 7, 3)]


# ------------------------------------------------------------------------ the running twin


async def make_twin(tmp_path: Path, **settings: object) -> Twin:
    quiet = {
        "twin_burst_window": 0,
        "twin_typing_delay": 0,
        "twin_typing_per_char": 0,
        "twin_typing_jitter": 0,
    }
    twin = Twin(
        Config(twin_db=tmp_path / "bot.db", **{**quiet, **settings}), nicknames=[], backend=ScriptedBackend()
    )
    await twin.start()
    return twin


def incoming(text: str, chat: str = "20001") -> StoredMessage:
    return StoredMessage("c2c", chat, chat, "incoming", text, int(time.time()))


async def test_the_twins_own_sticker_echo_is_never_learned_as_the_owners(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, twin_stickers="any")
    sent: list[str] = []

    async def send(text: str) -> int:
        sent.append(text)
        return 9000 + len(sent)

    try:
        friend_sticker = stickers_in(segments(PAT))
        await twin.record(incoming("[摸摸头]"), friend_sticker)
        assert twin.stickers["摸摸头"].source == "friend"
        await twin.answer(("c2c", "20001"), await twin.record(incoming("好[摸摸头]")), send, self_id="10000")
        assert sent == ["收到:好", "[摸摸头]"]
        echo = StoredMessage("c2c", "20001", "10000", "owner", "[摸摸头]", int(time.time()), msg_id="9002")
        assert await twin.record_own(("c2c", "20001"), echo, friend_sticker) is None  # claimed
        assert twin.stickers["摸摸头"].source == "friend"
        assert (await twin.store.stickers("摸摸头"))[0].source == "friend"
        # the owner sending it themself makes it theirs
        own = StoredMessage("c2c", "20001", "10000", "owner", "[摸摸头]", int(time.time()), msg_id="77")
        assert await twin.record_own(("c2c", "20001"), own, friend_sticker) is not None
        assert twin.stickers["摸摸头"].source == "owner"
    finally:
        await twin.close()


async def test_friends_stickers_are_learned_only_with_twin_stickers_any(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path)
    sent: list[str] = []

    async def send(text: str) -> int:
        sent.append(text)
        return len(sent)

    try:
        await twin.record(incoming("[摸摸头]", chat="20002"), stickers_in(segments(PAT)))
        assert twin.stickers == {}
        await twin.answer(("c2c", "20001"), await twin.record(incoming("好[摸摸头]")), send, self_id="10000")
        assert sent == ["收到:好"]  # neither the sticker nor its bracket text
    finally:
        await twin.close()
    reopened = await make_twin(tmp_path, twin_stickers="off")
    try:
        own = StoredMessage("c2c", "20001", "10000", "owner", "[摸摸头]", int(time.time()), msg_id="5")
        await reopened.record_own(("c2c", "20001"), own, stickers_in(segments(PAT)))
        assert "摸摸头" in reopened.stickers and reopened.sendable_stickers() == {}  # kept, not sent
    finally:
        await reopened.close()
    again = await make_twin(tmp_path)
    try:
        assert set(again.sendable_stickers()) == {"摸摸头"}  # kept in the store across restarts
    finally:
        await again.close()


async def test_operators_see_and_forget_kept_stickers(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path)

    async def admin(*words: str) -> str:
        async def report(text: str) -> None:
            pass

        return await run_admin(twin, list(words), chat=None, user="42", quoted=None, report=report)

    try:
        own = StoredMessage("c2c", "20001", "10000", "owner", "[摸摸头]", int(time.time()), msg_id="5")
        await twin.record_own(("c2c", "20001"), own, stickers_in(segments(PAT)))
        await twin.learn_stickers(stickers_in(segments(HUG)), "friend")
        assert await admin("stickers") == (
            "stickers: 2 kept, TWIN_STICKERS=owner\n[摸摸头] owner\n[贴贴] friend, not sent"
        )
        assert await admin("stickers", "forget", "[摸摸头]") == "forgot [摸摸头]"
        assert await admin("stickers", "forget", "摸摸头") == "no sticker [摸摸头]"
        assert twin.sendable_stickers() == {} and [s.name for s in await twin.store.stickers()] == ["贴贴"]
        assert (await admin("stickers", "x")).startswith("usage:")
    finally:
        await twin.close()

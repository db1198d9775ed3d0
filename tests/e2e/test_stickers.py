"""Stickers over a real OneBot connection: `python bot.py`, the fake OpenAI server and the QQ side
speaking NapCat's segment shapes (a market sticker reported as an `image` with its market-face
fields, sent as an `mface`), echoing every message the bot sends as NapCat does."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from deploy.onebot_client import BotProcess, OneBotClient, market_face
from tests.e2e.conftest import OWNER, bot_env, running_bot, wait_until
from tests.fake_openai import FakeOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

PAT = {"emoji_package_id": 241904, "emoji_id": "9f8e7d6c5b4a39281706f5e4d3c2b1a0", "key": "0123456789abcdef"}
HUG = {"emoji_package_id": 1002, "emoji_id": "3c4a6e0b2f1d7e8a9b0c1d2e3f4a5b6c", "key": "a1b2c3d4e5f6a7b8"}


def settings(fake: FakeOpenAI, home: Path, **extra: str) -> dict[str, str]:
    return bot_env(
        TWIN_BACKEND="openai",
        TWIN_OPENAI_BASE_URL=fake.base_url,
        TWIN_OPENAI_MODEL="fake-twin",
        TWIN_OPENAI_RETRIES="0",
        TWIN_DB=str(home / "data" / "bot.db"),
        TWIN_RATE_PER_CHAT="100",
        TWIN_RATE_TOTAL="1000",
        **extra,
    )


@pytest.fixture(scope="module")
def bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("stickers")
    yield from running_bot(settings(fake, home), home)


@pytest.fixture(scope="module")
def any_bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    """A bot that also sends the stickers friends sent (`TWIN_STICKERS=any`)."""
    home = tmp_path_factory.mktemp("stickers-any")
    yield from running_bot(settings(fake, home, TWIN_STICKERS="any"), home)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def qq(bot: BotProcess) -> OneBotClient:
    """The QQ side, echoing each message the bot sends back as a NapCat `message_sent`."""
    async with bot.client(self_id=OWNER, echo="after") as client:
        yield client


def rows(bot: BotProcess, sql: str) -> list[tuple]:
    with sqlite3.connect(bot.settings["TWIN_DB"]) as conn:
        return conn.execute(sql).fetchall()


async def reply_to(qq: OneBotClient, user: int, text: str, bubbles: int = 1) -> list:
    """Send `text` as friend `user` (the fake model answers `收到:<text>`); the bubbles that came back."""
    before = len(qq.replies(user_id=user))
    await qq.send_private(user, text)
    replies = await qq.wait_reply(user_id=user, after=before, count=bubbles, timeout=20)
    return replies + await qq.wait_quiet(1.0, user_id=user)


async def test_an_unknown_sticker_name_and_placeholders_never_go_out_as_text(qq: OneBotClient) -> None:
    (reply,) = await reply_to(qq, 20101, "好呀[摸摸头]")
    assert reply.segments == [{"type": "text", "data": {"text": "收到:好呀"}}]
    (reply,) = await reply_to(qq, 20101, "看[图片]")
    assert reply.segments == [{"type": "text", "data": {"text": "收到:看"}}]
    (reply,) = await reply_to(qq, 20101, "来[贴贴]")  # QQ face 350 is called 贴贴 too
    assert reply.segments == [
        {"type": "text", "data": {"text": "收到:来"}},
        {"type": "face", "data": {"id": "350"}},
    ]


async def test_a_friends_sticker_is_not_learned_by_default(qq: OneBotClient, bot: BotProcess) -> None:
    await qq.send_private(20102, [market_face(**PAT, summary="[摸摸头]")])
    (answer,) = await qq.wait_reply(user_id=20102, timeout=20)
    assert answer.text == "收到:"  # the model saw `[摸摸头]`; its own `[摸摸头]` was not sent
    assert rows(bot, "SELECT text, kinds FROM messages WHERE chat = '20102' AND origin = 'incoming'") == [
        ("[摸摸头]", '["sticker"]')
    ]
    assert rows(bot, "SELECT * FROM stickers") == []
    (reply,) = await reply_to(qq, 20101, "好呀[摸摸头]")
    assert reply.text == "收到:好呀"


async def test_once_the_owner_sent_a_sticker_the_twin_sends_it_in_its_own_bubble(
    qq: OneBotClient, bot: BotProcess
) -> None:
    # The owner sends 摸摸头 from the phone (NapCat's report shape) and 贴贴 (the mface shape).
    await qq.send_message_sent([market_face(**PAT, summary="[摸摸头]")], target_id=20103)
    await qq.send_message_sent([market_face(**HUG, summary="[贴贴]", shape="mface")], target_id=20103)
    learned = "SELECT name, emoji_package_id, emoji_id, key, source FROM stickers ORDER BY name"
    assert await wait_until(lambda: len(rows(bot, learned)) == 2, 10)

    text, sticker = await reply_to(qq, 20101, "好呀[摸摸头]", bubbles=2)
    assert text.segments == [{"type": "text", "data": {"text": "收到:好呀"}}]
    assert sticker.segments == [{"type": "mface", "data": {**PAT, "summary": "[摸摸头]"}}]
    text, sticker = await reply_to(qq, 20101, "来[贴贴]", bubbles=2)  # the owner's sticker wins over the face
    assert [text.text, sticker.segments] == [
        "收到:来",
        [{"type": "mface", "data": {**HUG, "summary": "[贴贴]"}}],
    ]

    # Recorded as what QQ shows, and each sticker bubble's echo (NapCat's image shape) claimed:
    # the only owner rows are the two stickers the owner sent.
    twin_rows = (
        "SELECT text, send_state, echoed FROM messages WHERE chat = '20101' AND origin = 'twin' ORDER BY id"
    )
    expected = [
        ("收到:好呀", "sent", 1),
        ("收到:看", "sent", 1),
        ("收到:来[贴贴]", "sent", 1),
        ("收到:好呀", "sent", 1),
        ("收到:好呀", "sent", 1),
        ("[摸摸头]", "sent", 1),
        ("收到:来", "sent", 1),
        ("[贴贴]", "sent", 1),
    ]
    assert await wait_until(lambda: rows(bot, twin_rows) == expected, 10), rows(bot, twin_rows)
    assert rows(bot, "SELECT chat, text FROM messages WHERE origin = 'owner' ORDER BY id") == [
        ("20103", "[摸摸头]"),
        ("20103", "[贴贴]"),
    ]
    assert rows(bot, learned) == [
        ("摸摸头", PAT["emoji_package_id"], PAT["emoji_id"], PAT["key"], "owner"),
        ("贴贴", HUG["emoji_package_id"], HUG["emoji_id"], HUG["key"], "owner"),
    ]
    assert rows(bot, "SELECT uses FROM stickers ORDER BY name") == [(1,), (1,)]  # echoes not counted


async def test_a_friend_cannot_replace_the_owners_sticker(qq: OneBotClient, bot: BotProcess) -> None:
    forged = {"emoji_package_id": 666, "emoji_id": "deadbeef", "key": "ffffffffffffffff"}
    await qq.send_private(20104, [market_face(**forged, summary="[摸摸头]")])
    await qq.wait_reply(user_id=20104, timeout=20)
    _, sticker = await reply_to(qq, 20101, "好呀[摸摸头]", bubbles=2)
    assert sticker.segments == [{"type": "mface", "data": {**PAT, "summary": "[摸摸头]"}}]
    assert rows(bot, "SELECT emoji_id, source FROM stickers WHERE name = '摸摸头'") == [
        (PAT["emoji_id"], "owner")
    ]


async def test_with_twin_stickers_any_friends_stickers_go_out_but_never_over_the_owners(
    any_bot: BotProcess,
) -> None:
    async with any_bot.client(self_id=OWNER, echo="after") as qq:
        await qq.send_message_sent([market_face(**PAT, summary="[摸摸头]")], target_id=20201)
        await qq.send_private(
            20202, [market_face(**HUG, summary="[哈哈哈]")]
        )  # a friend's, first of its name
        # events are handled concurrently: "first" means first stored, so let these land first
        firsts = "SELECT name, source FROM stickers ORDER BY name"
        assert await wait_until(
            lambda: rows(any_bot, firsts) == [("哈哈哈", "friend"), ("摸摸头", "owner")], 20
        ), rows(any_bot, firsts)
        forged = {"emoji_package_id": 666, "emoji_id": "deadbeef", "key": "ffffffffffffffff"}
        await qq.send_private(20203, [market_face(**forged, summary="[摸摸头]")])  # collides with the owner's
        await qq.send_private(20203, [market_face(**forged, summary="[微笑]")])  # collides with a QQ face
        await qq.send_private(20204, [market_face(**forged, summary="[哈哈哈]")])  # with the first friend's
        learned = "SELECT name, emoji_id, source FROM stickers ORDER BY name"
        expected = [
            ("哈哈哈", HUG["emoji_id"], "friend"),
            ("微笑", "deadbeef", "friend"),
            ("摸摸头", PAT["emoji_id"], "owner"),
        ]
        assert await wait_until(lambda: rows(any_bot, learned) == expected, 20), rows(any_bot, learned)

        _, pat, _, laugh, smile = await reply_to(qq, 20205, "好[摸摸头]呀[哈哈哈]嗯[微笑]", bubbles=5)
        assert pat.segments == [{"type": "mface", "data": {**PAT, "summary": "[摸摸头]"}}]
        assert laugh.segments == [{"type": "mface", "data": {**HUG, "summary": "[哈哈哈]"}}]
        assert smile.segments == [
            {"type": "text", "data": {"text": "嗯"}},
            {"type": "face", "data": {"id": "14"}},
        ]
        # the echo of the friend's sticker the twin sent never makes it the owner's
        assert await wait_until(
            lambda: rows(any_bot, "SELECT 1 FROM messages WHERE echoed = 1 AND text = '[哈哈哈]'"), 10
        )
        assert rows(any_bot, learned) == expected

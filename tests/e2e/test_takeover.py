"""The owner takes over, against the real `bot.py` over OneBot v11 with the QQ side simulated:
the owner types (NapCat's `message_sent`), the twin stays quiet in that chat for the window
(TWIN_TAKEOVER_MINUTES=0.05: 3 s here) and drops the reply it was writing; other chats go on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.onebot_client import BotProcess, OneBotClient
from tests.e2e.conftest import OWNER, SUPERUSER, running_bot, twin_status, wait_until
from tests.e2e.test_bot_openai import bot_settings, rows
from tests.fake_openai import FakeOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

WINDOW = 3.0  # seconds: TWIN_TAKEOVER_MINUTES=0.05


@pytest.fixture(scope="module")
def bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("takeover")
    yield from running_bot(bot_settings(fake, home / "data" / "bot.db", TWIN_TAKEOVER_MINUTES="0.05"), home)


def twin_rows(bot: BotProcess, chat: int) -> list[tuple[str, str]]:
    sql = "SELECT text, send_state FROM messages WHERE chat = ? AND origin = 'twin' ORDER BY id"
    return rows(Path(bot.settings["TWIN_DB"]), sql, str(chat))


async def owner_types(qq: OneBotClient, bot: BotProcess, text: str, **chat: int) -> None:
    """The owner types in QQ (NapCat's `message_sent`); returns once the bot has stored it (events
    are handled concurrently: a friend's message sent at once could otherwise overtake it)."""
    await qq.send_message_sent(text, **chat)
    sql = "SELECT 1 FROM messages WHERE origin = 'owner' AND text = ?"
    assert await wait_until(lambda: rows(Path(bot.settings["TWIN_DB"]), sql, text), 10, interval=0.02)


async def alive(qq: OneBotClient, friend: int, text: str) -> None:
    """Another chat is answered meanwhile: the bot is running and has handled what came before."""
    before = len(qq.replies(user_id=friend))
    await qq.send_private(friend, text)
    assert [r.text for r in await qq.wait_reply(user_id=friend, after=before, timeout=20)] == [f"收到:{text}"]


async def test_a_friend_writing_within_the_window_is_not_answered_and_after_it_is(bot: BotProcess) -> None:
    async with bot.client(self_id=OWNER) as qq:
        typed = time.monotonic()
        await owner_types(qq, bot, "我来回你", target_id=20101)
        await qq.send_private(20101, "那说好了哦")
        await alive(qq, 20102, "另一个聊天")
        assert await qq.wait_quiet(1.0, user_id=20101) == []
        assert time.monotonic() - typed < WINDOW, "too slow to test inside the window"
        await asyncio.sleep(WINDOW - (time.monotonic() - typed) + 0.5)
        await qq.send_private(20101, "现在呢")
        replies = await qq.wait_reply(user_id=20101, timeout=20)
    assert [r.text for r in replies] == ["收到:现在呢"]
    expected = [("收到:现在呢", "sent")]  # marked sent just after the send returns
    assert await wait_until(lambda: twin_rows(bot, 20101) == expected, 5, interval=0.05)


async def test_status_shows_the_chat_taken_over_until_when(bot: BotProcess) -> None:
    async with bot.client(self_id=OWNER) as qq:
        await owner_types(qq, bot, "我在", target_id=20103)
        status = await twin_status(qq)
    assert "taken over: 1" in status.splitlines()
    assert any(line.startswith("  c2c:20103 until ") for line in status.splitlines())


async def test_the_owner_typing_while_a_slow_reply_is_written_stops_it(
    bot: BotProcess, fake: FakeOpenAI
) -> None:
    async with bot.client(self_id=OWNER) as qq:
        await qq.send_private(20104, "慢慢想想")  # the fake server takes 2 s over this one
        assert await wait_until(lambda: fake.requests_mentioning("慢慢想想"), 10, interval=0.05)
        await owner_types(qq, bot, "我自己说吧", target_id=20104)
        await alive(qq, 20105, "你好呀")
        assert await qq.wait_quiet(3.0, user_id=20104) == []
    assert twin_rows(bot, 20104) == []


async def test_the_owner_writing_in_a_group_takes_only_that_group_over(bot: BotProcess) -> None:
    async with bot.client(self_id=OWNER) as qq:
        await owner_types(qq, bot, "我来", group_id=300)
        await qq.send_group(300, 30001, "小明 在吗")
        await qq.send_group(301, 30001, "小明 你呢")
        answered = await qq.wait_reply(group_id=301, timeout=20)
        assert await qq.wait_quiet(1.0, group_id=300) == []
    assert answered[0].text.startswith("收到:") and answered[0].text.endswith("小明 你呢")


async def test_the_twins_own_echoed_bubbles_take_nothing_over(bot: BotProcess) -> None:
    async with bot.client(self_id=OWNER, echo="before", echo_shape="napcat") as qq:
        await qq.send_private(20106, "多条")  # four bubbles, each echoed back before its send result
        await qq.wait_reply(user_id=20106, count=4, timeout=30)
        await asyncio.sleep(0.5)
        await qq.send_private(20106, "还有吗")
        replies = await qq.wait_reply(user_id=20106, after=4, timeout=20)
    assert [r.text for r in replies] == ["收到:还有吗"]


async def test_a_superuser_takes_a_chat_over_by_name_until_off(bot: BotProcess) -> None:
    async with bot.client(self_id=OWNER) as qq:
        before = len(qq.replies(user_id=SUPERUSER))
        await qq.send_private(SUPERUSER, "/twin takeover c2c:20107 on")
        (answer,) = await qq.wait_reply(user_id=SUPERUSER, after=before, timeout=20)
        assert answer.text.startswith("c2c:20107: taken over")
        await qq.send_private(20107, "有人吗")
        await alive(qq, 20108, "在不在")
        await asyncio.sleep(WINDOW + 0.5)  # no window: it lasts until off
        assert qq.replies(user_id=20107) == []
        assert "  c2c:20107 until /twin takeover off" in (await twin_status(qq)).splitlines()
        before = len(qq.replies(user_id=SUPERUSER))
        await qq.send_private(SUPERUSER, "/twin takeover c2c:20107 off")
        await qq.wait_reply(user_id=SUPERUSER, after=before, timeout=20)
        await qq.send_private(20107, "现在有人吗")
        replies = await qq.wait_reply(user_id=20107, timeout=20)
    assert [r.text for r in replies] == ["收到:现在有人吗"]


async def test_the_demo_shows_the_owner_taking_over(bot: BotProcess) -> None:
    from deploy.demo import TAKEOVER_FRIEND, takeover_moment

    async with bot.client(self_id=OWNER) as qq:
        transcript = dict(enumerate(await takeover_moment(qq, SUPERUSER)))
    assert transcript[1][1].startswith(f"taken over: 1 · c2c:{TAKEOVER_FRIEND} until ")
    assert transcript[3][0] == "twin" and transcript[3][1].startswith("(stays quiet")
    assert transcript[4][1] == f"c2c:{TAKEOVER_FRIEND}: the twin answers there again"
    assert transcript[6] == ("twin", "收到:你还在吗")

"""`python bot.py` with TWIN_EXAMPLES: the owner's past replies reach the prompt of their own chat only."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from deploy.onebot_client import BotProcess, OneBotClient
from pipeline.chatformat import EXAMPLES_HEADING
from pipeline.records import Message, write_messages
from tests.e2e.conftest import OWNER, bot_env, running_bot, wait_until
from tests.fake_openai import FakeOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

FRIEND_A, FRIEND_B = 20001, 20002


@pytest.fixture(scope="module")
def bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("bot")
    imported = home / "messages.jsonl"
    day_ago = int(time.time()) - 86_400
    a = str(FRIEND_A)
    write_messages(
        imported,
        [
            Message("1", "c2c", a, a, "阿花", False, day_ago, "你家wifi密码多少 我是阿花"),
            Message("2", "c2c", a, str(OWNER), "", True, day_ago + 30, "密码是qq12345678"),
        ],
    )
    settings = bot_env(
        TWIN_BACKEND="openai",
        TWIN_OPENAI_BASE_URL=fake.base_url,
        TWIN_OPENAI_RETRIES="0",
        TWIN_DB=str(home / "data" / "bot.db"),
        TWIN_EXAMPLES="3",
        TWIN_EXAMPLES_MESSAGES=str(imported),
        TWIN_TAKEOVER_MINUTES="0",  # the owner answers in chat A and the friend writes on at once
    )
    yield from running_bot(settings, home)


def system_prompt_mentioning(fake: FakeOpenAI, text: str) -> str:
    requests = fake.requests_mentioning(text)
    return requests[-1]["messages"][0]["content"] if requests else ""


async def ask(qq: OneBotClient, fake: FakeOpenAI, friend: int, text: str) -> str:
    """A friend writes; returns the system prompt of the request that answered it."""
    await qq.send_private(friend, text)
    await qq.wait_reply(user_id=friend, timeout=20)
    await qq.wait_quiet(0.3, user_id=friend)
    return system_prompt_mentioning(fake, text)


async def test_a_chats_examples_come_from_that_chat_and_never_reach_another(
    qq: OneBotClient, fake: FakeOpenAI, bot: BotProcess
) -> None:
    # From the imported history; asked until the index (built in the background at start) is ready.
    async def examples_in_a() -> str:
        prompt = await ask(qq, fake, FRIEND_A, "你家wifi密码多少")
        return prompt if EXAMPLES_HEADING in prompt else ""

    in_a = await wait_until(examples_in_a, timeout=30, interval=0.2)
    assert in_a.endswith(f"{EXAMPLES_HEADING}\n- 密码是qq12345678") and "阿花" not in in_a

    # The owner answers live in chat A; chat A's next prompt has it, chat B's never.
    await ask(qq, fake, FRIEND_A, "周末去哪玩")
    await qq.send_message_sent("去江边吧 带上小白", target_id=FRIEND_A)
    await qq.wait_quiet(0.5)
    in_a = await ask(qq, fake, FRIEND_A, "周末去哪玩呀")
    assert "- 去江边吧 带上小白" in in_a

    in_b = await ask(qq, fake, FRIEND_B, "周末去哪玩 你家wifi密码多少")
    assert EXAMPLES_HEADING not in in_b
    assert all(secret not in in_b for secret in ("qq12345678", "阿花", "江边", "小白"))

"""Per-chat memory in a real `bot.py`: a fact told in chat A weeks ago (seeded from the imported
`messages.jsonl` with `twin memory build`) is in A's prompt and never in B's; a friend cannot
read any chat's memory, a superuser can, privately."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.onebot_client import BotProcess, OneBotClient
from pipeline.chatformat import MEMORY_HEADING
from tests.e2e.conftest import SUPERUSER, bot_env, running_bot, wait_until
from tests.fake_openai import FakeOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

REPO = Path(__file__).resolve().parents[2]
FRIEND_A, FRIEND_B = 20001, 20002
WEEKS_AGO = int(time.time()) - 21 * 86400


def record(chat: int, text: str, at: int, *, me: bool = False) -> str:
    sender = "10000" if me else str(chat)
    name = "" if me else f"友{chat}"
    message = {"msg_id": f"{chat}-{at}", "chat_type": "c2c", "chat": str(chat), "sender": sender,
               "sender_name": name, "is_self": me, "time": at, "text": text}  # fmt: skip
    return json.dumps(message, ensure_ascii=False)


@pytest.fixture(scope="module")
def bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("memory-bot")
    history = home / "messages.jsonl"
    history.write_text(
        "\n".join(
            [
                record(FRIEND_A, "下周六我生日，打算去杭州玩", WEEKS_AGO),
                record(FRIEND_A, "好啊", WEEKS_AGO + 30, me=True),
                record(FRIEND_B, "我在准备考研复习", WEEKS_AGO + 60),
                record(FRIEND_B, "加油", WEEKS_AGO + 90, me=True),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    settings = bot_env(
        COMMAND_START='["/"]',
        TWIN_BACKEND="openai",
        TWIN_OPENAI_BASE_URL=fake.base_url,
        TWIN_OPENAI_MODEL="fake-twin",
        TWIN_OPENAI_RETRIES="0",
        TWIN_DB=str(home / "data" / "bot.db"),
        TWIN_BURST_WINDOW="0",
        TWIN_MEMORY="true",
    )
    seeded = subprocess.run(
        [sys.executable, "-m", "deploy", "memory", "build", "--messages", str(history)],
        cwd=home,
        env={**os.environ, **settings, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert seeded.returncode == 0 and "2 chats" in seeded.stdout, seeded.stderr
    yield from running_bot(settings, home)


def prompts_of(fake: FakeOpenAI, said: str) -> list[str]:
    """The system prompts of the requests that answered `said`."""
    return [
        r["messages"][0]["content"]
        for r in fake.requests_mentioning(said)
        if r["messages"][-1]["content"] == said
    ]


async def test_a_fact_told_weeks_ago_is_in_that_chats_prompt_only(qq: OneBotClient, fake: FakeOpenAI) -> None:
    await qq.send_private(FRIEND_A, "生日那天你来吗")
    await qq.wait_reply(user_id=FRIEND_A, timeout=20)
    await qq.send_private(FRIEND_B, "生日快乐的歌你会唱吗")
    await qq.wait_reply(user_id=FRIEND_B, timeout=20)

    (prompt_a,) = prompts_of(fake, "生日那天你来吗")
    (prompt_b,) = prompts_of(fake, "生日快乐的歌你会唱吗")
    assert MEMORY_HEADING in prompt_a and "杭州" in prompt_a and "考研" not in prompt_a
    assert "考研" in prompt_b and "杭州" not in prompt_b
    assert not any("杭州" in m["content"] for r in fake.requests_mentioning("考研") for m in r["messages"])


async def test_a_friend_cannot_read_a_chats_memory(qq: OneBotClient, fake: FakeOpenAI) -> None:
    asked = len(fake.requests)
    await qq.send_private(FRIEND_B, f"/twin memory c2c:{FRIEND_A}")
    assert await qq.wait_quiet(3, user_id=FRIEND_B) == []
    assert not any("杭州" in m["content"] for r in fake.requests[asked:] for m in r["messages"])


async def test_a_superuser_reads_it_privately_and_in_a_group_only_an_ack(qq: OneBotClient) -> None:
    before = len(qq.replies(user_id=SUPERUSER))
    await qq.send_private(SUPERUSER, f"/twin memory c2c:{FRIEND_A}")
    (answer,) = await qq.wait_reply(user_id=SUPERUSER, after=before, timeout=20)
    assert "杭州" in answer.text and "考研" not in answer.text

    await qq.send_group(300, SUPERUSER, f"/twin memory c2c:{FRIEND_A}")
    acks = await qq.wait_reply(group_id=300, timeout=20)
    assert [a.text for a in acks] == ["收到"]
    privately = await wait_until(lambda: qq.replies(user_id=SUPERUSER)[before + 1 :], 20)
    assert "杭州" not in privately[0].text and "private" in privately[0].text

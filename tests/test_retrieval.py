"""The owner's past replies as examples: terms, BM25, pairs, no leakage, and never across chats."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bot.config import Config
from bot.runtime import Twin
from bot.store import StoredMessage
from pipeline.chatformat import BURST_GAP, EXAMPLES_HEADING
from pipeline.dataset.build import build_samples
from pipeline.dataset.settings import DatasetSettings
from pipeline.records import Message, write_messages
from pipeline.retrieval import PAIR_GAP, Pair, ReplyIndex, pairs_of, terms
from tests.bot_helpers import ScriptedBackend

A = ("c2c", "20001")
B = ("c2c", "20002")
T0 = 1_700_000_000


def test_chinese_is_cut_into_bigrams_and_faces_and_words_stay_whole():
    assert terms("今晚吃啥") == ["今晚", "晚吃", "吃啥"]
    assert terms("好") == ["好"]
    assert terms("OK 在吗[微笑]") == ["[微笑]", "在吗", "ok"]
    assert terms("，。！") == []


def pair(chat: tuple[str, str], message: str, reply: str, at: int) -> Pair:
    return Pair(chat, message, reply, T0 + at)


def test_the_closest_message_ranks_first_and_a_tie_goes_to_the_newer_reply():
    index = ReplyIndex()
    index.add(pair(A, "周末去爬山吗", "好啊去香山", 0))
    index.add(pair(A, "今晚吃火锅吗", "吃！", 10))
    index.add(pair(A, "今晚吃烧烤吗", "烧烤也行", 20))
    far = T0 + 1000

    assert index.examples_for("周末爬山去不去", A, k=1, before_time=far) == ("好啊去香山",)
    assert index.examples_for("今晚吃啥", A, k=2, before_time=far) == ("烧烤也行", "吃！")
    assert index.examples_for("在吗", A, k=3, before_time=far) == ()  # nothing in common: no example


def test_examples_are_distinct_bounded_in_tokens_and_only_from_before_the_time():
    index = ReplyIndex()
    for at in range(3):
        index.add(pair(A, "在干嘛", "摸鱼", at))
    index.add(pair(A, "在干嘛呢", "在写一篇很长很长很长很长很长很长的报告呢", 5))

    assert index.examples_for("在干嘛", A, k=5, before_time=T0 + 9) == (
        "摸鱼",
        "在写一篇很长很长很长很长很长很长的报告呢",
    )
    assert index.examples_for("在干嘛", A, k=5, before_time=T0 + 9, max_tokens=8) == ("摸鱼",)
    assert index.examples_for("在干嘛", A, k=5, before_time=T0) == ()  # strictly before


def test_a_chat_sees_only_its_own_replies_unless_other_chats_are_allowed():
    index = ReplyIndex(other_chats=True)
    index.add(pair(A, "你家wifi密码多少", "密码是qq12345678", 0))
    far = T0 + 100

    assert index.examples_for("wifi密码多少", B, k=3, before_time=far) == ()
    shared = index.examples_for("wifi密码多少", B, k=3, before_time=far, other_chats=True)
    assert shared == ("密码是qq12345678",)  # the owner's words, and only them, may cross


def test_a_recalled_message_takes_its_pair_out():
    index = ReplyIndex()
    index.add(Pair(A, "明天几点", "九点见", T0, ("m1", "m2")))
    assert index.forget("m2") == 1
    assert index.examples_for("明天几点", A, k=3, before_time=T0 + 9) == ()


def said(chat: tuple[str, str], who: str, text: str, at: int) -> tuple[tuple[str, str], Message]:
    owner = who == "owner"
    sender = "10000" if owner else chat[1]
    return chat, Message(f"m{at}", chat[0], chat[1], sender, "", owner, T0 + at, text)


def test_pairs_are_a_friends_turn_and_the_owners_next_turn_as_turns_are_cut():
    history = [
        said(A, "friend", "在吗", 0),
        said(A, "friend", "问你个事", 10),  # the same burst
        said(A, "owner", "在", 20),
        said(A, "owner", "说", 25),
        said(A, "friend", "借我点钱", 30),
        said(A, "friend", "好吗", 30 + PAIR_GAP + 1),  # a new conversation: the owner's answer is to this
        said(A, "owner", "不借", 30 + PAIR_GAP + 60),
    ]
    got = [(p.message, p.reply) for p in pairs_of(history, BURST_GAP)]
    assert got == [("在吗\n问你个事", "在\n说"), ("好吗", "不借")]


def history_with_repeats() -> list[Message]:
    """Chat A asks the same thing twice, a day apart; chat B has its own secret."""
    day = 86_400
    rows = [
        said(A, "friend", "周末去爬山吗", 0),
        said(A, "owner", "好啊去香山", 30),
        said(B, "friend", "我家门锁密码是4471", 100),
        said(B, "owner", "记住了门锁", 130),
        said(A, "friend", "周末去爬山吗", day),
        said(A, "owner", "这周不行", day + 30),
    ]
    return [message for _, message in rows]


def test_a_sample_never_sees_the_reply_it_is_trained_on():
    settings = DatasetSettings(examples=3, persona="阿明")
    samples = [s for s in build_samples(history_with_repeats(), settings) if s.chat == "20001"]
    first, second = (s.messages for s in samples)

    assert first[-1]["content"] == "好啊去香山" and EXAMPLES_HEADING not in first[0]["content"]
    assert second[-1]["content"] == "这周不行"
    assert second[0]["content"].endswith(f"{EXAMPLES_HEADING}\n- 好啊去香山")
    assert "这周不行" not in second[0]["content"]


def test_examples_off_by_default_leave_the_dataset_as_it_was():
    samples = list(build_samples(history_with_repeats(), DatasetSettings(persona="阿明")))
    assert all(EXAMPLES_HEADING not in s.messages[0]["content"] for s in samples)


# ---------------------------------------------------------------- the bot


async def started_twin(tmp_path: Path, backend: ScriptedBackend, **settings: object) -> Twin:
    quiet = {"twin_burst_window": 0, "twin_typing_delay": 0, "twin_typing_per_char": 0}
    config = Config(twin_db=tmp_path / "bot.db", twin_memory_window=0, **{**quiet, **settings})
    twin = Twin(config, nicknames=["小明"], backend=backend)
    await twin.start()
    if not twin.config.twin_examples:
        return twin
    for _ in range(200):
        if twin.replies is not None:
            return twin
        await asyncio.sleep(0.02)
    raise AssertionError("the owner's replies were never indexed")


async def chat_in(twin: Twin, chat: tuple[str, str], friend_text: str, owner_text: str, at: float) -> None:
    await twin.record(StoredMessage(*chat, chat[1], "incoming", friend_text, int(at), msg_id=f"f{int(at)}"))
    await twin.record(StoredMessage(*chat, "10000", "owner", owner_text, int(at) + 5, msg_id=f"o{int(at)}"))


class Outbox:
    async def send(self, text: str) -> int:
        return 1


async def ask(twin: Twin, chat: tuple[str, str], text: str) -> str:
    """A friend writes in `chat`; returns the system prompt the backend was given."""
    row = await twin.record(StoredMessage(*chat, chat[1], "incoming", text, int(time.time())))
    await twin.answer(chat, row, Outbox().send)
    return twin.backend.prompts[-1][0]["content"]  # type: ignore[attr-defined]


async def test_a_chats_words_never_reach_another_chats_prompt(tmp_path: Path) -> None:
    twin = await started_twin(tmp_path, ScriptedBackend(), twin_examples=3)
    past = time.time() - 600
    await chat_in(twin, A, "你家wifi密码多少 我是阿花", "密码是qq12345678", past)
    await chat_in(twin, B, "周末有空吗", "有空", past + 60)

    in_b = await ask(twin, B, "你家wifi密码多少")
    in_a = await ask(twin, A, "你家wifi密码多少")
    await twin.close()

    assert "qq12345678" not in in_b and "阿花" not in in_b
    assert in_a.endswith(f"{EXAMPLES_HEADING}\n- 密码是qq12345678")
    assert "阿花" not in in_a  # a friend's words are never an example, even in their own chat


async def test_with_other_chats_allowed_only_the_owners_words_cross(tmp_path: Path) -> None:
    twin = await started_twin(tmp_path, ScriptedBackend(), twin_examples=3, twin_examples_other_chats=True)
    await chat_in(twin, A, "你家wifi密码多少 我是阿花", "密码是qq12345678", time.time() - 600)

    in_b = await ask(twin, B, "你家wifi密码多少")
    await twin.close()

    assert "qq12345678" in in_b and "阿花" not in in_b


async def test_the_index_is_built_at_start_from_the_store_and_the_imported_history(tmp_path: Path) -> None:
    imported = tmp_path / "messages.jsonl"
    write_messages(imported, [m for _, m in [said(A, "friend", "下班了吗", 0), said(A, "owner", "刚下", 9)]])
    first = await started_twin(tmp_path, ScriptedBackend(), twin_examples=2)
    await chat_in(first, A, "吃饭了吗", "吃过了", time.time() - 600)
    await first.close()

    twin = await started_twin(tmp_path, ScriptedBackend(), twin_examples=2, twin_examples_messages=imported)
    prompt = await ask(twin, A, "下班了吗 吃饭了吗")
    await twin.close()

    assert f"{EXAMPLES_HEADING}\n" in prompt and "- 刚下" in prompt and "- 吃过了" in prompt


async def test_a_recalled_reply_is_no_longer_an_example(tmp_path: Path) -> None:
    twin = await started_twin(tmp_path, ScriptedBackend(), twin_examples=2)
    past = time.time() - 600
    await chat_in(twin, A, "明天几点出发", "九点", past)
    await twin.exclude(f"o{int(past)}", "recalled")

    prompt = await ask(twin, A, "明天几点出发")
    await twin.close()

    assert EXAMPLES_HEADING not in prompt


async def test_an_included_reply_is_an_example_again_without_a_restart(tmp_path: Path) -> None:
    twin = await started_twin(tmp_path, ScriptedBackend(), twin_examples=2)
    past = time.time() - 600
    await chat_in(twin, A, "明天几点出发", "九点", past)
    await twin.exclude(f"o{int(past)}", "operator")
    assert EXAMPLES_HEADING not in await ask(twin, A, "明天几点出发")
    excluded_index = twin.replies

    assert await twin.include(f"o{int(past)}") == 1
    await wait_for_new_index(twin, excluded_index)
    prompt = await ask(twin, A, "明天几点出发")
    await twin.close()

    assert prompt.endswith(f"{EXAMPLES_HEADING}\n- 九点")


async def test_excluding_a_reply_in_one_chat_keeps_the_same_id_in_another_an_example(tmp_path: Path) -> None:
    twin = await started_twin(tmp_path, ScriptedBackend(), twin_examples=2)
    past = int(time.time() - 600)
    for chat, reply in ((A, "九点"), (B, "十点")):  # a QQ side whose ids restart: both replies are "o1"
        await twin.record(StoredMessage(*chat, chat[1], "incoming", "明天几点出发", past, msg_id="f1"))
        await twin.record(StoredMessage(*chat, "10000", "owner", reply, past + 5, msg_id="o1"))
        await twin.record(StoredMessage(*chat, chat[1], "incoming", "好", past + 60, msg_id="f2"))
    await twin.exclude("o1", "operator", A)

    in_a, in_b = await ask(twin, A, "明天几点出发"), await ask(twin, B, "明天几点出发")
    await twin.close()
    assert EXAMPLES_HEADING not in in_a and in_b.endswith(f"{EXAMPLES_HEADING}\n- 十点")


async def wait_for_new_index(twin: Twin, old: object) -> None:
    for _ in range(200):  # rebuilt in the background; the old index answers meanwhile
        if twin.replies is not old and (twin._indexer is None or twin._indexer.done()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the examples index was not rebuilt")


async def test_an_approved_twin_reply_is_an_example_and_an_unapproved_one_not(tmp_path: Path) -> None:
    twin = await started_twin(tmp_path, ScriptedBackend(), twin_examples=2)
    past = int(time.time() - 600)
    await twin.record(StoredMessage(*A, A[1], "incoming", "明天几点出发", past, msg_id="f1"))
    await twin.record(StoredMessage(*A, "10000", "twin", "九点吧", past + 5, msg_id="t1"))
    await twin.record(StoredMessage(*A, A[1], "incoming", "好的", past + 60, msg_id="f2"))
    assert EXAMPLES_HEADING not in await ask(twin, A, "明天几点出发")  # unreviewed output is no example

    old = twin.replies
    assert await twin.approve("t1") == 1
    await wait_for_new_index(twin, old)
    assert (await ask(twin, A, "明天几点出发")).endswith(f"{EXAMPLES_HEADING}\n- 九点吧")

    old = twin.replies
    assert await twin.approve("t1", approved=False) == 1
    assert EXAMPLES_HEADING not in await ask(twin, A, "明天几点出发")  # at once, rebuilt or not
    await wait_for_new_index(twin, old)
    prompt = await ask(twin, A, "明天几点出发")
    await twin.close()
    assert EXAMPLES_HEADING not in prompt


async def test_a_reply_excluded_while_the_index_is_rebuilt_stays_out_of_it(tmp_path: Path) -> None:
    twin = await started_twin(tmp_path, ScriptedBackend(), twin_examples=2)
    past = time.time() - 600
    await chat_in(twin, A, "明天几点出发", "九点", past)
    await chat_in(twin, A, "周末去哪", "去香山", past + 60)
    await twin.exclude(f"o{int(past)}", "operator")
    started = asyncio.Event()
    build = twin._build_index

    def slow_build(pairs):  # the thread reads every row, then the operator excludes one
        result = build(pairs)
        asyncio.run_coroutine_threadsafe(_set(started), loop)
        time.sleep(0.3)
        return result

    async def _set(event: asyncio.Event) -> None:
        event.set()

    loop = asyncio.get_running_loop()
    twin._build_index = slow_build  # type: ignore[method-assign]
    await twin.include(f"o{int(past)}")
    await started.wait()
    await twin.exclude(f"o{int(past) + 60}", "operator")  # read by the running build already
    await twin._indexer
    prompt = await ask(twin, A, "明天几点出发 周末去哪")
    await twin.close()

    assert "- 九点" in prompt and "去香山" not in prompt


async def test_examples_are_off_by_default(tmp_path: Path) -> None:
    twin = await started_twin(tmp_path, ScriptedBackend())
    await chat_in(twin, A, "明天几点出发", "九点", time.time() - 600)
    prompt = await ask(twin, A, "明天几点出发")
    await twin.close()
    assert Config().twin_examples == 0 and DatasetSettings().examples == 0
    assert EXAMPLES_HEADING not in prompt and twin._indexer is None


def test_a_pasted_essay_is_looked_up_by_its_end():
    index = ReplyIndex()
    index.add(pair(A, "明天几点出发", "九点", 0))
    essay = "啊" * 20_000 + "天气" * 500 + "明天几点出发"
    assert index.examples_for(essay, A, k=1, before_time=T0 + 9) == ("九点",)


async def test_a_broken_import_file_leaves_examples_off_and_the_twin_answering(
    tmp_path: Path, caplog
) -> None:
    broken = tmp_path / "messages.jsonl"
    broken.write_text("not json\n", encoding="utf-8")
    twin = await started_twin(tmp_path, ScriptedBackend(), twin_examples_messages=broken)
    twin.config.twin_examples = 2
    await twin._index_replies()
    prompt = await ask(twin, A, "在吗")
    await twin.close()
    assert twin.replies is None and prompt.startswith("你是我")
    assert "examples are off" in caplog.text and str(broken) in caplog.text

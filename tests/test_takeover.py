"""The owner takes over a chat: the twin steps aside there for a while, or until told otherwise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from bot.admin import run_admin
from bot.backends import Generation
from bot.config import Config
from bot.runtime import Twin
from bot.store import StoredMessage, read_messages_since
from pipeline.chatformat import parse_chat
from tests.bot_helpers import ScriptedBackend

KEY = ("c2c", "20001")
OTHER = ("c2c", "20002")
GROUP_KEY = ("group", "300")


class FakeClock:
    """The takeover window's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ThreeBubbles(ScriptedBackend):
    async def generate(self, messages: Sequence[dict[str, str]]) -> Generation:
        self.prompts.append(list(messages))
        return Generation(text="一\n二\n三", version=self.version)


async def make_twin(tmp_path: Path, backend: ScriptedBackend | None = None, **settings: object) -> Twin:
    quiet = {"twin_burst_window": 0, "twin_typing_delay": 0, "twin_typing_per_char": 0}
    config = Config(twin_db=tmp_path / "bot.db", **{**quiet, **settings})
    twin = Twin(config, nicknames=["小明"], backend=backend or ScriptedBackend())
    twin.clock = FakeClock()
    await twin.start()
    return twin


class Outbox:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, text: str) -> int:
        self.sent.append(text)
        return 1000 + len(self.sent)


async def friend_writes(twin: Twin, text: str, key: tuple[str, str] = KEY) -> int:
    message = StoredMessage(key[0], key[1], key[1], "incoming", text, int(time.time()))
    return await twin.record(message)


async def owner_writes(twin: Twin, text: str, key: tuple[str, str] = KEY) -> None:
    assert await twin.record_own(key, StoredMessage(key[0], key[1], "10000", "owner", text, int(time.time())))
    await twin.owner_spoke(key)


async def answer(twin: Twin, outbox: Outbox, text: str, key: tuple[str, str] = KEY) -> list[str]:
    return await twin.answer(key, await friend_writes(twin, text, key), outbox.send)


async def test_the_owner_writing_silences_the_chat_for_the_window_then_the_twin_answers(
    tmp_path: Path,
) -> None:
    backend = ScriptedBackend()
    twin = await make_twin(tmp_path, backend, twin_takeover_minutes=10)
    outbox = Outbox()
    await friend_writes(twin, "周末去哪")
    await owner_writes(twin, "我来回")
    assert await answer(twin, outbox, "好的") == []
    twin.clock.now += 9 * 60
    assert await answer(twin, outbox, "还在吗") == []
    assert backend.prompts == []  # not even generated
    twin.clock.now += 60
    assert await answer(twin, outbox, "人呢") == ["收到:人呢"]
    # what the owner and the friend said meanwhile is the reply's context
    contents = [m["content"] for m in backend.prompts[0][1:]]
    await twin.close()
    assert "我来回" in contents and any("还在吗" in c for c in contents)
    assert outbox.sent == ["收到:人呢"]


async def test_writing_again_extends_the_window(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, twin_takeover_minutes=1)
    await owner_writes(twin, "在")
    twin.clock.now += 50
    await owner_writes(twin, "等下")
    twin.clock.now += 50
    assert twin.taken_over(KEY) is not None
    twin.clock.now += 11
    assert twin.taken_over(KEY) is None
    await twin.close()


async def test_a_takeover_in_one_chat_leaves_every_other_chat_answered(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path)
    outbox = Outbox()
    await owner_writes(twin, "我在", GROUP_KEY)  # the owner writing in a group takes the group over
    assert await answer(twin, outbox, "@小明 在吗", GROUP_KEY) == []
    assert await answer(twin, outbox, "在吗", OTHER) == ["收到:在吗"]
    await owner_writes(twin, "我来")
    assert await answer(twin, outbox, "在吗", OTHER) == ["收到:在吗"]
    await twin.close()
    assert set(twin.takeovers()) == {KEY, GROUP_KEY}


async def test_zero_minutes_takes_nothing_over_but_the_owners_answer_still_counts(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, twin_takeover_minutes=0, twin_burst_window=0.3)
    outbox = Outbox()
    waiting = asyncio.create_task(answer(twin, outbox, "周末去吗"))
    await asyncio.sleep(0.1)
    await owner_writes(twin, "去")  # answered by the owner while the twin waited out the burst
    assert await waiting == []
    assert twin.taken_over(KEY) is None
    assert await answer(twin, outbox, "几点") == ["收到:几点"]
    await twin.close()


async def test_the_owner_writing_while_a_reply_is_generated_drops_it(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, ScriptedBackend(delay=5))
    outbox = Outbox()
    started = time.monotonic()
    replying = asyncio.create_task(answer(twin, outbox, "在吗"))
    await asyncio.sleep(0.2)
    await owner_writes(twin, "在的")
    assert await asyncio.wait_for(replying, 2) == []
    assert time.monotonic() - started < 2  # the backend call was given up, not waited out
    rows = await twin.store.recent(*KEY, since=0, limit=9)
    await twin.close()
    assert outbox.sent == [] and [m.origin for m in rows] == ["incoming", "owner"]


async def test_a_reply_stops_before_the_next_bubble_once_the_owner_writes(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, ThreeBubbles())
    sent: list[str] = []

    async def send(text: str) -> int:
        sent.append(text)
        if len(sent) == 1:  # the owner types right after the first bubble went out
            await owner_writes(twin, "我来说")
        return 2000 + len(sent)

    assert await twin.answer(KEY, await friend_writes(twin, "说说"), send) == ["一"]
    rows = await twin.store.recent(*KEY, since=0, limit=9)
    await twin.close()
    assert sent == ["一"]
    assert [(m.origin, m.text, m.send_state) for m in rows] == [
        ("incoming", "说说", None),
        ("twin", "一", "sent"),
        ("owner", "我来说", None),
    ]


async def test_a_bubble_recorded_as_the_owner_writes_is_dropped_and_never_seen_again(
    tmp_path: Path,
) -> None:
    twin = await make_twin(tmp_path)
    outbox = Outbox()
    assert twin.store is not None
    add = twin.store.add

    async def add_then_owner_writes(message: StoredMessage) -> int:
        row = await add(message)
        if message.origin == "twin":  # between recording the bubble and sending it
            await twin.owner_spoke(KEY)
        return row

    twin.store.add = add_then_owner_writes
    assert await answer(twin, outbox, "在吗") == []
    twin.store.add = add
    assert outbox.sent == []
    (dropped,) = await twin.store._conn.execute_fetchall(
        "SELECT id, text, send_state FROM messages WHERE origin = 'twin'"
    )
    assert tuple(dropped)[1:] == ("收到:在吗", "dropped")
    # not context for the next reply, never claimed as an echo, never trained on even if approved
    assert [m.origin for m in await twin.store.recent(*KEY, since=0, limit=9)] == ["incoming"]
    assert not await twin.store.claim_echo(*KEY, "77", "收到:在吗", int(time.time()))
    await twin.store.approve(dropped[0])
    db = twin.config.twin_db
    await twin.close()
    assert [m.origin for m in read_messages_since(db, include_approved_twin=True)] == ["incoming"]


async def test_an_echo_of_a_twin_bubble_is_claimed_not_taken_for_the_owner(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path)
    outbox = Outbox()
    assert await answer(twin, outbox, "在吗") == ["收到:在吗"]
    echo = StoredMessage(*KEY, "10000", "owner", "收到:在吗", int(time.time()), msg_id="1001")
    assert await twin.record_own(KEY, echo) is None  # so the handler never calls owner_spoke
    await twin.close()


async def test_a_manual_takeover_lasts_across_restarts_until_off(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path)
    outbox = Outbox()
    await twin.set_takeover(KEY, True)
    await twin.close()

    twin = await make_twin(tmp_path)
    twin.clock.now += 365 * 24 * 3600
    assert twin.taken_over(KEY) is not None and twin.taken_over(KEY).manual
    assert await answer(twin, outbox, "在吗") == []
    await owner_writes(twin, "我在")  # the owner writing does not shorten a manual takeover
    twin.clock.now += 3600
    assert twin.taken_over(KEY).manual
    await twin.set_takeover(KEY, False)
    assert await answer(twin, outbox, "还在吗") == ["收到:还在吗"]
    await twin.close()

    twin = await make_twin(tmp_path)
    assert twin.takeovers() == {}
    await twin.close()


async def test_off_ends_an_automatic_takeover_now(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path)
    outbox = Outbox()
    await owner_writes(twin, "我来")
    await twin.set_takeover(KEY, False)
    assert await answer(twin, outbox, "在吗") == ["收到:在吗"]
    await twin.close()


async def admin(twin: Twin, line: str, chat: tuple[str, str] | None = ("c2c", "42")) -> str:
    async def report(text: str) -> None:
        pass

    return await run_admin(twin, line.split(), chat=chat, user="42", quoted=None, report=report)


async def test_the_takeover_verb_names_this_chat_or_another_and_refuses_anything_else(
    tmp_path: Path,
) -> None:
    twin = await make_twin(tmp_path)
    assert "c2c:42: taken over" in await admin(twin, "takeover on")
    assert twin.taken_over(("c2c", "42")) is not None
    assert "group:300: taken over" in await admin(twin, "takeover group:300 ON")
    assert "c2c:20001: taken over" in await admin(twin, "takeover c2c:020001 on")
    for bad in ("takeover c2c:abc on", "takeover qq:1 on", "takeover c2c:1 maybe", "takeover a b c"):
        assert (await admin(twin, bad)).startswith("usage:")
    assert (await admin(twin, "takeover on", chat=None)).startswith("usage:")
    listing = await admin(twin, "takeover")
    assert listing.splitlines()[0] == "taken over: 3"
    assert "  group:300 until /twin takeover off" in listing.splitlines()
    assert "answers there again" in await admin(twin, "takeover group:300 off")
    await twin.close()
    for bad in ("group:", "c2c:１２"):
        with pytest.raises(ValueError):
            parse_chat(bad)


async def test_status_lists_at_most_five_taken_over_chats_with_until_when(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, twin_takeover_minutes=10)
    assert "taken over: none" in (await twin.status_text()).splitlines()
    before = time.strftime("%H:%M", time.localtime(time.time() + 600))
    await owner_writes(twin, "我来")
    lines = (await twin.status_text()).splitlines()
    after = time.strftime("%H:%M", time.localtime(time.time() + 600))
    at = lines.index("taken over: 1")
    assert lines[at + 1][: len("  c2c:20001 until 12:34")] in (
        f"  c2c:20001 until {before}",
        f"  c2c:20001 until {after}",
    )
    for uin in range(30001, 30006):
        await twin.set_takeover(("c2c", str(uin)), True)
    lines = (await twin.status_text()).splitlines()
    at = lines.index("taken over: 6")
    assert lines[at + 1 : at + 7] == [
        *(f"  c2c:{uin} until /twin takeover off" for uin in range(30001, 30006)),
        "  …",
    ]
    await twin.close()

"""The running twin on a real account: its own words never become the owner's, nothing jams,
and it sends like a careful person (no NoneBot here; the handlers are tested over OneBot)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from bot.config import Config
from bot.memory import build_prompt, estimate_tokens, fit_messages, keep_end
from bot.pacing import SendHealth, SendLimiter, SendLimits, filter_bubbles, jittered
from bot.runtime import Twin
from bot.segments import outgoing_parts, outgoing_text
from bot.store import MAX_TEXT_CHARS, Store, StoredMessage, read_messages_since, sanitize
from tests.bot_helpers import ScriptedBackend

KEY = ("c2c", "20001")
SELF = "10000"


class EchoingQQ:
    """A QQ side whose `send_msg` echoes the bubble as a `message_sent` (as NapCat does), in a
    chosen order: before answering, after answering, or with the answer lost (a timeout)."""

    def __init__(self, twin: Twin, order: str, mangle=lambda text: text) -> None:
        self.twin, self.order, self.mangle = twin, order, mangle
        self.sent: list[str] = []
        self.next_id = 5000

    async def echo(self, text: str, message_id: int) -> None:
        shown = self.mangle(outgoing_text(outgoing_parts(text)))  # what QQ shows: faces, no placeholders
        own = StoredMessage("c2c", KEY[1], SELF, "owner", shown, int(time.time()), msg_id=str(message_id))
        await self.twin.record_own(KEY, own)

    async def send(self, text: str) -> int:
        self.next_id += 1
        self.sent.append(text)
        if self.order == "echo-first":
            await self.echo(text, self.next_id)
            return self.next_id
        if self.order == "answer-lost":
            asyncio.get_running_loop().call_later(
                0.05, lambda: asyncio.ensure_future(self.echo(text, self.next_id))
            )
            raise TimeoutError("send_msg timed out")
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.echo(text, self.next_id)))
        return self.next_id


async def make_twin(tmp_path: Path, backend: ScriptedBackend | None = None, **settings: object) -> Twin:
    quiet = {
        "twin_burst_window": 0,
        "twin_typing_delay": 0,
        "twin_typing_per_char": 0,
        "twin_typing_jitter": 0,
    }
    config = Config(twin_db=tmp_path / "bot.db", **{**quiet, **settings})
    twin = Twin(config, nicknames=["小明"], backend=backend or ScriptedBackend(), command_prefixes=["/"])
    await twin.start()
    return twin


async def incoming(twin: Twin, text: str, sender: str = KEY[1], key: tuple[str, str] = KEY) -> int:
    return await twin.record(StoredMessage(key[0], key[1], sender, "incoming", text, int(time.time())))


def owner_lines(db: Path) -> list[str]:
    return [m.text for m in read_messages_since(db) if m.origin == "owner"]


class Saying(ScriptedBackend):
    """Always says `reply`."""

    def __init__(self, reply: str) -> None:
        super().__init__()
        self.reply = reply

    async def generate(self, messages):  # type: ignore[override]
        generation = await super().generate(messages)
        generation.text = self.reply
        return generation


# --------------------------------------------------------------------------- the owner signal


@pytest.mark.parametrize("order", ["echo-first", "answer-first", "answer-lost"])
@pytest.mark.parametrize(
    ("reply", "mangle"),
    [
        ("哈哈[图片]\n好的 [微笑]", lambda t: t),  # a placeholder dropped on send, a face sent as a face
        ("明天 见\n走起", lambda t: t.replace(" ", "  ") + " "),  # the QQ side changed the spacing
        ("[动画表情]\n嗯嗯", lambda t: t),  # a bubble of nothing sendable is not sent at all
    ],
)
async def test_a_twin_bubble_is_never_stored_as_the_owners_words(
    tmp_path: Path, order: str, reply: str, mangle
) -> None:
    twin = await make_twin(tmp_path, Saying(reply))
    qq = EchoingQQ(twin, order, mangle)
    await twin.answer(KEY, await incoming(twin, "在吗"), qq.send, self_id=SELF)
    await asyncio.sleep(0.2)  # late echoes
    await twin.close()
    assert owner_lines(tmp_path / "bot.db") == []


async def test_the_owner_typing_the_twins_words_later_is_still_the_owner(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, Saying("哈哈"))
    qq = EchoingQQ(twin, "answer-first")
    await twin.answer(KEY, await incoming(twin, "好笑吗"), qq.send, self_id=SELF)
    await asyncio.sleep(0.1)
    await twin.record_own(
        KEY, StoredMessage("c2c", KEY[1], SELF, "owner", "哈哈", int(time.time()), msg_id="77")
    )
    await twin.close()
    assert owner_lines(tmp_path / "bot.db") == ["哈哈"]


async def test_an_echo_naming_no_chat_is_still_recognised(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, Saying("好的呀"))
    sent: list[str] = []

    async def send(text: str) -> None:  # an implementation that returns no message id
        sent.append(text)

    await twin.answer(KEY, await incoming(twin, "来吗"), send, self_id=SELF)
    assert (
        await twin.record_own(None, StoredMessage("c2c", SELF, SELF, "owner", "好的呀", int(time.time())))
        is None
    )
    await twin.close()
    assert owner_lines(tmp_path / "bot.db") == []


async def test_command_lines_and_recalled_messages_are_never_training_text(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path)
    await twin.record_own(
        KEY, StoredMessage("c2c", KEY[1], SELF, "owner", " /twin status", int(time.time()), msg_id="1")
    )
    await twin.record_own(
        KEY, StoredMessage("c2c", KEY[1], SELF, "owner", "/help", int(time.time()), msg_id="2")
    )
    await twin.record_own(
        KEY, StoredMessage("c2c", KEY[1], SELF, "owner", "说错了", int(time.time()), msg_id="3")
    )
    await twin.record_own(
        KEY, StoredMessage("c2c", KEY[1], SELF, "owner", "明天见", int(time.time()), msg_id="4")
    )
    assert twin.store is not None
    assert await twin.store.exclude("3", "recalled") == 1
    await twin.close()
    assert owner_lines(tmp_path / "bot.db") == ["明天见"]


# --------------------------------------------------------------------------- nothing lost, nothing jams


@pytest.mark.parametrize(
    "text",
    ["半个\ud83d表情", "空\x00字符", "x" * 1_000_000, "\ud83d\ude00 成对的代理", "[CQ:face,id=14]"],
)
async def test_awkward_texts_are_stored_sanitised(tmp_path: Path, text: str) -> None:
    store = await Store.open(tmp_path / "bot.db")
    row = await store.add(
        StoredMessage("c2c", "1", "1", "incoming", text, int(time.time()), sender_name="名\ud800字")
    )
    (stored,) = await store.recent("c2c", "1", since=0, limit=5)
    await store.close()
    assert row and stored.text == sanitize(text)
    assert len(stored.text) <= MAX_TEXT_CHARS and "\x00" not in stored.text
    stored.text.encode("utf-8")  # no lone surrogate left
    assert stored.sender_name == "名\ufffd字"


def test_a_surrogate_pair_written_as_two_halves_is_joined() -> None:
    assert sanitize("\ud83d\ude00") == "😀"


async def test_a_huge_message_does_not_silence_the_chat(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    twin = await make_twin(tmp_path, backend, twin_max_turn_chars=300)
    sent: list[str] = []

    async def send(text: str) -> int:
        sent.append(text)
        return len(sent)

    await twin.answer(KEY, await incoming(twin, "长" * 30_000), send, self_id=SELF)
    await twin.answer(KEY, await incoming(twin, "在吗"), send, self_id=SELF)
    await twin.close()
    assert sent[-1] == "收到:在吗"
    assert all(len(m["content"]) <= 300 for prompt in backend.prompts for m in prompt[1:])


def test_every_turn_is_cut_keeping_its_end() -> None:
    assert keep_end("0123456789", 5) == "…6789"
    history = [StoredMessage("c2c", "1", "1", "incoming", "废话" * 500 + "重点在最后", 1)]
    messages = build_prompt(history, "c2c", "我", max_turn_chars=50)
    assert len(messages[-1]["content"]) == 50 and messages[-1]["content"].endswith("重点在最后")


def test_the_oldest_turns_go_first_and_the_prompt_always_fits() -> None:
    messages = [{"role": "system", "content": "你是我"}]
    for i in range(40):
        messages += [
            {"role": "user", "content": f"问题{i}" * 20},
            {"role": "assistant", "content": f"回答{i}" * 20},
        ]
    messages.append({"role": "user", "content": "在吗"})
    fitted = fit_messages(messages, 400, estimate_tokens)
    assert estimate_tokens(fitted) <= 400
    assert fitted[0] == messages[0] and fitted[-1] == messages[-1]
    assert fitted[1]["role"] == "user" and fitted[1:] == messages[len(messages) - len(fitted) + 1 :]


def test_a_last_turn_too_long_for_any_budget_is_cut_from_its_start() -> None:
    messages = [{"role": "system", "content": "你是我"}, {"role": "user", "content": "很长" * 5000 + "在吗"}]
    fitted = fit_messages(messages, 200, estimate_tokens)
    assert estimate_tokens(fitted) <= 200 and fitted[-1]["content"].endswith("在吗")


# --------------------------------------------------------------------------- a careful person


def test_one_friend_flooding_cannot_silence_the_others() -> None:
    limiter = SendLimiter(
        SendLimits(per_chat_minute=20, per_sender_minute=8, total_minute=20, sender_hour=30)
    )
    t = 1_700_000_000.0
    flooder_sent = 0
    for second in range(0, 3600, 10):  # one friend writes every 10 s for an hour
        if limiter.blocked("c2c:1", "1", t + second) is None:
            limiter.record("c2c:1", "1", t + second)
            flooder_sent += 1
    assert flooder_sent == 30
    assert limiter.blocked("c2c:2", "2", t + 3600) is None  # the others are still answered


def test_no_chat_gets_more_than_20_sends_in_any_minute_by_default() -> None:
    config = Config()
    limiter = SendLimiter(
        SendLimits(per_chat_minute=config.twin_rate_per_chat, total_minute=config.twin_rate_total)
    )
    t = 1_700_000_000.0
    sent: list[float] = []
    for step in range(240):  # a busy group asks every half second for two minutes
        at = t + step * 0.5
        if limiter.blocked("group:1", f"u{step}", at) is None:
            limiter.record("group:1", f"u{step}", at)
            sent.append(at)
    assert all(len([s for s in sent if first <= s < first + 60]) <= 20 for first in sent)
    assert len(sent) == 2 * config.twin_rate_per_chat


def test_failed_sends_back_off_exponentially_then_stop_until_resumed() -> None:
    health = SendHealth(limit=3, backoff=10)
    assert health.failed(0) == "send failed (1 in a row): backing off 10s"
    assert health.blocked(5) and not health.blocked(11)
    assert "20s" in health.failed(11)
    assert "sending stopped" in health.failed(40)
    assert "resume" in (health.blocked(10_000) or "")
    health.resume()
    assert health.blocked(10_000) is None


async def test_a_failing_qq_side_stops_the_twin_and_status_says_so(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, twin_send_failure_limit=2, twin_send_backoff=0.01)

    async def refused(text: str) -> int:
        raise RuntimeError("ActionFailed: retcode 1200")

    for text in ("一", "二", "三"):
        await twin.answer(KEY, await incoming(twin, text), refused, self_id=SELF)
        await asyncio.sleep(0.05)
    status = await twin.status_text()
    assert "sending: stopped after 2 failed sends" in status
    await twin.set_paused(False)  # /twin resume
    assert "sending: ok" in await twin.status_text()
    await twin.close()


def test_jitter_varies_delays_within_bounds() -> None:
    assert jittered(2.0, 0.3, roll=0.0) == pytest.approx(1.4)
    assert jittered(2.0, 0.3, roll=1.0) == pytest.approx(2.6)
    assert jittered(2.0, 0.0) == 2.0


def test_a_bubble_that_starts_with_a_command_prefix_is_never_sent() -> None:
    bubbles = ["/twin pause", " /ban 123", "好的 /twin"]
    assert filter_bubbles(bubbles, block_links=True, blocked_words=[], command_prefixes=["/"]) == [
        "好的 /twin"
    ]


async def test_the_daily_cap_counts_bubbles_and_survives_a_restart(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, Saying("一\n二"), twin_daily_cap=3)
    sent: list[str] = []

    async def send(text: str) -> int:
        sent.append(text)
        return len(sent)

    await twin.answer(KEY, await incoming(twin, "在吗"), send, self_id=SELF)
    await twin.close()
    again = await make_twin(tmp_path, Saying("三\n四"), twin_daily_cap=3)
    await again.answer(KEY, await incoming(again, "还在吗"), send, self_id=SELF)
    await again.close()
    assert sent == ["一", "二", "三"]  # the cap counts bubbles, restarts included


async def test_a_group_members_daily_cap_survives_a_restart(tmp_path: Path) -> None:
    """The per-person cap counts the group bubbles that answered someone, across restarts too."""
    group, member = ("group", "300"), "20077"
    twin = await make_twin(tmp_path, Saying("一\n二"), twin_sender_daily_cap=3)
    sent: list[str] = []

    async def send(text: str) -> int:
        sent.append(text)
        return len(sent)

    await twin.answer(group, await incoming(twin, "在吗", member, group), send, self_id=SELF, sender=member)
    await twin.close()
    again = await make_twin(tmp_path, Saying("三\n四"), twin_sender_daily_cap=3)
    row = await incoming(again, "还在吗", member, group)
    await again.answer(group, row, send, self_id=SELF, sender=member)
    other = await incoming(again, "我也问", "20078", group)  # another member's cap is their own
    await again.answer(group, other, send, self_id=SELF, sender="20078")
    await again.close()
    assert sent == ["一", "二", "三", "三", "四"]


async def test_a_quoted_message_id_reaches_only_the_row_of_its_own_chat(tmp_path: Path) -> None:
    """QQ sides whose message ids restart (or collide) give two chats' rows one id: approving or
    excluding by quoting touches the row in the chat the quote was made in, never the other."""
    from bot.admin import run_admin

    twin = await make_twin(tmp_path)
    assert twin.store is not None
    here, there = ("group", "300"), ("group", "301")
    for chat in (here, there):
        await twin.record(StoredMessage(*chat, "20001", "incoming", "在吗", int(time.time()), msg_id="7"))
        await twin.store.add(
            StoredMessage(*chat, SELF, "twin", "在的", int(time.time()), msg_id="8", send_state="sent")
        )

    async def admin(line: str, quoted: str) -> str:
        async def report(_: str) -> None:
            return None

        words = line.split()
        return await run_admin(
            twin, words, chat=here, user="42", quoted=quoted, report=report, quoted_chat=here
        )

    assert await admin("approve", "8") == "approved for retraining"
    assert await admin("exclude", "7") == "excluded from prompts and training"
    sql = "SELECT chat, msg_id, approved, excluded FROM messages ORDER BY chat, msg_id"
    with sqlite3.connect(tmp_path / "bot.db") as conn:
        assert conn.execute(sql).fetchall() == [
            ("300", "7", 0, "operator"),
            ("300", "8", 1, None),
            ("301", "7", 0, None),
            ("301", "8", 0, None),
        ]
    assert await admin("include", "7") == "included again in prompts and training"
    await twin.close()

"""The running twin without NoneBot: bursts, silence, fallbacks, and what it stores."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bot.config import Config
from bot.pacing import SendLimits
from bot.runtime import Twin
from bot.store import StoredMessage
from tests.bot_helpers import ScriptedBackend

KEY = ("c2c", "20001")


async def make_twin(tmp_path: Path, backend: ScriptedBackend, **settings: object) -> Twin:
    quiet = {"twin_burst_window": 0, "twin_typing_delay": 0, "twin_typing_per_char": 0}
    config = Config(twin_db=tmp_path / "bot.db", **{**quiet, **settings})
    twin = Twin(config, nicknames=["小明"], backend=backend)
    await twin.start()
    return twin


class Outbox:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, text: str) -> int:
        self.sent.append(text)
        return 1000 + len(self.sent)


async def incoming(twin: Twin, text: str) -> int:
    return await twin.record(StoredMessage("c2c", "20001", "20001", "incoming", text, int(time.time())))


async def test_a_burst_within_the_window_is_answered_once(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    twin = await make_twin(tmp_path, backend, twin_burst_window=0.3)
    outbox = Outbox()
    tasks = []
    for text in ("一", "二", "三"):
        tasks.append(asyncio.create_task(twin.answer(KEY, await incoming(twin, text), outbox.send)))
        await asyncio.sleep(0.1)
    await asyncio.gather(*tasks)
    await twin.close()
    assert outbox.sent == ["收到:三"]
    assert backend.prompts[0][-1]["content"] == "一\n二\n三"


async def test_a_message_arriving_during_generation_is_answered_next(tmp_path: Path) -> None:
    backend = ScriptedBackend(delay=0.3)
    twin = await make_twin(tmp_path, backend)
    outbox = Outbox()
    first = asyncio.create_task(twin.answer(KEY, await incoming(twin, "早"), outbox.send))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(twin.answer(KEY, await incoming(twin, "吃了吗"), outbox.send))
    await asyncio.gather(first, second)
    await twin.close()
    assert outbox.sent == ["收到:早", "收到:吃了吗"]
    # the late message goes after the reply it missed, so the prompt ends with it
    assert [m["content"] for m in backend.prompts[1][1:]] == ["早", "收到:早", "吃了吗"]


async def test_a_failing_backend_gets_the_fallback_reply_or_silence(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, ScriptedBackend(fail=True), twin_fallback_reply="在忙，晚点说")
    outbox = Outbox()
    await twin.answer(KEY, await incoming(twin, "在吗"), outbox.send)
    assert outbox.sent == ["在忙，晚点说"]
    (reply,) = [m for m in await twin.store.recent(*KEY, since=0, limit=9) if m.origin == "twin"]
    assert reply.model_version == "fallback" and reply.msg_id == "1001"
    twin.config.twin_fallback_reply = ""
    await twin.answer(KEY, await incoming(twin, "人呢"), outbox.send)
    await twin.close()
    assert outbox.sent == ["在忙，晚点说"]


async def test_paused_rate_limited_or_already_answered_chats_stay_silent(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, ScriptedBackend(), twin_rate_per_chat=1)
    outbox = Outbox()
    await twin.set_paused(True)
    await twin.answer(KEY, await incoming(twin, "在吗"), outbox.send)
    await twin.set_paused(False)
    await twin.answer(KEY, await incoming(twin, "在吗?"), outbox.send)
    await twin.answer(KEY, await incoming(twin, "再问一次"), outbox.send)  # over 1 reply a minute
    assert outbox.sent == ["收到:在吗?"]
    twin.limiter.limits = SendLimits(per_chat_minute=100)
    twin.config.twin_burst_window = 0.3
    waiting = asyncio.create_task(twin.answer(KEY, await incoming(twin, "周末去吗"), outbox.send))
    await asyncio.sleep(0.1)  # the owner answers from the phone while the twin waits out the burst
    await twin.record(StoredMessage("c2c", "20001", "10000", "owner", "去", int(time.time())))
    await twin.owner_spoke(KEY)
    await waiting
    await twin.close()
    assert outbox.sent == ["收到:在吗?"]


async def test_shutdown_releases_a_handler_waiting_out_a_burst(tmp_path: Path) -> None:
    twin = await make_twin(tmp_path, ScriptedBackend(), twin_burst_window=30)
    outbox = Outbox()
    waiting = asyncio.create_task(twin.answer(KEY, await incoming(twin, "在吗"), outbox.send))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await twin.close()
    assert await asyncio.wait_for(waiting, 2) == []
    assert time.monotonic() - started < 2 and outbox.sent == []


@pytest.mark.parametrize("text", ["看 https://x.cn", "加我 vx"])
async def test_filtered_replies_are_not_sent(tmp_path: Path, text: str) -> None:
    twin = await make_twin(tmp_path, ScriptedBackend(), twin_blocked_words=["vx"])
    outbox = Outbox()
    await twin.answer(KEY, await incoming(twin, text), outbox.send)
    await twin.close()
    assert outbox.sent == []


CHILD = """
import signal, sys, time
from pathlib import Path
def stop(*_):
    Path(sys.argv[1]).write_text("interrupted")
    sys.exit(1)
if sys.argv[2] == "polite":
    signal.signal(signal.SIGTERM, stop)
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("manners", ["polite", "deaf"])
async def test_a_retrain_child_is_asked_to_stop_then_killed(tmp_path: Path, manners: str) -> None:
    import sys

    from bot.retrain import stop_child

    marker = tmp_path / "marker"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(marker), manners, stdout=asyncio.subprocess.PIPE
    )
    await child.stdout.readline()  # its SIGTERM handler is in place

    started = time.monotonic()
    await stop_child(child, grace=2.0)

    assert child.returncode is not None
    if manners == "polite":  # it had the chance to clean up (the real one stops its training child)
        assert marker.read_text() == "interrupted" and time.monotonic() - started < 2.0
    else:  # it ignored SIGTERM and was killed after the grace period
        assert not marker.exists() and child.returncode < 0

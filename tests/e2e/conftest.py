"""What the end-to-end tests share: the bot process, the QQ client connected to it, polling."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
import pytest_asyncio

from deploy.onebot_client import NO_PACING, BotProcess, OneBotClient
from tests.fake_openai import FakeOpenAI

T = TypeVar("T")

TOKEN = "e2e-token"
OWNER = 10000  # the QQ account the twin answers as (the client's self_id)
SUPERUSER = 42


def bot_env(**settings: str) -> dict[str, str]:
    """A test bot's settings: our token and superuser, no pacing, no scheduled retrain, then `settings`."""
    return {"ONEBOT_ACCESS_TOKEN": TOKEN, "SUPERUSERS": f'["{SUPERUSER}"]', **NO_PACING, **settings}


def running_bot(settings: dict[str, str], home: Path, *, timeout: float = 120.0) -> Iterator[BotProcess]:
    """`python bot.py` started in `home` for a fixture to `yield from`; stopped afterwards, with any
    retrain cycle it started (cancelling the cycle's task in the bot does not end the process)."""
    bot = BotProcess(settings, cwd=home)
    bot.start(timeout=timeout)
    try:
        yield bot
    finally:
        below = processes_below(bot.process.pid) if bot.process is not None else []
        bot.stop(timeout=15)
        end_processes(below)


def processes_below(pid: int) -> list[psutil.Process]:
    """Every process descended from `pid` (none once it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def end_processes(processes: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM those still running, SIGKILL whatever outlives `timeout`."""
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=timeout)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    """A scripted OpenAI-compatible server for the module's bots (tests/fake_openai.py)."""
    server = FakeOpenAI()
    yield server
    server.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def qq(bot: BotProcess) -> OneBotClient:
    """The QQ side, connected as OWNER to the module's `bot` for all its tests."""
    async with bot.client(self_id=OWNER) as client:
        yield client


async def wait_until(predicate: Callable[[], T | Awaitable[T]], timeout: float, interval: float = 0.5) -> T:
    """Call `predicate` (plain or async) every `interval` s until it returns something true or `timeout`
    s have passed; returns its last value, so the caller asserts on it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(interval)


async def twin_status(qq: OneBotClient, timeout: float = 60) -> str:
    """`/twin status` as the superuser sees it (other reports to the superuser meanwhile are skipped)."""
    before = len(qq.replies(user_id=SUPERUSER))
    await qq.send_private(SUPERUSER, "/twin status")
    for count in range(1, 10):
        replies = await qq.wait_reply(user_id=SUPERUSER, after=before, count=count, timeout=timeout)
        answer = next((r.text for r in replies if r.text.startswith("model:")), None)
        if answer is not None:
            return answer
    raise AssertionError("no /twin status answer")

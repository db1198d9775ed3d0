"""`/twin/health` and `/twin/ready` over real HTTP against `bot.py`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy.onebot_client import BotProcess
from tests.e2e.conftest import OWNER, TOKEN, running_bot
from tests.e2e.test_bot_openai import bot_settings
from tests.fake_openai import FakeOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("health")
    yield from running_bot(bot_settings(fake, home / "data" / "bot.db"), home)


def http(bot: BotProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{bot.settings['PORT']}", timeout=10)


async def test_health_answers_anyone_and_reveals_nothing(bot: BotProcess) -> None:
    async with http(bot) as client:
        response = await client.get("/twin/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_ready_needs_the_access_token_and_says_nothing_without_it(bot: BotProcess) -> None:
    async with http(bot) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            response = await client.get("/twin/ready", headers=headers)
            assert response.status_code == 401 and response.json() == {"error": "unauthorized"}


async def test_ready_reports_the_model_the_store_and_the_onebot_connection(bot: BotProcess) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with http(bot) as client:
        waiting = await client.get("/twin/ready", headers=auth)
        assert waiting.status_code == 503  # no QQ side connected yet
        assert waiting.json()["onebot_connections"] == 0 and waiting.json()["model"] == "fake-twin"
        async with bot.client(self_id=OWNER):
            ready = await client.get("/twin/ready", headers=auth)
    body = ready.json()
    assert ready.status_code == 200 and body["ready"] is True
    assert body["store_writable"] is True and body["onebot_connections"] == 1
    assert body["sending"] == "ok" and body["last_retrain"] == "never"


def twin_health(bot: BotProcess, *args: str) -> subprocess.CompletedProcess:
    """`twin health` as a container's health check runs it: its own process, settings from the environment."""
    env = {**os.environ, "HOST": "0.0.0.0", "PORT": bot.settings["PORT"], "ONEBOT_ACCESS_TOKEN": TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "deploy", "health", *args],
        cwd=bot.cwd,
        env={**env, "PYTHONPATH": str(Path(__file__).parents[2])},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_twin_health_is_0_for_a_live_bot_and_ready_only_with_a_qq_side(bot: BotProcess) -> None:
    live = await asyncio.to_thread(twin_health, bot)
    assert (
        live.returncode == 0
        and live.stdout == f"healthy: http://127.0.0.1:{bot.settings['PORT']}/twin/health\n"
    )
    waiting = await asyncio.to_thread(twin_health, bot, "--ready")
    assert waiting.returncode == 1 and waiting.stdout.startswith("not ready (HTTP 503): model fake-twin")
    async with bot.client(self_id=OWNER):
        ready = await asyncio.to_thread(twin_health, bot, "--ready")
    assert ready.returncode == 0 and ready.stdout.startswith(
        "ready: model fake-twin, store writable, 1 OneBot"
    )
    assert TOKEN not in live.stdout + waiting.stdout + ready.stdout

"""`/twin/health` and `/twin/ready` over real HTTP against `bot.py`."""

from __future__ import annotations

from collections.abc import Iterator

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

"""Attacks on how the QQ side reaches the real `bot.py`: no or wrong token, HTTP POST, a
superuser account, secrets in the log. Replies come from the fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus

from deploy.onebot_client import BotProcess, OneBotClient, OneBotRefused, free_port, private_message_event
from tests.e2e.conftest import OWNER, SUPERUSER, TOKEN, running_bot, twin_status, wait_until
from tests.e2e.test_bot_openai import bot_settings, rows
from tests.fake_openai import FakeOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SECRET = "post-signing-secret-7f3a"
bot_running = contextlib.contextmanager(running_bot)  # a bot for one test: `with bot_running(...) as bot`
REFUSED_LINE = f"SUPERUSERS contains the bot's own account {SUPERUSER}: refusing the connection; remove it"


@pytest.fixture(scope="module")
def bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("transport")
    yield from running_bot(bot_settings(fake, home / "data" / "bot.db"), home)


def message_event(user_id: int, text: str, message_id: int) -> dict:
    return private_message_event(OWNER, user_id, [{"type": "text", "data": {"text": text}}], message_id)


async def post(url: str, event: dict, *, token: str | None = TOKEN, secret: str | None = None) -> int:
    """POST one event as a OneBot HTTP reporter would; returns the HTTP status."""
    body = json.dumps(event).encode()
    headers = {"Content-Type": "application/json", "X-Self-ID": str(OWNER)}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if secret is not None:
        headers["X-Signature"] = "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()

    def send() -> int:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    return await asyncio.to_thread(send)


def http_root(bot: BotProcess) -> str:
    return f"http://{bot.settings['HOST']}:{bot.settings['PORT']}"


async def handshake(url: str, headers: dict[str, str], event: dict) -> int:
    """Try the WebSocket handshake, sending `event` if it were accepted; the HTTP status (101: accepted)."""
    try:
        async with connect(url, additional_headers={"X-Self-ID": str(OWNER), **headers}) as ws:
            await ws.send(json.dumps(event))
            await asyncio.sleep(0.5)
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def stored(bot: BotProcess, chat: int) -> list[tuple]:
    return rows(Path(bot.settings["TWIN_DB"]), "SELECT origin, text FROM messages WHERE chat = ?", str(chat))


# ------------------------------------------------------------------------- the shared bot


async def test_a_websocket_without_exactly_the_token_is_refused_and_nothing_it_sends_counts(
    bot: BotProcess, qq: OneBotClient
) -> None:
    attempts = {
        "no token": (bot.url, {}),
        "wrong token": (bot.url, {"Authorization": "Bearer wrong"}),
        "token prefix": (bot.url, {"Authorization": f"Bearer {TOKEN[:-1]}"}),
        "no scheme": (bot.url, {"Authorization": TOKEN}),
        "query string": (f"{bot.url}?access_token={TOKEN}", {}),
        "root path": (bot.url.removesuffix("ws"), {}),
    }
    for number, (what, (url, headers)) in enumerate(attempts.items()):
        event = message_event(20600 + number, "在吗", 600 + number)
        assert await handshake(url, headers, event) in (401, 403), what
    await asyncio.sleep(1.0)
    for number in range(len(attempts)):
        assert stored(bot, 20600 + number) == [] and qq.replies(user_id=20600 + number) == []
    # the real client still works
    await qq.send_private(20699, "在吗")
    assert (await qq.wait_reply(user_id=20699, timeout=20))[0].text == "收到:在吗"


async def test_http_post_is_not_served_and_cannot_pause_the_twin(bot: BotProcess, qq: OneBotClient) -> None:
    for number, path in enumerate(("/onebot/v11/", "/onebot/v11/http", "/onebot/v11/http/")):
        url = http_root(bot) + path
        # the right token and a superuser: still nothing, because the route does not exist
        assert await post(url, message_event(SUPERUSER, "/twin pause", 700 + number)) in (404, 405)
        assert await post(url, message_event(20700, "在吗", 710 + number)) in (404, 405)
    assert "paused: no" in await twin_status(qq)
    await asyncio.sleep(0.5)
    assert stored(bot, 20700) == [] and qq.replies(user_id=20700) == []


async def test_an_account_that_is_its_own_superuser_is_refused(bot: BotProcess) -> None:
    with pytest.raises(OneBotRefused, match="403"):
        await OneBotClient(bot.url, token=TOKEN, self_id=SUPERUSER).connect()
    assert REFUSED_LINE in bot.log()


# ------------------------------------------------------------------------- bots of their own


async def test_http_post_when_enabled_needs_the_token_and_the_signature(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    settings = bot_settings(fake, tmp_path / "bot.db", TWIN_ONEBOT_HTTP_POST="true", ONEBOT_SECRET=SECRET)
    with bot_running(settings, tmp_path) as bot:
        url = http_root(bot) + "/onebot/v11/"
        async with bot.client(self_id=OWNER) as qq:  # where the twin's answers arrive
            pause = message_event(SUPERUSER, "/twin pause", 800)
            assert await post(url, pause) == 401  # no signature
            assert await post(url, pause, secret="not-the-secret") == 403
            assert await post(url, pause, token=None, secret=SECRET) == 403
            assert await post(url, pause, token="wrong", secret=SECRET) == 403
            assert "paused: no" in await twin_status(qq)

            assert await post(url, pause, secret=SECRET) == 204  # both: served
            assert "paused: yes" in await twin_status(qq)


async def test_http_post_without_a_signing_secret_refuses_to_start(fake: FakeOpenAI, tmp_path: Path) -> None:
    process = BotProcess(bot_settings(fake, tmp_path / "bot.db", TWIN_ONEBOT_HTTP_POST="true"), cwd=tmp_path)
    with pytest.raises(RuntimeError, match="bot exited"):
        process.start(timeout=60)
    assert "TWIN_ONEBOT_HTTP_POST=true needs ONEBOT_SECRET" in process.log()
    assert process.process is not None and process.process.returncode == 2
    assert "Traceback" not in process.log()


async def test_an_empty_token_is_generated_once_kept_owner_only_and_required(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    settings = bot_settings(fake, tmp_path / "store" / "bot.db", ONEBOT_ACCESS_TOKEN="", HOST="0.0.0.0")
    kept = tmp_path / "store" / "onebot-token"
    tokens = []
    for _ in range(2):  # the second start reuses the file
        with bot_running(settings, tmp_path) as bot:
            token = kept.read_text().strip()
            tokens.append(token)
            assert stat.S_IMODE(kept.stat().st_mode) == 0o600
            assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
            with pytest.raises(OneBotRefused, match=r"401|403"):
                await OneBotClient(bot.url, token=None, self_id=OWNER).connect()
            assert bot.token == token
            # passed to NoneBot directly: not in the environment a retrain child inherits
            assert token not in "".join(psutil.Process(bot.process.pid).environ().values())
            async with bot.client(self_id=OWNER) as qq:
                assert "paused: no" in await twin_status(qq)
    log = bot.log()
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 40
    assert f"generated a token, kept owner-only in {kept}" in log
    assert f"using the token kept owner-only in {kept}" in log
    assert tokens[0] not in log


async def test_no_secret_reaches_the_log_even_at_debug(fake: FakeOpenAI, tmp_path: Path) -> None:
    secrets = {
        "ONEBOT_ACCESS_TOKEN": "dotenv-token-5b9e1c",
        "TWIN_DB_KEY": "dotenv-db-key-77aa",
        "ONEBOT_SECRET": "dotenv-signing-secret-31",
        "TWIN_OPENAI_API_KEY": "sk-environment-key-0c4d",  # from the environment, not .env
        "BACKUP_PASSWORD": "environment-password-9e",
    }
    dotenv = ("ONEBOT_ACCESS_TOKEN", "TWIN_DB_KEY", "ONEBOT_SECRET")
    (tmp_path / ".env").write_text("".join(f"{name}={secrets[name]}\n" for name in dotenv))
    settings = bot_settings(fake, tmp_path / "bot.db", LOG_LEVEL="DEBUG")
    del settings["ONEBOT_ACCESS_TOKEN"]  # the .env one is used
    settings |= {name: value for name, value in secrets.items() if name not in dotenv}
    token = secrets["ONEBOT_ACCESS_TOKEN"]
    with bot_running(settings, tmp_path) as bot:
        async with OneBotClient(bot.url, token=token, self_id=OWNER) as qq:
            await qq.send_private(20900, "在吗")
            assert (await qq.wait_reply(user_id=20900, timeout=20))[0].text == "收到:在吗"
            assert "paused: no" in await twin_status(qq)
        # secrets in a request line (uvicorn logs the path) and in a refused header
        await handshake(f"{bot.url}?access_token={token}", {}, message_event(20901, "x", 901))
        await handshake(bot.url, {"Authorization": f"Bearer {secrets['TWIN_DB_KEY']}"}, {})
    log = bot.log()
    assert "Loaded Config" in log and "'onebot_access_token': '***'" in log  # NoneBot's dump, masked
    assert "在吗" in log  # DEBUG really was on: message text is logged
    for name, value in secrets.items():
        assert value not in log, name


async def test_forward_websocket_dials_with_the_token_and_serves(fake: FakeOpenAI, tmp_path: Path) -> None:
    """ONEBOT_WS_URLS: the QQ side is the server; the bot dials it with its (generated) token."""
    dialed: list[str | None] = []
    answers: list[dict] = []

    async def qq_side(ws: ServerConnection) -> None:  # NapCat's WebSocket server, in short
        dialed.append(ws.request.headers.get("Authorization"))
        lifecycle = {"post_type": "meta_event", "meta_event_type": "lifecycle", "sub_type": "connect"}
        await ws.send(json.dumps({"time": int(time.time()), "self_id": OWNER, **lifecycle}))
        await ws.send(json.dumps(message_event(SUPERUSER, "/twin status", 950)))
        async for frame in ws:
            request = json.loads(frame)
            answers.append(request.get("params") or {})
            await ws.send(json.dumps({"status": "ok", "retcode": 0, "data": {"message_id": 951},
                                      "echo": request.get("echo")}))  # fmt: skip

    port = free_port()
    settings = bot_settings(
        fake, tmp_path / "bot.db", ONEBOT_ACCESS_TOKEN="", ONEBOT_WS_URLS=f'["ws://127.0.0.1:{port}"]'
    )
    server = await serve(qq_side, "127.0.0.1", port)
    with bot_running(settings, tmp_path) as bot:
        await wait_until(lambda: any(a.get("user_id") == SUPERUSER for a in answers), 20, interval=0.1)
        server.close()  # before the bot stops: NoneBot waits for a live forward connection
        await server.wait_closed()
        token = bot.token
    assert token and dialed[0] == f"Bearer {token}"
    assert any("paused: no" in json.dumps(a, ensure_ascii=False) for a in answers)

"""The operator console in-process, for HTTP-level tests: a real Twin (scripted backend, real
store) behind the real console app, reached through httpx's ASGI transport on the test's loop."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from starlette.applications import Starlette

from bot.accounts import Account, Accounts
from bot.config import Config
from bot.console.app import mount
from bot.console.web import PREFIX, ConsoleSource
from bot.runtime import Twin
from tests.bot_helpers import ScriptedBackend

PASSWORD = "correct horse battery"
BASE = "http://testserver"
ORIGIN = {"Origin": BASE}


class Reports:
    """What the console told the superusers (a retrain's outcome)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, account: Account):
        async def tell(text: str) -> None:
            self.lines.append(text)

        return tell


@asynccontextmanager
async def console_client(
    tmp_path: Path, *, twin: Twin | None = None, connected: set[str] | None = None, **settings: object
) -> AsyncIterator[tuple[httpx.AsyncClient, Twin]]:
    """A started twin (unless given) and a client for its console; both closed afterwards."""
    if twin is None:
        quiet = {"twin_burst_window": 0, "twin_typing_delay": 0, "twin_typing_per_char": 0}
        config = Config(twin_db=tmp_path / "bot.db", **{**quiet, **settings})
        twin = Twin(config, nicknames=["小明"], backend=ScriptedBackend())
        await twin.start()
    accounts = Accounts([Account("", twin, frozenset({"42"}))], several=False)
    source = ConsoleSource(
        accounts=lambda: accounts,
        connected=lambda: set(connected or {"10000"}),
        report=Reports(),
        config=lambda: twin.config,
    )
    server = Starlette()  # as the bot's own server: the console mounted at /twin/console
    app = mount(server, source, PASSWORD, 12)
    transport = httpx.ASGITransport(app=server, client=("127.0.0.1", 50000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url=BASE + PREFIX) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client, twin
    finally:
        await twin.close()


def field(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no {name} field in the page"
    return match.group(1)


async def login(client: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    page = await client.get("/login")
    return await client.post(
        "/login", data={"login_csrf": field(page.text, "login_csrf"), "password": password}, headers=ORIGIN
    )


async def csrf(client: httpx.AsyncClient, path: str = "/") -> str:
    """The session's CSRF token, as a page's forms carry it."""
    return field((await client.get(path)).text, "csrf")


async def post(client: httpx.AsyncClient, path: str, **fields: str) -> httpx.Response:
    """A form posted from a console page: the session's CSRF token and the page's origin."""
    token = await csrf(client)
    return await client.post(path, data={"csrf": token, **fields}, headers=ORIGIN)

"""The operator console in-process, for HTTP-level tests: a real Twin (scripted backend, real
store) behind the real console app, reached through httpx's ASGI transport on the test's loop."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from starlette.applications import Starlette

from bot.accounts import Account, Accounts
from bot.backends import Backend
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


QUIET = {"twin_burst_window": 0, "twin_typing_delay": 0, "twin_typing_per_char": 0}


@asynccontextmanager
async def serve(
    accounts: Accounts, config: Config, connected: set[str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the console over these running accounts (closed afterwards; the twins are not)."""
    source = ConsoleSource(
        accounts=lambda: accounts,
        connected=lambda: set(connected or {"10000"}),
        report=Reports(),
        config=lambda: config,
    )
    server = Starlette()  # as the bot's own server: the console mounted at /twin/console
    app = mount(server, source, PASSWORD, 12)
    transport = httpx.ASGITransport(app=server, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url=BASE + PREFIX) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


@asynccontextmanager
async def console_client(
    tmp_path: Path, *, twin: Twin | None = None, connected: set[str] | None = None, **settings: object
) -> AsyncIterator[tuple[httpx.AsyncClient, Twin]]:
    """A started twin (unless given) and a client for its console; both closed afterwards."""
    if twin is None:
        config = Config(twin_db=tmp_path / "bot.db", **{**QUIET, **settings})
        twin = Twin(config, nicknames=["小明"], backend=ScriptedBackend())
        await twin.start()
    accounts = Accounts([Account("", twin, frozenset({"42"}))], several=False)
    try:
        async with serve(accounts, twin.config, connected) as client:
            yield client, twin
    finally:
        await twin.close()


@asynccontextmanager
async def accounts_client(
    tmp_path: Path,
    configs: Sequence[Config] | None = None,
    *,
    connected: set[str] | None = None,
    backend: Callable[[Config], Backend] = lambda _: ScriptedBackend(),
) -> AsyncIterator[tuple[httpx.AsyncClient, list[Account]]]:
    """Several accounts in one process, as `TWIN_ACCOUNTS` makes them: a started twin (own store)
    per config (default: QQ 10001 and 10002), one console over them; all closed afterwards."""
    if configs is None:
        configs = [Config(twin_account=qq, twin_db=tmp_path / f"{qq}.db", **QUIET) for qq in (10001, 10002)]
    started: list[Account] = []
    try:
        for config in configs:
            twin = Twin(config, nicknames=["小明"], backend=backend(config))
            started.append(Account(str(config.twin_account), twin, frozenset({"42"})))
            await twin.start()
        process = configs[0]
        async with serve(Accounts(started, several=True), process, connected) as client:
            yield client, started
    finally:
        for account in started:
            await account.twin.close()


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

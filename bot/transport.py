"""How the QQ side reaches the bot, hardened for a real QQ account.

- Never without a token: an empty `ONEBOT_ACCESS_TOKEN` is replaced, before NoneBot starts, by
  one generated once and kept owner-only beside the store (`<dir of TWIN_DB>/onebot-token`),
  handed to `nonebot.init` (not the environment, which child processes inherit).
- Only the reverse WebSocket is served; OneBot's HTTP POST routes exist only with
  `TWIN_ONEBOT_HTTP_POST=true`, and then need both the token and `ONEBOT_SECRET`'s signature
  (the stock adapter checks no token on HTTP POST).
- Tokens are compared in constant time, and a QQ account that is itself in `SUPERUSERS` (or,
  with several accounts, in any account's `TWIN_SUPERUSERS`) is refused: everyone who messages
  it could otherwise give the twin orders.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from nonebot import get_adapters, get_driver, get_plugin_config
from nonebot.adapters.onebot.utils import get_auth_bearer
from nonebot.adapters.onebot.v11 import Adapter, Bot
from nonebot.adapters.onebot.v11.config import Config as OneBotConfig
from nonebot.adapters.onebot.v11.utils import log
from nonebot.drivers import HTTPServerSetup, Request, Response, WebSocket
from nonebot.utils import escape_tag
from typing_extensions import override

from bot.config import DEFAULT_DB, Config, env_files
from pipeline.files import write_text_atomic

TOKEN_FILE_NAME = "onebot-token"
TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 43 characters
# The adapter reads its token under either name; the `v11` alias wins when both are set.
TOKEN_SETTINGS = ("onebot_v11_access_token", "onebot_access_token")
MIN_EXPOSED_TOKEN_LENGTH = 16
GENERATE_HINT = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


class TokenFileError(RuntimeError):
    """The kept token file cannot be trusted or read; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class AccessToken:
    """The token the bot requires, and where it is kept when the bot generated it."""

    value: str
    file: Path | None = None  # None: configured in the environment or `.env`
    created: bool = False

    def nonebot_settings(self) -> dict[str, str]:
        """Keyword arguments for `nonebot.init`: they win over the environment and `.env`, under both
        names the adapter reads, and stay out of the environment that child processes inherit."""
        return {} if self.file is None else dict.fromkeys(TOKEN_SETTINGS, self.value)

    def describe(self) -> str:
        """One line for the log: where the token is (never the token itself)."""
        done = "generated a token, kept" if self.created else "using the token kept"
        return (
            f"qq-twin: ONEBOT_ACCESS_TOKEN is empty: {done} owner-only in {self.file}; give the QQ side "
            "that file's content as its token (NapCat: WebSocket client → Token)"
        )


# ------------------------------------------------------------------------- settings, before NoneBot


def settings_layers(environ: Mapping[str, str], cwd: Path = Path()) -> list[dict[str, str | None]]:
    """Where NoneBot reads settings, lowest priority first: `.env`, `.env.{ENVIRONMENT}`, the
    environment; names lower-cased as NoneBot compares them."""
    base, specific = env_files(environ, cwd)
    return [_dotenv(base), _dotenv(specific), {name.lower(): value for name, value in environ.items()}]


def account_layers(settings: Mapping[str, str | None], cwd: Path = Path()) -> list[dict[str, str | None]]:
    """The account files of `TWIN_ACCOUNTS` as read before NoneBot starts, so that their secrets
    (`TWIN_DB_KEY`…) are masked in the log too; they are checked later (`bot.config.load_accounts`)."""
    try:
        files = json.loads(settings.get("twin_accounts") or "[]")
    except ValueError:
        return []
    layers = []
    for name in files if isinstance(files, list) else []:
        try:
            layers.append(_dotenv(cwd / str(name)))
        except (OSError, UnicodeDecodeError):  # reported in one line once the plugin checks it
            continue
    return layers


def merge_layers(layers: Sequence[Mapping[str, str | None]]) -> dict[str, str | None]:
    merged: dict[str, str | None] = {}
    for layer in layers:
        merged.update(layer)
    return merged


def _dotenv(path: Path) -> dict[str, str | None]:
    if not path.is_file():
        return {}
    return {name.lower(): value for name, value in dotenv_values(path, encoding="utf-8").items()}


def configured_token(settings: Mapping[str, str | None]) -> str:
    """The access token NoneBot's OneBot adapter will use ("" when none is set)."""
    for name in TOKEN_SETTINGS:
        if name in settings:
            return (settings[name] or "").strip()
    return ""


def token_file(settings: Mapping[str, str | None]) -> Path:
    """Where a generated token is kept: beside the conversation store (`TWIN_DB`)."""
    return Path(settings.get("twin_db") or DEFAULT_DB).expanduser().parent / TOKEN_FILE_NAME


def read_token_file(path: Path) -> str | None:
    """The token kept in `path` (None when there is none); refuses a file others could read or plant."""
    try:
        # Never follow a planted link; never hang on a planted FIFO.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symbolic link
        raise TokenFileError(f"{path}: {exc.strerror}; delete it and a new token is generated") from None
    with os.fdopen(fd, encoding="utf-8") as file:
        info = os.fstat(file.fileno())
        mode = stat.S_IMODE(info.st_mode)
        foreign = hasattr(os, "geteuid") and info.st_uid != os.geteuid()
        if not stat.S_ISREG(info.st_mode) or foreign or (os.name == "posix" and mode & 0o077):
            raise TokenFileError(
                f"{path} must be a regular file of yours with mode 0600 (it is {mode:04o}): "
                "refusing a token others could read; delete it and a new token is generated"
            )
        return file.read().strip() or None


def write_token_file(path: Path) -> str:
    """A new random token, written owner-only (0600 file; its directory created 0700) and returned."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    write_text_atomic(path, token + "\n")
    return token


def bootstrap_access_token(settings: Mapping[str, str | None]) -> AccessToken:
    """The token the bot will require: the configured one, else the kept one (generated the first time)."""
    configured = configured_token(settings)
    if configured:
        return AccessToken(configured)
    path = token_file(settings)
    value = read_token_file(path)
    if value is not None:
        return AccessToken(value, path)
    return AccessToken(write_token_file(path), path, created=True)


def kept_token(settings: Mapping[str, str | None]) -> str | None:
    """The token a bot with these settings generated and kept, if any (for `twin simulate`, tests)."""
    try:
        return read_token_file(token_file(settings))
    except TokenFileError:
        return None


# ------------------------------------------------------------------------- checks at start


def is_loopback(host: str) -> bool:
    """127.0.0.1, ::1, localhost: reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def transport_problem(host: str, token: str, *, http_post: bool, secret: str) -> str | None:
    """What is wrong with how the QQ side would connect, as one line (None when all is well)."""
    if not token:
        return "ONEBOT_ACCESS_TOKEN is empty: refusing to serve without authentication (start with bot.py)"
    if not is_loopback(host) and len(token) < MIN_EXPOSED_TOKEN_LENGTH:
        return (
            f"HOST {host} is not loopback and ONEBOT_ACCESS_TOKEN has only {len(token)} characters: "
            f"refusing to start; use at least {MIN_EXPOSED_TOKEN_LENGTH} ({GENERATE_HINT}), "
            "or leave it empty and the bot generates one"
        )
    if http_post and not secret:
        return (
            "TWIN_ONEBOT_HTTP_POST=true needs ONEBOT_SECRET (the QQ side signs each POST with it): "
            "refusing to start"
        )
    return None


def adapter_problem(adapters: Iterable[object]) -> str | None:
    """The OneBot v11 adapter registered must be the hardened one: NoneBot's stock adapter (as
    `nb run` without bot.py would register it) checks no QQ side's account, hostile payloads or
    the token as this one does."""
    for adapter in adapters:
        if isinstance(adapter, Adapter) and not isinstance(adapter, HardenedAdapter):
            return (
                "the OneBot V11 adapter is NoneBot's stock one, not qq-twin's hardened adapter: "
                "start the bot with `python bot.py` or `twin serve`"
            )
    return None


def startup_problem() -> str | None:
    """`adapter_problem` and `transport_problem` for the running NoneBot."""
    problem = adapter_problem(get_adapters().values())
    if problem:
        return problem
    onebot = get_plugin_config(OneBotConfig)
    return transport_problem(
        str(get_driver().config.host),
        onebot.onebot_access_token or "",
        http_post=get_plugin_config(Config).twin_onebot_http_post,
        secret=onebot.onebot_secret or "",
    )


# ------------------------------------------------------------------------- the adapter


class OwnAccountIsSuperuser(PermissionError):
    """The connecting QQ account is in SUPERUSERS."""


# Known once the twins started, before anyone can connect: every account's superusers
# (TWIN_SUPERUSERS; SUPERUSERS itself the adapter reads from NoneBot's settings), and the QQ
# numbers served (empty: whichever connects).
_account_superusers: frozenset[str] = frozenset()
_served_accounts: frozenset[str] = frozenset()


def set_accounts(served: Iterable[str], superusers: Iterable[str]) -> None:
    """The accounts this process serves, and their superusers, refused as the connecting account."""
    global _account_superusers, _served_accounts
    _served_accounts, _account_superusers = frozenset(served), frozenset(superusers)


class HardenedAdapter(Adapter):
    """NoneBot's OneBot v11 adapter (same name, events and API) that serves the reverse WebSocket
    only, requires the token everywhere, and refuses an account that is its own superuser."""

    @override
    def __init__(self, driver: Any, **kwargs: Any) -> None:
        self.transport_config = get_plugin_config(Config)  # the stock __init__ sets up routes
        super().__init__(driver, **kwargs)

    @override
    def setup_http_server(self, setup: HTTPServerSetup) -> None:
        # Not served at all (404) unless asked for: the stock handler checks no token.
        if self.transport_config.twin_onebot_http_post:
            super().setup_http_server(setup)

    @override
    def _check_access_token(self, request: Request) -> Response | None:
        expected = self.onebot_config.onebot_access_token or ""
        given = get_auth_bearer(request.headers.get("authorization")) or ""
        if expected and hmac.compare_digest(given.encode(), expected.encode()):
            return None
        message = "Authorization Header is invalid" if given else "Missing Authorization Header"
        log("WARNING", message)
        return Response(403, content=message)

    def _own_account_refused(self, self_id: str) -> bool:
        superusers = self.config.superusers
        if self_id in superusers or f"onebot:{self_id}" in superusers:
            where = "SUPERUSERS"
        elif self_id in _account_superusers:
            where = "an account's TWIN_SUPERUSERS"
        else:
            return False
        account = escape_tag(self_id)
        log("ERROR", f"{where} contains the bot's own account {account}: refusing the connection; remove it")
        return True

    @override
    async def _handle_ws(self, websocket: WebSocket) -> None:
        # The token first, so that nobody unauthenticated learns anything or fills the log.
        refused = self._check_access_token(websocket.request)
        self_id = websocket.request.headers.get("x-self-id") or ""
        if refused is not None or self._own_account_refused(self_id):
            await websocket.close(1008, "refused")  # before accept: the handshake gets HTTP 403
            return
        await super()._handle_ws(websocket)

    @override
    async def _handle_http(self, request: Request) -> Response:
        if not self.onebot_config.onebot_secret:  # the bot refuses to start like this; never serve it
            return Response(403, content="HTTP POST needs ONEBOT_SECRET")
        refused = self._check_access_token(request)
        if refused is not None:
            return refused
        if self._own_account_refused(request.headers.get("x-self-id") or ""):
            return Response(403, content="refused")
        return await super()._handle_http(request)  # X-Self-ID and the X-Signature HMAC

    @override
    def bot_connect(self, bot: Bot) -> None:
        # Forward WebSockets learn the account only from the first event: refuse it here too.
        if bot.self_id not in self.bots and self._own_account_refused(bot.self_id):
            raise OwnAccountIsSuperuser(f"SUPERUSERS contains the bot's own account {bot.self_id}")
        if _served_accounts and bot.self_id not in _served_accounts:  # its events reach no twin
            account = escape_tag(bot.self_id)
            log("WARNING", f"QQ account {account} connected, but no account file names it: ignored")
        super().bot_connect(bot)

    @override
    def bot_disconnect(self, bot: Bot) -> None:
        if self.bots.get(bot.self_id) is bot:  # a refused bot never connected
            super().bot_disconnect(bot)

"""The console's web plumbing: routes that need a login, forms that need a CSRF token, rendering.

Page modules (`bot/console/pages/`) declare their routes with `@page(path)` (GET, renders) and
`@action(path)` (POST from a form: login and CSRF checked, the handler returns one line shown on
the next page, then the browser is sent back where it came from). Every change goes through
`View.admin`, which runs the same admin verb as `/twin …` in chat (`bot/admin.py`).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from bot.admin import run_admin
from bot.console.auth import LoginThrottle, Session, Sessions, csrf_matches

if TYPE_CHECKING:
    from bot.accounts import Account, Accounts
    from bot.config import Config
    from bot.runtime import Twin

PREFIX = "/twin/console"
COOKIE = "twin_console"
LOGIN_COOKIE = "twin_console_login"  # the login form's own CSRF token, before any session
MAX_FORM_BYTES = 64 * 1024
TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
# No script at all, styles and images from here only (plots are data: SVG images).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(slots=True)
class ConsoleSource:
    """What the console reads from the running bot (handlers.py supplies it)."""

    accounts: Callable[[], Accounts | None]
    connected: Callable[[], set[str]]  # the QQ numbers with an open OneBot connection
    report: Callable[[Account], Callable[[str], Awaitable[None]]]  # tells an account's superusers
    config: Callable[[], Config]  # the process's settings (the console's own among them)
    next_retrain: Callable[[Account], str | None] = lambda _: None  # the schedule's next run, if any


def templates() -> Environment:
    """The console's Jinja2 environment: autoescaped, `prefix` global (imported macros see no context)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True), enable_async=False
    )
    env.globals["prefix"] = PREFIX
    return env


@dataclass(slots=True)
class Console:
    source: ConsoleSource
    password: str
    sessions: Sessions
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    env: Environment = field(default_factory=templates)


Handler = Callable[["View"], Awaitable[Response]]
ActionHandler = Callable[["View", "Form"], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Route:
    path: str  # below PREFIX, e.g. "/conversations"
    method: str
    handler: Callable[..., Awaitable[Any]]


ROUTES: list[Route] = []
# The pages in the menu, in this order: (path, 中文, English).
MENU = ("/", "/conversations", "/learning", "/versions", "/settings")
NAV: list[tuple[str, str, str]] = []


def page(path: str, nav: tuple[str, str] | None = None) -> Callable[[Handler], Handler]:
    """A GET page behind the login; `nav` = (中文, English) puts it in the menu (at its place in MENU)."""

    def register(handler: Handler) -> Handler:
        ROUTES.append(Route(path, "GET", handler))
        if nav is not None:
            NAV.append((path, *nav))
            NAV.sort(key=lambda entry: MENU.index(entry[0]) if entry[0] in MENU else len(MENU))
        return handler

    return register


def action(path: str) -> Callable[[ActionHandler], ActionHandler]:
    """A POST action behind the login and the CSRF token; returns the line to show next."""

    def register(handler: ActionHandler) -> ActionHandler:
        ROUTES.append(Route(path, "POST", handler))
        return handler

    return register


class Form:
    """A posted form's fields (application/x-www-form-urlencoded), first value of each."""

    def __init__(self, fields: Mapping[str, list[str]]) -> None:
        self._fields = fields

    def get(self, name: str, default: str = "") -> str:
        values = self._fields.get(name)
        return values[0] if values else default

    def __contains__(self, name: str) -> bool:
        return name in self._fields


async def read_form(request: Request) -> Form | None:
    """The posted form, or None when it is too big or not a form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        return None
    return Form(fields)


def secured(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def same_origin(request: Request) -> bool:
    """A browser's POST names where the form was: it must be this server (a second line of
    defence behind SameSite=Strict and the CSRF token). No Origin/Referer at all: not a browser
    form of ours either."""
    claimed = request.headers.get("origin") or request.headers.get("referer")
    if not claimed or claimed == "null":
        return False
    parts = urlsplit(claimed)
    return parts.netloc.lower() == request.headers.get("host", "").lower()


def client_of(request: Request) -> str:
    return request.client.host if request.client is not None else "?"


def safe_back(target: str, fallback: str) -> str:
    """Only a console path of this server is a place to go back to after an action."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith(PREFIX + "/") or "\\" in target:
        return fallback
    if "//" in parts.path or any(ord(c) < 32 for c in target):
        return fallback
    return target


def svg_image(svg: str) -> str:
    """An SVG as an <img src> value (no inline styles or scripts reach the page)."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


@dataclass(slots=True)
class View:
    """One request to a page or action: who is logged in, which account it is about."""

    console: Console
    request: Request
    session: Session
    account: Account
    accounts: list[Account]

    @property
    def twin(self) -> Twin:
        return self.account.twin

    @property
    def query(self) -> Mapping[str, str]:
        return self.request.query_params

    def url(self, path: str, **params: object) -> str:
        """A console URL for this account (`path` below /twin/console)."""
        shown = {"account": self.account.self_id} if len(self.accounts) > 1 else {}
        shown.update({k: str(v) for k, v in params.items() if v is not None and v != ""})
        return f"{PREFIX}{path}" + (f"?{urlencode(shown)}" if shown else "")

    def render(self, template: str, **values: object) -> Response:
        flash, self.session.flash = self.session.flash, []
        html = self.console.env.get_template(template).render(
            view=self,
            nav=NAV,
            prefix=PREFIX,
            csrf=self.session.csrf,
            flash=flash,
            here=self.request.url.path,
            back=self.back_here(),
            **values,
        )
        return secured(HTMLResponse(html))

    def back_here(self) -> str:
        query = f"?{self.request.url.query}" if self.request.url.query else ""
        return f"{self.request.url.path}{query}"

    async def admin(
        self, *words: str, quoted: str | None = None, quoted_chat: tuple[str, str] | None = None
    ) -> str:
        """Run `/twin <words…>` for this account exactly as a superuser in chat would."""
        return await run_admin(
            self.twin,
            list(words),
            chat=None,
            user="console",
            quoted=quoted,
            report=self.console.source.report(self.account),
            quoted_chat=quoted_chat,
        )


def _pick_account(accounts: list[Account], wanted: str | None) -> Account | None:
    if not accounts:
        return None
    if not wanted:
        return accounts[0]
    return next((a for a in accounts if a.self_id == wanted), None)


def _account_problem(in_url: str, in_form: str, *, several: bool) -> str | None:
    """Why an action may not run: with several accounts it must name one, and the address and
    the form may not name two different ones (one operator session acts on every account, so
    the account acted on is only ever the one the form was made for)."""
    if in_url and in_form and in_url != in_form:
        return "refused: the address and the form name different accounts / 账号不一致"
    if several and not (in_url or in_form):
        return "refused: the form names no account / 未指定账号"
    return None


def _running(console: Console) -> list[Account]:
    running = console.source.accounts()
    return [a for a in running if a.twin.store is not None] if running is not None else []


async def dispatch(console: Console, route: Route, request: Request) -> Response:
    """Check the login (and for actions the CSRF token and origin), then run the handler."""
    session = console.sessions.get(request.cookies.get(COOKIE))
    if route.method == "GET":
        if session is None:
            return secured(RedirectResponse(f"{PREFIX}/login", status_code=303))
    else:
        if session is None:
            return secured(PlainTextResponse("not logged in", status_code=403))
        form = await read_form(request)
        if form is None or not csrf_matches(session, form.get("csrf")) or not same_origin(request):
            return secured(PlainTextResponse("refused: bad or missing CSRF token", status_code=403))
    accounts = _running(console)
    wanted = request.query_params.get("account", "")
    if route.method == "POST":
        problem = _account_problem(wanted, form.get("account"), several=len(accounts) > 1)
        if problem is not None:
            return secured(PlainTextResponse(problem, status_code=400))
        wanted = wanted or form.get("account")
    account = _pick_account(accounts, wanted)
    if account is None:
        text = "qq-twin is not running" if not accounts else "no such account"
        return secured(PlainTextResponse(text, status_code=503 if not accounts else 404))
    view = View(console, request, session, account, accounts)
    if route.method == "GET":
        return await route.handler(view)
    message = await route.handler(view, form)
    if message:
        # One session's answers, whichever account they were about: say which.
        session.flash.append(f"{account.self_id}: {message}" if len(accounts) > 1 else message)
    return secured(RedirectResponse(safe_back(form.get("back"), view.url("/")), status_code=303))


def login_token() -> str:
    return secrets.token_urlsafe(24)

"""The console as an ASGI app, mounted at /twin/console on the bot's own FastAPI server."""

from __future__ import annotations

import logging
from functools import partial

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route as StarletteRoute

from bot.console import pages  # noqa: F401  (the pages register their routes on import)
from bot.console.auth import LoginThrottle, Sessions, csrf_matches, password_matches, tokens_match
from bot.console.web import (
    COOKIE,
    LOGIN_COOKIE,
    PREFIX,
    ROUTES,
    STATIC,
    Console,
    ConsoleSource,
    client_of,
    dispatch,
    login_token,
    read_form,
    same_origin,
    secured,
)

log = logging.getLogger(__name__)
STATIC_FILES = {"console.css": "text/css"}


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def create_app(source: ConsoleSource, password: str, session_hours: float) -> Starlette:
    """The console app; `password` is the operator's (checked to be usable before this)."""
    console = Console(source, password, Sessions(session_hours * 3600), LoginThrottle())

    def login_page(request: Request, problem: str = "", status: int = 200) -> Response:
        token = login_token()
        html = console.env.get_template("login.html").render(
            prefix=PREFIX, login_csrf=token, problem=problem, nav=[], view=None
        )
        response = secured(HTMLResponse(html, status_code=status))
        _cookie(response, request, LOGIN_COOKIE, token, 3600)
        return response

    async def show_login(request: Request) -> Response:
        if console.sessions.get(request.cookies.get(COOKIE)) is not None:
            return secured(RedirectResponse(f"{PREFIX}/", status_code=303))
        return login_page(request)

    async def do_login(request: Request) -> Response:
        client = client_of(request)
        wait = console.throttle.retry_after(client)
        if wait:
            response = login_page(
                request, f"too many failed logins; try again in {wait}s / 登录失败太多，请稍后再试", 429
            )
            response.headers["Retry-After"] = str(wait)
            return response
        form = await read_form(request)
        expected = request.cookies.get(LOGIN_COOKIE) or ""
        if (
            form is None
            or not same_origin(request)
            or not expected
            or not tokens_match(form.get("login_csrf"), expected)
        ):
            return login_page(
                request, "the login form expired; please try again / 登录表单已过期，请重试", 403
            )
        if not password_matches(form.get("password"), console.password):
            console.throttle.failed(client)
            log.warning("console: failed login from %s", client)
            return login_page(request, "wrong password / 密码错误", 401)
        console.throttle.succeeded(client)
        session = console.sessions.create()
        log.info("console: operator logged in from %s", client)
        response = secured(RedirectResponse(f"{PREFIX}/", status_code=303))
        _cookie(response, request, COOKIE, session.id, int(console.sessions.lifetime))
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return response

    async def do_logout(request: Request) -> Response:
        session = console.sessions.get(request.cookies.get(COOKIE))
        form = await read_form(request)
        if (
            session is None
            or form is None
            or not csrf_matches(session, form.get("csrf"))
            or not same_origin(request)
        ):
            return secured(PlainTextResponse("refused", status_code=403))
        console.sessions.end(session.id)
        response = secured(RedirectResponse(f"{PREFIX}/login", status_code=303))
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return secured(PlainTextResponse("not found", status_code=404))
        response = FileResponse(STATIC / name, media_type=STATIC_FILES[name])
        response.headers["Cache-Control"] = "no-cache"
        for header in ("Content-Security-Policy", "X-Content-Type-Options"):
            response.headers[header] = secured(Response()).headers[header]
        return response

    async def not_found(request: Request, exc: Exception) -> Response:
        return secured(PlainTextResponse("not found", status_code=404))

    routes = [
        StarletteRoute("/login", show_login, methods=["GET"]),
        StarletteRoute("/login", do_login, methods=["POST"]),
        StarletteRoute("/logout", do_logout, methods=["POST"]),
        StarletteRoute("/static/{name}", static, methods=["GET"]),
    ]
    for route in ROUTES:
        routes.append(StarletteRoute(route.path, partial(dispatch, console, route), methods=[route.method]))
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.console = console
    return app


def mount(server_app: Starlette, source: ConsoleSource, password: str, session_hours: float) -> Starlette:
    """Serve the console on the bot's server under /twin/console."""
    app = create_app(source, password, session_hours)

    async def to_console(_: Request) -> Response:
        return secured(RedirectResponse(f"{PREFIX}/", status_code=307))

    server_app.add_route(PREFIX, to_console, methods=["GET"])
    server_app.mount(PREFIX, app, name="twin-console")
    return app

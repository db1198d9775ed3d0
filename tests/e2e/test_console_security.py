"""The operator console's gatekeeping over real HTTP against `bot.py` processes: nothing without a
login, no state change without the session's CSRF token from this very server, sessions that only
their own bot instance knows, a throttled login, and a console that is off unless asked for."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bot.console.web import COOKIE, PREFIX
from deploy.onebot_client import BotProcess
from tests.console_helpers import field
from tests.e2e.conftest import TOKEN, running_bot
from tests.e2e.test_bot_openai import bot_settings
from tests.fake_openai import FakeOpenAI

pytestmark = pytest.mark.e2e

PASSWORD = "e2e-console-password-4711"
PAGES = ["/", "/conversations", "/learning", "/versions", "/settings"]
PAGES_WITH_QUERIES = [
    *PAGES,
    "/?account=10000",
    "/conversations?chat=c2c:20001&before=5",
    "/conversations?q=%25&chat=group:300",
    "/versions?version=v0001",
]
ACTIONS = [
    "/pause",
    "/resume",
    "/probability",
    "/approve",
    "/unapprove",
    "/exclude",
    "/include",
    "/block",
    "/unblock",
    "/retrain",
    "/promote",
    "/rollback",
    "/samples",
    "/logout",
]


def console_settings(fake: FakeOpenAI, home: Path, **extra: str) -> dict[str, str]:
    return bot_settings(
        fake, home / "data" / "bot.db", TWIN_CONSOLE="true", TWIN_CONSOLE_PASSWORD=PASSWORD, **extra
    )


@pytest.fixture(scope="module")
def bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("console")
    yield from running_bot(console_settings(fake, home), home)


@pytest.fixture(scope="module")
def other(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    """A second bot instance with the same password (its throttle test fails logins there)."""
    home = tmp_path_factory.mktemp("console-other")
    yield from running_bot(console_settings(fake, home), home)


def base(bot: BotProcess) -> str:
    return f"http://127.0.0.1:{bot.settings['PORT']}"


def browser(bot: BotProcess, **kwargs: object) -> httpx.Client:
    """A client at the bot's console that keeps cookies, as a browser would, and follows no redirect."""
    return httpx.Client(base_url=base(bot) + PREFIX, timeout=15, **kwargs)  # type: ignore[arg-type]


def origin(bot: BotProcess) -> dict[str, str]:
    return {"Origin": base(bot)}


def log_in(client: httpx.Client, bot: BotProcess, password: str = PASSWORD) -> httpx.Response:
    page = client.get("/login")
    assert page.status_code == 200
    return client.post(
        "/login",
        data={"login_csrf": field(page.text, "login_csrf"), "password": password},
        headers=origin(bot),
    )


@contextmanager
def logged_in(bot: BotProcess) -> Iterator[httpx.Client]:
    with browser(bot) as client:
        answer = log_in(client, bot)
        assert answer.status_code == 303 and answer.headers["location"] == f"{PREFIX}/"
        yield client


def csrf_of(client: httpx.Client) -> str:
    return field(client.get("/").text, "csrf")


def paused(bot: BotProcess) -> bool:
    ready = httpx.get(f"{base(bot)}/twin/ready", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    return ready.json()["paused"]


def refused_to_login(response: httpx.Response) -> bool:
    return response.status_code == 303 and response.headers["location"] == f"{PREFIX}/login"


@pytest.mark.parametrize("path", PAGES_WITH_QUERIES)
def test_every_page_sends_a_stranger_to_the_login_and_shows_nothing(bot: BotProcess, path: str) -> None:
    with browser(bot) as client:
        response = client.get(path)
    assert refused_to_login(response)
    assert response.content == b""
    assert COOKIE not in response.cookies


@pytest.mark.parametrize("path", ACTIONS)
def test_every_action_refuses_a_stranger(bot: BotProcess, path: str) -> None:
    # Well-formed in every other way: a token-looking field, this server's origin, a console path.
    with browser(bot) as client:
        response = client.post(
            path, data={"csrf": "x" * 43, "back": f"{PREFIX}/", "uin": "20001"}, headers=origin(bot)
        )
    assert response.status_code == 403, f"{path}: {response.status_code}"
    assert "<html" not in response.text.lower()
    assert not paused(bot)


def test_a_post_needs_the_sessions_csrf_token_and_this_servers_origin(bot: BotProcess) -> None:
    with logged_in(bot) as client:
        token = csrf_of(client)
        back = {"back": f"{PREFIX}/"}
        refused = [
            client.post("/pause", data=back, headers=origin(bot)),
            client.post("/pause", data={**back, "csrf": "wrong-" + token[6:]}, headers=origin(bot)),
            client.post("/pause", data={**back, "csrf": token}, headers={"Origin": "http://evil.example"}),
            client.post("/pause", data={**back, "csrf": token}, headers={"Referer": "http://evil.example/"}),
            client.post("/pause", data={**back, "csrf": token}),  # no Origin, no Referer
            client.post("/pause", content=f"csrf={token}", headers=origin(bot)),  # not a form
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        assert not paused(bot)
        done = client.post("/pause", data={**back, "csrf": token}, headers=origin(bot))
        assert done.status_code == 303 and done.headers["location"] == f"{PREFIX}/"
        assert paused(bot)
        flash = '<p class="flash" role="status">paused</p>'  # the verb's answer, on the next page
        assert flash in client.get("/").text and flash not in client.get("/").text  # shown once
        resumed = client.post("/resume", data={**back, "csrf": token}, headers=origin(bot))
        assert resumed.status_code == 303 and not paused(bot)


def test_a_session_cookie_from_another_bot_instance_is_refused(bot: BotProcess, other: BotProcess) -> None:
    with logged_in(bot) as client:
        session = client.cookies[COOKIE]
        token = csrf_of(client)
    assert session
    with browser(other, cookies={COOKIE: session}) as stranger:
        assert refused_to_login(stranger.get("/"))
        post = stranger.post("/pause", data={"csrf": token, "back": f"{PREFIX}/"}, headers=origin(other))
        assert post.status_code == 403 and not paused(other)


@pytest.mark.parametrize("cookie", ["made-up", "A" * 43, "", "x" * 5000])
def test_a_made_up_session_cookie_is_refused(bot: BotProcess, cookie: str) -> None:
    with browser(bot, headers={"Cookie": f"{COOKIE}={cookie}"}) as client:
        assert refused_to_login(client.get("/"))
        assert client.post("/pause", data={"csrf": "x"}, headers=origin(bot)).status_code == 403


def test_a_wrong_password_gets_401_and_no_session(bot: BotProcess) -> None:
    with browser(bot) as client:
        answer = log_in(client, bot, "wrong-" + PASSWORD)
        assert answer.status_code == 401
        assert COOKIE not in answer.cookies and COOKIE not in client.cookies
        assert refused_to_login(client.get("/"))
        assert log_in(client, bot).status_code == 303  # and the right one still works


def test_a_login_needs_the_login_forms_token_and_this_servers_origin(bot: BotProcess) -> None:
    with browser(bot) as client:
        token = field(client.get("/login").text, "login_csrf")
        without_token = client.post("/login", data={"password": PASSWORD}, headers=origin(bot))
        cross_site = client.post(
            "/login",
            data={"login_csrf": token, "password": PASSWORD},
            headers={"Origin": "http://evil.example"},
        )
    assert without_token.status_code == 403 and cross_site.status_code == 403
    assert COOKIE not in without_token.cookies and COOKIE not in cross_site.cookies


def test_after_five_wrong_passwords_even_the_right_one_waits(other: BotProcess) -> None:
    with browser(other) as client:
        for _ in range(5):
            assert log_in(client, other, "not the password at all").status_code == 401
        throttled = log_in(client, other)
    assert throttled.status_code == 429
    assert 0 < int(throttled.headers["Retry-After"]) <= 601
    assert COOKIE not in throttled.cookies


def test_behind_a_local_reverse_proxy_the_throttle_counts_the_client_it_names(bot: BotProcess) -> None:
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 only: the proxy's own address is not throttled.
    with browser(bot, headers={"X-Forwarded-For": "198.51.100.7"}) as proxied:
        for _ in range(5):
            assert log_in(proxied, bot, "not the password at all").status_code == 401
        assert log_in(proxied, bot).status_code == 429
    with browser(bot) as direct:
        assert log_in(direct, bot).status_code == 303
    assert "console: failed login from 198.51.100.7" in bot.log()


def test_the_session_cookie_is_httponly_strict_and_scoped_to_the_console(bot: BotProcess) -> None:
    with browser(bot) as client:
        answer = log_in(client, bot)
    (cookie,) = [c for c in answer.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}=")]
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
    assert "httponly" in flags
    assert flags["samesite"].lower() == "samesite=strict"
    assert flags["path"] == f"Path={PREFIX}"
    assert "secure" not in flags  # plain http here; over https the cookie is Secure


def test_pages_forbid_scripts_framing_and_caching(bot: BotProcess) -> None:
    with logged_in(bot) as client:
        responses = [client.get(path) for path in PAGES] + [client.get("/login")]
    for response in responses:
        assert response.status_code in (200, 303)
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert any(r.status_code == 200 and "<html" in r.text.lower() for r in responses)


def test_logout_ends_the_session(bot: BotProcess) -> None:
    with logged_in(bot) as client:
        session = client.cookies[COOKIE]
        out = client.post("/logout", data={"csrf": csrf_of(client)}, headers=origin(bot))
        assert refused_to_login(out)
    with browser(bot, cookies={COOKIE: session}) as old:
        assert refused_to_login(old.get("/"))


def test_no_password_reaches_the_log(bot: BotProcess) -> None:
    with browser(bot) as client:
        assert log_in(client, bot, "a-wrong-guess-" + PASSWORD[::-1]).status_code == 401
        assert log_in(client, bot).status_code == 303
    log = bot.log()
    assert "console: failed login" in log and "console: operator logged in" in log
    assert PASSWORD not in log and PASSWORD[::-1] not in log


def test_the_console_is_off_by_default(fake: FakeOpenAI, tmp_path: Path) -> None:
    with contextmanager(running_bot)(bot_settings(fake, tmp_path / "data" / "bot.db"), tmp_path) as process:
        assert httpx.get(f"{base(process)}/twin/health", timeout=10).status_code == 200
        for path in (PREFIX, f"{PREFIX}/", f"{PREFIX}/login"):
            assert httpx.get(f"{base(process)}{path}", timeout=10).status_code == 404
        login = httpx.post(f"{base(process)}{PREFIX}/login", data={"password": "x"}, timeout=10)
        assert login.status_code in (404, 405)


@pytest.mark.parametrize("password", ["", "short-pass1"])
def test_an_empty_or_short_password_stops_the_bot_with_one_line(
    fake: FakeOpenAI, tmp_path: Path, password: str
) -> None:
    settings = bot_settings(
        fake, tmp_path / "data" / "bot.db", TWIN_CONSOLE="true", TWIN_CONSOLE_PASSWORD=password
    )
    process = BotProcess(settings, cwd=tmp_path)
    try:
        with pytest.raises(RuntimeError, match="bot exited"):
            process.start(timeout=60)
    finally:
        process.stop()
    log = process.log()
    assert [line for line in log.splitlines() if "TWIN_CONSOLE_PASSWORD" in line]
    assert "Traceback" not in log
    if password.strip():
        assert password not in log

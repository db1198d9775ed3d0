"""The console's gatekeeping as pure functions: passwords, sessions, CSRF, the login throttle, where
a form may send the browser back to, and the same-origin check."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from bot.console.auth import (
    FAILURE_WINDOW_SECONDS,
    FAILURES_PER_CLIENT,
    FAILURES_TOTAL,
    MAX_SESSIONS,
    MIN_PASSWORD_CHARS,
    LoginThrottle,
    Sessions,
    csrf_matches,
    password_matches,
    password_problem,
)
from bot.console.web import PREFIX, safe_back, same_origin


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_empty_or_short_password_cannot_protect_the_console() -> None:
    assert "empty" in (password_problem("") or "")
    assert "empty" in (password_problem("   \t ") or "")
    short = password_problem("x" * (MIN_PASSWORD_CHARS - 1))
    assert short is not None and "TWIN_CONSOLE_PASSWORD" in short
    assert password_problem("x" * MIN_PASSWORD_CHARS) is None


def test_password_matches_only_the_exact_password_and_never_an_empty_one() -> None:
    assert password_matches("correct horse battery", "correct horse battery")
    assert not password_matches("correct horse batter", "correct horse battery")
    assert not password_matches("correct horse battery ", "correct horse battery")
    assert not password_matches("", "")


def test_a_session_is_found_by_its_id_until_it_expires() -> None:
    clock = Clock()
    sessions = Sessions(lifetime_seconds=60, clock=clock)
    session = sessions.create()
    assert sessions.get(session.id) is session
    clock.now += 60
    assert sessions.get(session.id) is session
    clock.now += 1
    assert sessions.get(session.id) is None
    assert len(sessions) == 0  # the expired one is forgotten


def test_unknown_malformed_and_ended_session_ids_are_refused() -> None:
    sessions = Sessions(lifetime_seconds=60, clock=Clock())
    session = sessions.create()
    for bad in (None, "", "made-up", session.id + "x", session.id[:-1], "a" * 129):
        assert sessions.get(bad) is None
    sessions.end(session.id)
    assert sessions.get(session.id) is None


def test_sessions_have_their_own_unguessable_ids_and_csrf_tokens() -> None:
    sessions = Sessions(lifetime_seconds=60, clock=Clock())
    first, second = sessions.create(), sessions.create()
    tokens = {first.id, first.csrf, second.id, second.csrf}
    assert len(tokens) == 4 and all(len(token) >= 40 for token in tokens)


def test_beyond_the_session_limit_the_oldest_login_is_dropped() -> None:
    sessions = Sessions(lifetime_seconds=60, clock=Clock())
    oldest = sessions.create()
    rest = [sessions.create() for _ in range(MAX_SESSIONS)]
    assert len(sessions) == MAX_SESSIONS
    assert sessions.get(oldest.id) is None and sessions.get(rest[0].id) is rest[0]


def test_csrf_matches_only_the_sessions_own_token() -> None:
    sessions = Sessions(lifetime_seconds=60, clock=Clock())
    session, other = sessions.create(), sessions.create()
    assert csrf_matches(session, session.csrf)
    for bad in (None, "", other.csrf, session.csrf[:-1], session.id):
        assert not csrf_matches(session, bad)


def test_a_client_is_throttled_after_five_failures_for_the_rest_of_the_window() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(FAILURES_PER_CLIENT - 1):
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 0
    throttle.failed("10.0.0.1")
    wait = throttle.retry_after("10.0.0.1")
    assert 0 < wait <= FAILURE_WINDOW_SECONDS + 1
    assert throttle.retry_after("10.0.0.2") == 0  # someone else may still try
    clock.now += FAILURE_WINDOW_SECONDS - 100
    assert 0 < throttle.retry_after("10.0.0.1") <= 101
    clock.now += 101
    assert throttle.retry_after("10.0.0.1") == 0


def test_failures_spread_over_many_clients_throttle_everyone() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for n in range(FAILURES_TOTAL):
        throttle.failed(f"10.0.1.{n}")  # one failure each: no single client is over its limit
    assert throttle.retry_after("10.9.9.9") > 0
    clock.now += FAILURE_WINDOW_SECONDS + 1
    assert throttle.retry_after("10.9.9.9") == 0


def test_a_successful_login_clears_that_clients_failures_but_not_the_total() -> None:
    throttle = LoginThrottle(Clock())
    for _ in range(FAILURES_PER_CLIENT - 1):
        throttle.failed("10.0.0.1")
    throttle.succeeded("10.0.0.1")
    for _ in range(FAILURES_PER_CLIENT - 1):
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 0
    for n in range(FAILURES_TOTAL - 2 * (FAILURES_PER_CLIENT - 1)):
        throttle.failed(f"10.0.2.{n}")
    assert throttle.retry_after("10.0.0.1") > 0  # the total still counts the forgiven failures


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/twin/console/",
        "http://evil.example/twin/console/",
        "https://x/twin/console/",
        "/other",
        "/twin/consolex",
        "/twin/console",
        f"{PREFIX}//evil.example",
        f"{PREFIX}/\\evil.example",
        f"{PREFIX}/\r\nLocation: http://evil.example",
        f"{PREFIX}/\x00",
        f"{PREFIX}/\t",
        "javascript:alert(1)",
        "",
    ],
)
def test_safe_back_refuses_anything_but_a_console_path_here(target: str) -> None:
    assert safe_back(target, f"{PREFIX}/") == f"{PREFIX}/"


@pytest.mark.parametrize("target", [f"{PREFIX}/", f"{PREFIX}/conversations?chat=c2c:20001&before=12"])
def test_safe_back_keeps_a_console_path_with_its_query(target: str) -> None:
    assert safe_back(target, f"{PREFIX}/") == target


def request_with(**headers: str) -> Request:
    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def test_same_origin_needs_an_origin_or_referer_naming_this_host() -> None:
    host = "127.0.0.1:8080"
    assert same_origin(request_with(host=host, origin=f"http://{host}"))
    assert same_origin(request_with(host=host, referer=f"http://{host}{PREFIX}/settings"))
    assert same_origin(request_with(host="Twin.example", origin="https://twin.example"))
    assert not same_origin(request_with(host=host))
    assert not same_origin(request_with(host=host, origin="null"))
    assert not same_origin(request_with(host=host, origin="http://evil.example"))
    assert not same_origin(request_with(host=host, origin="http://127.0.0.1:8081"))
    assert not same_origin(request_with(host=host, referer=f"http://evil.example/{host}"))
    assert not same_origin(request_with(host=host, origin=f"http://{host}.evil.example"))

"""Who may use the console: the operator password, sessions, CSRF tokens, login throttling.

Sessions live in this process's memory only: a session id is 32 random bytes that only this
bot instance ever issued, so a cookie from another instance (or from before a restart) is
unknown here and refused. Each session carries its own CSRF token, which every state-changing
form sends back; comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_PASSWORD_CHARS = 12
MAX_SESSIONS = 64  # the oldest login is dropped beyond this
# Failed logins: per client address, and for everyone together (a spread-out guesser).
FAILURES_PER_CLIENT = 5
FAILURES_TOTAL = 20
FAILURE_WINDOW_SECONDS = 600.0


def password_problem(password: str) -> str | None:
    """Why `password` cannot protect the console, or None."""
    if not password.strip():
        return "TWIN_CONSOLE is on but TWIN_CONSOLE_PASSWORD is empty"
    if len(password) < MIN_PASSWORD_CHARS:
        return f"TWIN_CONSOLE_PASSWORD is shorter than {MIN_PASSWORD_CHARS} characters"
    return None


def password_matches(given: str, expected: str) -> bool:
    """Constant-time, whatever the lengths (both are hashed first)."""
    digest = lambda text: hashlib.sha256(text.encode("utf-8", "replace")).digest()  # noqa: E731
    return bool(expected) and hmac.compare_digest(digest(given), digest(expected))


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(slots=True)
class Session:
    id: str
    csrf: str
    created: float
    flash: list[str] = field(default_factory=list)  # shown once on the next page


class Sessions:
    """The logged-in sessions of this process."""

    def __init__(self, lifetime_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime = lifetime_seconds
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self) -> Session:
        session = Session(new_token(), new_token(), self.clock())
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id; None for an unknown, expired or malformed one."""
        if not session_id or len(session_id) > 128:
            return None
        # Looked up by hash key, then confirmed in constant time.
        session = self._sessions.get(session_id)
        if session is None or not hmac.compare_digest(session.id.encode(), session_id.encode()):
            return None
        if self.clock() - session.created > self.lifetime:
            self._sessions.pop(session.id, None)
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


def tokens_match(given: str | None, expected: str) -> bool:
    """Constant-time; never true for an empty token."""
    return bool(given) and bool(expected) and hmac.compare_digest(str(given).encode(), expected.encode())


def csrf_matches(session: Session, given: str | None) -> bool:
    return tokens_match(given, session.csrf)


class LoginThrottle:
    """Refuses further attempts after too many recent failures, per client and in all."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        window = self._failures.setdefault(key, deque())
        while window and self.clock() - window[0] > FAILURE_WINDOW_SECONDS:
            window.popleft()
        return window

    def retry_after(self, client: str) -> int:
        """Seconds until `client` may try again; 0 = now."""
        waits = []
        for key, limit in ((f"client:{client}", FAILURES_PER_CLIENT), ("all", FAILURES_TOTAL)):
            window = self._recent(key)
            if len(window) >= limit:
                waits.append(FAILURE_WINDOW_SECONDS - (self.clock() - window[0]))
        return max(1, int(max(waits)) + 1) if waits else 0

    def failed(self, client: str) -> None:
        now = self.clock()
        for key in (f"client:{client}", "all"):
            self._recent(key).append(now)
        if len(self._failures) > 4096:  # many addresses: forget the quiet ones
            for key in [k for k, v in self._failures.items() if not v and k != "all"]:
                del self._failures[key]

    def succeeded(self, client: str) -> None:
        self._failures.pop(f"client:{client}", None)

"""How the twin paces and guards what it sends: typing delays, send limits, back-off, an output filter."""

from __future__ import annotations

import random
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

_LINK_RE = re.compile(
    r"(https?://|www\.|\b[a-z0-9-]+\.(com|cn|net|org|io|me|top|xyz|cc|co|info|vip|link)\b)", re.IGNORECASE
)


def typing_delay(text: str, base: float, per_char: float, cap: float) -> float:
    """Seconds a person would take to type `text`: a pause plus a little per character."""
    return min(cap, base + per_char * len(text)) if base or per_char else 0.0


def has_link(text: str) -> bool:
    return bool(_LINK_RE.search(text))


def filter_bubbles(
    bubbles: Sequence[str],
    *,
    block_links: bool,
    blocked_words: Sequence[str],
    command_prefixes: Sequence[str] = (),
) -> list[str]:
    """Drop bubbles that carry links or blocked words (QQ penalises accounts that post them), and
    bubbles that start with a command prefix (another bot in the chat would take them as orders)."""
    words = [w.lower() for w in blocked_words if w]
    prefixes = tuple(p for p in command_prefixes if p)
    return [
        b
        for b in bubbles
        if not (block_links and has_link(b))
        and not any(w in b.lower() for w in words)
        and not (prefixes and b.lstrip().startswith(prefixes))
    ]


def jittered(seconds: float, jitter: float, roll: float | None = None) -> float:
    """`seconds` varied by up to `jitter` (a share) either way: people do not type like a clock."""
    if seconds <= 0 or jitter <= 0:
        return max(seconds, 0.0)
    roll = random.random() if roll is None else roll
    return seconds * (1.0 + jitter * (2.0 * roll - 1.0))


@dataclass(slots=True, frozen=True)
class SendLimits:
    """How many bubbles may go out, per chat, per person answered and per account."""

    per_chat_minute: int = 12
    per_sender_minute: int = 8
    total_minute: int = 20
    sender_hour: int = 60  # 0 = no limit
    sender_day: int = 150  # 0 = no limit
    total_day: int = 500  # 0 = no limit


@dataclass(slots=True)
class SendLimiter:
    """Counts the bubbles actually sent in sliding windows, so that one friend flooding a chat
    spends their own budget and not everyone's; the day is the local calendar day."""

    limits: SendLimits
    _minute: dict[str, deque[float]] = field(default_factory=dict)  # "chat:…", "sender:…", "all"
    _hour: dict[str, deque[float]] = field(default_factory=dict)  # per sender
    _day: str = ""
    _day_counts: dict[str, int] = field(default_factory=dict)  # per sender, and "all"

    def blocked(self, chat: str, sender: str, now: float | None = None) -> str | None:
        """The name of the limit that stops the next bubble to `chat` answering `sender`, or None."""
        now = time.time() if now is None else now
        self._roll_day(now)
        lim = self.limits
        if lim.total_day and self._day_counts.get("all", 0) >= lim.total_day:
            return "daily cap"
        if lim.sender_day and self._day_counts.get(sender, 0) >= lim.sender_day:
            return "daily cap for this person"
        if lim.sender_hour and len(self._window(self._hour, sender, now, 3600.0)) >= lim.sender_hour:
            return "hourly cap for this person"
        if len(self._window(self._minute, "all", now, 60.0)) >= lim.total_minute:
            return "overall rate"
        if len(self._window(self._minute, f"chat:{chat}", now, 60.0)) >= lim.per_chat_minute:
            return "chat rate"
        if len(self._window(self._minute, f"sender:{sender}", now, 60.0)) >= lim.per_sender_minute:
            return "rate for this person"
        return None

    def record(self, chat: str, sender: str, now: float | None = None) -> None:
        """Count one bubble sent to `chat` in answer to `sender`."""
        now = time.time() if now is None else now
        self._roll_day(now)
        for key in ("all", f"chat:{chat}", f"sender:{sender}"):
            self._minute.setdefault(key, deque()).append(now)
        self._hour.setdefault(sender, deque()).append(now)
        for key in ("all", sender):
            self._day_counts[key] = self._day_counts.get(key, 0) + 1

    def seed_today(self, sends_today: int, by_sender: dict[str, int] | None = None) -> None:
        """Start the daily counts from what the store says was already sent today."""
        self._day = time.strftime("%Y-%m-%d")
        self._day_counts = {**(by_sender or {}), "all": sends_today}

    def sent_today(self, now: float | None = None) -> int:
        """Bubbles sent today (the daily cap's count)."""
        self._roll_day(time.time() if now is None else now)
        return self._day_counts.get("all", 0)

    def _roll_day(self, now: float) -> None:
        day = time.strftime("%Y-%m-%d", time.localtime(now))
        if day != self._day:
            self._day, self._day_counts = day, {}

    @staticmethod
    def _window(windows: dict[str, deque[float]], key: str, now: float, span: float) -> deque[float]:
        window = windows.get(key)
        if window is None:
            return deque()
        while window and now - window[0] >= span:
            window.popleft()
        if not window:
            del windows[key]  # keys of people long gone do not pile up
        return window


@dataclass(slots=True)
class SendHealth:
    """Failed sends are the usual sign of QQ's risk control: back off exponentially, then stop.

    After each failure nothing is sent for `backoff` seconds, doubling with every further failure
    in a row; after `limit` failures in a row sending stops until an operator resumes.
    """

    limit: int = 5
    backoff: float = 30.0
    failures: int = 0
    halted: bool = False
    quiet_until: float = 0.0

    def blocked(self, now: float | None = None) -> str | None:
        """Why nothing may be sent now, or None."""
        now = time.time() if now is None else now
        if self.halted:
            return f"stopped after {self.failures} failed sends in a row (/twin resume)"
        if now < self.quiet_until:
            return f"backing off for {self.quiet_until - now:.0f}s after {self.failures} failed send(s)"
        return None

    def failed(self, now: float | None = None) -> str:
        """Count a failed send; returns the one line to log."""
        now = time.time() if now is None else now
        self.failures += 1
        if self.failures >= self.limit:
            self.halted = True
            return f"{self.failures} sends failed in a row: sending stopped until an operator resumes"
        pause = self.backoff * 2 ** (self.failures - 1)
        self.quiet_until = now + pause
        return f"send failed ({self.failures} in a row): backing off {pause:.0f}s"

    def succeeded(self) -> None:
        self.failures, self.quiet_until = 0, 0.0

    def resume(self) -> None:
        self.failures, self.halted, self.quiet_until = 0, False, 0.0

    def describe(self) -> str:
        return self.blocked() or ("ok" if not self.failures else f"{self.failures} recent failure(s)")

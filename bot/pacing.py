"""How the twin paces and guards what it sends: typing delays, rate limits, an output filter."""

from __future__ import annotations

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


def filter_bubbles(bubbles: Sequence[str], *, block_links: bool, blocked_words: Sequence[str]) -> list[str]:
    """Drop bubbles that carry links or blocked words (QQ penalises accounts that post them)."""
    words = [w.lower() for w in blocked_words if w]
    return [
        b for b in bubbles if not (block_links and has_link(b)) and not any(w in b.lower() for w in words)
    ]


@dataclass(slots=True)
class RateLimiter:
    """Replies per chat per minute, per minute overall, and per calendar day (local time)."""

    per_chat: int
    total: int
    daily_cap: int = 0
    _chats: dict[str, deque[float]] = field(default_factory=dict)
    _all: deque[float] = field(default_factory=deque)
    _day: str = ""
    _today: int = 0

    def allow(self, chat: str, now: float | None = None) -> str | None:
        """Record a reply and return None when allowed; else the name of the limit hit."""
        now = time.time() if now is None else now
        day = time.strftime("%Y-%m-%d", time.localtime(now))
        if day != self._day:
            self._day, self._today = day, 0
        recent = self._chats.setdefault(chat, deque())
        for window in (recent, self._all):
            while window and now - window[0] >= 60.0:
                window.popleft()
        if self.daily_cap and self._today >= self.daily_cap:
            return "daily cap"
        if len(self._all) >= self.total:
            return "overall rate"
        if len(recent) >= self.per_chat:
            return "chat rate"
        recent.append(now)
        self._all.append(now)
        self._today += 1
        return None

    def seed_today(self, replies_today: int) -> None:
        """Start the daily count from what the store says was already sent today."""
        self._day = time.strftime("%Y-%m-%d")
        self._today = replies_today

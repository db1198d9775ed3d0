"""When the twin speaks: pure decisions on who wrote, where, and how it was addressed."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence


def answers_private(user_id: int, *, allow: Collection[int], deny: Collection[int]) -> bool:
    """Friends are answered unless denied; a non-empty allow list names the only ones."""
    if user_id in deny:
        return False
    return not allow or user_id in allow


def called_by_nickname(text: str, nicknames: Sequence[str]) -> bool:
    """The owner's nickname appears in the message (people say "小明你看…", not only "@小明")."""
    return any(n and n in text for n in nicknames)


def answers_group(
    group_id: int,
    *,
    to_me: bool,
    text: str,
    nicknames: Sequence[str],
    allow: Collection[int],
    probability: float,
    roll: float | None = None,
) -> bool:
    """In groups: when @-mentioned, quoted or called by name, else by chance (`probability`)."""
    if allow and group_id not in allow:
        return False
    if to_me or called_by_nickname(text, nicknames):
        return True
    roll = random.random() if roll is None else roll
    return roll < probability


def is_ignored_sender(
    user_id: int, self_id: int, *, ignored: Collection[int], blocked: Collection[int]
) -> bool:
    """Never answer itself, listed bots, or blocked users."""
    return user_id == self_id or user_id in ignored or user_id in blocked

"""The rule-based cleaning pass over one conversation's messages; every drop is counted."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from pipeline.chatformat import ANIMATED_STICKER, CARD, FORWARD, PLACEHOLDERS, is_placeholder_only
from pipeline.dataset.redact import has_url, strip_urls
from pipeline.dataset.settings import RuleSettings
from pipeline.records import Message

# Report keys, one per rule.
BOT_SENDER = "bot_sender"
BOT_COMMAND = "bot_command"
FORWARD_OR_CARD = "forward_or_card"
LONG_PASTE = "long_paste"
LINK_ONLY = "link_only"
PLACEHOLDER_ONLY = "placeholder_only"
REPEATED_SPAM = "repeated_spam"

RULE_NAMES = (
    BOT_SENDER,
    BOT_COMMAND,
    FORWARD_OR_CARD,
    LONG_PASTE,
    LINK_ONLY,
    PLACEHOLDER_ONLY,
    REPEATED_SPAM,
)

_WORDISH = re.compile(r"[A-Za-z\u4e00-\u9fff]")
_PLACEHOLDER_STARTS = tuple({p[0] for p in PLACEHOLDERS})
_PLACEHOLDER_ENDS = tuple({p[-1] for p in PLACEHOLDERS})
# What is left of a link share once the link is gone: a few words of punctuation or a label.
_LINK_ONLY_REST = 6


def drop_reason(msg: Message, rules: RuleSettings) -> str | None:
    """The rule that drops this message on its own, or None to keep it."""
    return _drop_reason(msg, msg.text.strip(), rules, tuple(rules.command_prefixes))


def _drop_reason(msg: Message, text: str, rules: RuleSettings, prefixes: tuple[str, ...]) -> str | None:
    if msg.sender in rules.bot_senders:
        return BOT_SENDER
    # One C call rules out nearly every message before the per-prefix check.
    if text.startswith(prefixes) and _is_command(text, prefixes):
        return BOT_COMMAND
    if rules.drop_forwards_and_cards and (
        "forward" in msg.kinds or "card" in msg.kinds or FORWARD in text or CARD in text
    ):
        return FORWARD_OR_CARD
    if len(text) > rules.max_message_chars:
        return LONG_PASTE
    if (
        rules.drop_link_only
        and ("." in text or "/" in text)  # every link has one; most chat lines have neither
        and has_url(text)
        and len(strip_urls(text).strip()) <= _LINK_ONLY_REST
    ):
        return LINK_ONLY
    if _placeholder_only(text):
        if msg.is_self:
            sticker = "sticker" in msg.kinds or ANIMATED_STICKER in text
            if rules.placeholder_only_owner and not (rules.keep_owner_stickers and sticker):
                return PLACEHOLDER_ONLY
        elif rules.placeholder_only_others:
            return PLACEHOLDER_ONLY
    return None


def _placeholder_only(text: str) -> bool:
    """`is_placeholder_only` of a stripped text, which then starts and ends like a placeholder."""
    if text and not (text.startswith(_PLACEHOLDER_STARTS) and text.endswith(_PLACEHOLDER_ENDS)):
        return False  # most chat lines: no need to try every placeholder
    return is_placeholder_only(text)


def _is_command(text: str, prefixes: Sequence[str]) -> bool:
    for prefix in prefixes:
        if prefix and text.startswith(prefix):
            rest = text[len(prefix) :]
            return bool(rest) and _WORDISH.match(rest) is not None
    return False


def clean_messages(messages: Iterable[Message], rules: RuleSettings, dropped: Counter[str]) -> list[Message]:
    """Apply every rule to a conversation in order; adds one count per dropped message to `dropped`."""
    kept: list[Message] = []
    run_key: tuple[str, str] | None = None
    run_length = 0
    prefixes = tuple(rules.command_prefixes)
    max_repeats = rules.max_repeats
    for msg in messages:
        text = msg.text.strip()
        key = (msg.sender, text)
        run_length = run_length + 1 if key == run_key else 1
        run_key = key
        if run_length > max_repeats:
            dropped[REPEATED_SPAM] += 1
            continue
        reason = _drop_reason(msg, text, rules, prefixes)
        if reason is not None:
            dropped[reason] += 1
            continue
        kept.append(msg)
    return kept

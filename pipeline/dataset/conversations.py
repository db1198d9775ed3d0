"""Messages → conversations (per chat, split at silences); turns (bursts of one sender) are
`chatformat.to_turns`, the one turn builder the bot's memory uses too.

`iter_conversations` streams: it holds only the conversations still open, i.e. those
whose last message is within `session_gap` of the newest message seen. With input in
time order (as `twin extract` writes it) that is a few chats' recent messages, whatever
the length of the history.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter

from pipeline.chatformat import ChatTurn, to_turns
from pipeline.records import Message

__all__ = ["ChatTurn", "Conversation", "iter_conversations", "to_turns"]  # turns: re-exported


@dataclass(slots=True)
class Conversation:
    """The messages of one chat between two silences longer than the session gap."""

    chat_type: str
    chat: str
    messages: list[Message] = field(default_factory=list)

    @property
    def start(self) -> int:
        return self.messages[0].time if self.messages else 0

    @property
    def end(self) -> int:
        return self.messages[-1].time if self.messages else 0

    @property
    def key(self) -> str:
        """A stable id: chat and start time (used for the train/val split, never written)."""
        return f"{self.chat_type}:{self.chat}:{self.start}"


def iter_conversations(
    messages: Iterable[Message], session_gap: int, max_messages: int = 2000
) -> Iterator[Conversation]:
    """Group a message stream by chat and cut it at silences longer than `session_gap` seconds."""
    open_convs: dict[tuple[str, str], Conversation] = {}
    newest = None
    last_sweep = None
    for msg in messages:
        time = msg.time
        key = (msg.chat_type, msg.chat)
        conv = open_convs.get(key)
        if conv is not None and (
            time - conv.messages[-1].time > session_gap or len(conv.messages) >= max_messages
        ):
            yield _closed(open_convs.pop(key))
            conv = None
        if conv is None:
            conv = open_convs[key] = Conversation(msg.chat_type, msg.chat)
        conv.messages.append(msg)
        if newest is None or last_sweep is None:
            newest = last_sweep = time
        elif time > newest:
            newest = time
        # Close every conversation that can no longer grow; this is what bounds memory.
        if newest - last_sweep > session_gap:
            for stale in [k for k, c in open_convs.items() if newest - c.messages[-1].time > session_gap]:
                yield _closed(open_convs.pop(stale))
            last_sweep = newest
    for conv in sorted(open_convs.values(), key=lambda c: c.messages[-1].time):
        yield _closed(conv)


_by_time = attrgetter("time")  # a C-level key: every message of the history is sorted once


def _closed(conv: Conversation) -> Conversation:
    # Input that is not in time order still yields well-formed conversations.
    conv.messages.sort(key=_by_time)
    return conv

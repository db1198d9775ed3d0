"""Turns of one conversation → training samples that end at an owner reply (or a silence)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pipeline.chatformat import to_messages
from pipeline.dataset.conversations import ChatTurn

Source = Literal["owner", "mix"]
Kind = Literal["reply", "no_reply", "mix"]

# Report keys for samples that could not be made.
NO_CONTEXT = "owner_turn_without_context"
OVER_BUDGET = "over_token_budget"

_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
_MESSAGE_OVERHEAD = 4  # role markers and separators of a chat template


def estimate_tokens(text: str) -> int:
    """A cheap upper-ish estimate: one token per CJK character, one per four other characters.

    Qwen/Llama tokenizers spend ~0.7 tokens per Chinese character and ~0.25 per ASCII
    character, so this errs on the long side and a budget built on it is safe.
    """
    cjk = len(_CJK.findall(text))
    other = len(text) - cjk - text.count(" ")
    return cjk + (other + 3) // 4


def estimate_messages_tokens(messages: Sequence[dict[str, str]]) -> int:
    """Estimated tokens of a whole `messages` list, template overhead included."""
    return sum(estimate_tokens(m["content"]) + _MESSAGE_OVERHEAD for m in messages)


@dataclass(slots=True)
class Sample:
    """One training sample: a `messages` list plus where it came from (never written raw)."""

    messages: list[dict[str, str]]
    chat_type: str = ""
    chat: str = ""
    start: int = 0  # time of the first turn in the sample
    end: int = 0  # time of the turn the sample answers
    source: Source = "owner"
    kind: Kind = "reply"
    conversation: str = ""  # id of the conversation, for the time split
    conversation_end: int = 0
    owner_messages: int = 0  # owner messages in the final assistant turn

    def content_hash(self) -> str:
        """A key for the content alone (what an LLM judge sees), stable across runs."""
        blob = json.dumps(self.messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        fields = {name: getattr(self, name) for name in self.__slots__}
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Sample:
        return cls(**json.loads(line))

    @property
    def turns(self) -> int:
        """Turns besides the system prompt."""
        return sum(1 for m in self.messages if m["role"] != "system")


@dataclass(slots=True)
class SampleOptions:
    """What `samples_from_turns` needs from the settings."""

    system: str
    context_turns: int = 8
    max_tokens: int = 1024
    no_reply_rate: float = 0.0
    seed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def samples_from_turns(
    turns: Sequence[ChatTurn],
    *,
    chat_type: str,
    chat: str,
    conversation: str,
    conversation_end: int,
    options: SampleOptions,
) -> Iterator[Sample]:
    """One sample per owner reply (a run of owner turns), plus sampled no-reply moments."""
    owner_present = any(t.turn.role == "assistant" for t in turns)
    for i, current in enumerate(turns):
        nxt = turns[i + 1] if i + 1 < len(turns) else None
        if current.turn.role == "assistant":
            if nxt is not None and nxt.turn.role == "assistant":
                continue  # the reply goes on: the sample ends at the last turn of the run
            start = i
            while start > 0 and turns[start - 1].turn.role == "assistant":
                start -= 1
            run = turns[start : i + 1]
            context = list(turns[max(0, start - options.context_turns) : start])
            fitted = _fit(context, run, chat_type, options)
            if fitted is None:
                continue
            owner = sum(t.messages for t in run)
            kind: Kind = "reply"
        else:
            if not (owner_present and options.no_reply_rate > 0):
                continue
            if nxt is not None and nxt.turn.role == "assistant":
                continue
            rng = random.Random(f"{options.seed}:{conversation}:{i}")
            if rng.random() >= options.no_reply_rate:
                continue
            context = list(turns[max(0, i + 1 - options.context_turns) : i + 1])
            fitted = _fit(context, [], chat_type, options)
            if fitted is None:
                continue
            owner, kind = 0, "no_reply"
        messages, first_time = fitted
        yield Sample(
            messages=messages,
            chat_type=chat_type,
            chat=chat,
            start=first_time,
            end=current.turn.time,
            kind=kind,
            conversation=conversation,
            conversation_end=conversation_end,
            owner_messages=owner,
        )


def _fit(
    context: list[ChatTurn], reply: list[ChatTurn], chat_type: str, options: SampleOptions
) -> tuple[list[dict[str, str]], int] | None:
    """Trim context from the left until it starts with a user turn and fits the token budget."""
    while True:
        while context and context[0].turn.role == "assistant":
            context.pop(0)
        if not context:
            options.skipped[NO_CONTEXT] += 1
            return None
        turns = [t.turn for t in (*context, *reply)]
        messages = to_messages(turns, chat_type, system=options.system)
        if not reply:
            messages.append({"role": "assistant", "content": ""})
        if estimate_messages_tokens(messages) <= options.max_tokens:
            return messages, context[0].turn.time
        if len(context) == 1:
            options.skipped[OVER_BUDGET] += 1
            return None
        context.pop(0)

"""Turns of one conversation → training samples that end at an owner reply (or a silence)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from pipeline.chatformat import Turn, label_turn
from pipeline.dataset.conversations import ChatTurn

Source = Literal["owner", "mix"]
Kind = Literal["reply", "no_reply", "mix"]

# Report keys for samples that could not be made.
NO_CONTEXT = "owner_turn_without_context"
OVER_BUDGET = "over_token_budget"

# Runs, not single characters: findall then allocates one string per run of Chinese text
# instead of one per character (about twice as fast on chat lines).
_CJK_RUNS = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]+")
_MESSAGE_OVERHEAD = 4  # role markers and separators of a chat template


def estimate_tokens(text: str) -> int:
    """A cheap estimate: one token per CJK character, one per four other characters.

    Not a bound: SmolLM2's tokenizer spends about 1.7× this on real samples (docs/dataset.md).
    """
    return _tokens(*_char_counts(text))


def _char_counts(text: str) -> tuple[int, int]:
    """(CJK characters, other non-space characters): what the estimate is made of, and additive."""
    cjk = 0 if text.isascii() else sum(map(len, _CJK_RUNS.findall(text)))
    return cjk, len(text) - cjk - text.count(" ")


def _tokens(cjk: int, other: int) -> int:
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
    tokens: int = 0  # estimate_messages_tokens(messages), counted while the sample was fitted

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
    system_for: Callable[[int], str] | None = None,
) -> Iterator[Sample]:
    """One sample per owner reply (a run of owner turns), plus sampled no-reply moments.

    `system_for(i)` gives the system prompt of the sample whose answer starts at turn `i` (a
    chat's memory or examples known before that turn); without it every sample has `options.system`.
    """
    # A turn shows up in up to `context_turns` + 1 samples: label and count it once, here.
    rendered = [_render(t.turn, chat_type) for t in turns]
    system_tokens = _tokens(*_char_counts(options.system)) + _MESSAGE_OVERHEAD
    if system_for is not None:
        options = replace(options)  # the per-sample prompt is set on a copy, never the caller's
    roles = [r[0] for r in rendered]
    no_reply_wanted = "assistant" in roles and options.no_reply_rate > 0
    last = len(roles) - 1
    for i, role in enumerate(roles):
        owner_next = i < last and roles[i + 1] == "assistant"
        if role == "assistant":
            if owner_next:
                continue  # the reply goes on: the sample ends at the last turn of the run
            start = i
            while start > 0 and roles[start - 1] == "assistant":
                start -= 1
            first = max(0, start - options.context_turns)
            if system_for is not None:
                options.system = system_for(start)
                system_tokens = _tokens(*_char_counts(options.system)) + _MESSAGE_OVERHEAD
            fitted = _fit(rendered, first, start, i + 1, options, system_tokens)
            if fitted is None:
                continue
            owner = turns[i].messages if start == i else sum(t.messages for t in turns[start : i + 1])
            kind: Kind = "reply"
        else:
            if not no_reply_wanted or owner_next:
                continue
            rng = random.Random(f"{options.seed}:{conversation}:{i}")
            if rng.random() >= options.no_reply_rate:
                continue
            first = max(0, i + 1 - options.context_turns)
            if system_for is not None:
                options.system = system_for(i + 1)
                system_tokens = _tokens(*_char_counts(options.system)) + _MESSAGE_OVERHEAD
            fitted = _fit(rendered, first, i + 1, i + 1, options, system_tokens)
            if fitted is None:
                continue
            owner, kind = 0, "no_reply"
        messages, first, tokens = fitted
        yield Sample(
            messages=messages,
            chat_type=chat_type,
            chat=chat,
            start=turns[first].turn.time,
            end=turns[i].turn.time,
            kind=kind,
            conversation=conversation,
            conversation_end=conversation_end,
            owner_messages=owner,
            tokens=tokens,
        )


# A turn as every sample that includes it shows it: role, labelled text (`label_turn`),
# and that text's character counts for the token estimate.
_Rendered = tuple[str, str, int, int]


def _render(turn: Turn, chat_type: str) -> _Rendered:
    text = label_turn(turn, chat_type)
    return (turn.role, text, *_char_counts(text))


def _fit(
    rendered: list[_Rendered],
    first: int,
    start: int,
    end: int,
    options: SampleOptions,
    system_tokens: int,
) -> tuple[list[dict[str, str]], int, int] | None:
    """Context is `rendered[first:start]`, the reply `rendered[start:end]` (none when equal).

    Trim context from the left until it starts with a user turn and fits the token budget;
    returns (messages, index of the first turn kept, estimated tokens).
    """
    no_reply = start == end
    while True:
        while first < start and rendered[first][0] == "assistant":
            first += 1
        if first == start:
            options.skipped[NO_CONTEXT] += 1
            return None
        messages, tokens = _messages(rendered[first:end], options.system, system_tokens)
        if no_reply:
            messages.append({"role": "assistant", "content": ""})
            tokens += _MESSAGE_OVERHEAD
        if tokens <= options.max_tokens:
            return messages, first, tokens
        if start - first == 1:
            options.skipped[OVER_BUDGET] += 1
            return None
        first += 1


def _messages(
    window: Sequence[_Rendered], system: str, system_tokens: int
) -> tuple[list[dict[str, str]], int]:
    """`to_messages` of already labelled turns, and `estimate_messages_tokens` of the result.

    Adjacent same-role turns join with a newline, as `to_messages` joins them (a test holds
    the two equal); the estimate of a joined text is the sum of its parts' counts plus one
    "other" character per newline, so no text is scanned twice.
    """
    messages = [{"role": "system", "content": system}]
    tokens = system_tokens
    last: dict[str, str] | None = None
    last_role = "system"
    cjk = other = 0
    for role, text, turn_cjk, turn_other in window:
        if role == last_role and role != "system" and last is not None:
            if text:
                last["content"] = f"{last['content']}\n{text}"
                cjk += turn_cjk
                other += turn_other + 1
            continue
        if last is not None:
            tokens += _tokens(cjk, other) + _MESSAGE_OVERHEAD
        last = {"role": role, "content": text}
        messages.append(last)
        last_role, cjk, other = role, turn_cjk, turn_other
    if last is not None:
        tokens += _tokens(cjk, other) + _MESSAGE_OVERHEAD
    return messages, tokens

"""A chat's recent history → the prompt, built exactly as training samples were built, and
bounded so that it always fits the model's context."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.store import StoredMessage
from pipeline.chatformat import BURST_GAP, ChatContext, Turn, system_prompt, to_messages, to_turns

CUT_MARK = "…"


def history_turns(history: Sequence[StoredMessage], burst_gap: int = BURST_GAP) -> list[Turn]:
    """The chat's turns, merged by the dataset's own turn builder (`chatformat.to_turns`): the
    owner's words and the twin's replies are the assistant's, incoming messages the user's."""
    return [chat_turn.turn for chat_turn in to_turns(history, burst_gap)]


def keep_end(text: str, limit: int) -> str:
    """`text` cut to `limit` characters keeping its end (what needs an answer is said last)."""
    if len(text) <= limit:
        return text
    return CUT_MARK + text[len(text) - limit + len(CUT_MARK) :]


def build_prompt(
    history: Sequence[StoredMessage],
    chat_type: str,
    persona: str,
    max_turn_chars: int = 600,
    burst_gap: int = BURST_GAP,
    context: ChatContext | None = None,
) -> list[dict[str, str]]:
    """The `messages` list for the backend; empty when there is nothing new to answer.

    The leading assistant turns are dropped (a sample starts with the other side), and when
    the last turn is already the owner's (they answered themself), there is nothing to say.
    Every turn is cut to `max_turn_chars`, keeping its end; `burst_gap` must be the dataset's.
    `context` (this chat's memory, the owner's similar past replies) goes into the system prompt
    exactly as the dataset puts it there.
    """
    turns = history_turns(history, burst_gap)
    while turns and turns[0].role == "assistant":
        turns.pop(0)
    if not turns or turns[-1].role != "user":
        return []
    for turn in turns:
        turn.text = keep_end(turn.text, max_turn_chars)
    return to_messages(turns, "group" if chat_type == "group" else "c2c", system_prompt(persona, context))


def fit_messages(
    messages: Sequence[dict[str, str]], budget: int, count: Callable[[Sequence[dict[str, str]]], int]
) -> list[dict[str, str]]:
    """`messages` within `budget` tokens as `count` measures them: the oldest turns go first
    (the system prompt and the last turn stay), then the last turn is cut keeping its end.

    Raises ValueError when even the system prompt and a few characters do not fit.
    """
    fitted = [dict(m) for m in messages]
    if count(fitted) <= budget:
        return fitted
    system = 1 if fitted and fitted[0]["role"] == "system" else 0
    # Dropping from the front keeps the turn after a removed one; an assistant turn may not lead.
    while len(fitted) > system + 1:
        del fitted[system]
        while len(fitted) > system + 1 and fitted[system]["role"] == "assistant":
            del fitted[system]
        if count(fitted) <= budget:
            return fitted
    original = fitted[-1]["content"]
    low, high = 0, len(original)  # binary search on how many characters of the end fit
    while low < high:
        middle = (low + high + 1) // 2
        fitted[-1]["content"] = keep_end(original, middle)
        if count(fitted) <= budget:
            low = middle
        else:
            high = middle - 1
    if low < len(CUT_MARK) + 1:
        raise ValueError(f"the prompt does not fit {budget} tokens even without history")
    fitted[-1]["content"] = keep_end(original, low)
    return fitted


def estimate_tokens(messages: Sequence[dict[str, str]]) -> int:
    """A safe upper bound on the tokens of a prompt when the tokenizer is not at hand (the OpenAI
    backend): byte-level BPE tokenizers spend at most one token per UTF-8 byte, plus the template."""
    return sum(len(m["content"].encode("utf-8")) + 8 for m in messages) + 8

"""A chat's recent history → the prompt, built exactly as training samples were built."""

from __future__ import annotations

from collections.abc import Sequence

from bot.store import StoredMessage
from pipeline.chatformat import Turn, join_burst, system_prompt, to_messages


def history_turns(history: Sequence[StoredMessage]) -> list[Turn]:
    """Consecutive messages of one speaker become one turn (a burst), as in the dataset.

    Incoming messages are the user's; the owner's own words and the twin's replies are the
    assistant's (the model speaks as the owner).
    """
    turns: list[Turn] = []
    speakers: list[str] = []
    bursts: list[list[str]] = []
    for message in history:
        role = "user" if message.origin == "incoming" else "assistant"
        speaker = message.sender_name if role == "user" else ""  # as pipeline.dataset names speakers
        key = f"{role}:{message.sender if role == 'user' else ''}"
        if turns and speakers[-1] == key:
            bursts[-1].append(message.text)
            turns[-1].text = join_burst(bursts[-1])
            continue
        turns.append(Turn(role=role, text=join_burst([message.text]), speaker=speaker, time=message.time))
        speakers.append(key)
        bursts.append([message.text])
    return [t for t in turns if t.text]


def build_prompt(history: Sequence[StoredMessage], chat_type: str, persona: str) -> list[dict[str, str]]:
    """The `messages` list for the backend; empty when there is nothing new to answer.

    The leading assistant turns are dropped (a sample starts with the other side), and when
    the last turn is already the owner's (they answered themself), there is nothing to say.
    """
    turns = history_turns(history)
    while turns and turns[0].role == "assistant":
        turns.pop(0)
    if not turns or turns[-1].role != "user":
        return []
    return to_messages(turns, "group" if chat_type == "group" else "c2c", system_prompt(persona))

"""Output records (OpenAI messages, ShareGPT, Alpaca), LLaMA-Factory's dataset_info, mix input."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pipeline.dataset.samples import Sample

TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"

_SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}
_FROM_SHAREGPT = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_record(sample: Sample, fmt: str) -> dict[str, Any]:
    """One output line; `source` ("owner" / "mix") and `chat_type` let evaluation separate them."""
    system, turns = _split_system(sample.messages)
    if fmt == "openai":
        record: dict[str, Any] = {"messages": sample.messages}
    elif fmt == "sharegpt":
        record = {
            "conversations": [{"from": _SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in turns]
        }
        if system is not None:
            record["system"] = system
    elif fmt == "alpaca":
        pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
        *history, (prompt, response) = pairs
        record = {"instruction": prompt, "input": "", "output": response}
        if system is not None:
            record["system"] = system
        record["history"] = [list(p) for p in history]
    else:
        raise ValueError(f"unknown format {fmt!r}")
    record["source"] = sample.source
    record["chat_type"] = sample.chat_type
    return record


# How `json.dumps(..., ensure_ascii=False)` writes a string (the C encoder where there is one).
_JSON_STR = json.encoder.encode_basestring
_ENCODER = json.JSONEncoder(ensure_ascii=False)


def record_line(sample: Sample, fmt: str) -> str:
    """`to_record` as one JSONL line, byte for byte what `json.dumps(record, ensure_ascii=False)` writes.

    The common case, an OpenAI record of plain role/content messages, is put together from
    its encoded strings: a build writes ~100k of them and the generic encoder's per-call
    setup cost more than the encoding itself.
    """
    if fmt == "openai" and type(sample.source) is str and type(sample.chat_type) is str:
        messages = _messages_json(sample.messages)
        if messages is not None:
            return (
                f'{{"messages": {messages}, "source": {_JSON_STR(sample.source)}, '
                f'"chat_type": {_JSON_STR(sample.chat_type)}}}\n'
            )
    return _ENCODER.encode(to_record(sample, fmt)) + "\n"


def _messages_json(messages: Sequence[Any]) -> str | None:
    """JSON of a list of {"role": str, "content": str} dicts (keys in that order), else None."""
    parts = []
    try:
        for message in messages:
            # Two keys, "role" first, and "content" present: exactly role then content.
            if type(message) is not dict or len(message) != 2 or next(iter(message)) != "role":
                return None
            # encode_basestring raises TypeError for anything but a string.
            parts.append(
                f'{{"role": {_JSON_STR(message["role"])}, "content": {_JSON_STR(message["content"])}}}'
            )
    except (KeyError, TypeError):
        return None
    return f"[{', '.join(parts)}]"


def _split_system(messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def dataset_info(fmt: str) -> dict[str, Any]:
    """LLaMA-Factory's `dataset_info.json` for this directory (its data/README schema)."""
    if fmt == "openai":
        entry: dict[str, Any] = {
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    elif fmt == "sharegpt":
        entry = {"formatting": "sharegpt", "columns": {"messages": "conversations", "system": "system"}}
    elif fmt == "alpaca":
        entry = {
            "formatting": "alpaca",
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "response": "output",
                "system": "system",
                "history": "history",
            },
        }
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return {
        "twin_train": {"file_name": TRAIN_FILE, **entry},
        "twin_val": {"file_name": VAL_FILE, **entry},
    }


def mix_messages(record: Any) -> list[dict[str, str]]:
    """A general instruction record (OpenAI, ShareGPT or Alpaca) → a `messages` list.

    Raises ValueError when the record is none of these or its turns do not alternate
    user/assistant starting with the user.
    """
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "messages" in record:
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]]
    elif "conversations" in record:
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": str(record["system"])})
        for m in record["conversations"]:
            role = str(m.get("from", m.get("role", "")))
            content = m.get("value", m.get("content"))
            role = "system" if role == "system" else _FROM_SHAREGPT.get(role, "")
            if not role or content is None:
                raise ValueError(f"unknown ShareGPT turn {m!r:.60}")
            messages.append({"role": role, "content": str(content)})
    elif "instruction" in record and "output" in record:
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": str(record["system"])})
        for prompt, response in record.get("history") or []:
            messages += [
                {"role": "user", "content": str(prompt)},
                {"role": "assistant", "content": str(response)},
            ]
        prompt = "\n".join(p for p in (str(record["instruction"]), str(record.get("input") or "")) if p)
        messages += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": str(record["output"])},
        ]
    else:
        raise ValueError(
            "neither OpenAI (messages), ShareGPT (conversations) nor Alpaca (instruction/output)"
        )
    _, turns = _split_system(messages)
    roles = [m["role"] for m in turns]
    if not roles or len(roles) % 2 or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(roles)):
        raise ValueError("turns must alternate user/assistant, starting with the user")
    return messages

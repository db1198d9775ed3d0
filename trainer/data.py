"""Dataset → token ids with owner-only labels → packed or padded batches.

The label mask is built by rendering prefixes of each conversation through the chat
template (the same `render_chat_template` the bot uses): only the characters of each
assistant reply and its end-of-turn token become labels; system, user and template
text stay -100. Message content is data, never control: special-token text inside it
(`<|im_end|>` typed by a friend) tokenises as plain text, as the bot's llama.cpp backend
tokenises it (`chatformat.render_chat_pieces`). Packing puts whole samples side by side
in a row and restarts the position ids at every sample, which transformers turns into a
block-diagonal causal mask, so no token ever attends across samples.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.chatformat import PromptPiece, render_chat_pieces, render_chat_template
from pipeline.errors import InputError

IGNORE = -100
TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"
ROLES = ("system", "user", "assistant")
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


# ---------------------------------------------------------------- reading


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """`messages` lists from one JSONL file (OpenAI format, or ShareGPT `conversations`)."""
    conversations: list[list[dict[str, str]]] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise InputError(path, f"cannot read dataset file ({exc.strerror or exc})") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"line {number}: not JSON ({exc.msg})") from None
            conversations.append(_messages_of(record, path, number))
    return conversations


def _messages_of(record: Any, path: Path, number: int) -> list[dict[str, str]]:
    if isinstance(record, dict) and isinstance(record.get("conversations"), list):
        sharegpt = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
        sharegpt["assistant"] = "assistant"
        messages = [
            {"role": sharegpt.get(str(m.get("from")), str(m.get("from"))), "content": m.get("value")}
            for m in record["conversations"]
            if isinstance(m, dict)
        ]
        if isinstance(record.get("system"), str):
            messages.insert(0, {"role": "system", "content": record["system"]})
    elif isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = record["messages"]
    else:
        raise InputError(path, f"line {number}: expected an object with a `messages` list")
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise InputError(path, f"line {number}: every message needs a role in {ROLES} and text content")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(path, f"line {number}: no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_split(
    data_dir: Path, name: str = TRAIN_FILE, *, required: bool = True
) -> list[list[dict[str, str]]]:
    """One split of a dataset directory; the training split must exist and be non-empty."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(data_dir, "no such dataset directory (run `twin build-dataset` first)")
    path = data_dir / name
    if not path.is_file():
        if not required:
            return []
        raise InputError(path, "missing: a dataset directory holds train.jsonl and val.jsonl")
    conversations = read_conversations(path)
    if required and not conversations:
        raise InputError(path, "the dataset is empty: no samples to train on")
    return conversations


def dataset_hash(data_dir: Path) -> str:
    """sha256 over the dataset's split files, naming the data a model was trained on."""
    digest = hashlib.sha256()
    for name in (TRAIN_FILE, VAL_FILE):
        path = Path(data_dir) / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------- label masks


@dataclass(slots=True)
class Encoded:
    """One sample as token ids and next-token targets (`targets[i]` is predicted at position i)."""

    input_ids: list[int]
    targets: list[int]

    @property
    def label_tokens(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def assistant_spans(
    template: str,
    messages: Sequence[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    rendered: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant reply (+ end-of-turn).

    `rendered` is the whole conversation rendered, when the caller has it already.
    """

    def render(part: Sequence[dict[str, str]]) -> str:
        return render_chat_template(
            template, part, add_generation_prompt=False, bos_token=bos_token, eos_token=eos_token
        )

    full = render(messages) if rendered is None else rendered
    spans: list[tuple[int, int]] = []
    markers = tuple(m for m in (eos_token, *END_OF_TURN_MARKERS) if m)
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or not message["content"].strip():
            continue
        before = render(messages[:index]) if index else ""
        if not full.startswith(before):
            raise ValueError("the chat template does not render conversation prefixes as prefixes")
        content = message["content"].strip()
        start = full.find(content, len(before))
        if start < 0:
            raise ValueError("the chat template changed an assistant reply's text")
        end = start + len(content)
        for marker in markers:
            if full.startswith(marker, end):
                end += len(marker)
                break
        spans.append((start, end))
    return full, spans


def encode(
    tokenizer: Any, messages: Sequence[dict[str, str]], max_len: int, *, loss_on: str = "all"
) -> Encoded:
    """Token ids of the rendered conversation; targets are -100 outside assistant replies.

    `loss_on="final"` keeps only the last reply as a target (earlier ones stay context).
    """
    template, bos, eos = tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or ""
    pieces = render_chat_pieces(template, messages, add_generation_prompt=False, bos_token=bos, eos_token=eos)
    text = "".join(piece.text for piece in pieces)
    text, spans = assistant_spans(template, messages, bos_token=bos, eos_token=eos, rendered=text)
    if loss_on == "final":
        spans = spans[-1:]
    ids, offsets = tokenize_pieces(tokenizer, text, pieces)
    labels = [IGNORE] * len(ids)
    span_index = 0
    for i, (char_start, char_end) in enumerate(offsets):
        while span_index < len(spans) and spans[span_index][1] <= char_start:
            span_index += 1
        if span_index < len(spans) and char_end > spans[span_index][0] and char_start < spans[span_index][1]:
            labels[i] = ids[i]
    ids, labels = ids[:max_len], labels[:max_len]
    return Encoded(input_ids=ids, targets=[*labels[1:], IGNORE])


def tokenize_pieces(
    tokenizer: Any, text: str, pieces: Sequence[PromptPiece]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of `text` (the joined `pieces`); special tokens only from template pieces.

    The whole text is tokenised in one call, as before; only when a special token landed
    inside message content is it re-tokenised piecewise with special-token parsing off there.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    special = _special_token_ids(tokenizer)
    starts: list[int] = []
    ends: list[int] = []
    position = 0
    for piece in pieces:
        if piece.is_content:
            starts.append(position)
            ends.append(position + len(piece.text))
        position += len(piece.text)
    for i in [i for i, token in enumerate(ids) if token in special]:
        start, end = offsets[i]
        k = bisect.bisect_left(starts, end) - 1  # the last content starting before the token ends
        if k >= 0 and ends[k] > start:
            return _tokenize_segments(tokenizer, pieces)
    return ids, offsets


@functools.lru_cache(maxsize=8)
def _special_token_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)


@functools.lru_cache(maxsize=8)
def _special_token_re(tokenizer: Any) -> re.Pattern[str]:
    texts = sorted(
        {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True
    )
    return re.compile("|".join(re.escape(t) for t in texts) or r"(?!)")


def _tokenize_segments(
    tokenizer: Any, pieces: Sequence[PromptPiece]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Template pieces cut at their special tokens; the text between (content included) plain."""
    pattern = _special_token_re(tokenizer)
    parts: list[tuple[int, str, bool]] = []  # (offset, text, is a special token)
    run_start, run = 0, ""
    position = 0
    for piece in pieces:
        cuts = [] if piece.is_content else list(pattern.finditer(piece.text))
        last = 0
        for cut in cuts:
            run += piece.text[last : cut.start()]
            if run:
                parts.append((run_start, run, False))
            parts.append((position + cut.start(), cut.group(), True))
            run, run_start = "", position + cut.end()
            last = cut.end()
        run += piece.text[last:]
        position += len(piece.text)
    if run:
        parts.append((run_start, run, False))
    plain = [text for _, text, is_special in parts if not is_special]
    encoded = (
        tokenizer(plain, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
        if plain
        else {"input_ids": [], "offset_mapping": []}
    )
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    n = 0
    for start, text, is_special in parts:
        if is_special:
            ids.append(tokenizer.convert_tokens_to_ids(text))
            offsets.append((start, start + len(text)))
            continue
        ids += encoded["input_ids"][n]
        offsets += [(start + a, start + b) for a, b in encoded["offset_mapping"][n]]
        n += 1
    return ids, offsets


def encode_all(
    tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], max_len: int, *, loss_on: str = "all"
) -> list[Encoded]:
    """Encode every conversation, dropping those left with nothing to learn after truncation."""
    out = [encode(tokenizer, messages, max_len, loss_on=loss_on) for messages in conversations]
    return [e for e in out if e.label_tokens > 0]


# ---------------------------------------------------------------- batches


@dataclass(slots=True)
class Batch:
    """Tensors for one micro-batch; `attention_mask` is None for packed rows (position ids rule)."""

    input_ids: Any
    position_ids: Any
    targets: Any
    attention_mask: Any | None
    tokens: int  # real (non-pad) tokens

    def to(self, device: Any) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.targets.to(device),
            mask,
            self.tokens,
        )


def pack_rows(samples: Sequence[Encoded], row_len: int) -> list[list[Encoded]]:
    """First-fit packing of whole samples into rows of at most `row_len` tokens, order kept."""
    rows: list[list[Encoded]] = []
    free: list[int] = []
    for sample in samples:
        size = len(sample.input_ids)
        for index, room in enumerate(free):
            if size <= room:
                rows[index].append(sample)
                free[index] -= size
                break
        else:
            rows.append([sample])
            free.append(row_len - size)
    return rows


def collate_packed(rows: Sequence[Sequence[Encoded]], pad_id: int) -> Batch:
    """Rows of packed samples → one padded tensor batch; positions restart at every sample."""
    import torch

    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    ids, pos, tgt = [], [], []
    tokens = 0
    for row in rows:
        r_ids: list[int] = []
        r_pos: list[int] = []
        r_tgt: list[int] = []
        for sample in row:
            r_ids += sample.input_ids
            r_pos += range(len(sample.input_ids))
            r_tgt += sample.targets
        tokens += len(r_ids)
        pad = width - len(r_ids)
        # Padding is its own "sample" (positions from 0), so it never joins a real one.
        ids.append(r_ids + [pad_id] * pad)
        pos.append(r_pos + list(range(pad)))
        tgt.append(r_tgt + [IGNORE] * pad)
    as_long = torch.long
    return Batch(
        torch.tensor(ids, dtype=as_long),
        torch.tensor(pos, dtype=as_long),
        torch.tensor(tgt, dtype=as_long),
        None,
        tokens,
    )


def collate_padded(samples: Sequence[Encoded], pad_id: int) -> Batch:
    """One sample per row, right-padded to the longest, with an attention mask."""
    import torch

    width = max(len(s.input_ids) for s in samples)
    ids, pos, tgt, mask = [], [], [], []
    for s in samples:
        pad = width - len(s.input_ids)
        ids.append(s.input_ids + [pad_id] * pad)
        pos.append(list(range(width)))
        tgt.append(s.targets + [IGNORE] * pad)
        mask.append([1] * len(s.input_ids) + [0] * pad)
    return Batch(
        torch.tensor(ids),
        torch.tensor(pos),
        torch.tensor(tgt),
        torch.tensor(mask),
        sum(len(s.input_ids) for s in samples),
    )


def epoch_batches(
    samples: Sequence[Encoded], *, batch_size: int, row_len: int, pack: bool, pad_id: int, seed: int
) -> list[Batch]:
    """One epoch's micro-batches in a seeded order (the same seed gives the same batches)."""
    order = list(samples)
    random.Random(seed).shuffle(order)
    if pack:
        rows = pack_rows(order, row_len)
        return [collate_packed(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
    return [collate_padded(order[i : i + batch_size], pad_id) for i in range(0, len(order), batch_size)]


def iter_micro_batches(
    samples: Sequence[Encoded], *, batch_size: int, row_len: int, pack: bool, pad_id: int, seed: int
) -> Iterator[Batch]:
    """Micro-batches forever, epoch after epoch, each epoch reshuffled from `seed + epoch`."""
    epoch = 0
    while True:
        yield from epoch_batches(
            samples, batch_size=batch_size, row_len=row_len, pack=pack, pad_id=pad_id, seed=seed + epoch
        )
        epoch += 1

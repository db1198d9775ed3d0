"""The owner's past replies to similar messages: a BM25 index over (message → owner reply) pairs.

Pure and standard-library only (the bot imports it): no downloads, no model. Chinese is cut
into character bigrams, other text into lower-cased words, so nothing needs a dictionary.
The dataset (`pipeline/dataset/build.py`) and the bot (`bot/runtime.py`) feed it the same
messages in the same order and ask it the same question, so a sample's examples are the ones
the bot would have shown at that moment (`tests/test_train_serve_parity.py`).

Privacy: each chat is its own partition; a query reads only its own chat unless the caller
asks for other chats too, and then only the owner's replies (never a friend's words) come back.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.chatformat import Said, Turn, join_burst
from pipeline.dataset.samples import estimate_tokens

ChatKey = tuple[str, str]  # (chat_type, chat)

# The dataset's default `session_gap`: a reply after a longer silence answers nothing before it.
PAIR_GAP = 3600
# BM25's usual constants (Robertson & Zaragoza): term saturation and length normalisation.
K1 = 1.2
B = 0.75
# A pasted essay must not make a lookup scan the whole chat, nor one pair hold 20,000 terms:
# the last terms are kept (what needs an answer is said last).
MAX_QUERY_TERMS = 64
MAX_PAIR_TERMS = 256

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"[0-9a-z]+")
_BRACKETED = re.compile(r"\[[^\[\]\n]{1,8}\]")  # `[微笑]`, `[图片]`: a face is one term


def terms(text: str) -> list[str]:
    """Index terms of a text: CJK character bigrams (a lone character stands alone), ASCII words,
    and each bracketed face or placeholder as one term."""
    text = text.lower()
    out = _BRACKETED.findall(text)
    text = _BRACKETED.sub(" ", text)
    for run in _CJK.findall(text):
        out += [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
    out += _WORD.findall(text)
    return out


@dataclass(slots=True, frozen=True)
class Pair:
    """A friend's turn and the owner's turn that answered it, at the time of that answer."""

    chat: ChatKey
    message: str
    reply: str
    time: int
    sources: tuple[str, ...] = ()  # message ids of both turns (a recall removes the pair)


@dataclass(slots=True)
class _Partition:
    """One chat's pairs (or every chat's), in time order, with their postings."""

    pairs: list[Pair] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # cumulative document lengths, for avgdl
    postings: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # term → (doc, tf)

    def add(self, pair: Pair, counts: dict[str, int], length: int) -> None:
        doc = len(self.pairs)
        self.pairs.append(pair)
        # Documents stay in time order, so "before t" is a prefix; a late arrival counts from the
        # latest time already indexed (later than it happened: never earlier, so it cannot leak).
        self.times.append(max(pair.time, self.times[-1]) if self.times else pair.time)
        self.lengths.append(length + (self.lengths[-1] if self.lengths else 0))
        for term, tf in counts.items():
            self.postings.setdefault(term, []).append((doc, tf))

    def ranked(self, query: Sequence[str], before: int, dead: set[int] | frozenset[int]) -> list[int]:
        """Documents before `before` that share a term with the query, best BM25 score first
        (the newer first on a tie). Statistics are those of that prefix alone, so the same
        history gives the same ranking whenever it is asked."""
        n = bisect.bisect_left(self.times, before)
        if n == 0:
            return []
        avgdl = self.lengths[n - 1] / n or 1.0
        scores: dict[int, float] = {}
        for term in dict.fromkeys(query):
            posting = self.postings.get(term)
            if not posting:
                continue
            df = bisect.bisect_left(posting, (n, 0))
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            for doc, tf in posting[:df]:
                length = self.lengths[doc] - (self.lengths[doc - 1] if doc else 0)
                score = idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / avgdl))
                scores[doc] = scores.get(doc, 0.0) + score
        return sorted((d for d in scores if d not in dead), key=lambda d: (-scores[d], -d))


class ReplyIndex:
    """BM25 over (message → owner reply) pairs, one partition per chat, grown pair by pair.

    `other_chats=True` also keeps a partition of every chat, for `examples_for(other_chats=True)`.
    """

    def __init__(self, *, other_chats: bool = False) -> None:
        self._chats: dict[ChatKey, _Partition] = {}
        self._all: _Partition | None = _Partition() if other_chats else None
        self._dead: dict[int, set[int]] = {}  # id(partition) → recalled documents
        self._by_source: dict[str, list[tuple[_Partition, int]]] = {}
        self._forgotten: set[str] = set()  # recalled before their pair was made

    def __len__(self) -> int:
        return sum(len(p.pairs) for p in self._chats.values())

    def add(self, pair: Pair) -> None:
        """Index one pair (its terms are those of the friend's message it answered)."""
        words = terms(pair.message)[-MAX_PAIR_TERMS:]
        if not words or not pair.reply.strip() or self._forgotten.intersection(pair.sources):
            return
        counts: dict[str, int] = {}
        for word in words:
            counts[word] = counts.get(word, 0) + 1
        pair = Pair(pair.chat, "", pair.reply, pair.time, pair.sources)  # the message lives on as terms
        for partition in (self._chats.setdefault(pair.chat, _Partition()), self._all):
            if partition is None:
                continue
            partition.add(pair, counts, len(words))
            for source in pair.sources:
                self._by_source.setdefault(source, []).append((partition, len(partition.pairs) - 1))

    def forget(self, source: str) -> int:
        """Drop the pairs a message (by its id) took part in, e.g. once it is recalled; returns how many."""
        self._forgotten.add(source)
        places = self._by_source.pop(source, [])
        for partition, doc in places:
            self._dead.setdefault(id(partition), set()).add(doc)
        return len(places)

    def examples_for(
        self,
        query_text: str,
        chat: ChatKey,
        *,
        k: int,
        before_time: int,
        max_tokens: int = 120,
        same_chat_first: bool = True,
        other_chats: bool = False,
    ) -> tuple[str, ...]:
        """Up to `k` distinct owner replies to messages like `query_text`, answered strictly before
        `before_time`, within `max_tokens` (estimated) in all: this chat's first, then, only with
        `other_chats`, other chats' (the owner's words only)."""
        query = terms(query_text)[-MAX_QUERY_TERMS:]
        if k <= 0 or not query:
            return ()
        picked: list[str] = []
        budget = max_tokens
        for source, exclude in self._sources(chat, same_chat_first, other_chats):
            dead = self._dead.get(id(source), frozenset())
            for doc in source.ranked(query, before_time, dead):
                pair = source.pairs[doc]
                if exclude and pair.chat == chat:
                    continue
                reply = pair.reply.strip()
                cost = estimate_tokens(reply)
                if reply in picked or cost > budget:
                    continue
                picked.append(reply)
                budget -= cost
                if len(picked) == k:
                    return tuple(picked)
        return tuple(picked)

    def _sources(
        self, chat: ChatKey, same_chat_first: bool, other_chats: bool
    ) -> Iterator[tuple[_Partition, bool]]:
        """(partition, whether to skip this chat's own pairs in it), in the order they are read."""
        own = self._chats.get(chat)
        wider = self._all if other_chats else None
        if same_chat_first or wider is None:
            if own is not None:
                yield own, False
            if wider is not None:
                yield wider, True
        else:
            yield wider, False


# ---------------------------------------------------------------- messages → pairs


@dataclass(slots=True)
class _Burst:
    """The turn being built in one chat: consecutive messages of one sender."""

    sender: str
    is_self: bool
    first: int
    last: int
    texts: list[str]
    sources: list[str]


@dataclass(slots=True)
class _ChatPairs:
    burst: _Burst | None = None
    previous: _Burst | None = None  # the last finished, non-empty turn


class PairBuilder:
    """Messages in time order (any chats interleaved) → pairs, as `chatformat.to_turns` would cut
    them into turns: a pair is a friend's turn and the owner's turn right after it, within `gap`.

    A turn is finished by the next message of someone else (or after `burst_gap`), so the pair of
    an owner turn is made when the friend's next message arrives: exactly when a prompt needs it.
    """

    def __init__(self, burst_gap: int, gap: int = PAIR_GAP) -> None:
        self.burst_gap = burst_gap
        self.gap = gap
        self._chats: dict[ChatKey, _ChatPairs] = {}

    def add(self, chat: ChatKey, message: Said, *, source: str = "") -> Pair | None:
        """Take the chat's next message (`source`: its id, for `ReplyIndex.forget`); returns the
        pair made by the turn it finished, if any."""
        state = self._chats.setdefault(chat, _ChatPairs())
        burst = state.burst
        pair = None
        if burst is not None and (
            message.sender != burst.sender
            or message.is_self != burst.is_self
            or message.time - burst.last > self.burst_gap
        ):
            pair = self._finish(chat, state)
            burst = None
        if burst is None:
            burst = state.burst = _Burst(message.sender, message.is_self, message.time, message.time, [], [])
        burst.last = message.time
        burst.texts.append(message.text)
        if source:
            burst.sources.append(source)
        return pair

    def finish(self) -> Iterator[Pair]:
        """The pairs of the turns still open (the end of a history)."""
        for chat, state in self._chats.items():
            pair = self._finish(chat, state)
            if pair is not None:
                yield pair

    def settled(self, now: int) -> Iterator[Pair]:
        """The pairs of open turns that nothing can extend any more (silent for over `burst_gap`
        at `now`): another chat's last answer, before anyone writes there again."""
        for chat, state in self._chats.items():
            if state.burst is not None and now - state.burst.last > self.burst_gap:
                pair = self._finish(chat, state)
                if pair is not None:
                    yield pair

    def _finish(self, chat: ChatKey, state: _ChatPairs) -> Pair | None:
        burst, state.burst = state.burst, None
        if burst is None:
            return None
        text = join_burst(burst.texts)
        if not text:
            return None  # `to_turns` leaves empty turns out: the previous turn stays the previous
        previous = state.previous
        state.previous = _Burst(burst.sender, burst.is_self, burst.first, burst.last, [text], burst.sources)
        if (
            previous is None
            or previous.is_self
            or not burst.is_self
            or burst.first - previous.last > self.gap
        ):
            return None
        return Pair(chat, previous.texts[0], text, burst.first, (*previous.sources, *burst.sources))


def pairs_of(messages: Iterable[tuple[ChatKey, Said]], burst_gap: int, gap: int = PAIR_GAP) -> Iterator[Pair]:
    """Every pair of a history in time order (a test's and a benchmark's shortcut)."""
    builder = PairBuilder(burst_gap, gap)
    for chat, message in messages:
        pair = builder.add(chat, message)
        if pair is not None:
            yield pair
    yield from builder.finish()


def query_of(turns: Sequence[Turn]) -> str:
    """What the examples are looked up by: the friends' turns since the owner last spoke."""
    tail: list[str] = []
    for turn in reversed(turns):
        if turn.role != "user":
            break
        tail.append(turn.text)
    return "\n".join(reversed(tail))


def read_record_pairs(path: Path, builder: PairBuilder) -> Iterator[Pair]:
    """Pairs from an imported `messages.jsonl` (the owner's history before the bot), in file order."""
    from pipeline.records import iter_messages

    for message in iter_messages(path):
        pair = builder.add((message.chat_type, message.chat), message, source=f"import:{message.msg_id}")
        if pair is not None:
            yield pair

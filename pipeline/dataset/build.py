"""`build-dataset`: messages → conversations → clean → redact → samples → LLM pass → files.

Memory stays bounded on long histories: messages stream through `iter_conversations`
(only open conversations are held), samples go to a scratch file inside the output's
temp directory, and the time split needs only one (end time, id) pair per conversation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline.chatformat import ChatContext, system_prompt
from pipeline.dataset import formats, llm_clean
from pipeline.dataset.clean import clean_messages
from pipeline.dataset.conversations import ChatTurn, Conversation, iter_conversations, to_turns
from pipeline.dataset.redact import needs_redaction, redact_found, redact_values
from pipeline.dataset.samples import Sample, SampleOptions, estimate_messages_tokens, samples_from_turns
from pipeline.dataset.settings import DatasetSettings
from pipeline.errors import InputError
from pipeline.files import PRIVATE_FILE_MODE, atomic_dir
from pipeline.friend_memory import (
    ChatMemory,
    apply_extraction,
    empty_memory,
    extract_rules,
    render_memory,
    update_memory,
)
from pipeline.records import Message, iter_messages
from pipeline.retrieval import PairBuilder, ReplyIndex, query_of

REPORT_FILE = "report.json"
INFO_FILE = "dataset_info.json"
# One line per sample: conversation number, tab, (with an LLM pass: samples no_reply turns
# tokens owner_messages content_hash), tab, the output record.
_SCRATCH = ".samples.tsv"
_JUDGE_SCRATCH = ".samples.jsonl"  # whole samples, for the LLM pass
_PROGRESS_BATCH = 2048  # rich redraws are not free; advance in batches
DEFAULT_CACHE_NAME = "llm-clean-cache.jsonl"


@dataclass(slots=True)
class BuildStats:
    """Counters filled while samples stream out of `build_samples`."""

    messages: int = 0
    owner_messages: int = 0
    chats: set[tuple[str, str]] = field(default_factory=set)
    conversations: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    redactions: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class DatasetReport:
    """What `report.json` says about a build."""

    out_dir: str
    format: str
    messages: int
    bad_lines: list[int]
    chats: int
    conversations: int
    samples: dict[str, int]
    turns: dict[str, int]
    estimated_tokens: dict[str, int]
    owner_messages: int
    owner_messages_in_training: int
    owner_share: float
    dropped: dict[str, int]
    redactions: dict[str, int]
    skipped: dict[str, int]
    llm: dict[str, Any]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- samples


def build_samples(
    messages: Iterable[Message],
    settings: DatasetSettings | None = None,
    *,
    stats: BuildStats | None = None,
    history: Iterable[Message] = (),
) -> Iterator[Sample]:
    """Stream cleaned, redacted owner samples (no LLM pass, no split) out of a message stream.

    `history` (older than every message, time order) makes no samples: it only feeds what the
    samples' system prompts know (each chat's memory, the owner's past replies), as the live bot
    knows the whole history when it answers. A retrain cycle passes what came before its window."""
    settings = settings or DatasetSettings()
    stats = stats if stats is not None else BuildStats()
    options = SampleOptions(
        system=system_prompt(settings.persona),
        context_turns=settings.context_turns,
        max_tokens=settings.max_context_tokens,
        no_reply_rate=settings.no_reply_samples,
        seed=settings.seed,
        skipped=stats.skipped,
    )
    names = tuple(settings.redact_names)
    contexts = SampleContexts(settings)
    if settings.memory or settings.examples > 0:
        for conv in iter_conversations(history, settings.session_gap, settings.max_conversation_messages):
            kept = clean_messages(conv.messages, settings.rules, Counter())
            contexts.follow(conv, _redact_conversation(kept, names, Counter()))
    for conv in iter_conversations(messages, settings.session_gap, settings.max_conversation_messages):
        stats.conversations += 1
        # Every message lands in exactly one conversation: count there, not message by message.
        stats.messages += len(conv.messages)
        stats.owner_messages += sum(msg.is_self for msg in conv.messages)
        stats.chats.add((conv.chat_type, conv.chat))
        kept = clean_messages(conv.messages, settings.rules, stats.dropped)
        redacted = _redact_conversation(kept, names, stats.redactions)
        prompts = contexts.follow(conv, redacted)
        if not any(msg.is_self for msg in redacted):
            continue  # every sample ends at (or waits for) the owner: a lurked chat makes none
        turns = to_turns(redacted, settings.burst_gap)
        yield from samples_from_turns(
            turns,
            chat_type=conv.chat_type,
            chat=conv.chat,
            conversation=conv.key,
            conversation_end=conv.end,
            options=options,
            system_for=prompts(turns),
        )


class SampleContexts:
    """What a sample's system prompt knows besides the persona, from the chat's own history before
    the sample (issue 15): the chat's memory and the owner's similar past replies, each enabled
    part filling its field of the one `ChatContext`."""

    def __init__(self, settings: DatasetSettings) -> None:
        self.settings = settings
        self.replies = ReplyIndex() if settings.examples > 0 else None
        # Per chat, across its conversations (a chat's conversations arrive in time order).
        self.pairs = PairBuilder(settings.burst_gap, settings.session_gap)
        self.memories: dict[tuple[str, str], ChatMemory] = {}  # each chat's memory of earlier conversations

    def follow(
        self, conv: Conversation, messages: list[Message]
    ) -> Callable[[list[ChatTurn]], Callable[[int], str] | None]:
        """Take in one conversation (every one, even without a sample: memory and the index grow
        from it); returns what gives `samples_from_turns` its per-sample system prompt, or None
        when no part is on."""
        settings, chat = self.settings, (conv.chat_type, conv.chat)
        earlier = self.memories.get(chat) or empty_memory(*chat)
        if settings.memory:
            # Redacted messages only: the memory of a sample is redacted as the sample is.
            self.memories[chat] = update_memory(earlier, messages)
        replies = self.replies
        if replies is not None:
            # Every pair this conversation makes is indexed now; a sample still sees only those
            # answered strictly before its own answer (`before_time`), never the one it trains on.
            for message in messages:
                pair = self.pairs.add(chat, message)
                if pair is not None:
                    replies.add(pair)

        def prompts(turns: list[ChatTurn]) -> Callable[[int], str] | None:
            if not settings.memory and replies is None:
                return None
            memory_for = _memory_texts(earlier, messages, turns, settings) if settings.memory else None
            plain = [t.turn for t in turns]

            def system(index: int) -> str:
                examples: tuple[str, ...] = ()
                if replies is not None:
                    before = plain[index].time if index < len(plain) else plain[-1].time + 1
                    examples = tuple(
                        replies.examples_for(
                            query_of(plain[:index]),
                            chat,
                            k=settings.examples,
                            before_time=before,
                            max_tokens=settings.examples_tokens,
                        )
                    )
                memory = memory_for(index) if memory_for is not None else ""
                return system_prompt(settings.persona, ChatContext(memory=memory, examples=examples))

            return system

        return prompts


def _memory_texts(
    earlier: ChatMemory, messages: list[Message], turns: list[ChatTurn], settings: DatasetSettings
) -> Callable[[int], str]:
    """The rendered memory for the sample answering at turn `index`: the chat's memory of everything
    said before that turn (its earlier conversations and this one so far), never after it."""
    memory, folded = earlier, 0

    def system_for(index: int) -> str:
        nonlocal memory, folded
        cutoff = turns[index].turn.time if index < len(turns) else messages[-1].time + 1
        if folded and messages[folded - 1].time >= cutoff:  # asked about an earlier turn: start over
            memory, folded = earlier, 0
        end = folded
        while end < len(messages) and messages[end].time < cutoff:
            end += 1
        # Every message here is new to the memory, even one in the same second as the last folded.
        memory = apply_extraction(memory, extract_rules(messages[folded:end]))
        folded = end
        query = turns[index - 1].turn.text if index > 0 else ""
        return render_memory(memory, settings.memory_tokens, query)

    return system_for


def _redact_conversation(
    messages: list[Message], names: tuple[str, ...], counts: Counter[str]
) -> list[Message]:
    """Redact every message, then any value found anywhere in the conversation wherever it recurs."""
    found: dict[str, str] = {}
    out = []
    # A conversation has a handful of speakers: redact each name once, count it every time.
    speakers: dict[str, tuple[str, Counter[str], dict[str, str]]] = {}
    for msg in messages:
        # Group cards are free text too ("张三 138…"), and they label turns in the output.
        redacted_speaker = speakers.get(msg.sender_name)
        if redacted_speaker is None:
            redacted_speaker = speakers[msg.sender_name] = redact_found(msg.sender_name, names)
        speaker, speaker_hits, speaker_seen = redacted_speaker
        if not speaker_hits and not needs_redaction(msg.text, names):
            out.append(msg)  # the common case: nothing in the text could be personal data
            continue
        text, hits, seen = redact_found(msg.text, names)
        if hits or speaker_hits:
            counts.update(hits)
            counts.update(speaker_hits)
            found.update(seen)
            found.update(speaker_seen)
            msg = dataclasses.replace(msg, text=text, sender_name=speaker)
        out.append(msg)
    if found:
        for i, msg in enumerate(out):
            text, hits = redact_values(msg.text, found)
            speaker, speaker_hits = redact_values(msg.sender_name, found)
            if hits or speaker_hits:
                counts.update(hits)
                counts.update(speaker_hits)
                out[i] = dataclasses.replace(msg, text=text, sender_name=speaker)
    return out


def write_samples(samples: Iterable[Sample], path: Path, fmt: str = "openai") -> int:
    """Write samples as `fmt` records, one JSON object a line (file mode 0600); returns the count."""
    count = 0
    with _open_private(path) as out:
        for sample in samples:
            out.write(formats.record_line(sample, fmt))
            count += 1
    return count


def _open_private(path: Path, mode: str = "w") -> IO[Any]:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    return os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8")


# ---------------------------------------------------------------- the whole build


@dataclass(slots=True)
class _Totals:
    """What samples add to the report: per conversation, and again per split."""

    samples: int = 0
    no_reply: int = 0
    turns: int = 0
    tokens: int = 0
    owner_messages: int = 0

    @classmethod
    def of(cls, sample: Sample) -> _Totals:
        return cls(1, int(sample.kind == "no_reply"), sample.turns, sample.tokens, sample.owner_messages)

    @classmethod
    def parse(cls, text: str) -> _Totals:
        return cls(*map(int, text.split(" ")))

    def __str__(self) -> str:
        return f"{self.samples} {self.no_reply} {self.turns} {self.tokens} {self.owner_messages}"

    def count(self, sample: Sample) -> None:
        self.samples += 1
        self.no_reply += sample.kind == "no_reply"
        self.turns += sample.turns
        self.tokens += sample.tokens
        self.owner_messages += sample.owner_messages

    def add(self, other: _Totals, sign: int = 1) -> None:
        self.samples += sign * other.samples
        self.no_reply += sign * other.no_reply
        self.turns += sign * other.turns
        self.tokens += sign * other.tokens
        self.owner_messages += sign * other.owner_messages


@dataclass(slots=True)
class _Scratch:
    """The first pass's output: one line per sample in `path` (whole samples in `judged` for
    an LLM pass) and, per conversation, its number, end time and totals."""

    path: Path
    judged: Path | None
    samples: int = 0
    ends: dict[str, int] = field(default_factory=dict)
    numbers: dict[str, int] = field(default_factory=dict)
    totals: list[_Totals] = field(default_factory=list)


@dataclass(slots=True)
class _Splits:
    """The split pass's output: what went to train, val and mix, and what the LLM pass dropped."""

    train: _Totals = field(default_factory=_Totals)
    val: _Totals = field(default_factory=_Totals)
    mix: _Totals = field(default_factory=_Totals)
    llm_dropped: int = 0


def build_dataset(
    messages: Path | Iterable[Message],
    out_dir: Path,
    settings: DatasetSettings | None = None,
    *,
    progress: bool = True,
) -> DatasetReport:
    """Build `out_dir/{train,val}.jsonl`, `dataset_info.json` and `report.json`, all or nothing."""
    settings = settings or DatasetSettings()
    out_dir = Path(out_dir)
    mix_path = Path(settings.mix) if settings.mix else None
    if mix_path is not None and settings.mix_ratio > 0 and not mix_path.is_file():
        raise InputError(mix_path, "no such mix file")

    llm_state = _llm_preflight(settings)
    bad_lines: list[int] = []
    total = None
    if isinstance(messages, (str, Path)):
        total = _count_lines(Path(messages)) if progress else None  # only the bar needs it
        stream: Iterable[Message] = iter_messages(messages, skip_bad=settings.skip_bad, bad_lines=bad_lines)
    else:
        stream = messages

    stats = BuildStats()
    with atomic_dir(out_dir) as tmp, _progress(progress) as bar:
        reading = bar.add_task("reading messages", total=total, unit="msg")
        scratch = _sample_pass(_advancing(stream, bar, reading) if progress else stream, settings, stats, tmp)
        bar.update(reading, total=stats.messages, completed=stats.messages)
        if scratch.samples == 0:
            source_name = str(messages) if isinstance(messages, (str, Path)) else "<messages>"
            raise InputError(
                source_name,
                f"no training samples could be made from {stats.messages} messages "
                f"({stats.owner_messages} from the owner): nothing the owner answered survived cleaning",
            )
        judged = scratch.judged
        verdicts = _llm_pass(judged, scratch.samples, settings, out_dir, llm_state, bar) if judged else {}
        val = {scratch.numbers[key] for key in _latest(scratch.ends, settings.val_fraction)}
        splits = _split_pass(scratch, verdicts, val, settings, tmp, bar)
        _write_mix(tmp / formats.TRAIN_FILE, mix_path, settings, stats, splits)
        report = _report(out_dir, settings, stats, bad_lines, splits, llm_state)
        with _open_private(tmp / INFO_FILE) as out:
            json.dump(formats.dataset_info(settings.format), out, ensure_ascii=False, indent=2)
        with _open_private(tmp / REPORT_FILE) as out:
            json.dump(report.to_dict(), out, ensure_ascii=False, indent=2)
    return report


def _sample_pass(
    stream: Iterable[Message], settings: DatasetSettings, stats: BuildStats, tmp: Path
) -> _Scratch:
    """Pass 1: build every sample and encode its output record once, into a scratch file."""
    # Only a judge (or its cache) needs whole samples back; the split needs a few numbers.
    scratch = _Scratch(tmp / _SCRATCH, tmp / _JUDGE_SCRATCH if settings.llm.enabled else None)
    with ExitStack() as files:
        out = files.enter_context(_open_private(scratch.path))
        judge_out = files.enter_context(_open_private(scratch.judged)) if scratch.judged else None
        for sample in build_samples(stream, settings, stats=stats):
            scratch.ends[sample.conversation] = sample.conversation_end
            number = scratch.numbers.setdefault(sample.conversation, len(scratch.numbers))
            if number == len(scratch.totals):
                scratch.totals.append(_Totals())
            scratch.totals[number].count(sample)
            meta = ""
            if judge_out is not None:
                judge_out.write(sample.to_json() + "\n")
                meta = f"{_Totals.of(sample)} {sample.content_hash()}"
            # The output record is encoded once, here; the split only copies the line.
            out.write(f"{number}\t{meta}\t{_line(sample, settings.format)}")
            scratch.samples += 1
    return scratch


def _split_pass(
    scratch: _Scratch,
    verdicts: dict[str, llm_clean.Verdict],
    val: set[int],
    settings: DatasetSettings,
    tmp: Path,
    bar: Progress,
) -> _Splits:
    """Pass 2: copy each kept record to train.jsonl or val.jsonl by its conversation; bytes in, bytes out."""
    splits = _Splits()
    splitting = bar.add_task("writing samples", total=scratch.samples, unit="samples")
    with (
        _open_private(tmp / formats.TRAIN_FILE, "wb") as train_out,
        _open_private(tmp / formats.VAL_FILE, "wb") as val_out,
        scratch.path.open("rb") as lines,
    ):
        for done, line in enumerate(lines, start=1):
            if done % _PROGRESS_BATCH == 0:
                bar.advance(splitting, _PROGRESS_BATCH)
            number_field, meta, record = line.split(b"\t", 2)
            number = int(number_field)
            if verdicts:
                totals, content_hash = meta.decode().rsplit(" ", 1)
                verdict = verdicts.get(llm_clean.key_for_hash(content_hash, settings.llm.model))
                if not llm_clean.keeps(verdict, settings.llm.min_score):
                    splits.llm_dropped += 1
                    scratch.totals[number].add(_Totals.parse(totals), sign=-1)
                    continue
            (val_out if number in val else train_out).write(record)
        bar.update(splitting, completed=scratch.samples)
    for number, totals in enumerate(scratch.totals):
        (splits.val if number in val else splits.train).add(totals)
    scratch.path.unlink()
    if scratch.judged is not None:
        scratch.judged.unlink()
    return splits


def _report(
    out_dir: Path,
    settings: DatasetSettings,
    stats: BuildStats,
    bad_lines: list[int],
    splits: _Splits,
    llm_state: dict[str, Any],
) -> DatasetReport:
    train, val, mix = splits.train, splits.val, splits.mix
    owner_in_training = train.owner_messages + val.owner_messages
    return DatasetReport(
        out_dir=str(out_dir),
        format=settings.format,
        messages=stats.messages,
        bad_lines=bad_lines[:1000],
        chats=len(stats.chats),
        conversations=stats.conversations,
        samples={
            "train": train.samples,
            "val": val.samples,
            "mix": mix.samples,
            "no_reply": train.no_reply + val.no_reply,
            "llm_dropped": splits.llm_dropped,
        },
        turns={"train": train.turns, "val": val.turns, "mix": mix.turns},
        estimated_tokens={"train": train.tokens, "val": val.tokens, "mix": mix.tokens},
        owner_messages=stats.owner_messages,
        owner_messages_in_training=owner_in_training,
        owner_share=round(owner_in_training / stats.owner_messages, 4) if stats.owner_messages else 0.0,
        dropped=dict(sorted(stats.dropped.items())),
        redactions=dict(sorted(stats.redactions.items())),
        skipped=dict(sorted(stats.skipped.items())),
        llm=llm_state,
        settings=settings.public_dict(),
    )


def _line(sample: Sample, fmt: str) -> str:
    return formats.record_line(sample, fmt)


def _latest(conversations: dict[str, int], fraction: float) -> set[str]:
    """Ids of the most recent `fraction` of conversations (at least one, never all)."""
    if fraction <= 0 or len(conversations) < 2:
        return set()
    n_val = min(len(conversations) - 1, max(1, round(len(conversations) * fraction)))
    ordered = sorted(conversations.items(), key=lambda kv: (kv[1], kv[0]))
    return {key for key, _ in ordered[-n_val:]}


def _count_lines(path: Path) -> int | None:
    try:
        with path.open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return None  # iter_messages reports the real problem


# ---------------------------------------------------------------- LLM pass


def _llm_preflight(settings: DatasetSettings) -> dict[str, Any]:
    llm = settings.llm
    state: dict[str, Any] = {"enabled": llm.enabled}
    if not llm.enabled:
        return state
    state.update(model=llm.model, api_base=llm.api_base, min_score=llm.min_score)
    try:
        asyncio.run(llm_clean.check_server(llm))
    except llm_clean.LLMUnavailable as exc:
        if not llm.optional:
            raise
        state.update(enabled=False, skipped_because=str(exc))
    return state


def _llm_pass(
    judged: Path,
    n_samples: int,
    settings: DatasetSettings,
    out_dir: Path,
    state: dict[str, Any],
    bar: Progress,
) -> dict[str, llm_clean.Verdict]:
    cache_path = Path(settings.llm.cache) if settings.llm.cache else out_dir.parent / DEFAULT_CACHE_NAME

    def samples() -> Iterator[Sample]:
        with judged.open(encoding="utf-8") as lines:
            for line in lines:
                yield Sample.from_json(line)

    if not state.get("enabled"):
        if settings.llm.enabled and cache_path.is_file():
            return _cached_verdicts(samples(), cache_path, settings, state)
        return {}
    cache = llm_clean.VerdictCache(cache_path)
    task = bar.add_task("LLM judging", total=n_samples, unit="samples")
    try:
        verdicts, stats = asyncio.run(
            llm_clean.judge_samples(samples(), settings.llm, cache, on_done=lambda n: bar.advance(task, n))
        )
    finally:
        cache.close()
    scores = Counter(v.score for v in verdicts.values())
    state.update(
        cache=str(cache_path),
        judged=stats.judged,
        cached=stats.cached,
        errors=stats.errors,
        retries=stats.retries,
        kept=sum(llm_clean.keeps(v, settings.llm.min_score) for v in verdicts.values()),
        dropped=sum(not llm_clean.keeps(v, settings.llm.min_score) for v in verdicts.values()),
        scores={str(s): scores[s] for s in range(1, 6)},
    )
    return verdicts


def _cached_verdicts(
    samples: Iterable[Sample], cache_path: Path, settings: DatasetSettings, state: dict[str, Any]
) -> dict[str, llm_clean.Verdict]:
    """Server down with --llm-optional: still apply the verdicts already paid for."""
    cache = llm_clean.VerdictCache(cache_path)
    cache.close()
    verdicts = {}
    for sample in samples:
        key = llm_clean.cache_key(sample, settings.llm.model)
        verdict = cache.get(key)
        if verdict is not None:
            verdicts[key] = verdict
    state.update(cache=str(cache_path), cached=len(verdicts))
    return verdicts


# ---------------------------------------------------------------- mixing general data


def _write_mix(
    train_file: Path, mix_path: Path | None, settings: DatasetSettings, stats: BuildStats, splits: _Splits
) -> None:
    """Pass 3: append general samples so they make up `mix_ratio` of train.jsonl."""
    n_owner = splits.train.samples
    if mix_path is None or settings.mix_ratio <= 0 or n_owner == 0:
        return
    valid = sum(1 for _ in _iter_mix(mix_path, settings.skip_bad))
    wanted = round(settings.mix_ratio * n_owner / (1 - settings.mix_ratio))
    chosen = set(random.Random(settings.seed).sample(range(valid), min(wanted, valid)))
    with _open_private(train_file, "ab") as train:
        for index, messages in enumerate(_iter_mix(mix_path, settings.skip_bad)):
            if index not in chosen:
                continue
            clean = _redact_mix_messages(messages, tuple(settings.redact_names), stats.redactions)
            sample = Sample(messages=clean, source="mix", kind="mix", chat_type="mix")
            train.write(_line(sample, settings.format).encode("utf-8"))
            splits.mix.add(_Totals(samples=1, turns=sample.turns, tokens=estimate_messages_tokens(clean)))


def _redact_mix_messages(
    messages: list[dict[str, str]], names: tuple[str, ...], counts: Counter[str]
) -> list[dict[str, str]]:
    """A general sample redacted as one conversation, like `_redact_conversation` does for chats.

    A value found after its label ("微信：zhang_san88") also goes where it recurs bare.
    """
    found: dict[str, str] = {}
    clean = []
    for m in messages:
        content, hits, seen = redact_found(m["content"], names)
        counts.update(hits)
        found.update(seen)
        clean.append({"role": m["role"], "content": content})
    if found:
        for m in clean:
            m["content"], hits = redact_values(m["content"], found)
            counts.update(hits)
    return clean


def _iter_mix(path: Path, skip_bad: bool) -> Iterator[list[dict[str, str]]]:
    """Valid mix records as `messages` lists, from a JSONL file or one JSON array."""
    try:
        with path.open(encoding="utf-8") as handle:
            head = handle.read(1024).lstrip()
            handle.seek(0)
            if head.startswith("["):
                rows: Iterable[tuple[int, Any]] = enumerate(json.load(handle), start=1)
                where = "record"
            else:
                rows = ((n, line) for n, line in enumerate(handle, start=1) if line.strip())
                where = "line"
            for number, row in rows:
                try:
                    yield formats.mix_messages(json.loads(row) if isinstance(row, str) else row)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    if not skip_bad:
                        raise InputError(
                            path,
                            f"{where} {number}: not a chat record ({exc}); use --skip-bad to skip such lines",
                        ) from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text") from None


# ---------------------------------------------------------------- progress


class _RateColumn(ProgressColumn):
    """Items per second, in the task's own unit."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


def _progress(enabled: bool) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _advancing(stream: Iterable[Message], bar: Progress, task: Any) -> Iterator[Message]:
    batch = 0
    for msg in stream:
        yield msg
        batch += 1
        if batch == _PROGRESS_BATCH:
            bar.advance(task, batch)
            batch = 0
    bar.advance(task, batch)

"""What the owner knows about one chat: names, facts said there, recent topics — built from that
chat's own messages only, updated incrementally, and rendered (bounded) as `ChatContext.memory`.

Pure and NoneBot-free: the dataset builder and the bot both import it, so a training sample and
a live prompt carry the same memory text for the same history. Rules extract by default; an
LLM may extract instead (`EXTRACTION_PROMPT`, `parse_extraction`), the caller doing the I/O.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from pipeline import chatformat
from pipeline.chatformat import CHAT_TYPES, EXAMPLES_HEADING, MEMORY_HEADING, PLACEHOLDERS
from pipeline.dataset.samples import estimate_tokens

# Dates in the memory are China time whatever the machine's zone: training and serving must
# render the same day for the same message.
CHINA_TIME = timezone(timedelta(hours=8))

MAX_FACTS = 200  # kept per chat, newest last; the render picks from these
MAX_TOPICS = 300
MAX_NAMES = 20
MAX_FACT_CHARS = 60
MAX_NAME_CHARS = 16
FACT_KINDS = ("date", "plan", "place", "work", "note")

# The one prompt an LLM extractor is given; its answer is read by `parse_extraction`.
EXTRACTION_PROMPT = (
    "下面是一段QQ聊天记录。请只根据这段记录，提取值得长期记住的关于对方（或群里的人）的事实："
    "别人怎么称呼对方、生日和日期、计划和约定、地点、在做的工作或学习。"
    '只输出一个JSON对象，格式为 {"names": ["称呼"], "facts": [{"line": 行号, '
    '"kind": "date|plan|place|work|note", "text": "简短的事实"}]}；'
    'line 是事实出自的那一行的行号。没有就输出 {"names": [], "facts": []}。'
)


class Said(chatformat.Said, Protocol):
    """A message as memory needs it: what turns need (`chatformat.Said`) and the chat it was said in."""

    @property
    def chat_type(self) -> str: ...
    @property
    def chat(self) -> str: ...


class OtherChatError(ValueError):
    """A message of another chat was offered to this chat's memory: refused, never merged."""


@dataclass(slots=True)
class Fact:
    """One thing said in the chat, as said (clipped), with who said it and when."""

    text: str
    kind: str
    said_at: int  # the source message's time (unix seconds)
    by: str  # "我" for the owner, else the speaker's name


@dataclass(slots=True)
class ChatMemory:
    """The memory of one chat; `updated_until` is the time of the newest message folded in."""

    chat_type: str
    chat: str
    names: dict[str, int] = field(default_factory=dict)  # name → times used
    facts: list[Fact] = field(default_factory=list)
    topics: dict[str, int] = field(default_factory=dict)  # keyword → count
    updated_until: int = 0

    @property
    def key(self) -> str:
        return f"{self.chat_type}:{self.chat}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ChatMemory:
        """Parse a stored or hand-edited memory; ValueError naming what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> ChatMemory:
        if not isinstance(data, dict):
            raise ValueError("a memory is a JSON object")
        chat_type, chat = data.get("chat_type"), data.get("chat")
        if chat_type not in CHAT_TYPES or not isinstance(chat, str) or not chat.isdigit():
            raise ValueError("chat_type must be c2c or group and chat a QQ number")
        try:
            facts = [
                Fact(
                    _clip(str(f["text"]), MAX_FACT_CHARS),
                    _kind(f.get("kind")),
                    int(f["said_at"]),
                    str(f["by"]),
                )
                for f in data.get("facts") or []
            ]
            names = {_clip(str(k), MAX_NAME_CHARS): int(v) for k, v in (data.get("names") or {}).items()}
            topics = {_clip(str(k), MAX_NAME_CHARS): int(v) for k, v in (data.get("topics") or {}).items()}
            until = int(data.get("updated_until") or 0)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"bad memory field ({type(exc).__name__}: {exc})") from None
        return cls(chat_type, chat, names, facts[-MAX_FACTS:], topics, until)


def _kind(value: object) -> str:
    return value if isinstance(value, str) and value in FACT_KINDS else "note"


def empty_memory(chat_type: str, chat: str) -> ChatMemory:
    return ChatMemory(chat_type, str(chat))


# ---------------------------------------------------------------- rules for Chinese chat

_WEEKDAY = "[一二三四五六日天]"
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "date",
        re.compile(
            rf"生日|\d{{1,2}}月\d{{1,2}}[日号]|\d{{1,2}}[号日](?!子)|[下这本]?(?:周|星期|礼拜){_WEEKDAY}|"
            r"下周|下个?月|明天|后天|大后天|明年|今晚|周末|纪念日|国庆|春节|过年|寒假|暑假"
        ),
    ),
    (
        "plan",
        re.compile(
            r"要去|打算|准备|约了?|计划|想去(?![哈呀啊吧了])|要回|回老家|出差|旅游|旅行|搬家|订了|报名|见面|聚餐|一起去"
        ),
    ),
    (
        "work",
        re.compile(
            r"在做|项目|考试|论文|实习|面试|上班|加班|工作|毕业|答辩|复习|作业|考研|考公|入职|辞职|课题|比赛"
        ),
    ),
    (
        "place",
        re.compile(
            r"[\u4e00-\u9fff]{2,4}(?:市|省|县|区|路|站|机场|大学|学校|公司|医院|酒店|公园)|北京|上海|广州|深圳|杭州|成都|南京|武汉|西安|重庆|老家"
        ),
    ),
)
_SENTENCE_END = re.compile(r"[。！？!?；;\n]+")
_QUESTION = re.compile(r"[？?]$|吗$|呢$|什么|哪天|几号|哪里|怎么")
_CONCRETE = re.compile(r"\d|[一二三四五六七八九十]+[号月]")
# How people are addressed: a vocative before a pause ("小王，…", "王哥 你…"), or "叫我X".
_VOCATIVE = re.compile(
    r"^((?:小|老|阿)[\u4e00-\u9fff]{1,2}|[\u4e00-\u9fff]{1,2}(?:哥|姐|总|老师|同学|宝|酱))[，,：:\s!！~～]"
)
_CALL_ME = re.compile(r"叫我([\u4e00-\u9fffA-Za-z]{1,4})")
_NOT_NAMES = frozenset(
    {"小时", "老师", "老板", "小心", "老是", "阿姨", "小说", "老家", "小区", "老实", "阿里"}
)
_CJK_RUN = re.compile(r"[\u4e00-\u9fff]{2,}")
# Characters that make a bigram chatter rather than a topic.
_FUNCTION_CHARS = frozenset(
    "的了吗呢吧啊呀哦嗯哈我你他她它们是在有就都也还这那么什怎没不个一人要去会说好来到看想得着过给对和很"
    "啥咋干嘛呗啦哇噢喔诶欸额呃吼哎唉么已经可以能就才又再把被让从跟"
)
_PLACEHOLDER_TEXT = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS) + r"|\[[^\]\s]{1,8}\]|@\S+")
OWNER_NAME = "我"


@dataclass(slots=True)
class Extraction:
    """What one batch of messages adds to a memory."""

    names: Counter[str] = field(default_factory=Counter)
    facts: list[Fact] = field(default_factory=list)
    topics: Counter[str] = field(default_factory=Counter)
    until: int = 0


def _clip(text: str, limit: int) -> str:
    # One line, no heading of the system prompt: a fact is data, it cannot start a new section.
    text = " ".join(text.replace(MEMORY_HEADING, "").replace(EXAMPLES_HEADING, "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _speaker(message: Said) -> str:
    return OWNER_NAME if message.is_self else (_clip(message.sender_name, MAX_NAME_CHARS) or "对方")


def _fact_kind(sentence: str) -> str | None:
    for kind, pattern in _RULES:
        if pattern.search(sentence):
            return kind
    return None


def extract_rules(messages: Iterable[Said]) -> Extraction:
    """The extractive pass: names used to address people, sentences with dates, plans, places or
    work, and keyword counts for topics; facts said by either side are kept."""
    found = Extraction()
    for message in messages:
        found.until = max(found.until, int(message.time))
        text = _PLACEHOLDER_TEXT.sub(" ", message.text).strip()
        if not text or text.startswith(("/", "!", "！", "#")):
            continue
        if not message.is_self and message.sender_name:
            found.names[_clip(message.sender_name, MAX_NAME_CHARS)] += 1
        vocative = _VOCATIVE.match(text)
        if vocative and vocative.group(1) not in _NOT_NAMES:
            found.names[vocative.group(1)] += 1
        for called in _CALL_ME.findall(text):
            found.names[called] += 1
        for sentence in _SENTENCE_END.split(text):
            sentence = sentence.strip(" ，,~～")
            if len(sentence) < 4:
                continue
            kind = _fact_kind(sentence)
            if kind is None or (_QUESTION.search(sentence) and not _CONCRETE.search(sentence)):
                continue
            found.facts.append(
                Fact(_clip(sentence, MAX_FACT_CHARS), kind, int(message.time), _speaker(message))
            )
        for run in _CJK_RUN.findall(text):
            for i in range(len(run) - 1):
                bigram = run[i : i + 2]
                if not (_FUNCTION_CHARS & set(bigram)):
                    found.topics[bigram] += 1
    return found


def parse_extraction(answer: str, messages: Sequence[Said]) -> Extraction:
    """An LLM's answer to `extraction_messages(messages)` → what it adds; whatever is not the
    asked-for JSON (or names a line that does not exist) is ignored, never trusted."""
    found = Extraction(until=max((int(m.time) for m in messages), default=0))
    start, end = answer.find("{"), answer.rfind("}")
    try:
        data = json.loads(answer[start : end + 1]) if 0 <= start < end else {}
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        return found
    for name in data.get("names") or []:
        if isinstance(name, str) and name.strip():
            found.names[_clip(name, MAX_NAME_CHARS)] += 1
    for fact in data.get("facts") or []:
        if not isinstance(fact, dict) or not isinstance(fact.get("text"), str):
            continue
        line = fact.get("line")
        if not isinstance(line, int) or not 1 <= line <= len(messages):
            continue  # a fact must come from a message of this batch: its time is that message's
        source = messages[line - 1]
        text = _clip(fact["text"], MAX_FACT_CHARS)
        if text:
            found.facts.append(Fact(text, _kind(fact.get("kind")), int(source.time), _speaker(source)))
    return found


def extraction_messages(messages: Sequence[Said]) -> list[dict[str, str]]:
    """The `messages` list that asks an LLM extractor about one batch of one chat's messages."""
    lines = [f"{i}. {_speaker(m)}：{_clip(m.text, 200)}" for i, m in enumerate(messages, start=1)]
    return [{"role": "system", "content": EXTRACTION_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


# ---------------------------------------------------------------- updating and rendering


def new_messages(memory: ChatMemory, messages: Iterable[Said]) -> list[Said]:
    """The messages not yet in `memory` (newer than `updated_until`), refusing any of another chat."""
    fresh = []
    for message in messages:
        if message.chat_type != memory.chat_type or str(message.chat) != memory.chat:
            raise OtherChatError(
                f"a message of {message.chat_type}:{message.chat} offered to the memory of {memory.key}"
            )
        if int(message.time) > memory.updated_until:
            fresh.append(message)
    return fresh


def update_memory(memory: ChatMemory, messages: Iterable[Said]) -> ChatMemory:
    """`memory` with the chat's messages newer than `updated_until` folded in by the rules; the
    same messages in one batch or in several give the same memory. Another chat's message raises."""
    return apply_extraction(memory, extract_rules(new_messages(memory, messages)))


def apply_extraction(memory: ChatMemory, found: Extraction) -> ChatMemory:
    """A new memory: `memory` plus `found` (facts deduplicated, everything bounded)."""
    names = Counter(memory.names)
    names.update(found.names)
    topics = Counter(memory.topics)
    topics.update(found.topics)
    facts = list(memory.facts)
    seen = {fact.text for fact in facts}
    for fact in found.facts:
        if fact.text not in seen:
            seen.add(fact.text)
            facts.append(fact)
    return ChatMemory(
        memory.chat_type,
        memory.chat,
        dict(_most_common(names, MAX_NAMES)),
        facts[-MAX_FACTS:],
        dict(_most_common(topics, MAX_TOPICS)),
        max(memory.updated_until, found.until),
    )


def _most_common(counts: Counter[str], limit: int) -> list[tuple[str, int]]:
    # Ties broken by the text, so that the kept set never depends on the order things arrived in.
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]


_NUMBER = re.compile(r"\d+")


def _bigrams(text: str) -> set[str]:
    """What relevance is measured in: Chinese bigrams and numbers (a date, a room, an amount)."""
    words = {run[i : i + 2] for run in _CJK_RUN.findall(text) for i in range(len(run) - 1)}
    return words | set(_NUMBER.findall(text))


def render_memory(memory: ChatMemory, max_tokens: int, query: str = "") -> str:
    """The memory as `ChatContext.memory`: names, then facts (those sharing words with `query`
    first, then the newest), then topics — cut to `max_tokens` by the dataset's token estimate."""
    if max_tokens <= 0:
        return ""
    lines: list[str] = []
    used = 0

    def add(line: str) -> bool:
        nonlocal used
        cost = estimate_tokens(line) + 1
        if used + cost > max_tokens:
            return False
        lines.append(line)
        used += cost
        return True

    names = [name for name, count in _most_common(Counter(memory.names), 5) if count >= 1]
    if names:
        add("称呼：" + "、".join(names))
    wanted = _bigrams(query)
    ranked = sorted(
        range(len(memory.facts)),
        key=lambda i: (-len(wanted & _bigrams(memory.facts[i].text)), -memory.facts[i].said_at, -i),
    )
    for i in ranked:
        fact = memory.facts[i]
        day = datetime.fromtimestamp(fact.said_at, CHINA_TIME)
        if not add(f"- {day.month}月{day.day}日 {fact.by}：{fact.text}"):
            break
    topics = [word for word, count in _most_common(Counter(memory.topics), 5) if count >= 2]
    if topics:
        add("最近聊到：" + "、".join(topics))
    return "\n".join(lines)


def describe_memory(memory: ChatMemory, last: int | None = None) -> str:
    """The memory for an operator: names, numbered facts (the numbers `forget_fact` takes; only
    the `last` newest when given), topics."""
    lines = [f"memory of {memory.key}"]
    if memory.updated_until:
        until = datetime.fromtimestamp(memory.updated_until, CHINA_TIME).strftime("%Y-%m-%d %H:%M")
        lines[0] += f" (messages until {until} UTC+8)"
    names = _most_common(Counter(memory.names), MAX_NAMES)
    lines.append("names: " + (", ".join(f"{name}×{count}" for name, count in names) or "-"))
    first = 0 if last is None else max(0, len(memory.facts) - last)
    if first:
        lines.append(f"facts ({first} older not shown):")
    else:
        lines.append("facts:" if memory.facts else "facts: -")
    for number, fact in enumerate(memory.facts[first:], start=first + 1):
        day = datetime.fromtimestamp(fact.said_at, CHINA_TIME).strftime("%Y-%m-%d")
        lines.append(f"{number}. [{fact.kind}] {day} {fact.by}：{fact.text}")
    topics = _most_common(Counter(memory.topics), 10)
    lines.append("topics: " + (", ".join(word for word, _ in topics) or "-"))
    return "\n".join(lines)


def forget_fact(memory: ChatMemory, number: int) -> ChatMemory:
    """`memory` without fact `number` (as `describe_memory` numbers them); ValueError if none."""
    if not 1 <= number <= len(memory.facts):
        raise ValueError(f"no fact {number}: {memory.key} has {len(memory.facts)}")
    facts = memory.facts[: number - 1] + memory.facts[number:]
    return ChatMemory(
        memory.chat_type, memory.chat, dict(memory.names), facts, dict(memory.topics), memory.updated_until
    )


def cleared_memory(chat_type: str, chat: str, until: int) -> ChatMemory:
    """An empty memory that stays empty of everything said until `until` (clearing must not be
    undone by the next refresh rebuilding from the store)."""
    return ChatMemory(chat_type, str(chat), updated_until=until)

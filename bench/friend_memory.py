"""Planted facts: does a chat's prompt remember what was said there weeks earlier, and does no
other chat's prompt ever see it?

A history of many private chats is generated: in each, the friend tells one planted fact
(a trip, an exam, a birthday…) in a first conversation, then weeks of ordinary chat follow,
fact-like lines included, then the friend refers back to it. The samples are built with
`DatasetSettings(memory=True)` — the prompts the bot serves for the same history (the parity
test holds the two equal). Reported: the share of "the fact matters" prompts whose memory
holds the fact, and the prompts of other chats that hold any planted fact (must be 0).

    .venv/bin/python bench/friend_memory.py [--chats 20] [--weeks 6] [--quick] [--write-docs]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._docs import replace_section
from pipeline.dataset.build import build_samples
from pipeline.dataset.settings import DatasetSettings
from pipeline.records import Message

HEADING = "## Memory per chat: planted facts (`bench/friend_memory.py`)"
OWNER = "10000"
START = 1_767_225_600  # 2026-01-01 UTC
DAY = 86400
CITIES = ("杭州", "成都", "厦门", "西安", "青岛", "大理", "长沙", "苏州", "昆明", "桂林", "洛阳", "拉萨")
EVENTS = ("马拉松", "婚礼", "面试", "音乐节", "答辩", "漫展", "比赛", "培训", "展会", "同学会")
FILLER_FRIEND = (
    "今天好累啊",
    "晚上吃啥",
    "明天要加班",
    "周末打算去爬山",
    "我在做一个新项目，头疼",
    "下周要考试了",
    "刚下班",
    "这游戏真好玩",
    "最近在复习",
    "准备去超市买点东西",
)
FILLER_OWNER = ("哈哈哈", "好的", "我也是", "加油", "可以啊", "[微笑]", "早点睡", "真的假的")


@dataclass(slots=True)
class Planted:
    chat: str
    phrase: str  # what the memory must hold: unique to its chat


def generate(chats: int, weeks: int, seed: int) -> tuple[list[Message], list[Planted]]:
    """Every chat's messages (time order across chats) and its planted fact."""
    rng = random.Random(seed)
    messages: list[Message] = []
    planted: list[Planted] = []
    for n in range(chats):
        chat = str(20001 + n)
        city, event = CITIES[n % len(CITIES)], EVENTS[(n // len(CITIES) + n) % len(EVENTS)]
        phrase = f"{city}参加{event}"
        planted.append(Planted(chat, phrase))
        clock = START + rng.randrange(0, 3 * DAY)

        def say(text: str, me: bool, *, chat: str = chat, name: str = f"友{n}") -> None:
            nonlocal clock
            clock += rng.randrange(20, 90)
            sender = OWNER if me else chat
            messages.append(
                Message(f"{chat}-{clock}", "c2c", chat, sender, "" if me else name, me, clock, text)
            )

        say("在吗", False)
        say("在", True)
        say(f"我下个月{n % 28 + 1}号要去{phrase}", False)
        say("厉害啊", True)
        for week in range(weeks):
            clock = START + (week + 1) * 7 * DAY + rng.randrange(0, 2 * DAY)
            for _ in range(rng.randrange(2, 5)):
                # Numbered, so that no two are the same fact: weeks of them compete for the budget.
                say(f"{rng.randrange(1, 29)}号{rng.choice(FILLER_FRIEND)}", False)
                say(rng.choice(FILLER_OWNER), True)
        clock = START + (weeks + 2) * 7 * DAY
        say(f"{city}那边天气怎么样，{event}我有点紧张", False)  # the fact matters now
        say("没事的", True)
    messages.sort(key=lambda m: (m.time, m.msg_id))
    return messages, planted


def measure(chats: int, weeks: int, seed: int, memory_tokens: int = 160) -> dict[str, float]:
    messages, planted = generate(chats, weeks, seed)
    settings = DatasetSettings(memory=True, memory_tokens=memory_tokens, no_reply_samples=0.0)
    started = time.perf_counter()
    samples = list(build_samples(messages, settings))
    seconds = time.perf_counter() - started
    remembered = matters = leaks = 0
    for sample in samples:
        system = sample.messages[0]["content"]
        for fact in planted:
            if fact.chat != sample.chat:
                leaks += fact.phrase in system
        if sample.messages[-1]["content"] == "没事的":
            matters += 1
            own = next(f for f in planted if f.chat == sample.chat)
            remembered += own.phrase in system
    return {
        "chats": chats,
        "messages": len(messages),
        "samples": len(samples),
        "matters": matters,
        "remembered": remembered,
        "recall": remembered / matters if matters else 0.0,
        "leaks": leaks,
        "seconds": seconds,
    }


def report_lines(result: dict[str, float], weeks: int, memory_tokens: int) -> list[str]:
    return [
        f"{result['chats']:.0f} private chats, {result['messages']:.0f} messages: each friend tells one "
        f"fact, then {weeks} weeks of ordinary chat (fact-like lines included) pass before they refer "
        f"back to it. Samples built with `DatasetSettings(memory=True, memory_tokens={memory_tokens})`, "
        "the prompts the bot serves for the same history.",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| prompts where the fact matters | {result['matters']:.0f} |",
        f"| … whose memory holds the fact | {result['remembered']:.0f} ({result['recall']:.0%}) |",
        f"| prompts of other chats holding any planted fact (must be 0) | {result['leaks']:.0f} |",
        f"| samples built (all prompts checked for leaks) | {result['samples']:.0f} |",
        f"| build time with memory, CPU | {result['seconds']:.2f} s |",
        "",
        "The held-out style distance and perplexity with memory against without are measured by the "
        "context ablation (`DatasetSettings.memory` on and off), reported, not gated. "
        "Re-run: `.venv/bin/python bench/friend_memory.py --write-docs`.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chats", type=int, default=20)
    parser.add_argument("--weeks", type=int, default=6)
    parser.add_argument("--memory-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 chats, 3 weeks (the test's size)")
    parser.add_argument(
        "--write-docs", action="store_true", help="rewrite this section of docs/benchmarks.md"
    )
    args = parser.parse_args(argv)
    chats, weeks = (4, 3) if args.quick else (args.chats, args.weeks)
    result = measure(chats, weeks, args.seed, args.memory_tokens)
    lines = report_lines(result, weeks, args.memory_tokens)
    print("\n".join(lines))
    if args.write_docs:
        replace_section(HEADING, lines)
    return 0 if result["leaks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

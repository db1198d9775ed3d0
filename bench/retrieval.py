"""The examples index at the bot's scale: build time, memory and lookup time over a large store.

A conversation store of `--rows` messages (friends and the owner taking turns in `--chats`
chats, texts from the demo history's vocabulary) is written once; the bot's start-up path is
then timed: `read_example_rows` → `PairBuilder` → `ReplyIndex`, with the process's resident
memory before and after, and the median time of `examples_for` over random queries.

    .venv/bin/python bench/retrieval.py [--rows 1000000] [--chats 2000] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._docs import replace_section
from bot.store import Store, read_example_rows
from pipeline.chatformat import BURST_GAP
from pipeline.ntqq import sampledb
from pipeline.retrieval import PairBuilder, ReplyIndex

HEADING = "## Examples index (`bench/retrieval.py`)"
_WORDS = (
    *sampledb._FOODS, *sampledb._PLACES, *sampledb._THINGS, *sampledb._SHOWS, *sampledb._GAMES,
    *sampledb._TIMES, *sampledb.OWNER_CATCHPHRASES, "今晚", "一起", "去不去", "吃什么", "在吗", "明天",
)  # fmt: skip


def text(rng: random.Random) -> str:
    return "".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))


def write_store(path: Path, rows: int, chats: int, seed: int) -> None:
    """A migrated store filled in one transaction (the bot's own schema, no bot needed); one message
    a second over all chats, so that each chat's turns follow within the pair gap."""
    asyncio.run(_create(path))
    import sqlite3

    rng = random.Random(seed)
    start = 1_700_000_000
    conn = sqlite3.connect(path)
    values = []
    for i in range(rows):
        chat = str(20_000 + rng.randrange(chats))
        owner = rng.random() < 0.4
        values.append(
            (
                "c2c",
                chat,
                "10000" if owner else chat,
                "owner" if owner else "incoming",
                start + i,
                text(rng),
            )
        )
    conn.executemany(
        "INSERT INTO messages (chat_type, chat, sender, origin, time, text) VALUES (?, ?, ?, ?, ?, ?)", values
    )
    conn.commit()
    conn.close()


async def _create(path: Path) -> None:
    store = await Store.open(path)
    await store.close()


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(path: Path, chats: int, queries: int, seed: int) -> dict[str, float]:
    before = rss_mb()
    started = time.perf_counter()
    index, builder = ReplyIndex(), PairBuilder(BURST_GAP)
    for row in read_example_rows(path):
        pair = builder.add((row.chat_type, row.chat), row, source=row.msg_id or "")
        if pair is not None:
            index.add(pair)
    built = time.perf_counter() - started
    after = rss_mb()
    rng = random.Random(seed + 1)
    times = []
    for _ in range(queries):
        chat = ("c2c", str(20_000 + rng.randrange(chats)))
        started = time.perf_counter()
        index.examples_for(text(rng), chat, k=3, before_time=2**62)
        times.append(time.perf_counter() - started)
    return {
        "pairs": len(index),
        "build_s": built,
        "memory_mb": after - before,
        "query_ms": statistics.median(times) * 1000,
        "query_p99_ms": sorted(times)[int(len(times) * 0.99) - 1] * 1000,
    }


def table(result: dict[str, float], args: argparse.Namespace) -> list[str]:
    return [
        f"A store of {args.rows:,} messages in {args.chats:,} private chats (40% the owner's, short "
        "texts from the demo history's words), indexed as the bot does at start "
        "(`read_example_rows` → `PairBuilder` → `ReplyIndex`, one thread); lookups of k=3 from random "
        f"chats, {args.queries} queries. Shared 2-core machine.",
        "",
        "| rows | pairs indexed | build (s) | added resident memory (MB) | lookup median (ms) "
        "| lookup p99 (ms) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {args.rows:,} | {result['pairs']:,} | {result['build_s']:.1f} | {result['memory_mb']:.0f} | "
        f"{result['query_ms']:.2f} | {result['query_p99_ms']:.2f} |",
        "",
        "The bot builds the index in the background (it answers without examples until then) and "
        "adds each message as it arrives. Re-run: `.venv/bin/python bench/retrieval.py --write-docs`.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chats", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where the store is written (default: the temp dir)")
    parser.add_argument(
        "--write-docs", action="store_true", help=f"replace '{HEADING}' in docs/benchmarks.md"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="twin-retrieval-bench-", dir=args.dir) as tmp:
        path = Path(tmp) / "bot.db"
        write_store(path, args.rows, args.chats, args.seed)
        result = measure(path, args.chats, args.queries, args.seed)
    lines = table(result, args)
    print("\n".join(lines))
    if args.write_docs:
        replace_section(HEADING, lines)


if __name__ == "__main__":
    main()

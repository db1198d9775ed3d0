"""`twin demo`: the whole path offline on CPU, from an encrypted QQ database to a twin
answering a simulated QQ client, with the base model's answers beside it."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from pipeline.files import private_dir

if TYPE_CHECKING:
    from deploy.onebot_client import OneBotClient

DEMO_SELF_ID = 10000
DEMO_SUPERUSER = 10001
BOT_REPLY_TIMEOUT = 60.0
DEMO_TEMPERATURE = 0.7  # the bot's default sampling, for the twin and the base alike
TAKEOVER_FRIEND = 29001  # the chat the owner takes over in the demo
TAKEOVER_QUIET = 3.0  # seconds the demo watches the taken-over chat stay quiet


@dataclass(slots=True)
class DemoSettings:
    """Knobs of the demo; the defaults finish in well under 20 minutes on 2 cores."""

    out_dir: Path = Path("demo-output")
    messages: int = 3000
    seed: int = 0
    # Sized for 2 CPU cores and minutes, not for quality: short contexts, short packed rows,
    # and a learning rate high enough for a few dozen LoRA steps to move a 135M model.
    train_steps: int = 60
    context_turns: int = 2
    batch_size: int = 2
    max_seq_len: int = 256
    learning_rate: float = 1e-3
    probe_messages: int = 16
    shown: int = 8
    n_threads: int = 2
    persona: str = ""


@dataclass(slots=True)
class Exchange:
    """One probe message with the owner's real reply, the twin's and the base model's."""

    prompt: str
    owner: str
    twin: str = ""
    base: str = ""


@dataclass(slots=True)
class DemoResult:
    artefacts: dict[str, Path] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    style: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    takeover: list[tuple[str, str]] = field(default_factory=list)  # (who, what) in order


class _Stages:
    """Times each stage and prints a header for it."""

    def __init__(self, console: Console, result: DemoResult) -> None:
        self.console = console
        self.result = result
        self.number = 0

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        self.number += 1
        self.console.rule(f"[bold]{self.number}. {title}")
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.result.seconds[title] = took
        self.console.print(f"[green]✓[/] {title} [dim]({took:.1f} s)[/]")


def run_demo(settings: DemoSettings | None = None, console: Console | None = None) -> DemoResult:
    """Run every stage for real and return what was made and what the twin said."""
    settings = settings or DemoSettings()
    console = console or Console(stderr=False)
    result = DemoResult()
    stages = _Stages(console, result)
    out = private_dir(settings.out_dir.resolve())
    art = result.artefacts

    from pipeline.ntqq import sampledb
    from pipeline.ntqq.extract import extract_messages

    with stages.stage("twin sample-db: a synthetic encrypted QQ NT database"):
        art["database"] = sampledb.write_sample_db(
            out / "qq", key=sampledb.SAMPLE_KEY, messages=settings.messages, seed=settings.seed
        )
        console.print(f"  {art['database']} (key {sampledb.SAMPLE_KEY!r}, {settings.messages} messages)")

    with stages.stage("twin extract: decrypt and decode every message"):
        art["messages"] = out / "messages.jsonl"
        art["extract_report"] = out / "extract-report.json"
        report = extract_messages(
            art["database"], art["messages"], key=sampledb.SAMPLE_KEY, report=art["extract_report"]
        )
        console.print(f"  {_summary(report)}")

    from pipeline.dataset.build import build_dataset
    from pipeline.dataset.settings import DatasetSettings

    with stages.stage("twin build-dataset: conversations → cleaned, redacted samples"):
        art["dataset"] = out / "dataset"
        dataset_report = build_dataset(
            art["messages"],
            art["dataset"],
            DatasetSettings(
                persona=settings.persona, seed=settings.seed, context_turns=settings.context_turns
            ),
        )
        console.print(f"  {_summary(dataset_report)}")

    from trainer.config import TrainSettings
    from trainer.train import train

    with stages.stage("twin train: LoRA on SmolLM2-135M-Instruct (CPU)"):
        art["run"] = out / "runs" / "demo"
        train_result = train(
            TrainSettings(
                base_model="smollm2",
                data=art["dataset"],
                output_dir=art["run"],
                max_steps=settings.train_steps,
                batch_size=settings.batch_size,
                max_seq_len=settings.max_seq_len,
                lr=settings.learning_rate,
                threads=settings.n_threads,
                seed=settings.seed,
                # fp32 on every CPU: bf16 autocast (the default where AMX or AVX512-BF16 exist)
                # would train a different adapter there and print different numbers.
                bf16=False,
            )
        )
        console.print(f"  {_summary(train_result)}")

    from pipeline import registry
    from pipeline.registry_ops import switch_current
    from trainer.export import export

    with stages.stage("twin export: merge, convert to GGUF, quantise Q8_0"):
        art["registry"] = out / "models"
        version = "v1"
        export(art["run"], art["registry"] / version, quants=("Q8_0",))
        switch_current(private_dir(art["registry"]), version, by="cli", reason="twin demo")
        art["model"] = registry.resolve_model(art["registry"]).gguf
        console.print(f"  {art['model']}")

    exchanges = _probe_exchanges(art["dataset"], settings.probe_messages)

    with stages.stage("twin serve: the bot answers a simulated QQ client over OneBot v11"):
        art["bot_db"] = out / "data" / "bot.db"
        art["bot_log"] = out / "data" / "bot.log"
        prompts = [e.prompt for e in exchanges]

        async def owner_takes_over(client: OneBotClient) -> None:
            result.takeover = await takeover_moment(client, DEMO_SUPERUSER)

        twin_replies = asyncio.run(
            _ask_a_bot(
                art["registry"], out / "data", prompts, settings, console, "twin", then=owner_takes_over
            )
        )
        for exchange, reply in zip(exchanges, twin_replies, strict=True):
            exchange.twin = reply

    with stages.stage("twin memory build: what the twin remembers of one chat"):
        for line in memory_lines(art["messages"]):
            console.print(f"  {line}", markup=False)

    with stages.stage("the same bot serving the untouched base model answers the same messages"):
        from trainer.models import smollm2_gguf_path

        base_replies = asyncio.run(
            _ask_a_bot(smollm2_gguf_path(), out / "data-base", prompts, settings, console, "base")
        )
        for exchange, reply in zip(exchanges, base_replies, strict=True):
            exchange.base = reply

    result.exchanges = exchanges
    result.style = _style_table(exchanges, sampledb)
    _print_results(console, result, settings)
    return result


def memory_lines(messages: Path, max_tokens: int = 160) -> list[str]:
    """The rendered memory (TWIN_MEMORY) of the chat whose history holds the most facts."""
    from pipeline.friend_memory import empty_memory, render_memory, update_memory
    from pipeline.records import Message, iter_messages

    chats: dict[tuple[str, str], list[Message]] = {}
    for message in iter_messages(messages):
        chats.setdefault((message.chat_type, message.chat), []).append(message)
    memories = [update_memory(empty_memory(*key), said) for key, said in chats.items()]
    if not memories:
        return ["(no messages)"]
    richest = max(memories, key=lambda memory: len(memory.facts))
    return [f"{richest.key}:", *render_memory(richest, max_tokens).splitlines()]


# ---------------------------------------------------------------- probes


def _probe_exchanges(dataset_dir: Path, count: int) -> list[Exchange]:
    """Friends' last messages from held-out private conversations, with the owner's real replies."""
    import json

    exchanges: list[Exchange] = []
    with (dataset_dir / "val.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            messages = json.loads(line)["messages"]
            if len(messages) < 3 or messages[-2]["role"] != "user" or not messages[-1]["content"]:
                continue
            prompt = messages[-2]["content"]
            if "：" in prompt.split("\n", 1)[0]:  # a group turn, labelled with a speaker name
                continue
            exchanges.append(Exchange(prompt=prompt, owner=messages[-1]["content"]))
            if len(exchanges) == count:
                break
    return exchanges


async def _ask_a_bot(
    model: Path,
    data_dir: Path,
    prompts: list[str],
    settings: DemoSettings,
    console: Console,
    who: str,
    then: Callable[[OneBotClient], Awaitable[None]] | None = None,
) -> list[str]:
    """Start `python bot.py` serving `model`, send each prompt from a new friend, collect the
    replies; `then` runs with the QQ client before the bot stops (the demo's bot moments)."""
    from rich.progress import Progress

    from deploy.onebot_client import NO_PACING, BotProcess

    private_dir(data_dir)
    bot = BotProcess(
        {
            "ONEBOT_ACCESS_TOKEN": secrets.token_urlsafe(16),
            "SUPERUSERS": f'["{DEMO_SUPERUSER}"]',
            "TWIN_MODEL": str(model),
            "TWIN_BACKEND": "llama_cpp",
            "TWIN_DB": str(data_dir / "bot.db"),
            "TWIN_N_THREADS": str(settings.n_threads),
            "TWIN_PERSONA": settings.persona,
            **NO_PACING,
            "TWIN_TEMPERATURE": str(DEMO_TEMPERATURE),
            "TWIN_SEED": str(settings.seed),
        },
        cwd=data_dir,
        log_file=data_dir / "bot.log",
    )
    with console.status(f"starting the bot (python bot.py) with the {who} model…"):
        bot.start(timeout=180)
    replies: list[str] = []
    try:
        async with bot.client(self_id=DEMO_SELF_ID) as client:
            with Progress(console=console) as progress:
                task = progress.add_task(f"friends message the {who} over OneBot v11", total=len(prompts))
                for number, prompt in enumerate(prompts):
                    friend = 20000 + number
                    await client.send_private(friend, prompt)
                    try:
                        await client.wait_reply(user_id=friend, timeout=BOT_REPLY_TIMEOUT)
                        await client.wait_quiet(0.5, user_id=friend)  # later bubbles of the same reply
                    except TimeoutError:
                        pass  # read, and chose not to answer
                    replies.append("\n".join(m.text for m in client.replies(user_id=friend)))
                    progress.advance(task)
            if then is not None:
                await then(client)
    finally:
        bot.stop(timeout=15)
    return replies


async def takeover_moment(client: OneBotClient, superuser: int) -> list[tuple[str, str]]:
    """The owner types in a chat from QQ and `/twin status` shows the chat taken over; the friend
    writes and the twin stays quiet; `/twin takeover … off` hands it back. Returns who said what."""
    friend, chat = TAKEOVER_FRIEND, f"c2c:{TAKEOVER_FRIEND}"

    async def superuser_says(command: str) -> str:
        before = len(client.replies(user_id=superuser))
        await client.send_private(superuser, command)
        return (await client.wait_reply(user_id=superuser, after=before, timeout=BOT_REPLY_TIMEOUT))[0].text

    owner, asks, again = "我来回你，等下打给你", "好的，那我等你电话", "你还在吗"
    await client.send_message_sent(owner, target_id=friend)  # as NapCat reports what the owner typed
    for _ in range(20):  # events are handled concurrently: the owner's may still be being stored
        status = await superuser_says("/twin status")
        taken = [line.strip() for line in status.splitlines() if line.startswith(("taken over", "  "))]
        if any(line.startswith(chat) for line in taken):
            break
        await asyncio.sleep(0.25)
    await client.send_private(friend, asks)
    quiet = await client.wait_quiet(TAKEOVER_QUIET, user_id=friend)
    handed_back = await superuser_says(f"/twin takeover {chat} off")
    before = len(client.replies(user_id=friend))
    await client.send_private(friend, again)
    with contextlib.suppress(TimeoutError):  # the twin may read and choose not to answer
        await client.wait_reply(user_id=friend, after=before, timeout=BOT_REPLY_TIMEOUT)
        await client.wait_quiet(0.5, user_id=friend)
    reply = "\n".join(m.text for m in client.replies(user_id=friend)[before:])
    return [
        (f"owner (types in QQ, {chat})", owner),
        ("/twin status", " · ".join(taken)),
        ("friend", asks),
        ("twin", "\n".join(m.text for m in quiet) or f"(stays quiet for {TAKEOVER_QUIET:g} s and more)"),
        (f"/twin takeover {chat} off", handed_back),
        ("friend", again),
        ("twin", reply or "(read, no reply)"),
    ]


# ---------------------------------------------------------------- reporting


def _style_table(exchanges: list[Exchange], sampledb) -> dict[str, dict[str, float]]:
    def rates(replies: list[str]) -> dict[str, float]:
        n = max(len(replies), 1)
        return {
            "catchphrase": sum(any(c in r for c in sampledb.OWNER_CATCHPHRASES) for r in replies) / n,
            "sticker": sum(any(s in r for s in sampledb.OWNER_STICKERS) for r in replies) / n,
            "mean_chars": sum(len(r) for r in replies) / n,
        }

    return {
        "owner (held-out)": rates([e.owner for e in exchanges]),
        "twin": rates([e.twin for e in exchanges]),
        "base": rates([e.base for e in exchanges]),
    }


def _summary(report: object) -> str:
    to_dict = getattr(report, "to_dict", None)
    data = to_dict() if callable(to_dict) else getattr(report, "__dict__", {})
    keys = [k for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(
        f"{k}={data[k]:.4g}" if isinstance(data[k], float) else f"{k}={data[k]}" for k in keys[:8]
    )


def _print_results(console: Console, result: DemoResult, settings: DemoSettings) -> None:
    table = Table(title="Friends' messages: the owner's real reply, the twin's and the base model's")
    for column in ("friend says", "owner really said", "twin (fine-tuned)", "base model"):
        table.add_column(column, overflow="fold")
    for exchange in result.exchanges[: settings.shown]:
        table.add_row(
            exchange.prompt, exchange.owner, exchange.twin or "(no reply)", exchange.base or "(empty)"
        )
    console.print(table)

    style = Table(title=f"Style over {len(result.exchanges)} held-out messages")
    style.add_column("who")
    style.add_column("replies with a catchphrase", justify="right")
    style.add_column("replies with a favourite sticker", justify="right")
    style.add_column("mean length (chars)", justify="right")
    for who, rates in result.style.items():
        style.add_row(
            who, f"{rates['catchphrase']:.0%}", f"{rates['sticker']:.0%}", f"{rates['mean_chars']:.1f}"
        )
    console.print(style)

    if result.takeover:
        takeover = Table(title="The owner takes over: the twin steps aside in that chat")
        takeover.add_column("who")
        takeover.add_column("says", overflow="fold")
        for who, what in result.takeover:
            takeover.add_row(who, what)
        console.print(takeover)

    where = Table(title="Where everything is", show_header=False)
    for name, path in result.artefacts.items():
        where.add_row(name, str(path))
    console.print(where)
    total = sum(result.seconds.values())
    console.print(f"[bold green]demo finished in {total / 60:.1f} min[/]")

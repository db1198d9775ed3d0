"""Reply latency while a retrain cycle trains beside the bot, against the same bot idle, in one run.

`python bot.py` (llama.cpp backend, greedy, pacing off) serves a registry; friends of a simulated
QQ client (`deploy/onebot_client.py`) send the same messages in every phase, phases alternating
idle / retrain. A retrain phase starts `twin retrain --now` on the same registry and store as a
separate process (niced, `TWIN_RETRAIN_THREADS`), waits until its training child has trained a
step, and loads the bot only while `retrain-status.json` still says the cycle is training; only
replies whose whole latency (message in → first `send_msg`) lies inside such a window count.

    .venv/bin/python bench/serve_retrain.py [--rounds 2 --messages 20 --friends 2] [--write-docs]

The first run builds its world in --workdir (the demo's builders: sample QQ database → extract →
dataset → a short LoRA on SmolLM2-135M → Q8_0 GGUF in a registry); later runs reuse it.
`--tiny` serves and retrains a tiny random model instead: the script's own quick test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _docs import replace_section  # noqa: E402  (bench/ is on sys.path when a script runs)
from _prompts import PROMPTS  # noqa: E402

HEADING = "## Serving while retraining (`bench/serve_retrain.py`)"
GOAL = 1.5  # p95 during retrain ≤ GOAL × p95 idle
REPLY_TIMEOUT = 180.0
TRAINING_TIMEOUT = 900.0  # a busy machine imports torch and loads the base slowly
POLL = 0.25


@dataclass(slots=True)
class World:
    """What the bot serves and what the retrain cycle learns from."""

    registry: Path
    dataset: Path
    history: Path  # messages.jsonl: the owner's past chats, seeded into the bot's store


@dataclass(slots=True)
class Phase:
    """One measured phase: its window (monotonic seconds) and the replies inside it."""

    number: int
    retrain: bool
    start: float = 0.0
    end: float = 0.0
    replies: list[tuple[float, float]] = field(default_factory=list)  # (sent, first bubble) monotonic
    sent: int = 0
    training_cpu: float = 0.0  # CPU seconds the training child used inside the window
    child_nice: int | None = None  # the training child's, read from the OS
    child_threads: int | None = None  # the torch threads the cycle gave its training child

    @property
    def name(self) -> str:
        return f"{'retrain' if self.retrain else 'idle'} {self.number}"

    @property
    def first_friend(self) -> int:
        """New friends in every phase: the same messages then meet the same (empty) memory."""
        return 30000 + 1000 * (2 * self.number + self.retrain)

    @property
    def latencies_ms(self) -> list[float]:
        """Replies whose whole latency lies inside the window."""
        return [(got - sent) * 1000 for sent, got in self.replies if self.start <= sent and got <= self.end]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---------------------------------------------------------------- the world


def prepare_world(root: Path, *, tiny: bool, threads: int) -> World:
    """Build (once; reused when `root` already holds it) a dataset and a registry serving v0001."""
    from deploy.demo import DemoSettings
    from pipeline.files import private_dir

    world = World(root / "models", root / "dataset", root / "messages.jsonl")
    if (world.registry / "current").is_file() and (world.dataset / "train.jsonl").is_file():
        return world
    from pipeline.dataset.build import build_dataset
    from pipeline.dataset.settings import DatasetSettings
    from pipeline.ntqq import sampledb
    from pipeline.ntqq.extract import extract_messages
    from pipeline.registry_ops import promote, register
    from trainer.config import TrainSettings
    from trainer.export import export
    from trainer.train import train

    demo = DemoSettings()
    private_dir(root)
    print("preparing the world: sample QQ database → dataset → LoRA → GGUF registry…", flush=True)
    database = sampledb.write_sample_db(
        root / "qq", key=sampledb.SAMPLE_KEY, messages=600 if tiny else demo.messages, seed=demo.seed
    )
    extract_messages(database, world.history, key=sampledb.SAMPLE_KEY, report=root / "extract-report.json")
    build_dataset(
        world.history,
        world.dataset,
        DatasetSettings(seed=demo.seed, context_turns=demo.context_turns),
        progress=False,
    )
    if tiny:
        from trainer.tiny import cached_tiny_model

        base = str(cached_tiny_model(root / "tiny"))
    else:
        base = "smollm2"
    # A few steps: the served model's quality does not change the work of serving or retraining.
    run = root / "run-v1"
    settings = TrainSettings(
        base_model=base,
        data=world.dataset,
        output_dir=run,
        max_steps=2,
        batch_size=demo.batch_size,
        max_seq_len=demo.max_seq_len,
        threads=threads,
        seed=demo.seed,
        bf16=False,
    )
    train(settings, progress=False)
    export(run, root / "export-v1", quants=("Q8_0",))
    promote(world.registry, register(world.registry, root / "export-v1").name)
    return world


async def seed_store(db: Path, history: Path) -> int:
    """The owner's past private chats as store rows, so that a cycle has owner replies to learn."""
    from bot.store import Store, StoredMessage
    from pipeline.records import iter_messages

    store = await Store.open(db, synchronous="NORMAL")
    count = 0
    try:
        for m in iter_messages(history):
            if m.chat_type != "c2c":
                continue
            origin = "owner" if m.is_self else "incoming"
            await store.add(
                StoredMessage(
                    m.chat_type, m.chat, m.sender, origin, m.text, m.time, m.sender_name, m.msg_id, m.reply_to
                )
            )
            count += 1
    finally:
        await store.close()
    return count


# ---------------------------------------------------------------- load


async def load(qq, phase: Phase, messages: int, friends: int) -> None:
    """`messages` in all from `friends` friends at once, each waiting for its reply before the next."""

    async def friend(number: int) -> None:
        user = phase.first_friend + number
        for turn in range(number, messages, friends):
            before = len(qq.replies(user_id=user))
            sent = time.monotonic()
            phase.sent += 1
            await qq.send_private(user, PROMPTS[turn % len(PROMPTS)])
            try:
                (first, *_) = await qq.wait_reply(user_id=user, after=before, timeout=REPLY_TIMEOUT)
            except TimeoutError:
                continue  # read, and chose not to answer (empty output): not a latency
            phase.replies.append((sent, first.time))
            while await qq.wait_quiet(0.3, user_id=user):
                pass  # later bubbles of the same reply, so they are not taken for the next one

    await asyncio.gather(*(friend(n) for n in range(friends)))


def training_now(registry: Path, pid: int) -> dict:
    """The cycle run by `pid` while its training child is past its first step, else empty."""
    from pipeline.registry import read_status

    cycle = read_status(registry)
    ok = cycle.get("pid") == pid and cycle.get("state") == "running" and cycle.get("stage") == "train"
    return cycle if ok and int(cycle.get("step") or 0) >= 1 else {}


def niceness_of(pid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, pid)
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """CPU time a process (all its threads) has used so far, from /proc (Linux); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def threads_given(registry: Path) -> int | None:
    """The `threads` of the running cycle's training settings (what its child sets torch to)."""
    from deploy.retrain import WORK_DIR

    with contextlib.suppress(OSError, ValueError):
        return json.loads((registry / WORK_DIR / "train-settings.json").read_text()).get("threads")
    return None


async def retrain_phase(qq, phase: Phase, args: argparse.Namespace, env: dict[str, str], home: Path) -> None:
    """Start a cycle, load the bot while it trains, then stop it (SIGTERM: it stops its child too)."""
    log = (home / f"{phase.name.replace(' ', '-')}.log").open("wb")
    cycle = subprocess.Popen(
        [sys.executable, "-m", "deploy", "retrain", "--now"],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one group, so that nothing of it can outlive the benchmark
    )
    registry = Path(env["TWIN_MODEL"])
    try:
        deadline = time.monotonic() + TRAINING_TIMEOUT
        while not (status := training_now(registry, cycle.pid)):
            if cycle.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the retrain cycle never trained a step; see {log.name} in {home}")
            await asyncio.sleep(POLL)
        child = int(status["child_pid"])
        phase.child_nice, phase.child_threads = niceness_of(child), threads_given(registry)
        phase.start, phase.end = time.monotonic(), float("inf")
        cpu_before = cpu_seconds(child)

        async def watch() -> None:
            while training_now(registry, cycle.pid):
                await asyncio.sleep(POLL)
            phase.end = time.monotonic()  # training ended or the cycle left the train stage

        watcher = asyncio.create_task(watch())
        await load(qq, phase, args.messages, args.friends)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        phase.end = min(phase.end, time.monotonic())
        phase.training_cpu = max(0.0, cpu_seconds(child) - cpu_before)
    finally:
        if cycle.poll() is None:
            cycle.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(cycle.wait, 60)
            except subprocess.TimeoutExpired:
                os.killpg(cycle.pid, signal.SIGKILL)
                cycle.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cycle.pid, signal.SIGKILL)  # a training child left behind, if any
        log.close()


async def idle_phase(qq, phase: Phase, args: argparse.Namespace) -> None:
    phase.start, phase.end = time.monotonic(), float("inf")
    await load(qq, phase, args.messages, args.friends)
    phase.end = time.monotonic()


# ---------------------------------------------------------------- the run


async def run(args: argparse.Namespace) -> list[Phase]:
    from deploy.onebot_client import NO_PACING, BotProcess

    root = args.workdir or Path(tempfile.mkdtemp(prefix="twin-serve-retrain-"))
    world = prepare_world(root.resolve(), tiny=args.tiny, threads=os.cpu_count() or 1)
    home = Path(tempfile.mkdtemp(prefix="bench-", dir=root))
    db = home / "bot.db"
    seeded = await seed_store(db, world.history)
    print(f"store seeded with {seeded} private messages of the owner's history", flush=True)
    shared = {
        "TWIN_MODEL": str(world.registry),
        "TWIN_DB": str(db),
        "TWIN_N_THREADS": str(args.threads),
    }
    bot = BotProcess(
        {
            **shared,
            "ONEBOT_ACCESS_TOKEN": "bench",
            "TWIN_BACKEND": "llama_cpp",
            "TWIN_MAX_TOKENS": str(args.max_tokens),
            # Greedy: every phase decodes the same tokens. A random model's greedy choice is a
            # newline (an empty reply), so --tiny samples, with a fixed seed.
            "TWIN_TEMPERATURE": "0.7" if args.tiny else "0",
            "TWIN_SEED": "0",
            "TWIN_MAX_BUBBLES": "50",
            "TWIN_BLOCK_LINKS": "false",
            "TWIN_RATE_PER_CHAT": "1000",
            "TWIN_RATE_TOTAL": "1000",
            "TWIN_DAILY_CAP": "0",
            "TWIN_MODEL_POLL": "3600",  # a cycle is stopped before it could promote anything
            **NO_PACING,
        },
        cwd=home,
    )
    retrain_env = {
        **os.environ,
        # `-m deploy` from this checkout, not whatever copy of the project is installed
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        **shared,
        "TWIN_RETRAIN_DATASET": str(world.dataset),
        "TWIN_RETRAIN_MIN_SAMPLES": "1",
        "TWIN_RETRAIN_MAX_STEPS": "1000000",  # trains until stopped
        "TWIN_RETRAIN_QUANTS": "Q8_0",
    }
    if args.nice is not None:
        retrain_env["TWIN_RETRAIN_NICE"] = str(args.nice)
    if args.retrain_threads is not None:
        retrain_env["TWIN_RETRAIN_THREADS"] = str(args.retrain_threads)

    phases: list[Phase] = []
    # SIGTERM unwinds like Ctrl-C, through the `finally`s that stop the bot and a running cycle.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    bot.start(timeout=300)
    try:
        async with bot.client() as qq:
            await qq.send_private(29999, PROMPTS[0])  # warms the model up; not counted
            with contextlib.suppress(TimeoutError):
                await qq.wait_reply(user_id=29999, timeout=REPLY_TIMEOUT)
            for number in range(1, args.rounds + 1):
                for retrain in (False, True):
                    phase = Phase(number, retrain)
                    print(f"{phase.name}…", flush=True)
                    if retrain:
                        await retrain_phase(qq, phase, args, retrain_env, home)
                    else:
                        await idle_phase(qq, phase, args)
                    print(f"  {phase_row(phase)}", flush=True)
                    phases.append(phase)
    finally:
        bot.stop(timeout=30)
    return phases


def phase_row(phase: Phase) -> str:
    values = phase.latencies_ms
    p50 = f"{statistics.median(values):.0f}" if values else "–"
    p95 = f"{percentile(values, 0.95):.0f}" if values else "–"
    window = phase.end - phase.start
    cpu = f"{phase.training_cpu:.1f} ({phase.training_cpu / window:.2f})" if phase.retrain else ""
    return f"| {phase.name} | {window:.1f} | {len(values)} of {phase.sent} | {p50} | {p95} | {cpu} |"


def report(phases: list[Phase], args: argparse.Namespace, load_before: tuple, load_after: tuple) -> list[str]:
    """The section for docs/benchmarks.md: what ran, every phase, both pooled, the ratio, the goal."""
    from deploy.retrain import available_cores

    idle = [v for p in phases if not p.retrain for v in p.latencies_ms]
    busy = [v for p in phases if p.retrain for v in p.latencies_ms]
    cores = available_cores()
    trained = [p for p in phases if p.retrain]
    nice = {p.child_nice for p in trained}
    threads = {p.child_threads for p in trained}
    model = "a tiny random Llama (Q8_0, `--tiny`)" if args.tiny else "SmolLM2-135M-Instruct LoRA, Q8_0 GGUF"
    lines = [
        f"`python bot.py` serving {model} from a registry (llama.cpp, `TWIN_N_THREADS` {args.threads}, "
        f"{'sampled' if args.tiny else 'greedy'}, up to {args.max_tokens} new tokens, pacing off); "
        f"{args.friends} simulated friends send {args.messages} messages per phase, "
        "each waiting for its reply before the next. "
        f"Phases alternate idle / retrain, {args.rounds} of each. A retrain phase runs "
        "`twin retrain --now` on the same registry and store as its own process and measures only "
        "while `retrain-status.json` says it is training (its child past its first step); a reply "
        "counts only if its whole latency (message in → first `send_msg`) lies inside that window. "
        f"Training child (read from the running cycle): niceness {listed(nice)}, torch threads "
        f"{listed(threads)} (`TWIN_RETRAIN_THREADS` "
        f"{args.retrain_threads if args.retrain_threads is not None else '0 = auto'}).",
        "",
        "| phase | window s | replies counted | p50 ms | p95 ms | training CPU s in window (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(phase_row(p) for p in phases),
    ]
    if not idle or not busy:
        lines += ["", "**No result**: a condition has no reply inside its windows."]
        return lines
    p50_idle, p95_idle = statistics.median(idle), percentile(idle, 0.95)
    p50_busy, p95_busy = statistics.median(busy), percentile(busy, 0.95)
    lines += [
        f"| **idle, all** | | {len(idle)} | **{p50_idle:.0f}** | **{p95_idle:.0f}** | |",
        f"| **retrain, all** | | {len(busy)} | **{p50_busy:.0f}** | **{p95_busy:.0f}** | |",
        f"| **retrain / idle** | | | **{p50_busy / p50_idle:.2f}×** | **{p95_busy / p95_idle:.2f}×** | |",
        "",
    ]
    cpu = cpu_model()
    lines.append(
        f"Machine: {cores} cores ({cpu}), load average {load_before[0]:.1f} before and "
        f"{load_after[0]:.1f} after the run (1 min), Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}."
    )
    verdict = "met" if p95_busy <= GOAL * p95_idle else "**NOT met**"
    lines.append(
        f"Goal p95(retrain) ≤ {GOAL} × p95(idle) = {GOAL * p95_idle:.0f} ms: {verdict} "
        f"({p95_busy:.0f} ms, {p95_busy / p95_idle:.2f}×)."
    )
    if max(load_before[0], load_after[0]) > cores:
        lines.append(
            f"The load average passed the {cores} cores during the run: other processes competed with the "
            "bot at its own priority, which neither niceness nor the thread bound controls, so the ratio "
            "is not the retrain's alone; re-run on a quiet machine."
        )
    if any(args.threads + (n or cores) > cores for n in threads):
        lines.append(
            f"The bot's and the training's threads ({args.threads} + {listed(threads)}) exceed the "
            f"{cores} cores: they share one, and niceness alone decides."
        )
    lines += [f"Re-run: `.venv/bin/python bench/serve_retrain.py {rerun_args(args)}`.", ""]
    return lines


def listed(values: set) -> str:
    return ", ".join(str(v) for v in sorted(values, key=str))


def rerun_args(args: argparse.Namespace) -> str:
    shown = f"--rounds {args.rounds} --messages {args.messages} --friends {args.friends} --write-docs"
    return shown + (" --tiny" if args.tiny else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="idle + retrain phase pairs")
    parser.add_argument("--messages", type=int, default=20, help="messages per phase")
    parser.add_argument("--friends", type=int, default=2, help="friends writing at once")
    parser.add_argument("--threads", type=int, default=1, help="TWIN_N_THREADS of the bot")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--nice", type=int, default=None, help="TWIN_RETRAIN_NICE (default: the setting's)")
    parser.add_argument("--retrain-threads", type=int, default=None, help="TWIN_RETRAIN_THREADS (default 0)")
    parser.add_argument("--workdir", type=Path, default=None, help="world to build or reuse (default: temp)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (the quick test)")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section of docs/benchmarks.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
    phases = asyncio.run(run(args))
    lines = report(phases, args, load_before, os.getloadavg())
    print("\n" + "\n".join(lines))
    if args.write_docs:
        replace_section(HEADING, lines)


if __name__ == "__main__":
    main()

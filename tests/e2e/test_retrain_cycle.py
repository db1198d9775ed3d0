"""Retraining for real: conversations logged by the running bot become a promoted version it serves.

A tiny random Llama (SmolLM2's tokenizer) is trained, exported to GGUF by llama.cpp's converter
and registered as v0001; `python bot.py` serves it from the registry. The owner's replies sent
through QQ (`message_sent`) are the new data; `/twin retrain` runs a real cycle (training child,
evaluation of both models, export) while friends keep messaging. Then a gate rejection, a
training crash and a rollback, each checked against what the bot serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from deploy.onebot_client import BotProcess, OneBotClient
from deploy.retrain import SETTLE_SECONDS
from pipeline.records import Message
from pipeline.registry import current_version, list_versions, read_status
from pipeline.registry_ops import promote, register
from tests.e2e.conftest import (
    OWNER,
    SUPERUSER,
    bot_env,
    end_processes,
    processes_below,
    running_bot,
    twin_status,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

REPO = Path(__file__).resolve().parents[2]
FRIENDS = (20001, 20002, 20003)
DURING = 21000  # the first friend writing during a cycle (one a second: never reaches 20198)
T0 = 1_700_000_000


# ---------------------------------------------------------------- fixtures: base, data, v0001


def history(days: int = 6) -> list[Message]:
    """The owner's original QQ history: short private chats where the owner answers."""
    out: list[Message] = []
    for d in range(days):
        t = T0 + d * 86400
        rows = [
            ("100", "小王", t, f"第{d}天在吗"),
            (str(OWNER), "", t + 20, "在的[doge]"),
            ("100", "小王", t + 90, "吃了吗"),
            (str(OWNER), "", t + 120, "吃了 绝了"),
        ]
        for i, (sender, name, when, text) in enumerate(rows):
            out.append(Message(f"{d}-{i}", "c2c", "100", sender, name, sender == str(OWNER), when, text))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> dict[str, Path]:
    """Base model, original dataset and a registry serving v0001 (trained and exported for real)."""
    from pipeline.dataset.build import build_dataset
    from pipeline.dataset.settings import DatasetSettings
    from trainer.config import TrainSettings
    from trainer.export import export
    from trainer.tiny import cached_tiny_model
    from trainer.train import train

    root = tmp_path_factory.mktemp("retrain-world")
    base = cached_tiny_model(pytestconfig.cache.mkdir("qq-twin-tiny"))
    dataset = root / "dataset"
    build_dataset(history(), dataset, DatasetSettings(val_fraction=0.2), progress=False)
    run = root / "run-v1"
    train(
        TrainSettings(data=dataset, output_dir=run, base_model=str(base), max_steps=2, threads=1),
        progress=False,
    )
    export(run, root / "export-v1", quants=("Q8_0",))
    registry = root / "models"
    promote(registry, register(registry, root / "export-v1").name)
    return {"root": root, "base": base, "dataset": dataset, "registry": registry}


def retrain_env(world: dict[str, Path], db: Path, **extra: str) -> dict[str, str]:
    return {
        "TWIN_MODEL": str(world["registry"]),
        "TWIN_DB": str(db),
        "TWIN_RETRAIN_DATASET": str(world["dataset"]),
        "TWIN_RETRAIN_MIN_SAMPLES": "4",
        "TWIN_RETRAIN_MAX_STEPS": "2",
        "TWIN_RETRAIN_EVAL_SAMPLES": "4",
        "TWIN_RETRAIN_QUANTS": "Q8_0",
        "TWIN_RETRAIN_NICE": "5",
        # A 2-layer random model's numbers move at random; this test is about the path, the
        # gate's decisions are specified in test_retrain.py and by the rejection test below.
        "TWIN_RETRAIN_PPL_TOLERANCE": "1.0",
        "TWIN_RETRAIN_STYLE_TOLERANCE": "10",
        **extra,
    }


@pytest.fixture(scope="module")
def bot(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("retrain-bot")
    settings = bot_env(
        TWIN_N_THREADS="1",
        TWIN_MAX_TOKENS="8",
        TWIN_SEED="7",
        TWIN_BLOCK_LINKS="false",
        TWIN_RATE_PER_CHAT="100",
        TWIN_RATE_TOTAL="1000",
        TWIN_MODEL_POLL="0.5",
        # The owner answers by hand between the friends' rounds (the retraining signal) and the
        # twin must still answer the next round: no takeover window here.
        TWIN_TAKEOVER_MINUTES="0",
        **retrain_env(world, home / "data" / "bot.db"),
    )
    yield from running_bot(settings, home)


async def superuser_report(qq: OneBotClient, prefix: str, timeout: float = 60) -> str:
    """The last message to the superuser starting with `prefix`, waiting for it if needed."""
    found = await wait_until(
        lambda: [m.text for m in qq.replies(user_id=SUPERUSER) if m.text.startswith(prefix)], timeout
    )
    assert found, f"the superuser was never told {prefix!r}"
    return found[-1]


async def wait_serving(qq: OneBotClient, version: str, timeout: float) -> str:
    """The `/twin status` answer once it names `version` as served (polled every second)."""
    seen: list[str] = []

    async def serving() -> bool:
        seen.append(await twin_status(qq))
        return f"model: {version} (llama_cpp)" in seen[-1]

    assert await wait_until(serving, timeout, interval=1.0), (
        f"the bot never served {version}; last status:\n{seen[-1]}"
    )
    return seen[-1]


def adapter_drift(registry: Path, old: str, new: str) -> float:
    """Relative change of the LoRA A matrices between two versions (a fresh LoRA is ~1.4)."""
    from safetensors.torch import load_file

    a = load_file(str(registry / old / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(registry / new / "adapter" / "adapter_model.safetensors"))
    keys = [k for k in a if "lora_A" in k]
    assert keys and set(keys) <= set(b)
    return max(float((b[k] - a[k]).norm() / a[k].norm()) for k in keys)


def store_rows(bot: BotProcess, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(bot.settings["TWIN_DB"]) as conn:
        return conn.execute(sql, args).fetchall()


# ---------------------------------------------------------------- the full cycle


async def test_owner_replies_become_a_promoted_version_that_the_running_bot_serves(
    qq: OneBotClient, bot: BotProcess, world: dict[str, Path]
) -> None:
    assert "model: v0001 (llama_cpp)" in await twin_status(qq)
    # Friends write, the twin answers, and the owner also answers by hand (message_sent).
    for round_ in range(3):
        for friend in FRIENDS:
            before = len(qq.replies(user_id=friend))
            await qq.send_private(friend, f"第{round_}轮 在吗")
            await qq.wait_reply(user_id=friend, after=before, timeout=60)
            await qq.send_message_sent(f"在的 我自己回的{round_}", target_id=friend)
    await asyncio.sleep(0.5)
    assert len(store_rows(bot, "SELECT id FROM messages WHERE origin = 'owner'")) == 9

    # Messages of the last few seconds wait for the next cycle (they may still be being written).
    await asyncio.sleep(SETTLE_SECONDS + 1)
    before = len(qq.replies(user_id=SUPERUSER))
    await qq.send_private(SUPERUSER, "/twin retrain")
    (started,) = await qq.wait_reply(user_id=SUPERUSER, after=before, timeout=30)
    assert started.text == "retrain started"

    # During the cycle (and the swap at its end) friends keep writing; every message is answered.
    sent_during = 0
    deadline = time.monotonic() + 400
    while current_version(world["registry"]) == "v0001" and time.monotonic() < deadline:
        if read_status(world["registry"]).get("state") in ("skipped", "failed", "rejected"):
            break  # the assertions below say why
        friend = DURING + sent_during
        await qq.send_private(friend, "训练的时候也在吗")
        await qq.wait_reply(user_id=friend, timeout=90)
        sent_during += 1
        await asyncio.sleep(1.0)
    text = await wait_serving(qq, "v0002", timeout=120)
    for friend in (20199, 20198):  # right after the swap
        await qq.send_private(friend, "换了模型吗")
        await qq.wait_reply(user_id=friend, timeout=90)

    cycle = read_status(world["registry"])
    assert cycle["state"] == "promoted", cycle
    assert cycle["version"] == "v0002" and cycle["new_samples"] >= 4
    assert "promoted" in text  # `/twin status` shows the last retrain
    manifest = json.loads((world["registry"] / "v0002" / "manifest.json").read_text())
    assert manifest["parent"] == "v0001"
    assert manifest["data_window"]["samples"] == cycle["new_samples"]
    assert manifest["dataset_hash"].startswith("sha256:")
    assert {"perplexity", "style_distance"} <= set(manifest["eval"])
    assert adapter_drift(world["registry"], "v0001", "v0002") < 0.2  # continued, not started afresh
    assert not (world["registry"] / ".retrain").exists()

    # Nothing was lost: every friend message is stored and got a stored twin reply.
    await asyncio.sleep(1.0)  # a reply is stored just after it is sent
    incoming = store_rows(
        bot, "SELECT COUNT(*) FROM messages WHERE origin = 'incoming' AND chat != ?", str(SUPERUSER)
    )
    assert incoming[0][0] == 9 + sent_during + 2
    answered_chats = {
        c for (c,) in store_rows(bot, "SELECT DISTINCT chat FROM messages WHERE origin = 'twin'")
    }
    assert {str(f) for f in (*FRIENDS, 20199, 20198)} | {
        str(DURING + i) for i in range(sent_during)
    } <= answered_chats
    versions = {v for (v,) in store_rows(bot, "SELECT model_version FROM messages WHERE chat = '20199'") if v}
    assert versions == {"v0002"}

    # The operator hears about it in QQ.
    assert "promoted v0002" in await superuser_report(qq, "retrain finished")


async def test_a_second_trigger_while_a_cycle_runs_is_refused(
    qq: OneBotClient, world: dict[str, Path]
) -> None:
    from pipeline.registry_ops import retrain_lock

    with retrain_lock(world["registry"]):
        before = len(qq.replies(user_id=SUPERUSER))
        await qq.send_private(SUPERUSER, "/twin retrain")
        (answer,) = await qq.wait_reply(user_id=SUPERUSER, after=before, timeout=30)
        assert answer.text == "a retrain cycle is already running"
        cli = await run_cli(
            [sys.executable, "-m", "deploy", "retrain", "--now", "--registry", str(world["registry"])],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, **retrain_env(world, Path("unused.db"))},
            timeout=60,
        )
    assert cli.returncode == 2
    assert "a retrain cycle is already running" in cli.stderr


async def test_rollback_restores_the_previous_version_in_the_running_bot(
    qq: OneBotClient, world: dict[str, Path]
) -> None:
    assert current_version(world["registry"]) == "v0002"
    cli = await run_cli(
        [sys.executable, "-m", "deploy", "models", "rollback", "--registry", str(world["registry"])],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert "v0002 → v0001" in cli.stdout
    await wait_serving(qq, "v0001", timeout=60)
    await qq.send_private(20300, "回滚了吗")
    await qq.wait_reply(user_id=20300, timeout=90)
    assert [v.name for v in list_versions(world["registry"])] == ["v0001", "v0002"]
    promote(world["registry"], "v0002")  # back to the retrained one for the next tests
    await wait_serving(qq, "v0002", timeout=60)


# ---------------------------------------------------------------- failures keep the old model


async def _store_with_owner_replies(db: Path, registry: Path, count: int) -> None:
    """A store (through the bot's own store module) where the owner answered `count` friends,
    just after the serving version's data window (so the messages are new to it)."""
    from bot.store import Store, StoredMessage

    serving = json.loads((registry / str(current_version(registry)) / "manifest.json").read_text())
    start = int((serving.get("data_window") or {}).get("until") or 0) + 1
    assert start + 2 * count < time.time() - 5, "the serving window must end in the past"
    store = await Store.open(db)
    try:
        now = start
        for i in range(count):
            chat = str(21000 + i)
            await store.add(StoredMessage("c2c", chat, chat, "incoming", f"问题{i}", now + i))
            await store.add(StoredMessage("c2c", chat, str(OWNER), "owner", f"回答{i}", now + i + 1))
    finally:
        await store.close()


async def run_cli(args: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    """A `twin` subprocess, waited for off the event loop (the QQ client must keep answering the bot)."""
    return await asyncio.to_thread(subprocess.run, args, **kwargs)


def cycle_of(registry: Path, pid: int) -> dict:
    """The registry's retrain status while it is the cycle run by `pid`'s (else empty)."""
    cycle = read_status(registry)
    return cycle if cycle.get("pid") == pid else {}


def training_step(registry: Path, pid: int) -> int:
    """The step the cycle run by `pid` has trained to (0 before it trains)."""
    cycle = cycle_of(registry, pid)
    return int(cycle.get("step") or 0) if cycle.get("state") == "running" else 0


StartCycle = Callable[..., Awaitable[subprocess.Popen]]


@pytest.fixture
def start_cycle(world: dict[str, Path], tmp_path: Path) -> Iterator[StartCycle]:
    """Starts `twin retrain --now` (settings: `extra`) on a store with 6 owner replies new to the serving
    version; whatever still runs of it, training child included, is stopped after the test."""
    started: list[subprocess.Popen] = []

    async def start(**extra: str) -> subprocess.Popen:
        db = tmp_path / "bot.db"
        await _store_with_owner_replies(db, world["registry"], 6)
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy", "retrain", "--now"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env={**os.environ, **retrain_env(world, db, **extra)},
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            end_processes([psutil.Process(process.pid), *processes_below(process.pid)])
        process.wait()
        process.stdout.close()


async def start_long_cycle(start_cycle: StartCycle, registry: Path) -> subprocess.Popen:
    """A cycle set to train 10000 steps, once it has trained its first."""
    process = await start_cycle(TWIN_RETRAIN_MAX_STEPS="10000")
    # a busy machine starts torch slowly
    trained = await wait_until(lambda: training_step(registry, process.pid), 300, interval=0.2)
    assert trained, "the cycle never trained a step"
    return process


async def test_a_gate_rejection_leaves_the_serving_version_and_records_why(
    qq: OneBotClient, world: dict[str, Path], start_cycle: StartCycle
) -> None:
    serving = current_version(world["registry"])
    # A learning rate this large wrecks the candidate; the gate must notice.
    process = await start_cycle(
        TWIN_RETRAIN_LEARNING_RATE="50", TWIN_RETRAIN_PPL_TOLERANCE="0", TWIN_RETRAIN_STYLE_TOLERANCE="0"
    )
    out, _ = await asyncio.to_thread(process.communicate, timeout=400)
    assert process.returncode == 0, out
    assert "candidate rejected by the quality gate" in out.splitlines()[-1]
    cycle = read_status(world["registry"])
    assert cycle["state"] == "rejected"
    assert "worse beyond tolerance" in cycle["reason"] or "not finite" in cycle["reason"]
    assert cycle["eval"]["serving"]["perplexity"] > 0
    assert current_version(world["registry"]) == serving
    assert [v.name for v in list_versions(world["registry"])] == ["v0001", "v0002"]
    assert "rejected" in await twin_status(qq)
    await wait_serving(qq, serving, timeout=10)


async def test_a_training_crash_leaves_the_serving_version_and_records_why(
    qq: OneBotClient, world: dict[str, Path], start_cycle: StartCycle
) -> None:
    serving = current_version(world["registry"])
    process = await start_long_cycle(start_cycle, world["registry"])
    cycle = read_status(world["registry"])
    assert cycle["state"] == "running" and cycle["step"] >= 1 and cycle["steps"] == 10000  # progress shows
    child = cycle["child_pid"]
    assert child, "the training child never started"
    assert "running" in await twin_status(qq)
    os.kill(child, signal.SIGKILL)  # what the OOM killer would do
    out, _ = await asyncio.to_thread(process.communicate, timeout=120)
    assert process.returncode == 1, out
    cycle = read_status(world["registry"])
    assert cycle["state"] == "failed" and cycle["stage"] == "train"
    assert "training crashed (killed by signal 9)" in cycle["reason"]
    assert current_version(world["registry"]) == serving
    assert (world["registry"] / ".retrain" / "train.log").is_file()  # kept for the operator
    text = await twin_status(qq)
    assert "failed" in text and "training crashed" in text
    await wait_serving(qq, serving, timeout=10)


async def test_sigterm_stops_the_cycle_and_its_training_child_and_keeps_serving(
    qq: OneBotClient, world: dict[str, Path], start_cycle: StartCycle
) -> None:
    serving = current_version(world["registry"])
    process = await start_long_cycle(start_cycle, world["registry"])
    child = read_status(world["registry"])["child_pid"]
    process.send_signal(signal.SIGTERM)  # the bot shutting down, or systemd stopping the job
    out, _ = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 143, out
    cycle = read_status(world["registry"])
    assert cycle["state"] == "failed" and "interrupted" in cycle["reason"]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # no orphaned training left behind
    assert current_version(world["registry"]) == serving
    await wait_serving(qq, serving, timeout=10)


async def test_an_operator_switch_during_a_cycle_is_not_overridden(
    qq: OneBotClient, world: dict[str, Path], start_cycle: StartCycle
) -> None:
    assert current_version(world["registry"]) == "v0002"
    process = await start_cycle()
    # a busy machine starts torch slowly
    training = await wait_until(
        lambda: cycle_of(world["registry"], process.pid).get("stage") == "train", 300, 0.1
    )
    assert training, "the cycle never started training"
    promote(world["registry"], "v0001", reason="operator")  # `twin models promote v0001` meanwhile
    out, _ = await asyncio.to_thread(process.communicate, timeout=400)
    assert process.returncode == 0, out
    assert "registered v0003 without promoting it" in out.splitlines()[-1]
    cycle = read_status(world["registry"])
    assert cycle["state"] == "registered" and cycle["serving"] == "v0001"
    assert current_version(world["registry"]) == "v0001"
    assert [v.name for v in list_versions(world["registry"])] == ["v0001", "v0002", "v0003"]
    await wait_serving(qq, "v0001", timeout=30)


async def test_a_bot_shutdown_stops_its_retrain_cycle_and_the_training_child(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """`/twin retrain`, then SIGTERM to the bot mid-training: the cycle records "interrupted"
    and nothing of it outlives the bot (asyncio alone would SIGKILL it and orphan the trainer)."""
    db = tmp_path / "data" / "bot.db"
    db.parent.mkdir()
    await _store_with_owner_replies(db, world["registry"], 6)
    settings = bot_env(TWIN_N_THREADS="1", **retrain_env(world, db, TWIN_RETRAIN_MAX_STEPS="10000"))
    bot = BotProcess(settings, cwd=tmp_path)
    bot.start(timeout=120)
    family: list[psutil.Process] = []
    try:
        async with bot.client(self_id=OWNER) as client:
            await client.send_private(SUPERUSER, "/twin retrain")
            (answer,) = await client.wait_reply(user_id=SUPERUSER, timeout=30)
            assert answer.text == "retrain started"

            def training() -> dict:
                cycle = read_status(world["registry"])
                running = cycle.get("state") == "running" and cycle.get("step") and cycle.get("child_pid")
                return cycle if running else {}

            cycle = await wait_until(training, 300, interval=0.2)  # a busy machine starts torch slowly
            assert cycle, "the cycle never trained a step"
            family = processes_below(bot.process.pid)
            assert {p.pid for p in family} >= {cycle["pid"], cycle["child_pid"]}
            # uvicorn shuts down gracefully, then re-raises SIGTERM: the exit status is -15
            await asyncio.to_thread(bot.stop, 60)
        cycle = read_status(world["registry"])
        assert cycle["state"] == "failed" and "interrupted" in cycle["reason"]
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:  # whatever outlived the bot is stopped, also when the test failed
        family += processes_below(bot.process.pid)
        bot.stop()
        end_processes(family)

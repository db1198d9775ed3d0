"""`twin backup` of a bot under a steady message stream, `twin restore`, and a second bot started
from the restored directory: every message stored before the backup began is there, the same
model version serves, and it answers."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from deploy.onebot_client import BotProcess, OneBotClient
from pipeline.registry import gguf_name
from pipeline.registry_ops import switch_current
from tests.e2e.conftest import OWNER, TOKEN, bot_env, end_processes, processes_below, twin_status, wait_until
from tests.e2e.test_bot_llama import smollm2_gguf

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="function")]

STREAMER = 20999  # a denied friend: every message is stored, none answered (no generation queue)
FRIEND = 20001
ROOT = Path(__file__).resolve().parents[2]


def registry_of_two(models: Path) -> None:
    """v1 then v2 promoted (v2 serves, v1 is its rollback target), each holding SmolLM2 as a file
    of the registry (a hard link where possible: a backup refuses links out of the registry)."""
    for version in ("v1", "v2"):
        (models / version).mkdir(parents=True)
        target = models / version / gguf_name("Q4_1")
        try:
            os.link(smollm2_gguf(), target)
        except OSError:
            shutil.copyfile(smollm2_gguf(), target)
    switch_current(models, "v1", by="test")
    switch_current(models, "v2", by="test")


def stored_texts(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT text FROM messages WHERE chat = ?", (str(STREAMER),)).fetchall()
    return {text for (text,) in rows}


async def stream(qq: OneBotClient, stop: asyncio.Event) -> int:
    """Private messages from STREAMER every 20 ms until `stop`; returns how many were sent."""
    sent = 0
    while not stop.is_set():
        await qq.send_private(STREAMER, f"流水{sent:05d}")
        sent += 1
        await asyncio.sleep(0.02)
    return sent


async def twin(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """`twin ARGS` from this checkout, run in `cwd`; its exit status and output."""
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy", *args, env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout=300)
    return process.returncode or 0, out.decode()


def stopped(bot: BotProcess) -> None:
    below = processes_below(bot.process.pid) if bot.process is not None else []
    bot.stop(timeout=15)
    end_processes(below)


async def test_a_backup_mid_stream_restores_to_a_bot_that_serves_the_same_version(tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry_of_two(home / "models")
    settings = bot_env(
        TWIN_MODEL="models",
        TWIN_DB="data/bot.db",
        TWIN_N_THREADS="1",
        TWIN_MAX_TOKENS="8",
        TWIN_SEED="7",
        TWIN_BLOCK_LINKS="false",
        TWIN_PRIVATE_DENY=f"[{STREAMER}]",
    )
    db = home / "data" / "bot.db"
    bot = BotProcess(settings, cwd=home)
    bot.start(timeout=120)
    try:
        async with bot.client(self_id=OWNER) as qq:
            stop = asyncio.Event()
            streaming = asyncio.create_task(stream(qq, stop))
            assert await wait_until(lambda: len(stored_texts(db)) >= 30, timeout=60, interval=0.1)
            acknowledged = stored_texts(db)  # stored by the bot before the backup starts
            code, said = await twin(
                "backup", "-o", str(tmp_path / "twin.tar"), env={**os.environ, **bot.settings}, cwd=home
            )
            during = stored_texts(db)
            await asyncio.sleep(0.3)
            stop.set()
            sent = await streaming
        assert code == 0, said
        assert len(during) > len(acknowledged), "the stream went on while the backup ran"
    finally:
        stopped(bot)
    assert sent > len(acknowledged)
    assert TOKEN.encode() not in (tmp_path / "twin.tar").read_bytes()

    restored = tmp_path / "restored"
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("TWIN_", "ONEBOT_"))}
    code, said = await twin(
        "restore", str(tmp_path / "twin.tar"), "--to", str(restored), env=clean_env, cwd=tmp_path
    )
    assert code == 0, said
    assert "serving v2" in said and "ONEBOT_ACCESS_TOKEN" in said
    assert acknowledged <= stored_texts(restored / "data" / "bot.db")

    # The restored directory runs as `cd DIR && twin serve` once the token is set again.
    second = BotProcess({"ONEBOT_ACCESS_TOKEN": TOKEN}, cwd=restored)
    second.start(timeout=120)
    try:
        async with second.client(self_id=OWNER) as qq:
            assert "model: v2 (llama_cpp)" in await twin_status(qq)
            await qq.send_private(FRIEND, "你好呀，还记得我吗")
            replies = await qq.wait_reply(user_id=FRIEND, timeout=90)
            assert replies and all(r.text.strip() for r in replies)
    finally:
        stopped(second)

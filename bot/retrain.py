"""Handing over to the retraining job (`python -m deploy retrain --now`) from the bot.

The bot never imports the trainer: it starts the job as a lower-priority child process; what
the job is doing is read from the registry (`pipeline.registry.retrain_status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bot.log_mask import SecretMask, secret_values
from pipeline.registry import CURRENT_FILE

log = logging.getLogger(__name__)
# How long a retrain child may take to record "interrupted" and stop its training child.
STOP_GRACE_SECONDS = 20.0


@dataclass(slots=True)
class RetrainResult:
    returncode: int
    summary: str


def registry_of(model: str) -> Path | None:
    """The registry directory when TWIN_MODEL names one (it holds `current`), else None."""
    path = Path(model) if model else None
    if path is not None and path.is_dir() and (path / CURRENT_FILE).is_file():
        return path
    return None


async def stop_child(process: asyncio.subprocess.Process, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM a retrain child (it stops its training child and records "interrupted"), then SIGKILL.

    Left alone, asyncio would SIGKILL it when its transport is collected, skipping that cleanup
    and orphaning the training process.
    """
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), grace)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def run_retrain(
    nice: int = 10, secrets: Iterable[str] = (), cwd: Path | None = None, *, account: int | None = None
) -> RetrainResult:
    """Run one cycle as a child process. It inherits the bot's environment and working directory,
    so it reads the bot's `TWIN_*` settings from the same environment and `.env` (`load_config`),
    and with `account` that account's file of `TWIN_ACCOUNTS` over them; `secrets` (the bot's
    secret setting values) are masked in the summary."""
    chosen = ["--account", str(account)] if account is not None else []
    return await run_deploy_child(["retrain", "--now", *chosen], nice, secrets, cwd)


async def run_samples(
    nice: int = 10, secrets: Iterable[str] = (), cwd: Path | None = None, *, account: int | None = None
) -> RetrainResult:
    """`twin models samples` (every version's replies to the held-out probes) as a child process,
    like `run_retrain`."""
    chosen = ["--account", str(account)] if account is not None else []
    return await run_deploy_child(["models", "samples", *chosen], nice, secrets, cwd)


async def run_deploy_child(
    arguments: list[str], nice: int = 10, secrets: Iterable[str] = (), cwd: Path | None = None
) -> RetrainResult:
    """`python -m deploy <arguments>` at lower priority; its last output line, secrets masked."""
    env = dict(os.environ)
    # `deploy` sits next to this package; found the same way from a checkout or an install.
    project = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH", "")) if p)

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy", *arguments,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=cwd,
    )  # fmt: skip
    if nice:
        # Not preexec_fn: forking with a function to run is unsafe in a process with threads.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, process.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    try:
        output, _ = await process.communicate()
    except asyncio.CancelledError:  # the bot is shutting down: end the child cleanly, then go
        await stop_child(process)
        raise
    lines = [line for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
    # The summary goes to superusers over QQ: no secret of the child's environment in it.
    summary = SecretMask({*secret_values(env), *secrets})(lines[-1].strip()) if lines else ""
    log.info("%s child exited with %s", arguments[0], process.returncode)
    return RetrainResult(returncode=process.returncode or 0, summary=summary[:300])

"""A scripted generation backend for bot tests that need no model."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from bot.backends import Generation


class ScriptedBackend:
    """Replies `收到:<last user line>` after `delay` seconds (`fail` makes it raise) and remembers
    the prompts it saw."""

    name = "scripted"
    version = "v-test"

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay, self.fail = delay, fail
        self.prompts: list[list[dict[str, str]]] = []

    async def start(self) -> None:
        pass

    async def generate(self, messages: Sequence[dict[str, str]]) -> Generation:
        self.prompts.append(list(messages))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("server down")
        return Generation(text="收到:" + messages[-1]["content"].split("\n")[-1], version=self.version)

    async def swap(self, gguf: Path, version: str) -> None:
        self.version = version

    def queue_length(self) -> int:
        return 0

    async def close(self) -> None:
        pass

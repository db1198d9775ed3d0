"""The twin at run time: store, backend, memory, bursts, pacing, limits and admin state.

Handlers (`bot/handlers.py`) translate OneBot events into calls on one `Twin`; everything
here is NoneBot-free so that it can be driven and tested directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bot.backends import Backend, BackendClosed, LlamaCppBackend, OpenAIBackend, SamplingSettings
from bot.config import Config
from bot.memory import build_prompt
from bot.pacing import RateLimiter, filter_bubbles, typing_delay
from bot.retrain import describe_status, read_status, registry_of, retrain_running, run_retrain
from bot.store import Store, StoredMessage
from pipeline import registry as model_registry
from pipeline.chatformat import split_bubbles

log = logging.getLogger("qq-twin")

T = TypeVar("T")
ChatKey = tuple[str, str]  # (chat_type, chat): ("c2c", "<uin>") or ("group", "<group code>")
SendBubble = Callable[[str], Awaitable["int | str | None"]]  # sends one bubble, returns its message id


@dataclass(slots=True)
class _ChatState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: bool = False  # a handler is waiting out this chat's burst
    last_trigger: float = 0.0
    pending: set[int] = field(default_factory=set)  # store ids of messages that want an answer


def make_backend(config: Config) -> Backend:
    """The configured backend; the llama.cpp one loads `TWIN_MODEL` (file, model dir or registry)."""
    sampling = SamplingSettings(
        config.twin_max_tokens,
        config.twin_temperature,
        config.twin_top_p,
        config.twin_seed,
        config.twin_repeat_penalty,
    )
    if config.twin_backend == "openai":
        return OpenAIBackend(
            config.twin_openai_base_url,
            config.twin_openai_model,
            api_key=config.twin_openai_api_key,
            timeout=config.twin_openai_timeout,
            retries=config.twin_openai_retries,
            sampling=sampling,
        )
    if not config.twin_model:
        raise ValueError("TWIN_MODEL is not set: name a .gguf file, a model directory or a registry")
    resolved = model_registry.resolve_model(config.twin_model)
    return LlamaCppBackend(
        resolved.gguf,
        resolved.version,
        n_threads=config.twin_n_threads,
        n_ctx=config.twin_n_ctx,
        sampling=sampling,
    )


def _midnight() -> int:
    """Unix time of today's local midnight (daily counts and the daily cap)."""
    return int(time.mktime(time.strptime(time.strftime("%Y-%m-%d"), "%Y-%m-%d")))


def settings_env(config: Config) -> dict[str, str]:
    """The plugin's settings as `TWIN_*` environment variables, for the retrain child."""
    env = {}
    for name, value in config.model_dump().items():
        env[name.upper()] = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
    return env


class Twin:
    """One running twin: what every handler talks to."""

    def __init__(self, config: Config, *, nicknames: list[str], backend: Backend | None = None) -> None:
        self.config = config
        self.nicknames = nicknames
        self.backend: Backend = backend or make_backend(config)
        self.store: Store | None = None
        self.started = time.time()
        self.paused = False
        self.probability = config.twin_group_probability
        self.blocked: set[int] = set()
        self.names: dict[str, str] = {}  # uin → display name, learned from events
        self.limiter = RateLimiter(config.twin_rate_per_chat, config.twin_rate_total, config.twin_daily_cap)
        self.registry = registry_of(config.twin_model) if config.twin_backend == "llama_cpp" else None
        self.retrain_task: asyncio.Task | None = None
        self._chats: dict[ChatKey, _ChatState] = {}
        self._sending: dict[ChatKey, list[str]] = {}  # bubbles on their way out (echo detection)
        self._stopping = asyncio.Event()
        self._watcher: asyncio.Task | None = None
        self._model_lock = asyncio.Lock()  # one model switch at a time (watcher or /twin model)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.store = await Store.open(self.config.twin_db, self.config.twin_db_key)
        self.paused = bool(await self.store.get_state("paused", False))
        self.probability = float(await self.store.get_state("probability", self.probability))
        self.blocked = {int(u) for u in await self.store.get_state("blocked", [])}
        self.limiter.seed_today(await self.store.count_since(_midnight(), "twin"))
        await self.backend.start()
        if self.registry is not None:
            self._watcher = asyncio.create_task(self._watch_registry(), name="twin-registry-watch")
        log.info(
            "twin ready: backend %s, model %s, paused=%s",
            self.backend.name,
            self.backend.version,
            self.paused,
        )

    async def close(self) -> None:
        """Stop waiting handlers, finish nothing new, free the model and the store."""
        self._stopping.set()
        tasks = [task for task in (self._watcher, self.retrain_task) if task is not None]
        for task in tasks:
            task.cancel()
        # A running retrain cycle is told to stop (it records "interrupted" and ends its training).
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.backend.close()
        if self.store is not None:
            await self.store.close()
            self.store = None
        log.info("twin stopped")

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless shutting down; True when the twin is stopping."""
        if seconds <= 0:
            return self._stopping.is_set()
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True

    async def _unless_stopping(self, call: Awaitable[T]) -> T:
        """Await `call`, giving up (BackendClosed) once shutdown starts.

        NoneBot waits for running handlers before it exits, and an API call on a connection
        that is closing only fails after API_TIMEOUT; shutdown must not wait that long.
        """
        task = asyncio.ensure_future(call)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not task.done():
            task.cancel()
            raise BackendClosed("shutting down")
        return task.result()

    async def _watch_registry(self) -> None:
        assert self.registry is not None
        failed: str | None = None  # a version that would not load is not retried until `current` moves
        while not await self._sleep(self.config.twin_model_poll):
            version = model_registry.current_version(self.registry)
            if not version or version in (self.backend.version, failed):
                continue
            async with self._model_lock:
                if model_registry.current_version(self.registry) != version:
                    continue  # `/twin model` moved it meanwhile
                try:
                    await self.use_version(version)
                    failed = None
                except Exception as exc:  # a broken version must not stop the bot or the watcher
                    failed = version
                    log.error("cannot serve %s, still serving %s: %s", version, self.backend.version, exc)

    async def use_version(self, version: str) -> None:
        """Serve `version` from the registry (requests already queued finish on the old model)."""
        assert self.registry is not None
        resolved = model_registry.resolve_model(self.registry / version)
        log.info("switching model %s → %s", self.backend.version, version)
        try:
            await self.backend.swap(resolved.gguf, version)
        except BackendClosed:
            return

    # ------------------------------------------------------------------ messages
    async def record(self, message: StoredMessage) -> int:
        """Store one message before anything else happens to it."""
        assert self.store is not None
        if message.sender_name:
            self.names[message.sender] = message.sender_name
        return await self.store.add(message)

    def is_own_echo(self, key: ChatKey, text: str) -> bool:
        """A `message_sent` carrying a bubble the twin is sending right now (NapCat echoes it)."""
        return text in self._sending.get(key, [])

    async def owner_spoke(self, key: ChatKey) -> None:
        """The owner answered themself: nothing before this needs the twin any more."""
        self._chats.setdefault(key, _ChatState()).pending.clear()

    async def answer(self, key: ChatKey, message_id: int, send: SendBubble, self_id: str = "") -> list[str]:
        """Answer a triggering message once its burst is over; returns the bubbles sent."""
        state = self._chats.setdefault(key, _ChatState())
        state.pending.add(message_id)
        state.last_trigger = asyncio.get_running_loop().time()
        if state.waiting:
            return []  # the handler already waiting on this burst will answer it as one turn
        state.waiting = True
        try:
            while True:
                quiet = state.last_trigger + self.config.twin_burst_window - asyncio.get_running_loop().time()
                if quiet <= 0:
                    break
                if await self._sleep(quiet):
                    return []
        finally:
            state.waiting = False
        async with state.lock:
            if not state.pending or self._stopping.is_set():
                return []
            return await self._generate_and_send(key, state, send, self_id)

    async def _generate_and_send(
        self, key: ChatKey, state: _ChatState, send: SendBubble, self_id: str
    ) -> list[str]:
        assert self.store is not None
        chat_type, chat = key
        pending = set(state.pending)
        state.pending.clear()
        if self.paused:
            return []
        limited = self.limiter.allow(f"{chat_type}:{chat}")
        if limited:
            log.info("not answering %s %s: %s reached", chat_type, chat, limited)
            return []
        history = await self._history(key)
        # Messages that arrived while the last reply was being written are still unanswered:
        # they go last, so the prompt ends with what needs an answer.
        history.sort(key=lambda m: (m.id in pending, m.id or 0))
        messages = build_prompt(history, chat_type, self.config.twin_persona)
        if not messages:
            return []
        try:
            generation = await self.backend.generate(messages)
        except BackendClosed:
            return []
        except Exception as exc:
            log.warning("backend %s failed: %s", self.backend.name, type(exc).__name__)
            log.debug("backend failure detail", exc_info=True)
            if not self.config.twin_fallback_reply:
                return []
            return await self._send_bubbles(key, [self.config.twin_fallback_reply], "fallback", send, self_id)
        log.debug("generated %d tokens in %.2fs: %r", generation.tokens, generation.seconds, generation.text)
        bubbles = split_bubbles(generation.text, self.config.twin_max_bubbles)
        kept = filter_bubbles(
            bubbles, block_links=self.config.twin_block_links, blocked_words=self.config.twin_blocked_words
        )
        if len(kept) < len(bubbles):
            log.info("output filter dropped %d bubble(s) in %s %s", len(bubbles) - len(kept), chat_type, chat)
        return await self._send_bubbles(key, kept, generation.version, send, self_id)

    async def _send_bubbles(
        self, key: ChatKey, bubbles: list[str], version: str, send: SendBubble, self_id: str
    ) -> list[str]:
        assert self.store is not None
        sent: list[str] = []
        c = self.config
        for bubble in bubbles:
            if await self._sleep(
                typing_delay(bubble, c.twin_typing_delay, c.twin_typing_per_char, c.twin_typing_max)
            ):
                break
            outgoing = self._sending.setdefault(key, [])
            outgoing.append(bubble)
            try:
                message_id = await self._unless_stopping(send(bubble))
                if self.store is None:
                    break
                await self.store.add(
                    StoredMessage(
                        chat_type=key[0],
                        chat=key[1],
                        sender=self_id,
                        origin="twin",
                        text=bubble,
                        time=int(time.time()),
                        msg_id=None if message_id is None else str(message_id),
                        model_version=version,
                    )
                )
            except BackendClosed:
                break
            except Exception as exc:
                log.warning("sending a reply failed: %s", type(exc).__name__)
                break
            finally:
                outgoing.remove(bubble)  # only now: an echo may arrive before send() returns
            sent.append(bubble)
        return sent

    async def _history(self, key: ChatKey) -> list[StoredMessage]:
        assert self.store is not None
        window = self.config.twin_memory_window
        since = int(time.time()) - window if window else 0
        after = int(await self.store.get_state(f"reset:{key[0]}:{key[1]}", 0))
        return await self.store.recent(
            key[0], key[1], since=since, limit=self.config.twin_memory_turns, after_id=after
        )

    # ------------------------------------------------------------------ admin
    async def set_paused(self, paused: bool) -> None:
        assert self.store is not None
        self.paused = paused
        await self.store.set_state("paused", paused)

    async def reset(self, key: ChatKey) -> None:
        """Forget a chat's memory (the messages stay in the store for retraining)."""
        assert self.store is not None
        await self.store.set_state(f"reset:{key[0]}:{key[1]}", await self.store.last_id())
        self._chats.pop(key, None)

    async def set_probability(self, probability: float) -> None:
        assert self.store is not None
        self.probability = probability
        await self.store.set_state("probability", probability)

    async def set_blocked(self, uin: int, blocked: bool) -> None:
        assert self.store is not None
        (self.blocked.add if blocked else self.blocked.discard)(uin)
        await self.store.set_state("blocked", sorted(self.blocked))

    async def switch_model(self, version: str) -> None:
        """Serve `version` now and make it the registry's `current`."""
        if self.registry is None:
            raise ValueError("TWIN_MODEL is not a model registry")
        if not (self.registry / version).is_dir():
            raise FileNotFoundError(f"no version {version} in the registry")
        async with self._model_lock:
            await self.use_version(version)  # `current` moves only once the version really serves
            model_registry.set_current(self.registry, version)

    def versions(self) -> list[str]:
        if self.registry is None:
            return []
        return sorted(p.name for p in self.registry.iterdir() if p.is_dir() and not p.name.startswith("."))

    async def status_text(self) -> str:
        assert self.store is not None
        uptime = int(time.time() - self.started)
        received = await self.store.count_since(_midnight(), "incoming")
        replied = await self.store.count_since(_midnight(), "twin")
        retrain = describe_status(read_status(self.registry))
        if self.retraining() and not retrain.startswith("running"):
            retrain = f"running (was: {retrain})"
        return "\n".join(
            [
                f"model: {self.backend.version} ({self.backend.name})",
                f"uptime: {uptime // 3600}h{uptime % 3600 // 60:02d}m{uptime % 60:02d}s",
                f"paused: {'yes' if self.paused else 'no'}",
                f"queue: {self.backend.queue_length()}",
                f"today: {received} in, {replied} out",
                f"group probability: {self.probability:g}",
                f"blocked: {len(self.blocked)}",
                f"last retrain: {retrain}",
            ]
        )

    def retraining(self) -> bool:
        return (self.retrain_task is not None and not self.retrain_task.done()) or (
            self.registry is not None and retrain_running(self.registry)
        )

    def start_retrain(self, report: Callable[[str], Awaitable[None]]) -> str:
        """Start a retrain cycle in the background; returns what to tell the operator now."""
        if self.registry is None:
            return "retrain needs TWIN_MODEL to be a model registry (models/ with `current`)"
        if self.retraining():
            return "a retrain cycle is already running"

        async def run() -> None:
            result = await run_retrain(settings_env(self.config), self.config.twin_retrain_nice)
            outcome = "finished" if result.returncode == 0 else f"failed (exit {result.returncode})"
            await report(f"retrain {outcome}: {result.summary}".strip())

        self.retrain_task = asyncio.create_task(run(), name="twin-retrain")
        return "retrain started"

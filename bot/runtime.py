"""The twin at run time: store, backend, memory, bursts, pacing, limits and admin state.

Handlers (`bot/handlers.py`) translate OneBot events into calls on one `Twin`; everything
here is NoneBot-free so that it can be driven and tested directly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bot.admin import COMMAND
from bot.backends import (
    Backend,
    BackendClosed,
    Generation,
    LlamaCppBackend,
    OpenAIBackend,
    SamplingSettings,
    shown_url,
)
from bot.config import Config
from bot.log_mask import secret_values
from bot.memory import build_prompt, history_turns
from bot.pacing import SendHealth, SendLimiter, SendLimits, filter_bubbles, jittered, typing_delay
from bot.retrain import registry_of, run_retrain, run_samples
from bot.segments import outgoing_bubbles, outgoing_parts, outgoing_text
from bot.stickers import Sticker, StickerSource, sendable
from bot.store import EXCLUDED_COMMAND, SEND_DROPPED, Store, StoredMessage, read_example_rows
from pipeline import registry as model_registry
from pipeline.chatformat import PRIVATE, ChatContext, ChatType, chat_name, parse_chat, split_bubbles
from pipeline.friend_memory import (
    ChatMemory,
    apply_extraction,
    cleared_memory,
    empty_memory,
    extraction_messages,
    forget_fact,
    new_messages,
    parse_extraction,
    render_memory,
    update_memory,
)
from pipeline.registry_ops import rollback_current, switch_current
from pipeline.retrieval import PairBuilder, ReplyIndex, query_of, read_record_pairs

log = logging.getLogger(__name__)

T = TypeVar("T")
EXTRACTION_BATCH = 40  # messages per request when the backend extracts a chat's memory
ChatKey = tuple[ChatType, str]  # (PRIVATE, "<uin>") or (GROUP, "<group code>")
# Sends one bubble, as `outgoing_text` shows it (a sticker alone as `[名字]`), returns its message id.
SendBubble = Callable[[str], Awaitable["int | str | None"]]


@dataclass(slots=True)
class _ChatState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: bool = False  # a handler is waiting out this chat's burst
    last_trigger: float = 0.0
    pending: set[int] = field(default_factory=set)  # store ids of messages that want an answer
    sender: str = ""  # who wrote the last of them: the person the reply's sends count against
    # Moves on whenever the owner steps in: a reply started before no longer goes out.
    epoch: int = 0
    generating: asyncio.Future | None = None  # the backend call of the reply being written


@dataclass(frozen=True, slots=True)
class Takeover:
    """A chat the owner has taken over: until a deadline, or (manual) until `/twin takeover off`."""

    until: float | None  # on the twin's monotonic clock; None: manual
    until_wall: float | None  # the same moment as Unix time, for `/twin status`

    @property
    def manual(self) -> bool:
        return self.until is None


TAKEOVER_STATE = "takeover"  # the store's state key: the chats taken over by hand ("c2c:123", …)
TAKEOVERS_SHOWN = 5  # `/twin status` stays short


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
        model, adapter = config.twin_openai_model, None
        if config.twin_openai_lora:
            module = serving_adapter(config)
            model, adapter = module.version, module.path
        return OpenAIBackend(
            config.twin_openai_base_url,
            model,
            api_key=config.twin_openai_api_key,
            timeout=config.twin_openai_timeout,
            retries=config.twin_openai_retries,
            sampling=sampling,
            special_tokens=config.twin_special_tokens,
            n_ctx=config.twin_n_ctx,
            fallback_urls=config.openai_urls[1:],
            lora=config.twin_openai_lora,
            runtime_lora=config.twin_vllm_runtime_lora,
            adapter=adapter,
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
        special_tokens=config.twin_special_tokens,
    )


def follows_registry(config: Config) -> bool:
    """Whether the backend serves the registry's `current` (llama.cpp, or vLLM with one LoRA per version)."""
    return config.twin_backend == "llama_cpp" or config.twin_openai_lora


def example_source(chat_type: str, chat: str, msg_id: str | None) -> str:
    """How the examples index names a stored message (`ReplyIndex.forget`): by chat and id, since
    QQ message ids repeat across chats; "" for a row without an id."""
    return f"{chat_type}:{chat}:{msg_id}" if msg_id else ""


def serving_adapter(config: Config) -> model_registry.LoraModule:
    """The serving version's adapter for TWIN_OPENAI_LORA; FileNotFoundError / ValueError naming the cause."""
    registry = registry_of(config.twin_model)
    if registry is None:
        raise FileNotFoundError(
            f"{config.twin_model}: TWIN_OPENAI_LORA needs TWIN_MODEL to name the registry (with `current`)"
        )
    version = model_registry.current_version(registry)
    if version is None:
        raise FileNotFoundError(f"{registry / model_registry.CURRENT_FILE}: names no version")
    return model_registry.lora_module(registry, version)


def closed_prefix(messages: Sequence[StoredMessage], gap: int, now: float) -> int:
    """How many of a chat's messages (oldest first) belong to conversations already closed: those
    before the last silence longer than `gap`, or all of them once the chat is silent that long."""
    if messages and now - messages[-1].time > gap:
        return len(messages)
    for i in range(len(messages) - 1, 0, -1):
        if messages[i].time - messages[i - 1].time > gap:
            return i
    return 0


def midnight() -> int:
    """Unix time of today's local midnight (daily counts and the daily cap)."""
    return int(time.mktime(time.strptime(time.strftime("%Y-%m-%d"), "%Y-%m-%d")))


class Twin:
    """One running twin: what every handler talks to."""

    def __init__(
        self,
        config: Config,
        *,
        nicknames: list[str],
        backend: Backend | None = None,
        command_prefixes: Sequence[str] = ("/",),
        model_lock: asyncio.Lock | None = None,
    ) -> None:
        self.config = config
        self.nicknames = nicknames
        self.command_prefixes = tuple(p for p in command_prefixes if p)
        self.backend: Backend = backend or make_backend(config)
        self.store: Store | None = None
        self.started = time.time()
        self.paused = False
        self.probability = config.twin_group_probability
        self.blocked: set[int] = set()
        self.names: dict[str, str] = {}  # uin → display name, learned from events
        self.stickers: dict[str, Sticker] = {}  # name → the market sticker the store keeps for it
        self.limiter = SendLimiter(
            SendLimits(
                per_chat_minute=config.twin_rate_per_chat,
                per_sender_minute=config.twin_rate_per_sender,
                total_minute=config.twin_rate_total,
                sender_hour=config.twin_sender_hourly_cap,
                sender_day=config.twin_sender_daily_cap,
                total_day=config.twin_daily_cap,
            )
        )
        self.health = SendHealth(limit=config.twin_send_failure_limit, backoff=config.twin_send_backoff)
        self.registry = registry_of(config.twin_model) if follows_registry(config) else None
        self.switch_problem: str | None = None  # why the last model switch failed, until one succeeds
        self.retrain_task: asyncio.Task | None = None
        self.samples_task: asyncio.Task | None = None  # `twin models samples` as a child, one at a time
        self._chats: dict[ChatKey, _ChatState] = {}
        self._takeovers: dict[ChatKey, Takeover] = {}
        self.clock: Callable[[], float] = time.monotonic  # the takeover window's clock (tests move it)
        self._stopping = asyncio.Event()
        self._watcher: asyncio.Task | None = None
        # One model switch at a time (watcher or /twin model); shared with the accounts that share
        # the backend (bot/accounts.py), so that their watchers swap it once.
        self._model_lock = model_lock or asyncio.Lock()
        self.model_shared_with: tuple[str, ...] = ()  # other accounts answering from this model
        # The owner's past replies (TWIN_EXAMPLES), this account's only; None until indexed.
        self.replies: ReplyIndex | None = None
        self._pairs = PairBuilder(config.twin_burst_gap)
        self._indexer: asyncio.Task | None = None
        self._indexed = 0  # the last store row in the index
        self._reindex_wanted = False  # an include came while the index was being built
        self._forgotten_meanwhile: set[str] = set()  # excluded while a build ran: out of the new index

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.store = await Store.open(
            self.config.twin_db, self.config.twin_db_key, synchronous=self.config.twin_db_synchronous
        )
        self.paused = bool(await self.store.get_state("paused", False))
        self.probability = float(await self.store.get_state("probability", self.probability))
        self.blocked = {int(u) for u in await self.store.get_state("blocked", [])}
        for name in await self.store.get_state(TAKEOVER_STATE, []):
            try:
                self._takeovers[parse_chat(str(name))] = Takeover(None, None)
            except ValueError:
                continue
        self.stickers = {sticker.name: sticker for sticker in await self.store.stickers()}
        if await self.store.get_state("sending_halted", False):
            self.health.halted = True
            self.health.failures = self.health.limit
        # Today's counts survive a restart: per person, a friend's private chat plus the group
        # bubbles that answered them.
        sent, by_chat = await self.store.sends_since(midnight())
        by_sender = await self.store.group_sends_by_sender_since(midnight())
        for (kind, chat), n in by_chat.items():
            if kind == PRIVATE:
                by_sender[chat] = by_sender.get(chat, 0) + n
        self.limiter.seed_today(sent, by_sender)
        await self.backend.start()
        if self.config.twin_examples:
            self._indexer = asyncio.create_task(self._index_replies(), name="twin-examples-index")
        if self.registry is not None:
            self._watcher = asyncio.create_task(self._watch_registry(), name="twin-registry-watch")
        account = self.config.twin_account
        log.info(
            "twin ready%s: backend %s, model %s, paused=%s",
            f" for account {account}" if account else "",
            self.backend.name,
            self.backend.version,
            self.paused,
        )

    async def close(self) -> None:
        """Stop waiting handlers, finish nothing new, free the model and the store."""
        self._stopping.set()
        running = (self._watcher, self.retrain_task, self.samples_task, self._indexer)
        tasks = [task for task in running if task is not None]
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
                moved = model_registry.current_version(self.registry) != version  # by `/twin model`
                if moved or self.backend.version == version:  # or swapped by an account sharing it
                    continue
                try:
                    await self.use_version(version)
                    failed = None
                except Exception as exc:  # a broken version must not stop the bot or the watcher
                    failed = version
                    log.error("cannot serve %s, still serving %s: %s", version, self.backend.version, exc)

    def _checked(self, version: str) -> Path:
        """What serves `version`, checked before anything is loaded: the GGUF (a name that leaves
        the registry, a file cut off or not a GGUF is refused), or for vLLM the LoRA adapter."""
        assert self.registry is not None
        if self.backend.name == OpenAIBackend.name:
            return model_registry.lora_module(self.registry, version).path
        return model_registry.check_version(self.registry, version).gguf

    async def use_version(self, version: str) -> None:
        """Serve `version` from the registry (requests already queued finish on the old model);
        a failure leaves the old version serving and is shown by `/twin status`."""
        try:
            path = await asyncio.to_thread(self._checked, version)  # may hash an adapter's weights
            log.info("switching model %s → %s", self.backend.version, version)
            await self.backend.swap(path, version)
        except BackendClosed:
            return
        except Exception as exc:
            self.switch_problem = f"{version} failed ({str(exc)[:200]}), still serving {self.backend.version}"
            raise
        self.switch_problem = None

    async def _index_replies(self) -> None:
        """Index the owner's past replies (the imported history, then the store) in a thread; rows
        stored meanwhile are caught up after, and from then on each message as it is recorded.
        Runs again from scratch when asked meanwhile (`reindex`); the index built before keeps
        answering until the new one replaces it."""
        assert self.store is not None
        while True:
            self._reindex_wanted = False
            self._forgotten_meanwhile = set()
            started = time.perf_counter()
            pairs = PairBuilder(self.config.twin_burst_gap)
            try:
                index, up_to = await asyncio.to_thread(self._build_index, pairs)
            except BackendClosed:
                return
            except Exception as exc:  # a bad import file must not stop the bot: it answers without examples
                log.error("examples are off: indexing the owner's replies failed: %s", exc)
                return
            # The thread saw committed rows only; the rest (ids only grow) is read here.
            while rows := await self.store.example_rows(up_to):
                for row in rows:
                    self._index_row(row, index, pairs)
                up_to = rows[-1].id or up_to
            for source in self._forgotten_meanwhile:  # the thread may have read it before
                index.forget(source)
            # no await since the last read: nothing recorded is missed
            self._pairs, self.replies, self._indexed = pairs, index, up_to
            log.info(
                "indexed %d of the owner's past replies in %.1f s", len(index), time.perf_counter() - started
            )
            if not self._reindex_wanted:
                return

    def reindex(self) -> None:
        """Build the examples index again (an included message's pairs were cut when it was
        excluded); the current index answers meanwhile. Nothing when TWIN_EXAMPLES is off."""
        if not self.config.twin_examples or self.store is None or self._stopping.is_set():
            return
        if self._indexer is not None and not self._indexer.done():
            self._reindex_wanted = True  # the running build may have read the row before: again
            return
        self._indexer = asyncio.create_task(self._index_replies(), name="twin-examples-index")

    def _build_index(self, pairs: PairBuilder) -> tuple[ReplyIndex, int]:
        """The index of the imported history and the store's committed rows, and the last row read."""
        index = ReplyIndex(other_chats=self.config.twin_examples_other_chats)
        if self.config.twin_examples_messages is not None:
            for pair in read_record_pairs(self.config.twin_examples_messages, pairs):
                index.add(pair)
        last = 0
        for row in read_example_rows(self.config.twin_db, key=self.config.twin_db_key):
            if self._stopping.is_set():  # a thread cannot be cancelled: it stops itself, or shutdown waits
                raise BackendClosed("shutting down")
            self._index_row(row, index, pairs)
            last = max(last, row.id or 0)
        return index, last

    def _index_row(self, row: StoredMessage, index: ReplyIndex, pairs: PairBuilder | None = None) -> None:
        source = example_source(row.chat_type, row.chat, row.msg_id)
        pair = (pairs or self._pairs).add((row.chat_type, row.chat), row, source=source)
        if pair is not None:
            index.add(pair)

    def examples_context(self, key: ChatKey, history: Sequence[StoredMessage]) -> ChatContext | None:
        """The owner's past replies to messages like the chat's last ones (TWIN_EXAMPLES), looked
        up as the dataset looked them up for its samples; None while off or still indexing."""
        c = self.config
        if self.replies is None or not c.twin_examples:
            return None
        now = int(time.time())
        if c.twin_examples_other_chats:  # the last answers of other chats, which no message finished yet
            for pair in self._pairs.settled(now):
                self.replies.add(pair)
        examples = self.replies.examples_for(
            query_of(history_turns(history, c.twin_burst_gap)),
            key,
            k=c.twin_examples,
            before_time=now + 1,
            max_tokens=c.twin_examples_tokens,
            other_chats=c.twin_examples_other_chats,
        )
        return ChatContext(examples=examples)

    # ------------------------------------------------------------------ messages
    async def record(self, message: StoredMessage, stickers: Sequence[Sticker] = ()) -> int:
        """Store one message before anything else happens to it; a friend's market `stickers` are
        learned too when `TWIN_STICKERS=any`."""
        assert self.store is not None
        if message.sender_name:
            self.names[message.sender] = message.sender_name
        row = await self.store.add(message)
        if message.origin == "incoming" and self.config.twin_stickers == "any":
            await self.learn_stickers(stickers, "friend")
        # A row the catch-up read while this one waited on the store is indexed already.
        if self.replies is not None and row > self._indexed:
            self._indexed = row
            if message.excluded is None and message.origin != "twin":
                self._index_row(message, self.replies)
        return row

    async def learn_stickers(self, stickers: Sequence[Sticker], source: StickerSource) -> None:
        """Keep the send data of market stickers seen on the QQ side (the owner's win, see
        `Store.learn_sticker`)."""
        assert self.store is not None
        for sticker in stickers:
            kept = await self.store.learn_sticker(sticker, source, int(time.time()))
            self.stickers[kept.name] = kept

    async def forget_sticker(self, name: str) -> bool:
        """Stop sending a kept sticker (an operator's choice); False when none has that name."""
        assert self.store is not None
        self.stickers.pop(name, None)
        return await self.store.forget_sticker(name)

    def sendable_stickers(self) -> dict[str, Sticker]:
        """The market stickers a reply may send now, by name (`TWIN_STICKERS`)."""
        return sendable(self.stickers.values(), self.config.twin_stickers)

    async def exclude(self, msg_id: str, reason: str, chat: ChatKey | None = None) -> int:
        """Keep a message (by its OneBot id) out of prompts, training and examples from now on."""
        assert self.store is not None
        changed = await self.store.exclude(msg_id, reason, chat)
        await self._forget_example(msg_id, chat)  # after the commit: a build from now on leaves it out
        return changed

    async def _forget_example(self, msg_id: str, chat: ChatKey | None) -> None:
        """A message stops being an example now, in the index that answers and in one being built
        (each of its rows by its own chat: ids repeat across chats)."""
        if self.store is None or (self.replies is None and self._indexer is None):
            return
        for row in await self.store.by_msg_id(msg_id, chat):
            source = example_source(row.chat_type, row.chat, row.msg_id)
            if self.replies is not None:
                self.replies.forget(source)
            if self._indexer is not None and not self._indexer.done():
                self._forgotten_meanwhile.add(source)  # the build may have read it already

    async def approve(self, msg_id: str, approved: bool = True, chat: ChatKey | None = None) -> int:
        """Approve (or unapprove) the twin's bubble with this OneBot id for training; returns rows
        matched. An approved reply is an example too: the index is built again in the background
        (an unapproved one leaves it at once)."""
        assert self.store is not None
        changed = await self.store.approve_sent(msg_id, approved, chat)
        if changed:
            if not approved:
                await self._forget_example(msg_id, chat)
            self.reindex()
        return changed

    async def include(self, msg_id: str, chat: ChatKey | None = None) -> int:
        """Undo an operator's exclusion (only that reason); the examples index is built again in
        the background, since the message's pairs were cut when it was excluded."""
        assert self.store is not None
        changed = await self.store.include(msg_id, chat)
        if changed:
            self.reindex()
        return changed

    def is_command(self, text: str) -> bool:
        """A command line (`/twin …`, another bot's `/help`): never chat, never training text."""
        return bool(self.command_prefixes) and text.lstrip().startswith(self.command_prefixes)

    async def record_own(
        self, key: ChatKey | None, message: StoredMessage, stickers: Sequence[Sticker] = ()
    ) -> int | None:
        """An account message (`message_sent`, or a message event from the account itself): the
        QQ side's echo of a twin bubble is claimed and not stored again; anything else is the
        owner's own words (a command line is kept out of prompts and training) and its market
        `stickers` the owner's. Returns the row id, or None for an echo (whose sticker, maybe
        a friend's, is never learned as the owner's)."""
        assert self.store is not None
        chat_type, chat = key if key is not None else (None, None)
        if await self.store.claim_echo(chat_type, chat, message.msg_id or "", message.text, int(time.time())):
            return None
        message.origin = "owner"
        if self.is_command(message.text):
            message.excluded = EXCLUDED_COMMAND
        row = await self.record(message)
        await self.learn_stickers(stickers, "owner")
        return row

    async def owner_spoke(self, key: ChatKey) -> None:
        """The owner wrote in the chat themself: nothing before this needs the twin any more, a
        reply being written or sent there is dropped, and the twin stays quiet there for
        TWIN_TAKEOVER_MINUTES."""
        minutes = self.config.twin_takeover_minutes
        current = self.taken_over(key)
        if minutes > 0 and (current is None or not current.manual):
            seconds = minutes * 60
            self._takeovers[key] = Takeover(self.clock() + seconds, time.time() + seconds)
            log.info("%s %s taken over by the owner for %g min", key[0], key[1], minutes)
        self._interrupt(key)

    def _interrupt(self, key: ChatKey) -> None:
        """Forget what the chat was waiting to have answered and stop the reply in progress."""
        state = self._chats.setdefault(key, _ChatState())
        state.pending.clear()
        state.epoch += 1
        if state.generating is not None:
            state.generating.cancel()

    def taken_over(self, key: ChatKey) -> Takeover | None:
        """The chat's takeover while it lasts (an automatic one ends with its window)."""
        takeover = self._takeovers.get(key)
        if takeover is not None and takeover.until is not None and self.clock() >= takeover.until:
            del self._takeovers[key]
            return None
        return takeover

    def takeovers(self) -> dict[ChatKey, Takeover]:
        """Every chat taken over now: manual ones first, then by when they end."""
        live = {key: t for key in list(self._takeovers) if (t := self.taken_over(key)) is not None}
        return dict(sorted(live.items(), key=lambda item: (not item[1].manual, item[1].until or 0, item[0])))

    async def set_takeover(self, key: ChatKey, on: bool) -> None:
        """`on`: the twin stays quiet in the chat until `off` (kept across restarts); `off` ends a
        manual or automatic takeover now."""
        assert self.store is not None
        if on:
            self._takeovers[key] = Takeover(None, None)
            self._interrupt(key)
        else:
            self._takeovers.pop(key, None)
        manual = sorted(chat_name(k) for k, t in self._takeovers.items() if t.manual)
        await self.store.set_state(TAKEOVER_STATE, manual)

    async def answer(
        self, key: ChatKey, message_id: int, send: SendBubble, self_id: str = "", sender: str = ""
    ) -> list[str]:
        """Answer a triggering message once its burst is over; returns the bubbles sent."""
        state = self._chats.setdefault(key, _ChatState())
        state.pending.add(message_id)
        state.sender = sender or (key[1] if key[0] == PRIVATE else "")
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
        if self.taken_over(key) is not None:
            log.info("not answering %s %s: the owner has taken over", chat_type, chat)
            return []
        epoch = state.epoch
        unable = self.health.blocked() or self.limiter.blocked(f"{chat_type}:{chat}", state.sender)
        if unable:
            log.info("not answering %s %s: %s", chat_type, chat, unable)
            return []
        history = await self._history(key)
        # Messages that arrived while the last reply was being written are still unanswered:
        # they go last, so the prompt ends with what needs an answer.
        history.sort(key=lambda m: (m.id in pending, m.id or 0))
        messages = build_prompt(
            history,
            chat_type,
            self.config.twin_persona,
            self.config.twin_max_turn_chars,
            self.config.twin_burst_gap,
            context=await self._context(key, history),
        )
        if not messages:
            return []
        try:
            generation = await self._generate(state, epoch, messages)
        except BackendClosed:
            return []
        except Exception as exc:
            log.warning("backend %s failed: %s", self.backend.name, type(exc).__name__)
            log.debug("backend failure detail", exc_info=True)
            if not self.config.twin_fallback_reply:
                return []
            fallback = [self.config.twin_fallback_reply]
            return await self._send_bubbles(key, state, epoch, fallback, "fallback", send, self_id)
        if generation is None:
            log.info("reply in %s %s dropped: the owner took over", chat_type, chat)
            return []
        log.debug("generated %d tokens in %.2fs: %r", generation.tokens, generation.seconds, generation.text)
        bubbles = split_bubbles(
            generation.text, self.config.twin_max_bubbles, extra_special=self.config.twin_special_tokens
        )
        kept = filter_bubbles(
            bubbles,
            block_links=self.config.twin_block_links,
            blocked_words=self.config.twin_blocked_words,
            command_prefixes=self.command_prefixes,
        )
        if len(kept) < len(bubbles):
            log.info("output filter dropped %d bubble(s) in %s %s", len(bubbles) - len(kept), chat_type, chat)
        return await self._send_bubbles(key, state, epoch, kept, generation.version, send, self_id)

    async def _generate(
        self, state: _ChatState, epoch: int, messages: list[dict[str, str]]
    ) -> Generation | None:
        """The backend's reply, or None when the owner stepped in meanwhile (the call is cancelled)."""
        call = asyncio.ensure_future(self.backend.generate(messages))
        state.generating = call
        try:
            await asyncio.wait({call})
        finally:
            state.generating = None
            call.cancel()  # only still running when this handler itself is cancelled
        if call.cancelled() or state.epoch != epoch:
            return None
        return call.result()

    async def _send_bubbles(
        self,
        key: ChatKey,
        state: _ChatState,
        epoch: int,
        bubbles: list[str],
        version: str,
        send: SendBubble,
        self_id: str,
    ) -> list[str]:
        """Send bubble after bubble, each recorded before it goes out (so that its echo is known
        whenever it comes) and counted against the limits; a failure backs off and stops the reply,
        and so does the owner stepping in (a bubble recorded but not yet sent is marked dropped)."""
        sent: list[str] = []
        c = self.config
        chat, sender = f"{key[0]}:{key[1]}", state.sender
        stickers = self.sendable_stickers()
        # What QQ will show: placeholders and unknown `[名字]` dropped, each sticker a bubble of its own.
        split = (outgoing_bubbles(outgoing_parts(bubble, stickers)) for bubble in bubbles)
        shown = [outgoing_text(parts) for parts in itertools.chain.from_iterable(split)]
        for text in shown:
            if not text:
                continue
            unable = self.health.blocked() or self.limiter.blocked(chat, sender)
            if unable:
                log.info("reply in %s cut short: %s", chat, unable)
                break
            delay = typing_delay(text, c.twin_typing_delay, c.twin_typing_per_char, c.twin_typing_max)
            if await self._sleep(jittered(delay, c.twin_typing_jitter)) or self.store is None:
                break
            if state.epoch != epoch:
                log.info("reply in %s cut short: the owner took over", chat)
                break
            row = await self.store.add(
                StoredMessage(
                    chat_type=key[0],
                    chat=key[1],
                    sender=self_id,
                    origin="twin",
                    text=text,
                    time=int(time.time()),
                    model_version=version,
                    send_state="sending",
                )
            )
            if state.epoch != epoch:  # the owner wrote while the bubble was being recorded
                await self._finish_send(row, None, SEND_DROPPED)
                log.info("reply in %s cut short: the owner took over", chat)
                break
            try:
                message_id = await self._unless_stopping(send(text))
            except BackendClosed:
                await self._finish_send(row, None, "failed")
                break
            except Exception as exc:  # the QQ side refused or timed out: risk control, most often
                await self._finish_send(row, None, "failed")
                log.warning("%s (%s)", self.health.failed(), type(exc).__name__)
                if self.health.halted and self.store is not None:
                    await self.store.set_state("sending_halted", True)
                break
            await self._finish_send(row, None if message_id is None else str(message_id), "sent")
            self.limiter.record(chat, sender)
            self.health.succeeded()
            sent.append(text)
        return sent

    async def _finish_send(self, row: int, message_id: str | None, state: str) -> None:
        if self.store is not None:
            await self.store.finish_send(row, message_id, state)

    async def _context(self, key: ChatKey, history: Sequence[StoredMessage]) -> ChatContext | None:
        """What THIS chat's prompt knows besides its turns: its memory (TWIN_MEMORY), ranked by what
        was said last, and the owner's similar past replies (TWIN_EXAMPLES); None when neither."""
        rendered = ""
        if self.config.twin_memory:
            memory = await self.refresh_memory(key)
            turns = history_turns(history, self.config.twin_burst_gap)
            query = turns[-1].text if turns else ""
            rendered = render_memory(memory, self.config.twin_memory_tokens, query)
        examples = self.examples_context(key, history)
        context = ChatContext(memory=rendered, examples=examples.examples if examples is not None else ())
        return context or None

    # ------------------------------------------------------------------ chat memory
    async def stored_memory(self, key: ChatKey) -> ChatMemory:
        """The chat's stored memory (empty when none, unreadable, or not this chat's)."""
        assert self.store is not None
        text = await self.store.get_memory(*key)
        if text is None:
            return empty_memory(*key)
        try:
            memory = ChatMemory.from_json(text)
        except ValueError as exc:
            log.warning("memory of %s:%s unreadable (%s); rebuilt from the store", key[0], key[1], exc)
            return empty_memory(*key)
        return memory if (memory.chat_type, memory.chat) == key else empty_memory(*key)

    async def refresh_memory(self, key: ChatKey, now: float | None = None) -> ChatMemory:
        """Fold the chat's closed conversations (a silence of TWIN_SESSION_GAP after them) into its
        stored memory; returns that memory with the open conversation added by the rules, unstored."""
        assert self.store is not None
        memory = await self.stored_memory(key)
        after = int(await self.store.get_state(f"reset:{key[0]}:{key[1]}", 0))
        messages = await self.store.chat_messages(*key, after_time=memory.updated_until, after_id=after)
        closed = closed_prefix(messages, self.config.twin_session_gap, time.time() if now is None else now)
        if closed:
            memory = await self._fold(memory, messages[:closed])
            await self.store.set_memory(*key, memory.to_json())
        return update_memory(memory, messages[closed:])

    async def _fold(self, memory: ChatMemory, messages: Sequence[StoredMessage]) -> ChatMemory:
        if self.config.twin_memory_extractor != "backend":
            return update_memory(memory, messages)
        fresh = new_messages(memory, messages)
        for start in range(0, len(fresh), EXTRACTION_BATCH):
            batch = fresh[start : start + EXTRACTION_BATCH]
            try:
                generation = await self.backend.generate(extraction_messages(batch))
                memory = apply_extraction(memory, parse_extraction(generation.text, batch))
            except BackendClosed:
                raise
            except Exception as exc:  # the model is down or busy: the rules keep memory current
                log.warning(
                    "memory extraction by the backend failed (%s); used the rules", type(exc).__name__
                )
                memory = update_memory(memory, batch)
        return memory

    async def clear_memory(self, key: ChatKey) -> None:
        """Forget the chat's remembered names, facts and topics so far (recent turns stay)."""
        assert self.store is not None
        await self.store.set_memory(*key, cleared_memory(*key, int(time.time())).to_json())

    async def forget_fact(self, key: ChatKey, number: int) -> ChatMemory:
        """Drop one remembered fact (numbered as `describe_memory` shows); ValueError if none."""
        assert self.store is not None
        await self.refresh_memory(key)
        memory = forget_fact(await self.stored_memory(key), number)
        await self.store.set_memory(*key, memory.to_json())
        return memory

    async def refresh_memories(self, since: float = 0) -> int:
        """Refresh the memory of every chat with messages since `since` (the retrain schedule)."""
        assert self.store is not None
        chats = await self.store.chats_since(int(since))
        for chat_type, chat in chats:
            if self._stopping.is_set():
                break
            await self.refresh_memory((chat_type, chat))  # type: ignore[arg-type]
        return len(chats)

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
        """Pause or resume answering; resuming also lifts a stop after failed sends."""
        assert self.store is not None
        self.paused = paused
        await self.store.set_state("paused", paused)
        if not paused:
            self.health.resume()
            await self.store.set_state("sending_halted", False)

    async def reset(self, key: ChatKey) -> None:
        """Forget a chat's memory, recent turns and remembered facts alike (the messages stay in
        the store for retraining; the facts are not rebuilt from before the reset)."""
        assert self.store is not None
        await self.store.set_state(f"reset:{key[0]}:{key[1]}", await self.store.last_id())
        await self.store.delete_memory(*key)
        self._chats.pop(key, None)

    async def set_probability(self, probability: float) -> None:
        assert self.store is not None
        self.probability = probability
        await self.store.set_state("probability", probability)

    async def set_blocked(self, uin: int, blocked: bool) -> None:
        assert self.store is not None
        (self.blocked.add if blocked else self.blocked.discard)(uin)
        await self.store.set_state("blocked", sorted(self.blocked))

    async def switch_model(self, version: str, by: str = "chat") -> None:
        """Serve `version` now and make it the registry's `current` through the registry's one
        guarded switch (name and GGUF checked, lock held, history recorded)."""
        if self.registry is None:
            raise ValueError("TWIN_MODEL is not a model registry")
        if self.model_shared_with:
            raise ValueError(self.shared_registry_note())
        await asyncio.to_thread(self._checked, version)  # before anything is loaded
        async with self._model_lock:
            await self.use_version(version)  # `current` moves only once the version really serves
            switch_current(self.registry, version, by=by, reason="/twin model")

    async def rollback(self, by: str = "chat") -> str:
        """Serve the previously promoted version again (as `twin models rollback`); returns it.

        ValueError (one line) when there is no registry, it is shared, or nothing to go back to."""
        if self.registry is None:
            raise ValueError("TWIN_MODEL is not a model registry")
        if self.model_shared_with:
            raise ValueError(self.shared_registry_note())
        async with self._model_lock:
            target = model_registry.previous_version(self.registry)
            if target is None:
                raise ValueError("no earlier promoted version to roll back to")
            before = self.backend.version
            await self.use_version(target)  # `current` moves only once the version really serves
            try:
                served = rollback_current(self.registry, by=by, reason="/twin rollback")
            except model_registry.RegistryError as exc:
                await self.use_version(before)  # `current` did not move: serve what it names
                raise ValueError(str(exc)) from None
            if served != self.backend.version:  # the history moved between the two reads
                await self.use_version(served)
        return served

    def versions(self) -> list[str]:
        """The registry's versions, oldest first (the order `twin models list` shows)."""
        return model_registry.version_names(self.registry) if self.registry is not None else []

    async def status_text(self) -> str:
        assert self.store is not None
        uptime = int(time.time() - self.started)
        received = await self.store.count_since(midnight(), "incoming")
        replied = await self.store.count_since(midnight(), "twin")
        status = model_registry.retrain_status(self.registry) if self.registry is not None else {}
        retrain = model_registry.describe_status(status)
        if self.retraining() and not retrain.startswith("running"):
            retrain = f"running (was: {retrain})"
        lines = [f"model: {self.backend.version} ({self.backend.name})"]
        url = getattr(self.backend, "serving_url", None)  # openai backends, pooled or not
        if url is not None:
            lines.append(f"server: {shown_url(url)}")
        if self.switch_problem:
            lines.append(f"last switch: {self.switch_problem}")
        return "\n".join(
            [
                *lines,
                f"uptime: {uptime // 3600}h{uptime % 3600 // 60:02d}m{uptime % 60:02d}s",
                f"paused: {'yes' if self.paused else 'no'}",
                f"sending: {self.health.describe()}",
                f"queue: {self.backend.queue_length()}",
                f"today: {received} in, {replied} out",
                f"group probability: {self.probability:g}",
                f"blocked: {len(self.blocked)}",
                *self.takeover_lines(),
                f"last retrain: {retrain}",
                *([f"account: {self.config.twin_account}"] if self.config.twin_account else []),
            ]
        )

    def takeover_lines(self) -> list[str]:
        """The chats the owner has taken over, for `/twin status`: a count, then at most a few."""
        takeovers = self.takeovers()
        if not takeovers:
            return ["taken over: none"]
        lines = [f"taken over: {len(takeovers)}"]
        for key, takeover in list(takeovers.items())[:TAKEOVERS_SHOWN]:
            if takeover.until_wall is None:
                until = f"/{COMMAND} takeover off"
            else:  # a long window (TWIN_TAKEOVER_MINUTES is not capped) needs its date
                shape = "%H:%M:%S" if takeover.until_wall - time.time() < 12 * 3600 else "%Y-%m-%d %H:%M"
                until = time.strftime(shape, time.localtime(takeover.until_wall))
            lines.append(f"  {chat_name(key)} until {until}")
        if len(takeovers) > TAKEOVERS_SHOWN:
            lines.append("  …")
        return lines

    def retraining(self) -> bool:
        return (self.retrain_task is not None and not self.retrain_task.done()) or (
            self.registry is not None and model_registry.cycle_running(self.registry)
        )

    def start_retrain(self, report: Callable[[str], Awaitable[None]]) -> str:
        """Start a retrain cycle in the background; returns what to tell the operator now."""
        if self.registry is None:
            return "retrain needs TWIN_MODEL to be a model registry (models/ with `current`)"
        if self.model_shared_with:
            return self.shared_registry_note()
        if self.retraining():
            return "a retrain cycle is already running"
        # With TWIN_ACCOUNTS the child must read this account's settings, not the process's.
        account = self.config.twin_account if self.config.twin_accounts else None

        async def run() -> None:
            secrets = secret_values(self.config.model_dump())
            result = await run_retrain(self.config.twin_retrain_nice, secrets, account=account)
            outcome = "finished" if result.returncode == 0 else f"failed (exit {result.returncode})"
            await report(f"retrain {outcome}: {result.summary}".strip())

        async def refresh_then_run() -> None:
            if self.config.twin_memory:  # the retrain schedule also brings every chat's memory up to date
                try:
                    await self.refresh_memories()
                except BackendClosed:
                    return
            await run()

        self.retrain_task = asyncio.create_task(refresh_then_run(), name="twin-retrain")
        return "retrain started"

    def start_samples(self, report: Callable[[str], Awaitable[None]]) -> str:
        """Start `twin models samples` (each version's replies to the held-out probes) in the
        background at lower priority; returns what to tell the operator now."""
        if self.registry is None:
            return "samples need TWIN_MODEL to be a model registry (models/ with `current`)"
        if self.samples_task is not None and not self.samples_task.done():
            return "sample replies are already being generated"
        account = self.config.twin_account if self.config.twin_accounts else None

        async def run() -> None:
            secrets = secret_values(self.config.model_dump())
            result = await run_samples(self.config.twin_retrain_nice, secrets, account=account)
            outcome = "finished" if result.returncode == 0 else f"failed (exit {result.returncode})"
            await report(f"samples {outcome}: {result.summary}".strip())

        self.samples_task = asyncio.create_task(run(), name="twin-samples")
        return "generating sample replies for every version (the result is sent to superusers)"

    def shared_registry_note(self) -> str:
        """Why this account leaves the registry alone: another account answers from it too."""
        others = ", ".join(self.model_shared_with)
        return (
            f"the registry {self.registry} also serves account {others}: "
            "retrain or switch it from the shell (`twin retrain`, `twin models`)"
        )

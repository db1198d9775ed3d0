"""Several QQ accounts in one process: a twin per account, found by the connection's `self_id`.

Each account has its own `Twin` (store, memory, limits, pause, persona, superusers); accounts
whose settings load the same model share one backend through the `BackendPool`, so a GGUF
named by two accounts is loaded once. NoneBot-free: `bot/handlers.py` asks `Accounts` which
twin an event's connection belongs to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.backends import Backend, Generation
from bot.config import Config
from bot.retrain import registry_of
from bot.runtime import Twin, make_backend
from pipeline import registry as model_registry

log = logging.getLogger(__name__)

# Settings that decide what a backend is (the model aside): two accounts share a backend only
# when all of these agree. By prefix, so that a new backend setting is never ignored.
_BACKEND_PREFIXES = ("twin_backend", "twin_n_", "twin_openai_", "twin_special_tokens")
_SAMPLING = ("twin_max_tokens", "twin_temperature", "twin_top_p", "twin_repeat_penalty", "twin_seed")


def backend_key(config: Config) -> tuple:
    """What makes two accounts' backends one: the model by its real path, and every backend setting."""
    registry = registry_of(config.twin_model) if config.twin_backend == "llama_cpp" else None
    if registry is not None:
        model = ("registry", str(registry.resolve()))  # followed, so `current` may move
    elif config.twin_backend == "llama_cpp":
        model = ("file", str(model_registry.resolve_model(config.twin_model).gguf.resolve()))
    else:
        model = ("server", "")  # the OpenAI settings name it
    settings = tuple(
        (name, tuple(value) if isinstance(value, list) else value)
        for name, value in config.model_dump().items()
        if name.startswith(_BACKEND_PREFIXES) or name in _SAMPLING
    )
    return (model, settings)


@dataclass(slots=True)
class _Pooled:
    backend: Backend
    accounts: list[str]  # who holds it, in the order they took it
    model_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one swap at a time, for all
    started: asyncio.Task | None = None


class SharedBackend:
    """One account's handle on a pooled backend: started once for all, closed with the last handle."""

    def __init__(self, pool: BackendPool, key: tuple, entry: _Pooled, account: str) -> None:
        self._pool, self._key, self._entry, self.account = pool, key, entry, account
        self._closed = False

    @property
    def name(self) -> str:
        return self._entry.backend.name

    @property
    def version(self) -> str:
        return self._entry.backend.version

    @property
    def model_lock(self) -> asyncio.Lock:
        return self._entry.model_lock

    def shared_with(self) -> list[str]:
        """The other accounts answering from the same model."""
        return [account for account in self._entry.accounts if account != self.account]

    async def start(self) -> None:
        entry = self._entry
        if entry.started is None:
            entry.started = asyncio.ensure_future(entry.backend.start())
        await asyncio.shield(entry.started)

    async def generate(self, messages: Sequence[dict[str, str]]) -> Generation:
        return await self._entry.backend.generate(messages)

    async def swap(self, gguf: Path, version: str) -> None:
        await self._entry.backend.swap(gguf, version)

    def queue_length(self) -> int:
        return self._entry.backend.queue_length()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.release(self._key, self.account)

    def __getattr__(self, name: str) -> Any:  # what only one kind of backend has (`render_prompt`…)
        return getattr(self._entry.backend, name)


class BackendPool:
    """Backends by `backend_key`, counted: the first account to need one creates it."""

    def __init__(self, make: Callable[[Config], Backend] = make_backend) -> None:
        self._make = make
        self._entries: dict[tuple, _Pooled] = {}

    def acquire(self, config: Config, account: str) -> SharedBackend:
        key = backend_key(config)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Pooled(self._make(config), [])
        else:
            log.info("model shared: account %s answers from account %s's model", account, entry.accounts[0])
        entry.accounts.append(account)
        return SharedBackend(self, key, entry, account)

    async def release(self, key: tuple, account: str) -> None:
        entry = self._entries[key]
        entry.accounts.remove(account)
        if not entry.accounts:
            del self._entries[key]
            await entry.backend.close()

    def __len__(self) -> int:
        return len(self._entries)


def superusers_of(config: Config, everyone: Iterable[str]) -> frozenset[str]:
    """Who may command this account: its `TWIN_SUPERUSERS`, else NoneBot's `SUPERUSERS` (whose
    `onebot:123` form names the same person as `123`)."""
    if config.twin_superusers:
        return frozenset(str(user) for user in config.twin_superusers)
    return frozenset(user.removeprefix("onebot:") for user in everyone)


@dataclass(slots=True)
class Account:
    """One configured account: its QQ number ("" = whichever connects), twin and superusers."""

    self_id: str
    twin: Twin
    superusers: frozenset[str]

    @property
    def label(self) -> str:
        return f"account {self.self_id}" if self.self_id else "the account"


class Accounts:
    """The running twins by QQ number; an account configured without one serves any connection."""

    def __init__(self, accounts: Sequence[Account], *, several: bool) -> None:
        self.several = several  # from TWIN_ACCOUNTS: /twin/ready lists the accounts
        self._accounts = list(accounts)
        self._by_id = {account.self_id: account for account in accounts}

    def find(self, self_id: str) -> Account | None:
        """The account a connection's events belong to; None: it is no account of this process."""
        return self._by_id.get(self_id) or self._by_id.get("")

    def __iter__(self) -> Iterator[Account]:
        return iter(self._accounts)

    def served(self) -> set[str]:
        """The QQ numbers served; empty when an account serves whichever connects."""
        return set() if "" in self._by_id else set(self._by_id)

    def superusers(self) -> set[str]:
        """Everyone who may command some account (no account may connect as one of them)."""
        return {user for account in self._accounts for user in account.superusers}

    async def close(self) -> None:
        for account in self._accounts:
            await account.twin.close()


async def start_accounts(
    configs: Sequence[Config],
    *,
    several: bool,
    superusers: Collection[str],
    nicknames: list[str],
    command_prefixes: Sequence[str],
    pool: BackendPool | None = None,
) -> Accounts:
    """Create and start a twin for every account (models shared by path loaded once); if one fails
    to start, those already started are closed again."""
    pool = BackendPool() if pool is None else pool
    accounts: list[Account] = []
    handles: list[SharedBackend] = []
    try:
        for config in configs:
            self_id = str(config.twin_account) if config.twin_account else ""
            backend = pool.acquire(config, self_id or "-")
            handles.append(backend)
            twin = Twin(
                config,
                nicknames=list(config.twin_nicknames) or nicknames,
                backend=backend,
                command_prefixes=command_prefixes,
                model_lock=backend.model_lock,
            )
            accounts.append(Account(self_id, twin, superusers_of(config, superusers)))
            await twin.start()
        for account, backend in zip(accounts, handles, strict=True):
            account.twin.model_shared_with = tuple(backend.shared_with())
    except BaseException:
        for account in accounts:
            await account.twin.close()
        for backend in handles[len(accounts) :]:  # taken, but its twin was never made
            await backend.close()
        raise
    return Accounts(accounts, several=several)

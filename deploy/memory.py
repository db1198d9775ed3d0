"""`twin memory list|show|edit|delete|build`: each chat's memory in the bot's store (TWIN_DB,
TWIN_DB_KEY; with TWIN_ACCOUNTS the account named by --account)."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from pipeline.errors import InputError

commands = typer.Typer()
memory = typer.Typer(
    help="each chat's memory (names, facts, topics) in the bot's store", no_args_is_help=True
)
commands.add_typer(memory, name="memory")

T = TypeVar("T")
Account = Annotated[
    int | None, typer.Option(help="with TWIN_ACCOUNTS: the QQ number whose account file's settings to use")
]
Chat = Annotated[str, typer.Argument(help="c2c:<QQ number> or group:<group number>")]


def _with_store(account: int | None, work: Callable[..., Awaitable[T]], *, create: bool = False) -> T:
    """Run `work(store)` on the account's store, opened (and migrated) as the bot opens it;
    `create` makes a new store where there is none (seeding before the bot's first start)."""
    from bot.store import Store
    from deploy.settings import load_settings

    settings = load_settings(account)
    if account is None and settings.twin_accounts:
        raise InputError("TWIN_ACCOUNTS", "several accounts are set up: name one with --account <QQ number>")
    if not create and not settings.twin_db.is_file():
        raise InputError(settings.twin_db, "no conversation store here (TWIN_DB); has the bot run yet?")

    async def run() -> T:
        try:
            store = await Store.open(settings.twin_db, settings.twin_db_key, settings.twin_db_synchronous)
        except Exception as exc:  # sqlite3/sqlcipher errors: a wrong key, not a database
            raise InputError(settings.twin_db, f"cannot open the store ({exc}); check TWIN_DB_KEY") from None
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _chat(text: str) -> tuple[str, str]:
    from pipeline.chatformat import parse_chat

    try:
        return parse_chat(text)
    except ValueError as exc:
        raise InputError(text, str(exc)) from None


async def _stored(store, key: tuple[str, str]):
    from pipeline.friend_memory import ChatMemory, empty_memory

    text = await store.get_memory(*key)
    if text is None:
        return empty_memory(*key)
    try:
        return ChatMemory.from_json(text)
    except ValueError as exc:
        raise InputError(f"{key[0]}:{key[1]}", f"stored memory unreadable ({exc})") from None


@memory.command("list")
def list_memories(account: Account = None) -> None:
    """The chats with a memory, and when each was last updated."""

    async def work(store) -> list[tuple[str, str, int]]:
        return await store.memories()

    for chat_type, chat, updated in _with_store(account, work):
        typer.echo(f"{chat_type}:{chat}\t{time.strftime('%Y-%m-%d %H:%M', time.localtime(updated))}")


@memory.command("show")
def show(chat: Chat, account: Account = None) -> None:
    """One chat's memory: names, numbered facts, topics."""
    from pipeline.friend_memory import describe_memory

    key = _chat(chat)

    async def work(store):
        return await _stored(store, key)

    typer.echo(describe_memory(_with_store(account, work)))


@memory.command("edit")
def edit(
    chat: Chat,
    set_file: Annotated[
        Path | None,
        typer.Option("--set", help="replace the memory by this JSON file instead of opening $EDITOR"),
    ] = None,
    account: Account = None,
) -> None:
    """Edit one chat's memory as JSON in $EDITOR, or replace it from a file (--set)."""
    from pipeline.files import PRIVATE_FILE_MODE
    from pipeline.friend_memory import ChatMemory

    key = _chat(chat)

    async def current(store):
        return await _stored(store, key)

    if set_file is not None:
        try:
            text, source = set_file.read_text(encoding="utf-8"), str(set_file)
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(set_file, f"cannot read ({type(exc).__name__})") from None
    else:
        before = _with_store(account, current)
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        # The memory holds what friends said: a private temporary file, removed afterwards.
        fd, name = tempfile.mkstemp(prefix="twin-memory-", suffix=".json")
        path, source = Path(name), "the edited memory"
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(before.to_json())
            if subprocess.run([*shlex.split(editor), str(path)], check=False).returncode != 0:
                raise InputError(editor, "the editor failed; the memory is unchanged")
            text = path.read_text(encoding="utf-8")
        finally:
            path.unlink(missing_ok=True)
    try:
        edited = ChatMemory.from_json(text)
    except ValueError as exc:
        raise InputError(source, f"not a chat memory ({exc}); unchanged") from None
    if (edited.chat_type, edited.chat) != key:
        raise InputError(source, f"is the memory of {edited.key}, not {key[0]}:{key[1]}; unchanged")

    async def save(store) -> None:
        await store.set_memory(*key, edited.to_json())

    _with_store(account, save)
    typer.echo(f"memory of {edited.key}: {len(edited.facts)} facts, {len(edited.names)} names")


@memory.command("delete")
def delete(chat: Chat, account: Account = None) -> None:
    """Forget one chat's memory: what was said so far is not remembered again."""
    from pipeline.friend_memory import cleared_memory

    key = _chat(chat)

    async def work(store) -> None:
        await store.set_memory(*key, cleared_memory(*key, int(time.time())).to_json())

    _with_store(account, work)
    typer.echo(f"memory of {key[0]}:{key[1]} deleted")


@memory.command("build")
def build(
    messages: Annotated[Path, typer.Option("--messages", help="messages.jsonl written by `twin extract`")],
    account: Account = None,
) -> None:
    """Seed every chat's memory from the imported history (each chat from its own messages only)."""
    from pipeline.friend_memory import update_memory
    from pipeline.records import iter_messages

    async def work(store) -> int:
        chats: dict[tuple[str, str], list] = {}
        for message in iter_messages(messages):
            chats.setdefault((message.chat_type, message.chat), []).append(message)
        for key, said in chats.items():
            said.sort(key=lambda m: m.time)
            memory = await _stored(store, key)
            # Only what is newer than the stored memory is folded in: seeding twice changes nothing.
            await store.set_memory(*key, update_memory(memory, said).to_json())
        return len(chats)

    typer.echo(f"memory built for {_with_store(account, work, create=True)} chats from {messages}")

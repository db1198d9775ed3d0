"""The conversation store: every live message in and out, in SQLite (optionally SQLCipher).

The bot writes through `Store` (aiosqlite, WAL). Retraining reads through the synchronous
`read_messages_since`, so this module must import without NoneBot (no plugin imports here).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from bot.stickers import Sticker, StickerSource
from pipeline.chatformat import BURST_GAP, to_turns
from pipeline.files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE

Origin = Literal["incoming", "twin", "owner"]
SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")

# Each entry moves the schema one version up; never edit a shipped entry, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        chat_type TEXT NOT NULL CHECK (chat_type IN ('c2c', 'group')),
        chat TEXT NOT NULL,
        sender TEXT NOT NULL,
        sender_name TEXT NOT NULL DEFAULT '',
        origin TEXT NOT NULL CHECK (origin IN ('incoming', 'twin', 'owner')),
        msg_id TEXT,
        time INTEGER NOT NULL,
        text TEXT NOT NULL,
        reply_to TEXT,
        kinds TEXT NOT NULL DEFAULT '[]',
        model_version TEXT
    );
    CREATE INDEX messages_chat_time ON messages (chat_type, chat, time);
    CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    ALTER TABLE messages ADD COLUMN approved INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX messages_time ON messages (time);
    CREATE INDEX messages_msg_id ON messages (msg_id);
    """,
    # v3: outgoing bubbles are recorded before they are sent (send_state, echo_key) so that the QQ
    # side's echo of a twin reply is recognised in any order; `excluded` keeps a row out of prompts
    # and training (command lines, recalled messages, an operator's choice) with the reason.
    """
    ALTER TABLE messages ADD COLUMN excluded TEXT;
    ALTER TABLE messages ADD COLUMN send_state TEXT;
    ALTER TABLE messages ADD COLUMN echo_key TEXT;
    ALTER TABLE messages ADD COLUMN echoed INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX messages_echo ON messages (chat_type, chat, echo_key);
    """,
    # v4: each chat's memory (pipeline/friend_memory.py), one JSON document per chat; the store is
    # the account's own, so memory is per account too.
    """
    CREATE TABLE chat_memory (
        chat_type TEXT NOT NULL CHECK (chat_type IN ('c2c', 'group')),
        chat TEXT NOT NULL,
        memory TEXT NOT NULL,
        updated INTEGER NOT NULL,
        PRIMARY KEY (chat_type, chat)
    );
    """,
    # v5: market stickers' send data by name (`[贴贴]` → 贴贴), learned from the QQ side; `source`
    # says whose it is (the owner's win, bot/stickers.py), `uses` how often it was seen.
    """
    CREATE TABLE stickers (
        name TEXT PRIMARY KEY,
        emoji_package_id INTEGER NOT NULL,
        emoji_id TEXT NOT NULL,
        key TEXT NOT NULL,
        summary TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('owner', 'friend')),
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        uses INTEGER NOT NULL DEFAULT 1
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "id, chat_type, chat, sender, sender_name, origin, msg_id, time, text, reply_to, kinds, "
    "model_version, approved, excluded, send_state"
)
# How a row leaves prompts and training, and how long an outgoing bubble waits for its echo.
EXCLUDED_COMMAND = "command"
EXCLUDED_RECALLED = "recalled"
EXCLUDED_OPERATOR = "operator"
ECHO_WINDOW_SECONDS = 300
# A twin bubble's send_state: sending → sent | failed | dropped (the owner took over before it
# went out: the friend never saw it, so it is neither context, nor an echo, nor training data).
SEND_DROPPED = "dropped"
# The longest text kept for one message: a 1 MB paste is stored cut, never refused.
MAX_TEXT_CHARS = 20_000
MAX_NAME_CHARS = 64
_CONTROL = dict.fromkeys(c for c in range(32) if chr(c) not in "\n\t")
_TRUNCATED = "…[截断]"


def sanitize(text: object, limit: int = MAX_TEXT_CHARS) -> str:
    """Any value → text SQLite and every later step can hold: lone surrogates become U+FFFD,
    NUL and other control characters go, and the text is cut at `limit` characters."""
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    if not text.isascii():
        # Pairs written as two surrogates are joined; a lone one becomes U+FFFD.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    text = text.translate(_CONTROL)
    if len(text) > limit:
        text = text[: limit - len(_TRUNCATED)] + _TRUNCATED
    return text


def echo_key(text: str) -> str:
    """What a sent bubble and its echo have in common whatever the QQ side did to spacing."""
    return "".join(sanitize(text).split())


@dataclass(slots=True)
class StoredMessage:
    """One row of the store; the fields of `pipeline.records.Message` plus origin and model."""

    chat_type: str
    chat: str
    sender: str
    origin: Origin
    text: str
    time: int
    sender_name: str = ""
    msg_id: str | None = None
    reply_to: str | None = None
    kinds: list[str] = field(default_factory=list)
    model_version: str | None = None
    approved: bool = False
    excluded: str | None = None  # why it is kept out of prompts and training (None: it is not)
    send_state: str | None = None  # twin rows: sending → sent | failed | dropped
    id: int | None = None

    @property
    def is_self(self) -> bool:
        """Written by the account: the owner's own words or the twin's."""
        return self.origin != "incoming"


@dataclass(frozen=True, slots=True)
class ChatSummary:
    """One chat as the console lists it: who, when last, how many rows, how many await review."""

    chat_type: str
    chat: str
    name: str  # the friend's (for a group: the last speaker's) latest name, "" when none is known
    last_time: int
    messages: int
    to_review: int  # twin replies sent, neither approved nor excluded


# A twin bubble that went out (rows from before send_state existed have none).
_SENT = "(send_state IS NULL OR send_state = 'sent')"

PREVIEW_SHOWN = 50  # the approved and excluded messages a learning preview lists


@dataclass(slots=True)
class LearningPreview:
    """What the next retrain cycle would read from the store (`Store.learning_preview`)."""

    since: int
    include_approved: bool
    owner_messages: int = 0
    owner_turns: int = 0  # the account's bursts (owner's words, approved replies when trained on)
    incoming: int = 0
    approved: int = 0  # approved twin replies that went out, trained on only with include_approved
    excluded: int = 0
    approved_rows: list[StoredMessage] = field(default_factory=list)  # newest first
    excluded_rows: list[StoredMessage] = field(default_factory=list)  # newest first


def _row_to_message(row: tuple[Any, ...]) -> StoredMessage:
    (
        id_,
        chat_type,
        chat,
        sender,
        sender_name,
        origin,
        msg_id,
        time_,
        text,
        reply_to,
        kinds,
        model_version,
        approved,
        excluded,
        send_state,
    ) = row
    return StoredMessage(
        id=id_,
        chat_type=chat_type,
        chat=chat,
        sender=sender,
        sender_name=sender_name,
        origin=origin,
        msg_id=msg_id,
        time=time_,
        text=text,
        reply_to=reply_to,
        kinds=json.loads(kinds),
        model_version=model_version,
        approved=bool(approved),
        excluded=excluded,
        send_state=send_state,
    )


def _connector(path: Path, key: str, *, read_only: bool = False) -> Callable[[], sqlite3.Connection]:
    """A connection factory: plain sqlite3, or SQLCipher keyed before anything else runs."""
    target, uri = (_read_only_uri(path), True) if read_only else (str(path), False)

    def connect() -> sqlite3.Connection:
        if not key:
            return sqlite3.connect(target, uri=uri)
        import sqlcipher3

        conn = sqlcipher3.connect(target, uri=uri)
        if read_only:  # a wrong key is an answer here, not an error for SQLCipher's own stderr log
            conn.execute("PRAGMA cipher_log_level = NONE")
        conn.execute("PRAGMA key = '{}'".format(key.replace("'", "''")))
        return conn  # type: ignore[return-value]

    return connect


def connect(path: str | Path, key: str = "", *, read_only: bool = False) -> sqlite3.Connection:
    """A synchronous connection to the store at `path` (SQLCipher-keyed when `key`), not migrated."""
    return _connector(Path(path), key, read_only=read_only)()


class SchemaError(RuntimeError):
    """The store cannot be brought to this bot's schema: newer than it knows, or a migration failed."""


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version a store is at (0: a new, empty database); also proves a SQLCipher key."""
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # "not a database" on a wrong key
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    row = conn.execute("SELECT version FROM schema_version").fetchone() if exists else None
    return int(row[0]) if row else 0


def _read_only_uri(path: Path) -> str:
    # Without a -wal file everything is in the main file, and `immutable` reads it without
    # creating -wal/-shm beside it; with one (the bot runs, or stopped uncleanly) SQLite must read it.
    wal = path.with_name(path.name + "-wal").exists()
    return path.resolve().as_uri() + ("?mode=ro" if wal else "?mode=ro&immutable=1")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION, one transaction per step: a failed step leaves the
    store at the version before it. Also proves a SQLCipher key is right."""
    version = schema_version(conn)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"store schema v{version} is newer than this bot (v{SCHEMA_VERSION}); "
            "upgrade qq-twin, or restore a backup made by this version"
        )
    for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
        try:
            conn.executescript(
                f"BEGIN; CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL); {script}; "
                f"DELETE FROM schema_version; INSERT INTO schema_version VALUES ({target}); COMMIT;"
            )
        except Exception as exc:  # sqlite3's or sqlcipher3's own error classes
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise SchemaError(
                f"migrating the store to schema v{target} failed ({exc}); it is left at v{target - 1}"
            ) from exc


class Store:
    """The bot's async handle on the store (one aiosqlite connection, WAL)."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    async def open(cls, path: str | Path, key: str = "", synchronous: str = "FULL") -> Store:
        """Open (creating and migrating) the store at `path`; 0600 file in a 0700 directory.

        `synchronous` is SQLite's durability setting under WAL: FULL (the default) syncs every
        commit, so an acknowledged message survives a power cut; NORMAL may lose the last commits
        then (docs/benchmarks.md measures the difference).
        """
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        connect = _connector(path, key)
        setup = connect()  # migrations run once, synchronously, before serving starts
        try:
            setup.execute("PRAGMA journal_mode = WAL")
            _migrate(setup)
        except SchemaError as exc:
            raise SchemaError(f"{path}: {exc}") from exc.__cause__
        finally:
            setup.close()
        path.chmod(PRIVATE_FILE_MODE)
        conn = aiosqlite.Connection(connect, iter_chunk_size=64)
        await conn
        await conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        return cls(conn, path)

    async def close(self) -> None:
        await self._conn.close()

    async def add(self, message: StoredMessage) -> int:
        """Write one message now (committed before the caller goes on); text fields are sanitised."""
        message.text = sanitize(message.text)
        message.sender_name = sanitize(message.sender_name, MAX_NAME_CHARS)
        cursor = await self._conn.execute(
            "INSERT INTO messages (chat_type, chat, sender, sender_name, origin, msg_id, time, text, "
            "reply_to, kinds, model_version, approved, excluded, send_state, echo_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message.chat_type,
                sanitize(message.chat, MAX_NAME_CHARS),
                sanitize(message.sender, MAX_NAME_CHARS),
                message.sender_name,
                message.origin,
                None if message.msg_id is None else sanitize(message.msg_id, MAX_NAME_CHARS),
                int(message.time),
                message.text,
                None if message.reply_to is None else sanitize(message.reply_to, MAX_NAME_CHARS),
                json.dumps([sanitize(k, MAX_NAME_CHARS) for k in message.kinds]),
                message.model_version,
                int(message.approved),
                message.excluded,
                message.send_state,
                echo_key(message.text) if message.origin == "twin" else None,
            ),
        )
        await self._conn.commit()
        message.id = cursor.lastrowid
        return message.id or 0

    async def update_text(self, row_id: int, text: str, kinds: list[str]) -> None:
        """Replace a stored message's rendering once slow details (names of @-targets) are known."""
        await self._conn.execute(
            "UPDATE messages SET text = ?, kinds = ? WHERE id = ?",
            (sanitize(text), json.dumps(kinds), row_id),
        )
        await self._conn.commit()

    async def finish_send(self, row_id: int, msg_id: str | None, state: str) -> None:
        """A recorded bubble was sent (with the QQ side's message id) or failed to go out."""
        await self._conn.execute(
            "UPDATE messages SET send_state = ?, msg_id = COALESCE(msg_id, ?) WHERE id = ?",
            (state, None if msg_id is None else str(msg_id), row_id),
        )
        await self._conn.commit()

    async def claim_echo(
        self, chat_type: str | None, chat: str | None, msg_id: str, text: str, now: int
    ) -> bool:
        """True when an account message is the QQ side's echo of a twin bubble, which is then claimed.

        Matched by message id, else by what was actually sent (whitespace aside) among the
        unclaimed bubbles of the last minutes, oldest first; both within the chat when the event
        names one (message ids are not unique across chats or restarts of the QQ side). Each
        bubble is claimed once by text, so the owner typing the same words later is still the
        owner. Whichever comes first, echo or `send_msg`'s answer, the row is there: it was
        written before sending.
        """
        scope = "origin = 'twin' AND time >= ? AND (send_state IS NULL OR send_state != 'dropped')"
        params: list[object] = [now - ECHO_WINDOW_SECONDS]
        if chat_type is not None and chat is not None:
            scope += " AND chat_type = ? AND chat = ?"
            params += [chat_type, chat]
        rows = list(
            await self._conn.execute_fetchall(
                f"SELECT id FROM messages WHERE {scope} AND msg_id = ? ORDER BY id DESC LIMIT 1",
                [*params, str(msg_id)],
            )
        )
        if not rows:
            rows = list(
                await self._conn.execute_fetchall(
                    f"SELECT id FROM messages WHERE {scope} AND echoed = 0 AND echo_key = ? "
                    "ORDER BY id LIMIT 1",
                    [*params, echo_key(text)],
                )
            )
        if not rows:
            return False
        await self._conn.execute(
            "UPDATE messages SET echoed = 1, msg_id = COALESCE(msg_id, ?) WHERE id = ?",
            (str(msg_id), rows[0][0]),
        )
        await self._conn.commit()
        return True

    async def exclude(self, msg_id: str, reason: str, chat: tuple[str, str] | None = None) -> int:
        """Keep the messages with this OneBot id (in `chat`, when given) out of prompts and training;
        returns rows changed.

        An operator's exclusion never replaces another reason: `include` could then undo a recall."""
        where, params = _in_chat(chat)
        cursor = await self._conn.execute(
            f"UPDATE messages SET excluded = ? WHERE msg_id = ? AND (? != ? OR excluded IS NULL){where}",
            (reason, str(msg_id), reason, EXCLUDED_OPERATOR, *params),
        )
        await self._conn.commit()
        return cursor.rowcount

    async def include(self, msg_id: str, chat: tuple[str, str] | None = None) -> int:
        """Undo an operator's exclusion of the messages with this OneBot id (in `chat`, when given;
        a recalled message or a command line stays excluded); returns rows changed."""
        where, params = _in_chat(chat)
        cursor = await self._conn.execute(
            f"UPDATE messages SET excluded = NULL WHERE msg_id = ? AND excluded = ?{where}",
            (str(msg_id), EXCLUDED_OPERATOR, *params),
        )
        await self._conn.commit()
        return cursor.rowcount

    async def message(self, row_id: int) -> StoredMessage | None:
        """One row by its id, or None."""
        rows = list(
            await self._conn.execute_fetchall(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (row_id,))
        )
        return _row_to_message(tuple(rows[0])) if rows else None

    async def by_msg_id(self, msg_id: str, chat: tuple[str, str] | None = None) -> list[StoredMessage]:
        """The rows with this OneBot message id (ids are not unique across chats: `chat` narrows)."""
        where, params = _in_chat(chat)
        rows = await self._conn.execute_fetchall(
            f"SELECT {_COLUMNS} FROM messages WHERE msg_id = ?{where} ORDER BY id", (str(msg_id), *params)
        )
        return [_row_to_message(tuple(r)) for r in rows]

    async def chat_list(self, limit: int) -> tuple[list[ChatSummary], int]:
        """The chats with the newest activity first (at most `limit`), and how many there are."""
        rows = await self._conn.execute_fetchall(
            "SELECT chat_type, chat, MAX(time), COUNT(*), "
            f"SUM(origin = 'twin' AND approved = 0 AND excluded IS NULL AND {_SENT}), "
            "(SELECT sender_name FROM messages AS n WHERE n.chat_type = m.chat_type AND n.chat = m.chat "
            "AND n.origin = 'incoming' AND n.sender_name != '' ORDER BY n.time DESC, n.id DESC LIMIT 1) "
            "FROM messages AS m GROUP BY chat_type, chat ORDER BY MAX(time) DESC, chat_type, chat LIMIT ?",
            (limit,),
        )
        total = list(
            await self._conn.execute_fetchall(
                "SELECT COUNT(*) FROM (SELECT DISTINCT chat_type, chat FROM messages)"
            )
        )
        chats = [
            ChatSummary(kind, chat, name or "", int(last), int(count), int(review or 0))
            for kind, chat, last, count, review, name in rows
        ]
        return chats, int(total[0][0])

    async def timeline(
        self, chat_type: str, chat: str, *, before_id: int | None = None, limit: int = 100
    ) -> tuple[list[StoredMessage], bool]:
        """A chat's `limit` rows before row `before_id` (the newest without it), oldest first, every
        row as stored (excluded and failed ones too); and whether older rows exist."""
        rows = list(
            await self._conn.execute_fetchall(
                f"SELECT {_COLUMNS} FROM messages WHERE chat_type = ? AND chat = ? AND id < ? "
                "ORDER BY id DESC LIMIT ?",
                (chat_type, chat, before_id if before_id is not None else 2**63 - 1, limit + 1),
            )
        )
        return [_row_to_message(tuple(r)) for r in reversed(rows[:limit])], len(rows) > limit

    async def search(
        self, text: str, *, chat: tuple[str, str] | None = None, limit: int = 100
    ) -> list[StoredMessage]:
        """Rows whose text contains `text` literally (`%`, `_` and `\\` are no wildcards), newest first."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where, params = "text LIKE ? ESCAPE '\\'", [pattern]
        if chat is not None:
            where += " AND chat_type = ? AND chat = ?"
            params += list(chat)
        rows = await self._conn.execute_fetchall(
            f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY time DESC, id DESC LIMIT ?",
            [*params, limit],
        )
        return [_row_to_message(tuple(r)) for r in rows]

    async def recent(
        self, chat_type: str, chat: str, *, since: int, limit: int, after_id: int = 0
    ) -> list[StoredMessage]:
        """The last `limit` messages of a chat at or after `since` (and after row `after_id`)."""
        rows = await self._conn.execute_fetchall(
            f"SELECT {_COLUMNS} FROM messages WHERE chat_type = ? AND chat = ? AND time >= ? AND id > ? "
            "AND excluded IS NULL "
            "AND (origin != 'twin' OR send_state IS NULL OR send_state NOT IN ('failed', 'dropped')) "
            "ORDER BY id DESC LIMIT ?",
            (chat_type, chat, since, after_id, limit),
        )
        return [_row_to_message(tuple(r)) for r in reversed(list(rows))]

    async def example_rows(self, after_id: int) -> list[StoredMessage]:
        """Rows after `after_id` that the owner's replies are indexed from (`read_example_rows`)."""
        rows = await self._conn.execute_fetchall(
            f"SELECT {_COLUMNS} FROM messages WHERE id > ? AND {_EXAMPLE_ROWS} ORDER BY id", (after_id,)
        )
        return [_row_to_message(tuple(r)) for r in rows]

    async def is_twin_message(
        self, msg_id: str, chat_type: str | None = None, chat: str | None = None
    ) -> bool:
        """True when the twin sent the message with this OneBot id (in that chat, when named)."""
        where, params = "msg_id = ? AND origin = 'twin'", [msg_id]
        if chat_type is not None and chat is not None:
            where += " AND chat_type = ? AND chat = ?"
            params += [chat_type, chat]
        rows = await self._conn.execute_fetchall(f"SELECT 1 FROM messages WHERE {where} LIMIT 1", params)
        return bool(list(rows))

    async def last_id(self) -> int:
        rows = await self._conn.execute_fetchall("SELECT COALESCE(MAX(id), 0) FROM messages")
        return int(next(iter(rows))[0])

    async def count_since(self, since: int, origin: Origin) -> int:
        rows = await self._conn.execute_fetchall(
            "SELECT COUNT(*) FROM messages WHERE time >= ? AND origin = ?", (since, origin)
        )
        return int(next(iter(rows))[0])

    async def writable(self) -> bool:
        """True when a write transaction can start now (tried and rolled back, nothing written)."""
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
            await self._conn.execute("ROLLBACK")
        except Exception:  # locked, read-only, disk gone: not writable, whatever the cause
            return False
        return True

    async def sends_since(self, since: int) -> tuple[int, dict[tuple[str, str], int]]:
        """Bubbles the twin sent at or after `since`: in all, and per chat (the limits' day so far)."""
        rows = await self._conn.execute_fetchall(
            "SELECT chat_type, chat, COUNT(*) FROM messages WHERE time >= ? AND origin = 'twin' "
            "AND (send_state IS NULL OR send_state = 'sent') GROUP BY chat_type, chat",
            (since,),
        )
        by_chat = {(kind, chat): int(n) for kind, chat, n in rows}
        return sum(by_chat.values()), by_chat

    async def group_sends_by_sender_since(self, since: int) -> dict[str, int]:
        """Bubbles the twin sent in groups at or after `since`, by the member each answered: the
        sender of the group's last incoming message before the bubble (a row does not name it)."""
        rows = await self._conn.execute_fetchall(
            "SELECT (SELECT i.sender FROM messages i WHERE i.chat_type = t.chat_type AND i.chat = t.chat "
            "AND i.origin = 'incoming' AND i.time <= t.time AND i.id < t.id "
            "ORDER BY i.time DESC, i.id DESC LIMIT 1) AS answered, COUNT(*) "
            "FROM messages t WHERE t.time >= ? AND t.origin = 'twin' AND t.chat_type = 'group' "
            "AND (t.send_state IS NULL OR t.send_state = 'sent') GROUP BY answered",
            (since,),
        )
        return {str(sender): int(n) for sender, n in rows if sender is not None}

    async def approve(self, message_id: int, approved: bool = True) -> None:
        """Mark a twin reply as good enough to train on (operators' choice)."""
        await self._conn.execute(
            "UPDATE messages SET approved = ? WHERE id = ? AND origin = 'twin'", (int(approved), message_id)
        )
        await self._conn.commit()

    async def approve_sent(
        self, msg_id: str, approved: bool = True, chat: tuple[str, str] | None = None
    ) -> int:
        """Approve the twin's bubble with this OneBot message id (in `chat`, when given); returns how
        many rows matched."""
        where, params = _in_chat(chat)
        cursor = await self._conn.execute(
            f"UPDATE messages SET approved = ? WHERE msg_id = ? AND origin = 'twin'{where}",
            (int(approved), str(msg_id), *params),
        )
        await self._conn.commit()
        return cursor.rowcount

    async def chat_messages(
        self, chat_type: str, chat: str, *, after_time: int, after_id: int = 0
    ) -> list[StoredMessage]:
        """One chat's messages newer than `after_time` (and after row `after_id`), oldest first, as
        prompts see them: no excluded rows, no failed sends. Memory is built from these."""
        rows = await self._conn.execute_fetchall(
            f"SELECT {_COLUMNS} FROM messages WHERE chat_type = ? AND chat = ? AND time > ? AND id > ? "
            "AND excluded IS NULL AND (origin != 'twin' OR send_state IS NULL OR send_state != 'failed') "
            "ORDER BY time, id",
            (chat_type, chat, after_time, after_id),
        )
        return [_row_to_message(tuple(r)) for r in rows]

    async def chats_since(self, since: int) -> list[tuple[str, str]]:
        """The chats with a message at or after `since`."""
        rows = await self._conn.execute_fetchall(
            "SELECT DISTINCT chat_type, chat FROM messages WHERE time >= ? ORDER BY chat_type, chat", (since,)
        )
        return [(kind, chat) for kind, chat in rows]

    async def get_memory(self, chat_type: str, chat: str) -> str | None:
        """The stored memory (JSON) of one chat, or None."""
        rows = list(
            await self._conn.execute_fetchall(
                "SELECT memory FROM chat_memory WHERE chat_type = ? AND chat = ?", (chat_type, chat)
            )
        )
        return rows[0][0] if rows else None

    async def set_memory(self, chat_type: str, chat: str, memory: str) -> None:
        await self._conn.execute(
            "INSERT INTO chat_memory (chat_type, chat, memory, updated) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(chat_type, chat) DO UPDATE SET memory = excluded.memory, updated = excluded.updated",
            (chat_type, chat, memory, int(time.time())),
        )
        await self._conn.commit()

    async def delete_memory(self, chat_type: str, chat: str) -> bool:
        """Forget one chat's memory; True when there was one."""
        cursor = await self._conn.execute(
            "DELETE FROM chat_memory WHERE chat_type = ? AND chat = ?", (chat_type, chat)
        )
        await self._conn.commit()
        return cursor.rowcount > 0

    async def memories(self) -> list[tuple[str, str, int]]:
        """(chat type, chat, last updated) of every chat with a memory."""
        rows = await self._conn.execute_fetchall(
            "SELECT chat_type, chat, updated FROM chat_memory ORDER BY chat_type, chat"
        )
        return [(kind, chat, int(updated)) for kind, chat, updated in rows]

    async def learn_sticker(self, sticker: Sticker, source: StickerSource, now: int) -> Sticker:
        """Keep a market sticker seen on the QQ side; returns what is kept under its name now.

        The owner's latest sticker of a name replaces whatever had it; a friend's is kept only
        for a name nobody had, so a friend can neither replace the owner's sticker nor another
        friend's (the same sticker seen again only counts).
        """
        values = (sticker.name, sticker.emoji_package_id, sticker.emoji_id, sticker.key, sticker.summary)
        insert = (
            "INSERT INTO stickers (name, emoji_package_id, emoji_id, key, summary, source, first_seen, "
            "last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
        )
        if source == "owner":
            update = (
                "emoji_package_id = excluded.emoji_package_id, emoji_id = excluded.emoji_id, "
                "key = excluded.key, summary = excluded.summary, source = 'owner', "
                "last_seen = excluded.last_seen, uses = uses + 1"
            )
        else:
            update = (
                "last_seen = excluded.last_seen, uses = uses + 1 WHERE source = 'friend' "
                "AND emoji_package_id = excluded.emoji_package_id AND emoji_id = excluded.emoji_id "
                "AND key = excluded.key"
            )
        await self._conn.execute(insert + update, (*values, source, now, now))
        await self._conn.commit()
        return next(s for s in await self.stickers(sticker.name))

    async def forget_sticker(self, name: str) -> bool:
        """Remove the sticker kept under `name`; False when there was none."""
        cursor = await self._conn.execute("DELETE FROM stickers WHERE name = ?", (name,))
        await self._conn.commit()
        return cursor.rowcount > 0

    async def stickers(self, name: str | None = None) -> list[Sticker]:
        """The market stickers kept (or the one named `name`), by name."""
        where, params = ("WHERE name = ?", (name,)) if name is not None else ("", ())
        rows = await self._conn.execute_fetchall(
            f"SELECT name, emoji_package_id, emoji_id, key, summary, source FROM stickers {where} "
            "ORDER BY name",
            params,
        )
        return [Sticker(*row) for row in rows]

    async def learning_preview(
        self, since: int, include_approved: bool, *, burst_gap: int = BURST_GAP, shown: int = PREVIEW_SHOWN
    ) -> LearningPreview:
        """What a retrain cycle reading from `since` would learn (the rows `read_messages_since`
        selects), the approved twin replies (listed even when they are not trained on) and the
        messages kept out, newest `shown` of each."""
        preview = LearningPreview(since=since, include_approved=include_approved)
        chat: tuple[str, str] | None = None
        said: list[StoredMessage] = []

        def count_turns() -> None:
            preview.owner_turns += sum(1 for t in to_turns(said, burst_gap) if t.turn.role == "assistant")

        # One chat's rows in memory at a time: turns never span chats.
        async with self._conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE {retrain_rows(include_approved)} "
            "ORDER BY chat_type, chat, time, id",
            (since,),
        ) as cursor:
            async for row in cursor:
                message = _row_to_message(tuple(row))
                if (message.chat_type, message.chat) != chat:
                    count_turns()
                    chat, said = (message.chat_type, message.chat), []
                said.append(message)
                if message.origin == "owner":
                    preview.owner_messages += 1
                elif message.origin == "incoming":
                    preview.incoming += 1
        count_turns()
        where = f"time >= ? AND excluded IS NULL AND {_APPROVED_SENT}"
        preview.approved = await self._count(where, since)
        preview.approved_rows = await self._newest(where, since, shown)
        preview.excluded = await self._count("time >= ? AND excluded IS NOT NULL", since)
        preview.excluded_rows = await self._newest("time >= ? AND excluded IS NOT NULL", since, shown)
        return preview

    async def _count(self, where: str, since: int) -> int:
        rows = await self._conn.execute_fetchall(f"SELECT COUNT(*) FROM messages WHERE {where}", (since,))
        return int(next(iter(rows))[0])

    async def _newest(self, where: str, since: int, limit: int) -> list[StoredMessage]:
        rows = await self._conn.execute_fetchall(
            f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY time DESC, id DESC LIMIT ?",
            (since, limit),
        )
        return [_row_to_message(tuple(r)) for r in rows]

    async def get_state(self, key: str, default: Any = None) -> Any:
        rows = list(await self._conn.execute_fetchall("SELECT value FROM state WHERE key = ?", (key,)))
        return json.loads(rows[0][0]) if rows else default

    async def set_state(self, key: str, value: Any) -> None:
        await self._conn.execute(
            "INSERT INTO state (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )
        await self._conn.commit()


# A twin reply an operator approved that went out (a failed or dropped bubble was never said).
_APPROVED_SENT = f"origin = 'twin' AND approved = 1 AND {_SENT}"


def retrain_rows(include_approved_twin: bool) -> str:
    """The WHERE clause (one `?`: since) of the rows a retrain cycle reads; the console's preview
    counts with the same clause."""
    twin_clause = f"OR ({_APPROVED_SENT})" if include_approved_twin else ""
    return f"time >= ? AND excluded IS NULL AND (origin IN ('incoming', 'owner') {twin_clause})"


def read_messages_since(
    db_path: str | Path,
    since_ts: int = 0,
    *,
    key: str = "",
    include_approved_twin: bool = False,
) -> list[StoredMessage]:
    """Messages at or after `since_ts`, oldest first, for retraining (synchronous, read-only use).

    Incoming and owner messages always; the twin's own replies only when `include_approved_twin`
    and an operator approved them (training on unreviewed output makes the model drift), and
    only bubbles that went out.
    """
    return list(iter_messages_since(db_path, since_ts, key=key, include_approved_twin=include_approved_twin))


def iter_messages_since(
    db_path: str | Path,
    since_ts: int = 0,
    *,
    key: str = "",
    include_approved_twin: bool = False,
    before_ts: int | None = None,
) -> Iterator[StoredMessage]:
    """`read_messages_since` (and before `before_ts`, when given), streamed row by row: a long
    history never sits in memory whole."""
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such conversation store")
    return _stream_rows(path, key or "", since_ts, include_approved_twin, before_ts)


def _stream_rows(
    path: Path, key: str, since_ts: int, include_approved_twin: bool, before_ts: int | None
) -> Iterator[StoredMessage]:
    conn = _connector(path, key)()
    try:
        until, params = ("", (since_ts,)) if before_ts is None else (" AND time < ?", (since_ts, before_ts))
        cursor = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE {retrain_rows(include_approved_twin)}{until} "
            "ORDER BY time, id",
            params,
        )
        for row in cursor:
            yield _row_to_message(tuple(row))
    finally:
        conn.close()


# What the owner's past replies are indexed from: what retraining learns from (friends' and the
# owner's words, twin replies an operator approved), never an excluded row.
_EXAMPLE_ROWS = "excluded IS NULL AND (origin IN ('incoming', 'owner') OR (origin = 'twin' AND approved = 1))"


def _in_chat(chat: tuple[str, str] | None) -> tuple[str, tuple[str, ...]]:
    """The SQL condition (and its values) narrowing a message-id lookup to one chat, if given:
    QQ sides whose ids restart (or collide) would otherwise touch another chat's row."""
    return ("", ()) if chat is None else (" AND chat_type = ? AND chat = ?", (chat[0], chat[1]))


def read_example_rows(db_path: str | Path, *, key: str = "") -> Iterator[StoredMessage]:
    """The rows that the owner's replies are indexed from, oldest first, streamed (synchronous:
    the bot reads them in a thread at start)."""
    conn = _connector(Path(db_path), key or "")()
    try:
        for row in conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE {_EXAMPLE_ROWS} ORDER BY time, id"):
            yield _row_to_message(tuple(row))
    finally:
        conn.close()


class StoreUnreadable(Exception):
    """The file is not a conversation store that opens with the given key (or none)."""


def read_schema_version(path: str | Path, key: str = "") -> int:
    """The store's schema version (0: never migrated), read without changing the store or its directory.

    Raises StoreUnreadable when it is not a SQLite database, or not one this key decrypts."""
    path = Path(path)
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    if key:
        import sqlcipher3

        errors += (sqlcipher3.Error,)
    try:
        conn = _connector(path, key, read_only=True)()
        try:
            return schema_version(conn)
        finally:
            conn.close()
    except errors as exc:
        raise StoreUnreadable(str(exc)) from None


def now() -> int:
    return int(time.time())

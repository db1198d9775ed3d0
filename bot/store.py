"""The conversation store: every live message in and out, in SQLite (optionally SQLCipher).

The bot writes through `Store` (aiosqlite, WAL). Retraining reads through the synchronous
`read_messages_since`, so this module must import without NoneBot (no plugin imports here).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosqlite

Origin = Literal["incoming", "twin", "owner"]

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
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "id, chat_type, chat, sender, sender_name, origin, msg_id, time, text, reply_to, kinds, "
    "model_version, approved"
)


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
    id: int | None = None

    @property
    def is_self(self) -> bool:
        """Written by the account: the owner's own words or the twin's."""
        return self.origin != "incoming"


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
    )


def _connector(path: Path, key: str) -> Callable[[], sqlite3.Connection]:
    """A connection factory: plain sqlite3, or SQLCipher keyed before anything else runs."""

    def connect() -> sqlite3.Connection:
        if not key:
            return sqlite3.connect(path)
        import sqlcipher3

        conn = sqlcipher3.connect(str(path))
        conn.execute("PRAGMA key = '{}'".format(key.replace("'", "''")))
        return conn  # type: ignore[return-value]

    return connect


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; also proves a SQLCipher key is right."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    version = row[0] if row else 0
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"store schema v{version} is newer than this bot (v{SCHEMA_VERSION})")
    for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.executescript(
            f"BEGIN; {script}; DELETE FROM schema_version; "
            f"INSERT INTO schema_version VALUES ({target}); COMMIT;"
        )


class Store:
    """The bot's async handle on the store (one aiosqlite connection, WAL)."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    async def open(cls, path: str | Path, key: str = "") -> Store:
        """Open (creating and migrating) the store at `path`; 0600 file in a 0700 directory."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        connect = _connector(path, key)
        setup = connect()  # migrations run once, synchronously, before serving starts
        try:
            setup.execute("PRAGMA journal_mode = WAL")
            _migrate(setup)
        finally:
            setup.close()
        path.chmod(0o600)
        conn = aiosqlite.Connection(connect, iter_chunk_size=64)
        await conn
        await conn.execute("PRAGMA synchronous = NORMAL")
        return cls(conn, path)

    async def close(self) -> None:
        await self._conn.close()

    async def add(self, message: StoredMessage) -> int:
        """Write one message now (committed before the caller goes on)."""
        cursor = await self._conn.execute(
            "INSERT INTO messages (chat_type, chat, sender, sender_name, origin, msg_id, time, text, "
            "reply_to, kinds, model_version, approved) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message.chat_type,
                message.chat,
                message.sender,
                message.sender_name,
                message.origin,
                message.msg_id,
                message.time,
                message.text,
                message.reply_to,
                json.dumps(message.kinds),
                message.model_version,
                int(message.approved),
            ),
        )
        await self._conn.commit()
        message.id = cursor.lastrowid
        return message.id or 0

    async def recent(
        self, chat_type: str, chat: str, *, since: int, limit: int, after_id: int = 0
    ) -> list[StoredMessage]:
        """The last `limit` messages of a chat at or after `since` (and after row `after_id`)."""
        rows = await self._conn.execute_fetchall(
            f"SELECT {_COLUMNS} FROM messages WHERE chat_type = ? AND chat = ? AND time >= ? AND id > ? "
            "ORDER BY id DESC LIMIT ?",
            (chat_type, chat, since, after_id, limit),
        )
        return [_row_to_message(tuple(r)) for r in reversed(list(rows))]

    async def is_twin_message(self, msg_id: str) -> bool:
        """True when the twin sent the message with this OneBot id (NapCat echoes it back)."""
        rows = await self._conn.execute_fetchall(
            "SELECT 1 FROM messages WHERE msg_id = ? AND origin = 'twin' LIMIT 1", (msg_id,)
        )
        return bool(list(rows))

    async def last_id(self) -> int:
        rows = await self._conn.execute_fetchall("SELECT COALESCE(MAX(id), 0) FROM messages")
        return int(next(iter(rows))[0])

    async def count_since(self, since: int, origin: Origin) -> int:
        rows = await self._conn.execute_fetchall(
            "SELECT COUNT(*) FROM messages WHERE time >= ? AND origin = ?", (since, origin)
        )
        return int(next(iter(rows))[0])

    async def approve(self, message_id: int, approved: bool = True) -> None:
        """Mark a twin reply as good enough to train on (operators' choice)."""
        await self._conn.execute(
            "UPDATE messages SET approved = ? WHERE id = ? AND origin = 'twin'", (int(approved), message_id)
        )
        await self._conn.commit()

    async def approve_sent(self, msg_id: str, approved: bool = True) -> int:
        """Approve the twin's bubble with this OneBot message id; returns how many rows changed."""
        cursor = await self._conn.execute(
            "UPDATE messages SET approved = ? WHERE msg_id = ? AND origin = 'twin'", (int(approved), msg_id)
        )
        await self._conn.commit()
        return cursor.rowcount

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


def read_messages_since(
    db_path: str | Path,
    since_ts: int = 0,
    *,
    key: str = "",
    include_approved_twin: bool = False,
) -> list[StoredMessage]:
    """Messages at or after `since_ts`, oldest first, for retraining (synchronous, read-only use).

    Incoming and owner messages always; the twin's own replies only when `include_approved_twin`
    and an operator approved them (training on unreviewed output makes the model drift).
    """
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such conversation store")
    conn = _connector(path, key or "")()
    try:
        twin_clause = "OR (origin = 'twin' AND approved = 1)" if include_approved_twin else ""
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE time >= ? AND (origin IN ('incoming', 'owner') "
            f"{twin_clause}) ORDER BY time, id",
            (since_ts,),
        ).fetchall()
    finally:
        conn.close()
    return [_row_to_message(tuple(r)) for r in rows]


def now() -> int:
    return int(time.time())

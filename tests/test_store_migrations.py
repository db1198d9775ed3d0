"""The store's schema migrations: every released schema opens in this bot with its rows intact,
a newer one is refused, a failed step changes nothing, and shipped steps never change."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

import bot.store
from bot.config import Config
from bot.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SchemaError,
    Store,
    StoredMessage,
    read_messages_since,
)
from deploy.backup import create_backup, restore_backup
from tests.gguf_helpers import write_gguf

# sha256 of each shipped entry of MIGRATIONS: editing one breaks every store already migrated past
# it, so a change must be a new entry. Appending a migration appends its hash here.
SHIPPED = (
    "d2e65baed83660447bc16f82bdfe5d5400c4d744876d6ba7fb78854da553f7c5",
    "cf5419d1355309213d2dcc8bec9a4d97c078d79cb9e2f4fea0da521c90312281",
    "c33932eba2cae2eb34643c14cccf364fe2029d0835eb00a2d3367825b7879767",
    "c3fe5c8745b1c6d3b41e0f46697bd39bc4c5f64e5f9d01711f8d90c87dff7735",
    "671e1cd942c8ceb9507f816cf0c4476db79ad35133a6847d7bdf9581c17eafae",  # market stickers
)

# Rows as each released schema wrote them, only with the columns that existed then.
ERA_ROWS: dict[int, list[dict]] = {
    1: [
        {"chat_type": "c2c", "chat": "20001", "sender": "20001", "sender_name": "小王", "origin": "incoming",
         "msg_id": "101", "time": 1_600_000_000, "text": "v1 在吗", "kinds": '["text"]'},
        {"chat_type": "c2c", "chat": "20001", "sender": "10000", "origin": "twin", "msg_id": "102",
         "time": 1_600_000_001, "text": "v1 在的", "model_version": "v0001"},
        {"chat_type": "group", "chat": "300", "sender": "10000", "origin": "owner", "time": 1_600_000_002,
         "text": "v1 我来了", "reply_to": "99"},
    ],
    2: [
        {"chat_type": "c2c", "chat": "20002", "sender": "20002", "origin": "incoming", "time": 1_650_000_000,
         "text": "v2 吃了吗"},
        {"chat_type": "c2c", "chat": "20002", "sender": "10000", "origin": "twin", "msg_id": "202",
         "time": 1_650_000_001, "text": "v2 吃了", "model_version": "v0002", "approved": 1},
    ],
    3: [
        {"chat_type": "c2c", "chat": "20003", "sender": "20003", "origin": "incoming", "time": 1_700_000_000,
         "text": "v3 /twin status", "excluded": "command"},
        {"chat_type": "c2c", "chat": "20003", "sender": "10000", "origin": "twin", "msg_id": "302",
         "time": 1_700_000_001, "text": "v3 好", "model_version": "v0003", "send_state": "failed",
         "echo_key": "v3好"},
    ],
    4: [  # v4 added the chat_memory table; message rows are as in v3
        {"chat_type": "group", "chat": "400", "sender": "20004", "sender_name": "老李", "origin": "incoming",
         "time": 1_750_000_000, "text": "v4 下周六聚餐"},
    ],
    5: [  # market stickers: a table of their own, messages as v3 wrote them
        {"chat_type": "c2c", "chat": "20004", "sender": "10000", "origin": "owner", "time": 1_750_000_000,
         "text": "[贴贴]", "kinds": '["sticker"]'},
    ],
}  # fmt: skip


def test_shipped_migrations_are_frozen() -> None:
    assert len(MIGRATIONS) >= len(SHIPPED), "a shipped migration was removed"
    for version, (script, digest) in enumerate(zip(MIGRATIONS, SHIPPED, strict=False), start=1):
        assert hashlib.sha256(script.encode()).hexdigest() == digest, (
            f"shipped migration v{version} was edited"
        )
    assert set(ERA_ROWS) == set(range(1, SCHEMA_VERSION + 1)), "every schema needs its rows in ERA_ROWS"


def store_at(path: Path, version: int) -> list[dict]:
    """A store as schema `version` left it, holding rows of every era up to it; returns the rows."""
    written = []
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for script in MIGRATIONS[:version]:
            conn.executescript(script)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("INSERT INTO state (key, value) VALUES ('paused', 'true')")
        for era in range(1, version + 1):
            for row in ERA_ROWS[era]:
                conn.execute(
                    f"INSERT INTO messages ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()),
                )
                written.append(row)
    return written


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
async def test_every_released_schema_opens_with_its_rows_readable(tmp_path: Path, version: int) -> None:
    path = tmp_path / "bot.db"
    written = store_at(path, version)
    store = await Store.open(path)
    try:
        assert await store.get_state("paused") is True
        assert await store.is_twin_message("102")
        recent = await store.recent("c2c", "20001", since=0, limit=10)
        assert [(m.text, m.origin, m.approved, m.excluded, m.send_state) for m in recent] == [
            ("v1 在吗", "incoming", False, None, None),
            ("v1 在的", "twin", False, None, None),
        ]
        assert recent[0].kinds == ["text"] and recent[0].sender_name == "小王" and recent[1].kinds == []
        new = await store.add(StoredMessage("c2c", "20001", "20001", "incoming", "新的", 1_800_000_000))
        assert new == len(written) + 1
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    every = read_messages_since(path, 0, include_approved_twin=True)
    expected = [r["text"] for r in written if r["origin"] != "twin" or r.get("approved")] + ["新的"]
    assert [m.text for m in every] == [t for t in expected if not t.startswith("v3 /twin")]


async def test_a_store_from_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    store_at(path, SCHEMA_VERSION)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(
        SchemaError, match=rf"{path}: store schema v{SCHEMA_VERSION + 1} is newer than this bot"
    ):
        await Store.open(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION + 1,)]


async def test_a_failed_migration_leaves_the_store_at_its_old_version(tmp_path, monkeypatch) -> None:
    path = tmp_path / "bot.db"
    written = store_at(path, SCHEMA_VERSION)
    # Two statements that work, then one that fails: neither of the first two may stay.
    broken = "ALTER TABLE messages ADD COLUMN later TEXT; UPDATE messages SET text = '';"
    broken += " INSERT INTO nosuch VALUES (1)"
    monkeypatch.setattr(bot.store, "MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr(bot.store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(
        SchemaError, match=rf"to schema v{SCHEMA_VERSION + 1} failed .*left at v{SCHEMA_VERSION}"
    ):
        await Store.open(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        columns = [c[1] for c in conn.execute("PRAGMA table_info(messages)")]
        assert "later" not in columns
        assert [t for (t,) in conn.execute("SELECT text FROM messages ORDER BY id")] == [
            r["text"] for r in written
        ]
    monkeypatch.undo()
    store = await Store.open(path)  # the shipped schema still opens it
    await store.close()


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION + 1))
async def test_a_store_of_every_schema_survives_backup_and_restore(tmp_path: Path, version: int) -> None:
    home = tmp_path / "home"
    home.mkdir()
    written = store_at(home / "bot.db", version)
    settings = Config(twin_db=home / "bot.db", twin_model=str(write_gguf(home / "model-Q8_0.gguf")))
    manifest = create_backup(settings, tmp_path / "twin.tar", base=home)
    assert manifest.schema_version == version
    result = restore_backup(tmp_path / "twin.tar", tmp_path / "restored")
    assert result.messages == len(written) and f"schema v{version}" in result.store_check
    store = await Store.open(tmp_path / "restored" / "data" / "bot.db")
    try:
        assert len(await store.recent("c2c", "20001", since=0, limit=10)) == 2
    finally:
        await store.close()

"""From an `nt_msg.db` (encrypted or a plain copy) to normalised message records.

One SQL statement streams both tables in time order (SQLite sorts on disk in the private
work directory, so memory stays bounded); each row's body is decoded with the protobuf
schema and rendered through `pipeline.chatformat`. What is not a message is dropped and
counted; a body that cannot be decoded is counted with its message id, never guessed at.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlcipher3

from pipeline.chatformat import render_elements
from pipeline.errors import InputError
from pipeline.files import atomic_path, write_text_atomic
from pipeline.ntqq.body import BodyError, decode_body
from pipeline.ntqq.decrypt import DecryptInfo, has_qq_tables, open_database
from pipeline.records import Message

CHAT_TABLES = {"c2c": "c2c_msg_table", "group": "group_msg_table"}

# Row-level drop rules of docs/ntqq.md.
MSG_TYPE_UNKNOWN, MSG_TYPE_EMPTY, MSG_TYPE_GRAY_TIP = 0, 1, 5
SEND_TYPE_SELF = (1, 2)
SEND_TYPE_SYSTEM = 3
STATUS_DELIVERED = 2

DROP_REASONS = ("revoked", "gray_tip", "system", "failed_send", "empty", "undecodable")
MAX_LISTED_UNDECODABLE = 1000

# (name in the query, required?) in the order the row tuple arrives.
_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("40001", True),  # msg id
    ("40011", True),  # msg type
    ("40013", True),  # send type
    ("40020", False),  # sender uid
    ("40021", False),  # peer uid / group code
    ("40030", False),  # peer uin / group code
    ("40033", False),  # sender uin
    ("40041", False),  # send status
    ("40050", True),  # time
    ("40090", False),  # group card
    ("40093", False),  # nickname
    ("40800", True),  # body
)


@dataclass(slots=True)
class ExtractReport:
    """What an extraction found: counts per chat type, element kind and drop reason."""

    source: str = ""
    layout: str = ""
    hmac: str | None = None
    wal: bool = False
    rows: int = 0
    messages: int = 0
    per_chat_type: dict[str, int] = field(default_factory=dict)
    per_kind: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    undecodable: int = 0
    undecodable_ids: list[str] = field(default_factory=list)
    unknown_element_types: dict[str, int] = field(default_factory=dict)
    unresolved_uids: int = 0
    replies_resolved: int = 0
    replies_unresolved: int = 0
    first_time: int | None = None
    last_time: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "layout": self.layout,
            "hmac": self.hmac,
            "wal": self.wal,
            "rows": self.rows,
            "messages": self.messages,
            "per_chat_type": dict(self.per_chat_type),
            "per_kind": dict(self.per_kind),
            "dropped": dict(self.dropped),
            "undecodable": self.undecodable,
            "undecodable_ids": list(self.undecodable_ids),
            "unknown_element_types": dict(self.unknown_element_types),
            "unresolved_uids": self.unresolved_uids,
            "replies": {"resolved": self.replies_resolved, "unresolved": self.replies_unresolved},
            "time_span": {"first": self.first_time, "last": self.last_time},
        }

    def summary_lines(self) -> list[str]:
        """A short human summary (counts only: never message text)."""
        chats = ", ".join(f"{k} {v}" for k, v in sorted(self.per_chat_type.items())) or "none"
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.per_kind.items(), key=lambda kv: -kv[1]))
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) or "none"
        lines = [
            f"{self.messages} messages from {self.rows} rows ({chats})",
            f"element kinds: {kinds or 'none'}",
            f"dropped: {dropped}",
        ]
        if self.undecodable:
            shown = ", ".join(self.undecodable_ids[:5]) + (", …" if self.undecodable > 5 else "")
            lines.append(f"undecodable bodies: {self.undecodable} (msg ids {shown})")
        if self.first_time is not None:
            from datetime import datetime, timezone

            first = datetime.fromtimestamp(self.first_time, tz=timezone.utc).date()
            last = datetime.fromtimestamp(self.last_time or self.first_time, tz=timezone.utc).date()
            lines.append(f"time span: {first} → {last}")
        return lines


def parse_chats(chats: str | Sequence[str]) -> tuple[str, ...]:
    """`"c2c,group"` or a sequence → validated chat types."""
    items = chats.split(",") if isinstance(chats, str) else list(chats)
    result = tuple(dict.fromkeys(c.strip().lower() for c in items if c.strip()))
    bad = [c for c in result if c not in CHAT_TABLES]
    if bad or not result:
        raise ValueError(f"unknown chat type {', '.join(bad) or '(none)'}; use c2c, group or c2c,group")
    return result


def iter_messages_from_db(
    db: str | Path,
    *,
    key: str | None = None,
    chats: Sequence[str] = ("c2c", "group"),
    hmac: str | None = None,
    report: ExtractReport | None = None,
    progress: bool = False,
) -> Iterator[Message]:
    """Stream `Message` records from a QQ NT database in time order; fills `report` as it goes."""
    report = report if report is not None else ExtractReport()
    db = Path(db)
    with open_database(db, key, hmac=hmac) as (conn, info):
        yield from _iter_open(conn, info, db, tuple(chats), report, progress)


def extract_messages(
    db: str | Path,
    out: str | Path,
    *,
    key: str | None = None,
    chats: Sequence[str] = ("c2c", "group"),
    hmac: str | None = None,
    report: str | Path | None = None,
    progress: bool = True,
) -> ExtractReport:
    """Write `out` (messages.jsonl) from `db`, atomically; `report` also gets the summary as JSON."""
    result = ExtractReport()
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8", buffering=1 << 20) as handle:
        write = handle.write
        for msg in iter_messages_from_db(
            db, key=key, chats=chats, hmac=hmac, report=result, progress=progress
        ):
            # Field order of the record contract; a dict literal is far cheaper than dataclasses.asdict.
            write(
                encode(
                    {
                        "msg_id": msg.msg_id,
                        "chat_type": msg.chat_type,
                        "chat": msg.chat,
                        "sender": msg.sender,
                        "sender_name": msg.sender_name,
                        "is_self": msg.is_self,
                        "time": msg.time,
                        "text": msg.text,
                        "reply_to": msg.reply_to,
                        "kinds": msg.kinds,
                    }
                )
            )
            write("\n")
    if report is not None:
        write_text_atomic(report, json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n")
    return result


# ---------------------------------------------------------------- internals


def _table_columns(conn: sqlcipher3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}


def build_query(tables: dict[str, tuple[str, set[str]]], db: Path) -> str:
    """One statement over the chosen tables, ordered by time then id, quoted replies resolved.

    `tables` maps a chat type to (table name, the columns it has).
    """
    selects = []
    for chat_type, (table, present) in tables.items():
        missing = [name for name, required in _COLUMNS if required and name not in present]
        if missing:
            raise InputError(db, f"unsupported QQ NT version: {table} has no column {', '.join(missing)}")
        cols = [f'm."{name}"' if name in present else "NULL" for name, _ in _COLUMNS]
        if {"40850", "40003", "40021"} <= present:
            # The quoted message: same chat, sequence number = 40850. SQLite builds a
            # transient index for this lookup, so it is one pass, not one scan per reply.
            cols.append(
                f'CASE WHEN m."40850" > 0 THEN (SELECT q."40001" FROM "{table}" q '
                f'WHERE q."40021" = m."40021" AND q."40003" = m."40850" LIMIT 1) END'
            )
            cols.append('m."40850"')
        else:
            cols += ["NULL", "NULL"]
        selects.append(f"SELECT '{chat_type}', {', '.join(cols)} FROM \"{table}\" m")
    return " UNION ALL ".join(selects) + " ORDER BY 10, 2"  # time (40050), then msg id


def _iter_open(
    conn: sqlcipher3.Connection,
    info: DecryptInfo,
    db: Path,
    chats: tuple[str, ...],
    report: ExtractReport,
    progress: bool,
) -> Iterator[Message]:
    report.source, report.layout, report.hmac, report.wal = str(db), info.layout, info.hmac, info.wal
    try:
        present = has_qq_tables(conn)
        if not present:
            raise InputError(
                db, "no QQ NT message tables (c2c_msg_table, group_msg_table): is this nt_msg.db?"
            )
        wanted = {c: CHAT_TABLES[c] for c in chats if CHAT_TABLES[c] in present}
        if not wanted:
            raise InputError(
                db, f"none of the chosen chats ({', '.join(chats)}) has a table in this database"
            )
        query = build_query({c: (t, _table_columns(conn, t)) for c, t in wanted.items()}, db)
        uid_map = _uid_map(conn)
        cursor = conn.execute(query)
        yield from _rows_to_messages(_fetch(cursor), uid_map, report, progress)
    except sqlcipher3.DatabaseError as exc:
        raise InputError(db, f"damaged or truncated database ({exc})") from None


def _fetch(cursor: sqlcipher3.Cursor) -> Iterator[tuple]:
    while True:
        rows = cursor.fetchmany(2048)
        if not rows:
            return
        yield from rows


def _uid_map(conn: sqlcipher3.Connection) -> dict[str, str]:
    """uid → uin from nt_uid_mapping_table (a few thousand contacts at most)."""
    try:
        columns = _table_columns(conn, "nt_uid_mapping_table")
    except sqlcipher3.DatabaseError:
        return {}
    if not {"48902", "1002"} <= columns:
        return {}
    return {
        str(uid): str(uin)
        for uid, uin in conn.execute('SELECT "48902", "1002" FROM nt_uid_mapping_table')
        if uid and uin
    }


def _rows_to_messages(
    rows: Iterator[tuple], uid_map: dict[str, str], report: ExtractReport, progress: bool
) -> Iterator[Message]:
    """The per-row core: drop rules, body decoding, rendering; pure apart from `report`."""
    dropped: Counter[str] = Counter()
    kinds_count: Counter[str] = Counter()
    chat_count: Counter[str] = Counter()
    unknown_types: Counter[int] = Counter()
    undecodable_ids: list[str] = []
    n_rows = n_messages = unresolved = replies_ok = replies_missing = 0
    first_time = last_time = None
    bar = _Progress() if progress else None
    try:
        for row in rows:
            n_rows += 1
            if bar is not None and not n_rows & 0x3FF:
                bar.update(n_rows)
            (chat_type, msg_id, msg_type, send_type, sender_uid, peer_uid, peer_uin, sender_uin,
             status, time, card, nick, body, reply_id, reply_seq) = row  # fmt: skip
            if send_type == SEND_TYPE_SYSTEM:
                dropped["system"] += 1
                continue
            if status is not None and status != STATUS_DELIVERED:
                dropped["failed_send"] += 1
                continue
            if msg_type in (MSG_TYPE_UNKNOWN, MSG_TYPE_EMPTY):
                dropped["empty" if msg_type == MSG_TYPE_EMPTY else "system"] += 1
                continue
            try:
                decoded = decode_body(body)
            except BodyError:
                dropped["undecodable"] += 1
                if len(undecodable_ids) < MAX_LISTED_UNDECODABLE:
                    undecodable_ids.append(str(msg_id))
                continue
            if decoded.revoked:
                dropped["revoked"] += 1
                continue
            if msg_type == MSG_TYPE_GRAY_TIP or decoded.gray_tip:
                dropped["gray_tip"] += 1
                continue
            if decoded.unknown_types:
                unknown_types.update(decoded.unknown_types)
            text, kinds, _ = render_elements(decoded.elements)
            if not text:
                dropped["empty"] += 1
                continue
            is_self = send_type in SEND_TYPE_SELF
            if sender_uin:
                sender = str(sender_uin)
            else:
                sender = uid_map.get(sender_uid or "", "")
                if not sender:
                    unresolved += 1
                    sender = sender_uid or ""
            if peer_uin:
                chat = str(peer_uin)
            elif chat_type == "group":
                chat = str(peer_uid or "")
            else:
                chat = uid_map.get(peer_uid or "", "") or str(peer_uid or "")
            reply_to = None
            if reply_seq or "reply" in kinds:
                if reply_id is not None:
                    reply_to = str(reply_id)
                    replies_ok += 1
                else:
                    replies_missing += 1
            n_messages += 1
            chat_count[chat_type] += 1
            kinds_count.update(kinds)
            if first_time is None:
                first_time = time
            last_time = time
            yield Message(
                msg_id=str(msg_id),
                chat_type=chat_type,
                chat=chat,
                sender=sender,
                sender_name=(card or nick or "") if chat_type == "group" else (nick or ""),
                is_self=is_self,
                time=int(time),
                text=text,
                reply_to=reply_to,
                kinds=kinds,
            )
    finally:
        if bar is not None:
            bar.close(n_rows)
        report.rows = n_rows
        report.messages = n_messages
        report.per_chat_type = dict(chat_count)
        report.per_kind = dict(kinds_count)
        report.dropped = {reason: dropped.get(reason, 0) for reason in DROP_REASONS}
        report.undecodable = dropped.get("undecodable", 0)
        report.undecodable_ids = undecodable_ids
        report.unknown_element_types = {str(k): v for k, v in sorted(unknown_types.items())}
        report.unresolved_uids = unresolved
        report.replies_resolved = replies_ok
        report.replies_unresolved = replies_missing
        report.first_time = first_time
        report.last_time = last_time


class _Progress:
    """A rich progress bar on stderr: rows read and rows per second."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("reading messages"),
            TextColumn("{task.completed:,.0f} rows"),
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task("extract", total=None, rate="")
        self._progress.start()

    def update(self, rows: int) -> None:
        task = self._progress.tasks[0]
        elapsed = task.elapsed or 0.0
        rate = f"{rows / elapsed:,.0f} rows/s" if elapsed > 0 else ""
        self._progress.update(self._task, completed=rows, rate=rate)

    def close(self, rows: int) -> None:
        self.update(rows)
        self._progress.stop()

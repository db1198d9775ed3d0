"""From an `nt_msg.db` (encrypted or a plain copy) to normalised message records.

One SQL statement streams both tables in time order (SQLite sorts on disk in the private
work directory, so memory stays bounded); each row's body is decoded with the protobuf
schema and rendered through `pipeline.chatformat`. What is not a message is dropped and
counted; a body that cannot be decoded is counted with its message id, never guessed at.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlcipher3

from pipeline.chatformat import CHAT_TYPES, GROUP, PRIVATE, render_elements
from pipeline.errors import InputError
from pipeline.files import atomic_path, write_text_atomic
from pipeline.ntqq.body import BodyError, decode_body
from pipeline.ntqq.decrypt import check_output, has_qq_tables, open_database
from pipeline.records import Message

_json_str = json.encoder.encode_basestring  # the C escaper json.dumps(ensure_ascii=False) uses
_KINDS_JSON: dict[tuple[str, ...], str] = {}

CHAT_TABLES = {PRIVATE: "c2c_msg_table", GROUP: "group_msg_table"}

# Row-level drop rules of docs/ntqq.md.
MSG_TYPE_UNKNOWN, MSG_TYPE_EMPTY, MSG_TYPE_GRAY_TIP = 0, 1, 5
SEND_TYPE_SELF = (1, 2)
SEND_TYPE_SYSTEM = 3
STATUS_DELIVERED = 2

DROP_REASONS = ("revoked", "gray_tip", "system", "failed_send", "unknown_type", "empty", "undecodable")
MAX_LISTED_UNDECODABLE = 1000
# Quoted messages are looked up among the most recent rows first (at least half this many;
# replies nearly always quote something recent), then in an index built on first need.
REPLY_WINDOW = 50_000

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
    ("40850", False),  # quoted message's sequence
    ("40003", False),  # this message's sequence
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
    chats: Sequence[str] = CHAT_TYPES,
    hmac: str | None = None,
    report: ExtractReport | None = None,
    progress: bool = False,
) -> Iterator[Message]:
    """Stream `Message` records from a QQ NT database in time order; fills `report` as it goes."""
    for fields in _iter_records(db, key, tuple(chats), hmac, report, progress):
        yield Message(*fields)


def extract_messages(
    db: str | Path,
    out: str | Path,
    *,
    key: str | None = None,
    chats: Sequence[str] = CHAT_TYPES,
    hmac: str | None = None,
    report: str | Path | None = None,
    progress: bool = True,
) -> ExtractReport:
    """Write `out` (messages.jsonl) from `db`, atomically; `report` also gets the summary as JSON."""
    result = ExtractReport()
    db, out = Path(db), Path(out)
    check_output(db, out)
    if report is not None:
        check_output(db, Path(report))
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8", buffering=1 << 20) as handle:
        handle.writelines(map(record_json, _iter_records(db, key, tuple(chats), hmac, result, progress)))
    if report is not None:
        write_text_atomic(report, json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n")
    return result


def record_json(fields: tuple) -> str:
    """One messages.jsonl line, byte-identical to `Message(*fields).to_json()` + newline.

    Written out by hand because building a Message and a dict per row costs more than
    everything else extract does in Python.
    """
    msg_id, chat_type, chat, sender, sender_name, is_self, time, text, reply_to, kinds = fields
    kinds_json = _KINDS_JSON.get(tuple(kinds))
    if kinds_json is None:  # fixed ASCII names, nothing to escape; few distinct combinations
        kinds_json = _KINDS_JSON[tuple(kinds)] = ",".join(f'"{kind}"' for kind in kinds)
    return (
        f'{{"msg_id":{_json_str(msg_id)},"chat_type":"{chat_type}","chat":{_json_str(chat)},'
        f'"sender":{_json_str(sender)},"sender_name":{_json_str(sender_name)},'
        f'"is_self":{"true" if is_self else "false"},"time":{time},"text":{_json_str(text)},'
        f'"reply_to":{"null" if reply_to is None else _json_str(reply_to)},"kinds":[{kinds_json}]}}\n'
    )


# ---------------------------------------------------------------- internals


def _table_columns(conn: sqlcipher3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}


def build_query(tables: dict[str, tuple[str, set[str]]], db: Path) -> str:
    """One statement over the chosen tables, ordered by time then message id.

    `tables` maps a chat type to (table name, the columns it has).
    """
    selects = []
    for chat_type, (table, present) in tables.items():
        missing = [name for name, required in _COLUMNS if required and name not in present]
        if missing:
            raise InputError(db, f"unsupported QQ NT version: {table} has no column {', '.join(missing)}")
        cols = [f'"{name}"' if name in present else "NULL" for name, _ in _COLUMNS]
        selects.append(f"SELECT '{chat_type}', {', '.join(cols)} FROM \"{table}\"")
    return " UNION ALL ".join(selects) + " ORDER BY 10, 2"  # time (40050), then msg id


class _QuotedIndex:
    """Exact lookup of a quoted message (chat, sequence) → id, for quotes older than the window.

    Built on first need, per table, as an indexed TEMP table on the same connection (temp
    storage lives in the private work directory); most histories never need it.
    """

    def __init__(self, conn: sqlcipher3.Connection, tables: dict[str, tuple[str, set[str]]]) -> None:
        self._conn = conn
        self._tables = tables
        self._built: set[str] = set()

    def lookup(self, chat_type: str, chat_key: object, seq: int) -> object | None:
        table, present = self._tables[chat_type]
        if not {"40021", "40003"} <= present:
            return None
        name = f"qqtwin_quoted_{chat_type}"
        if chat_type not in self._built:
            self._conn.execute(
                f'CREATE TEMP TABLE {name} AS SELECT "40021" AS chat, "40003" AS seq, "40001" AS id '
                f'FROM main."{table}" WHERE "40003" IS NOT NULL'
            )
            self._conn.execute(f"CREATE INDEX temp.{name}_key ON {name}(chat, seq)")
            self._built.add(chat_type)
        row = self._conn.execute(
            f"SELECT id FROM temp.{name} WHERE chat = ? AND seq = ?", (chat_key, seq)
        ).fetchone()
        return row[0] if row else None


def _iter_records(
    db: str | Path,
    key: str | None,
    chats: tuple[str, ...],
    hmac: str | None,
    report: ExtractReport | None,
    progress: bool,
) -> Iterator[tuple]:
    """Record tuples in `Message` field order, from open to close of the private copy."""
    report = report if report is not None else ExtractReport()
    db = Path(db)
    bar = _Progress() if progress and _stderr_is_terminal() else None
    try:
        yield from _read(db, key, chats, hmac, report, bar)
    finally:
        if bar is not None:
            bar.close()


def _read(
    db: Path,
    key: str | None,
    chats: tuple[str, ...],
    hmac: str | None,
    report: ExtractReport,
    bar: _Progress | None,
) -> Iterator[tuple]:
    """Open a private copy, check the tables, run the one query and decode its rows."""
    with open_database(db, key, hmac=hmac) as (conn, info):
        report.source, report.layout, report.hmac, report.wal = str(db), info.layout, info.hmac, info.wal
        try:
            present = has_qq_tables(conn)
            if not present:
                raise InputError(
                    db, "no QQ NT message tables (c2c_msg_table, group_msg_table): is this nt_msg.db?"
                )
            wanted = {c: CHAT_TABLES[c] for c in chats if CHAT_TABLES[c] in present}
            if not wanted:
                raise InputError(db, f"none of the chosen chats ({', '.join(chats)}) has a table here")
            tables = {c: (t, _table_columns(conn, t)) for c, t in wanted.items()}
            query = build_query(tables, db)
            uid_map = _uid_map(conn)
            if bar is not None:
                bar.stage("sorting by time")
            cursor = conn.execute(query)
            cursor.arraysize = 2048
            yield from _rows_to_records(cursor, uid_map, report, bar, _QuotedIndex(conn, tables).lookup)
        except sqlcipher3.DatabaseError as exc:
            raise InputError(db, f"damaged or truncated database ({exc})") from None


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


@dataclass(slots=True)
class _Tally:
    """What `_rows_to_records` counts row by row, copied into the report when the rows end."""

    rows: int = 0
    messages: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    per_kind: dict[str, int] = field(default_factory=dict)
    per_chat_type: dict[str, int] = field(default_factory=dict)
    unknown_types: Counter[int] = field(default_factory=Counter)
    undecodable_ids: list[str] = field(default_factory=list)
    unresolved_uids: int = 0
    replies_resolved: int = 0
    replies_unresolved: int = 0
    first_time: int | None = None
    last_time: int | None = None

    def kept(self, chat_type: str, kinds: list[str], time: int) -> None:
        self.messages += 1
        if self.messages == 1:
            self.first_time = time
        self.last_time = time
        self.per_chat_type[chat_type] = self.per_chat_type.get(chat_type, 0) + 1
        for kind in kinds:
            self.per_kind[kind] = self.per_kind.get(kind, 0) + 1

    def fill(self, report: ExtractReport) -> None:
        report.rows = self.rows
        report.messages = self.messages
        report.per_chat_type = dict(self.per_chat_type)
        report.per_kind = dict(self.per_kind)
        report.dropped = {reason: self.dropped.get(reason, 0) for reason in DROP_REASONS}
        report.undecodable = self.dropped.get("undecodable", 0)
        report.undecodable_ids = self.undecodable_ids
        report.unknown_element_types = {str(k): v for k, v in sorted(self.unknown_types.items())}
        report.unresolved_uids = self.unresolved_uids
        report.replies_resolved = self.replies_resolved
        report.replies_unresolved = self.replies_unresolved
        report.first_time = self.first_time
        report.last_time = self.last_time


class _RecentIds:
    """(chat type, chat, sequence) → message id for the last 25k-50k rows, in two generations;
    most replies quote something just said, and `find_quoted` answers for older quotes."""

    def __init__(self, find_quoted: Callable[[str, object, int], object | None] | None) -> None:
        self.recent: dict[tuple, object] = {}
        self.older: dict[tuple, object] = {}
        self.half = REPLY_WINDOW // 2
        self.find_quoted = find_quoted

    def remember(self, chat_type: str, chat_key: object, seq: int, msg_id: object) -> None:
        self.recent[(chat_type, chat_key, seq)] = msg_id
        if len(self.recent) >= self.half:
            self.older, self.recent = self.recent, {}

    def quoted(self, chat_type: str, chat_key: object, seq: int) -> object | None:
        key = (chat_type, chat_key, seq)
        found = self.recent.get(key) or self.older.get(key)
        if found is None and self.find_quoted is not None:
            found = self.find_quoted(chat_type, chat_key, seq)
        return found


def _rows_to_records(
    rows: Iterator[tuple],
    uid_map: dict[str, str],
    report: ExtractReport,
    bar: _Progress | None = None,
    find_quoted: Callable[[str, object, int], object | None] | None = None,
) -> Iterator[tuple]:
    """The per-row core: drop rules, body decoding, rendering, reply resolution.

    Pure apart from filling `report` and calling `find_quoted` for quotes older than the window.
    """
    tally = _Tally()
    ids = _RecentIds(find_quoted)
    # Local names: this loop runs once per row of a possibly multi-million-row history.
    decode, render, dropped = decode_body, render_elements, tally.dropped
    try:
        for row in rows:
            tally.rows += 1
            if bar is not None and not tally.rows & 0x3FF:
                bar.update(tally.rows)
            (chat_type, msg_id, msg_type, send_type, sender_uid, peer_uid, peer_uin, sender_uin,
             status, time, card, nick, body, reply_seq, seq) = row  # fmt: skip
            if seq:
                ids.remember(chat_type, peer_uid, seq, msg_id)
            reason = _row_drop_reason(msg_type, send_type, status)
            if reason:
                dropped[reason] += 1
                continue
            try:
                decoded = decode(body)
            except BodyError:
                dropped["undecodable"] += 1
                if len(tally.undecodable_ids) < MAX_LISTED_UNDECODABLE:
                    tally.undecodable_ids.append(str(msg_id))
                continue
            if decoded.revoked:
                dropped["revoked"] += 1
                continue
            if msg_type == MSG_TYPE_GRAY_TIP or decoded.gray_tip:
                dropped["gray_tip"] += 1
                continue
            if decoded.unknown_types:
                tally.unknown_types.update(decoded.unknown_types)
            text, kinds, _ = render(decoded.elements)
            if not text:
                dropped["empty"] += 1
                continue
            reply_to = None
            if reply_seq or "reply" in kinds:
                # The quoted sequence: column 40850, else the reply element's own field.
                reply_to = _reply_to(ids, chat_type, peer_uid, reply_seq or decoded.reply_seq, tally)
            tally.kept(chat_type, kinds, time)
            yield (
                str(msg_id),
                chat_type,
                _chat(chat_type, peer_uid, peer_uin, uid_map),
                _sender(sender_uid, sender_uin, uid_map, tally),
                (card or nick or "") if chat_type == "group" else (nick or ""),
                send_type in SEND_TYPE_SELF,
                int(time or 0),
                text,
                reply_to,
                kinds,
            )
    finally:
        if bar is not None:
            bar.update(tally.rows)
        tally.fill(report)


def _row_drop_reason(msg_type: int, send_type: int, status: int | None) -> str:
    """Why a row is not a message, judged from its columns before its body is decoded ("" if it may be)."""
    if send_type == SEND_TYPE_SYSTEM:
        return "system"
    # Only the owner's own sends can have failed; a received row is delivered by definition.
    if status is not None and status != STATUS_DELIVERED and send_type in SEND_TYPE_SELF:
        return "failed_send"
    if msg_type in (MSG_TYPE_UNKNOWN, MSG_TYPE_EMPTY):
        return "empty" if msg_type == MSG_TYPE_EMPTY else "unknown_type"
    return ""


def _sender(sender_uid: str | None, sender_uin: object, uid_map: dict[str, str], tally: _Tally) -> str:
    """The sender's QQ number: its column, else through the uid mapping, else the uid (counted)."""
    if sender_uin:
        return str(sender_uin)
    sender = uid_map.get(sender_uid or "", "")
    if not sender:
        tally.unresolved_uids += 1
        sender = sender_uid or ""
    return sender


def _chat(chat_type: str, peer_uid: object, peer_uin: object, uid_map: dict[str, str]) -> str:
    """The chat's number: the peer's QQ number, the group code, else the peer uid."""
    if peer_uin:
        return str(peer_uin)
    if chat_type == "group":
        return str(peer_uid or "")
    return uid_map.get(peer_uid or "", "") or str(peer_uid or "")


def _reply_to(
    ids: _RecentIds, chat_type: str, peer_uid: object, quoted_seq: int, tally: _Tally
) -> str | None:
    """The quoted message's id, counted as resolved or not."""
    reply_id = ids.quoted(chat_type, peer_uid, quoted_seq) if quoted_seq else None
    if reply_id is None:
        tally.replies_unresolved += 1
        return None
    tally.replies_resolved += 1
    return str(reply_id)


def _stderr_is_terminal() -> bool:
    import sys

    return bool(sys.stderr is not None and sys.stderr.isatty())


class _Progress:
    """A rich progress display on stderr: the current stage, rows read and rows per second."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TextColumn("{task.fields[rows]}"),
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task("copying the database", total=None, rows="", rate="")
        self._reading_since: float | None = None
        self._progress.start()

    def stage(self, description: str) -> None:
        self._progress.update(self._task, description=description)

    def update(self, rows: int) -> None:
        import time

        now = time.monotonic()
        if self._reading_since is None:
            self._reading_since = now
            self.stage("reading messages")
        elapsed = now - self._reading_since
        rate = f"{rows / elapsed:,.0f} rows/s" if elapsed > 0 else ""
        self._progress.update(self._task, rows=f"{rows:,} rows", rate=rate)

    def close(self) -> None:
        self._progress.stop()

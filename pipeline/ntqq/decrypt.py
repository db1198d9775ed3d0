"""Opening QQ NT databases: detect the file layout, work on a private copy, find the HMAC.

The user's files are only ever read: the body (minus QQ's 1024-byte header) and any `-wal`
beside it are copied into a private temp directory (0700), which is removed afterwards.
The key is passed to SQLCipher and nowhere else: never stored, never logged.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sqlcipher3

from pipeline.errors import InputError
from pipeline.files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, atomic_path

QQ_HEADER_SIZE = 1024
QQ_HEADER_MAGIC = b"SQLite header 3\x00"
QQ_MAGIC = b"QQ_NT DB"
QQ_MAGIC_OFFSET = 32
SQLITE_MAGIC = b"SQLite format 3\x00"

PAGE_SIZE = 4096
KDF_ITER = 4000
KDF_ALGORITHM = "PBKDF2_HMAC_SHA512"
HMAC_ALGORITHMS = ("HMAC_SHA1", "HMAC_SHA256", "HMAC_SHA512")

QQ_TABLES = ("c2c_msg_table", "group_msg_table")

Layout = Literal["qq-nt", "sqlcipher", "sqlite"]

LAYOUT_DESCRIPTIONS: dict[str, str] = {
    "qq-nt": "QQ NT database (1024-byte header + SQLCipher 4)",
    "sqlcipher": "SQLCipher database without the QQ NT header",
    "sqlite": "plain SQLite database (already decrypted)",
}

_COPY_CHUNK = 1 << 20
_HMAC_RE = re.compile(rb"HMAC_SHA(?:1|256|512)")
_PRINTABLE_RUN_RE = re.compile(rb"[0-9A-Za-z]{6,64}")


@dataclass(slots=True, frozen=True)
class QQNTHeader:
    """What the plaintext header says: the HMAC it names and the Android `rand` if present."""

    hmac: str | None = None
    rand: str | None = None


@dataclass(slots=True)
class DecryptInfo:
    """What was found when opening a database."""

    source: str
    layout: Layout
    hmac: str | None = None  # the HMAC variant that worked (None for plain SQLite)
    header_hmac: str | None = None  # the variant the QQ NT header named
    wal: bool = False  # a `-wal` file beside the source was copied and read

    def describe(self) -> str:
        text = LAYOUT_DESCRIPTIONS[self.layout]
        if self.hmac:
            text += f", {self.hmac}"
        if self.wal:
            text += ", with -wal"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "layout": self.layout,
            "hmac": self.hmac,
            "header_hmac": self.header_hmac,
            "wal": self.wal,
        }


def parse_header(header: bytes) -> QQNTHeader | None:
    """Parse QQ NT's 1024-byte plaintext header; None when `header` is not one."""
    if not (header.startswith(QQ_HEADER_MAGIC) and header[QQ_MAGIC_OFFSET:].startswith(QQ_MAGIC)):
        return None
    body = header[QQ_MAGIC_OFFSET + len(QQ_MAGIC) : QQ_HEADER_SIZE]
    hmac_match = _HMAC_RE.search(body)
    hmac = hmac_match.group().decode() if hmac_match else None
    # The header's layout is undocumented; `rand` is the alphanumeric string that is
    # not the HMAC name (Android tools read it at the same place by eye).
    rand = None
    for run in _PRINTABLE_RUN_RE.finditer(body):
        text = run.group().decode()
        if not text.startswith("HMAC_"):
            rand = text
            break
    return QQNTHeader(hmac=hmac, rand=rand)


def detect_layout(path: Path) -> tuple[Layout, QQNTHeader | None]:
    """Classify a file by its first bytes (QQ NT header, plain SQLite, else SQLCipher)."""
    with _open_source(path) as handle:
        head = handle.read(QQ_HEADER_SIZE)
    header = parse_header(head)
    if header is not None:
        return "qq-nt", header
    if head.startswith(SQLITE_MAGIC):
        return "sqlite", None
    return "sqlcipher", None


def read_header(path: str | Path) -> QQNTHeader:
    """The QQ NT header of `path`; InputError when it has none."""
    path = Path(path)
    layout, header = detect_layout(path)
    if header is None:
        raise InputError(path, f"no QQ NT header (found a {LAYOUT_DESCRIPTIONS[layout]})")
    return header


def quote_key(key: str) -> str:
    """The key as an SQL string literal: single quotes doubled, so any text key works."""
    if "\x00" in key:
        raise ValueError("key contains a NUL character")
    return "'" + key.replace("'", "''") + "'"


@contextlib.contextmanager
def open_database(
    src: str | Path, key: str | None, *, hmac: str | None = None
) -> Iterator[tuple[sqlcipher3.Connection, DecryptInfo]]:
    """Open a private copy of `src` (QQ NT, SQLCipher or plain SQLite); yields (connection, info).

    Tries the HMAC given, else the one the header names, then SHA1, SHA256, SHA512.
    """
    src = Path(src)
    layout, header = detect_layout(src)
    if hmac is not None and hmac.upper() not in HMAC_ALGORITHMS:
        raise InputError(src, f"unknown HMAC algorithm {hmac!r} (use one of {', '.join(HMAC_ALGORITHMS)})")
    info = DecryptInfo(source=str(src), layout=layout, header_hmac=header.hmac if header else None)
    if layout != "sqlite":  # before copying what may be gigabytes
        if key is None:
            raise InputError(src, "not plain SQLite: encrypted (pass its key with --key) or not a database")
        _check_key(src, key)
    with _private_workdir() as work:
        copy = work / "nt_msg.db"
        skip = QQ_HEADER_SIZE if layout == "qq-nt" else 0
        try:
            body_size = _copy_body(src, copy, skip)
            info.wal = _copy_wal(src, copy)
        except OSError as exc:  # the source opened fine, so this is the temp directory (full disk?)
            raise InputError(
                src, f"cannot copy it to a private temp directory ({exc.strerror or exc})"
            ) from None
        if layout != "sqlite" and body_size % PAGE_SIZE:
            raise InputError(
                src, f"truncated: the SQLCipher body is not a whole number of {PAGE_SIZE}-byte pages"
            )
        if body_size == 0:
            raise InputError(src, "truncated: no database pages after the header")
        if layout == "sqlite":
            conn = _connect(copy, None, None)
            try:
                _probe(conn)
            except sqlcipher3.DatabaseError as exc:
                conn.close()
                raise InputError(src, f"damaged SQLite database ({exc})") from None
        else:
            assert key is not None
            conn = _open_encrypted(src, copy, key, _hmac_order(hmac, info.header_hmac), info)
        # Sorts and transient indexes spill to files inside the private work directory, not
        # into RAM (bounded memory on multi-GB histories) and not into a shared /tmp.
        conn.execute(f"PRAGMA temp_store_directory = {quote_key(str(work))}")
        conn.execute("PRAGMA temp_store = FILE")
        try:
            yield conn, info
        finally:
            conn.close()
            sqlcipher3.connect(":memory:").execute("PRAGMA temp_store_directory = ''").connection.close()


def has_qq_tables(conn: sqlcipher3.Connection) -> list[str]:
    """The QQ NT message tables present in an open database."""
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return [table for table in QQ_TABLES if table in names]


def check_output(src: Path, out: Path) -> None:
    """Refuse an output path that would overwrite the source (or its WAL) or cannot be a file."""
    target = out.resolve()
    if target in {src.resolve(), src.with_name(src.name + "-wal").resolve()}:
        raise InputError(out, "the output must not be the source database")
    if out.is_dir():
        raise InputError(out, "is a directory; give a file name for the output")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(out, f"cannot create the output: {parent} is not a directory")


def decrypt_db(src: str | Path, key: str | None, out: str | Path, *, hmac: str | None = None) -> DecryptInfo:
    """Write a plain SQLite copy of `src` (WAL rows included) to `out`; `src` is never modified."""
    src, out = Path(src), Path(out)
    check_output(src, out)
    with open_database(src, key, hmac=hmac) as (conn, info):
        if info.layout == "sqlite" and not has_qq_tables(conn):
            raise InputError(src, "a plain SQLite database without QQ NT message tables: nothing to decrypt")
        with atomic_path(out) as tmp:
            tmp.unlink()  # sqlcipher_export needs to create the file itself
            try:
                conn.execute("ATTACH DATABASE ? AS plaintext KEY ''", (str(tmp),))
                conn.execute("SELECT sqlcipher_export('plaintext')")
                conn.execute("DETACH DATABASE plaintext")
            except sqlcipher3.DatabaseError as exc:
                raise InputError(src, f"damaged database, cannot export ({exc})") from None
            os.chmod(tmp, PRIVATE_FILE_MODE)
    return info


# ---------------------------------------------------------------- internals


def _open_source(path: Path):
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a database file (nt_msg.db)") from None
    except NotADirectoryError:
        raise InputError(path, "a parent of this path is not a directory") from None
    except PermissionError:
        raise InputError(path, "permission denied (cannot read the file or its directory)") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None


@contextlib.contextmanager
def _private_workdir() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="qq-twin-ntqq-"))
    os.chmod(work, PRIVATE_DIR_MODE)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _copy_body(src: Path, dst: Path, skip: int) -> int:
    with _open_source(src) as fin, dst.open("wb") as fout:
        os.chmod(dst, PRIVATE_FILE_MODE)
        fin.seek(skip)
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)
        return fout.tell()


def _copy_wal(src: Path, copy: Path) -> bool:
    """Copy `<src>-wal` (never `-shm`: SQLite rebuilds it) so uncheckpointed rows are read."""
    wal = src.with_name(src.name + "-wal")
    if not wal.is_file() or wal.stat().st_size == 0:
        return False
    dst = copy.with_name(copy.name + "-wal")
    with _open_source(wal) as fin, dst.open("wb") as fout:
        os.chmod(dst, PRIVATE_FILE_MODE)
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)
    return True


def _check_key(src: Path, key: str) -> None:
    if not key:
        raise InputError(src, "empty key")
    if "\x00" in key:
        raise InputError(src, "the key contains a NUL character")


def _hmac_order(forced: str | None, named: str | None) -> list[str]:
    if forced:
        return [forced.upper()]
    order = [named] if named in HMAC_ALGORITHMS else []
    return order + [h for h in HMAC_ALGORITHMS if h not in order]


def _connect(path: Path, key: str | None, hmac: str | None) -> sqlcipher3.Connection:
    conn = sqlcipher3.connect(str(path), check_same_thread=False)
    apply_qq_cipher(conn, key, hmac)
    return conn


def apply_qq_cipher(conn: sqlcipher3.Connection, key: str | None, hmac: str | None) -> None:
    """Set QQ NT's SQLCipher parameters on a fresh connection (none for a plain SQLite file).

    The one place they are written: the reader and the sample-database generator both use it.
    """
    # SQLCipher would print every failed HMAC check to stderr; the user gets one clear error instead.
    conn.execute("PRAGMA cipher_log_level = NONE")
    if key is not None:
        conn.execute(f"PRAGMA key = {quote_key(key)}")
        conn.execute(f"PRAGMA cipher_page_size = {PAGE_SIZE}")
        conn.execute(f"PRAGMA kdf_iter = {KDF_ITER}")
        conn.execute(f"PRAGMA cipher_hmac_algorithm = {hmac}")
        conn.execute(f"PRAGMA cipher_kdf_algorithm = {KDF_ALGORITHM}")


def _probe(conn: sqlcipher3.Connection) -> None:
    """A wrong key only shows at the first real read."""
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()


def _open_encrypted(
    src: Path, copy: Path, key: str, order: list[str], info: DecryptInfo
) -> sqlcipher3.Connection:
    for hmac in order:
        conn = _connect(copy, key, hmac)
        try:
            _probe(conn)
        except sqlcipher3.DatabaseError as exc:
            conn.close()
            if "not a database" in str(exc):  # what a wrong key or wrong HMAC looks like
                continue
            # Page 1 decrypted and verified, so the key is right: the file itself is damaged.
            raise InputError(src, f"damaged or truncated database ({exc})") from None
        info.hmac = hmac
        return conn
    tried = ", ".join(order)
    if info.layout == "qq-nt":
        cause = f"wrong key or unsupported QQ NT version (tried {tried})"
    else:
        cause = f"not a QQ NT database, or wrong key (no QQ NT header; tried SQLCipher with {tried})"
    raise InputError(src, cause)

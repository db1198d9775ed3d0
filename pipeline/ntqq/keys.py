"""Deriving the database key of Android QQ NT (rooted phones), as the public tools do."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.errors import InputError
from pipeline.ntqq.decrypt import read_header


def android_key(uid: str, rand: str) -> str:
    """`md5(md5(uid) + rand)`, both digests as lowercase hex; `uid` is the account's `u_...` id."""
    uid, rand = uid.strip(), rand.strip()
    if not uid or not rand:
        raise ValueError("both uid and rand are needed")
    uid_hash = hashlib.md5(uid.encode("utf-8")).hexdigest()
    return hashlib.md5((uid_hash + rand).encode("utf-8")).hexdigest()


def android_rand(db: str | Path) -> str:
    """The `rand` string from a QQ NT database header; InputError if the header has none."""
    header = read_header(db)
    if not header.rand:
        raise InputError(db, "the QQ NT header holds no rand value; pass it with --android-rand")
    return header.rand


def android_db_dirname(uid: str) -> str:
    """Android's per-account folder under `databases/nt_db/`: `nt_qq_` + md5(md5(uid) + "nt_kernel")."""
    uid_hash = hashlib.md5(uid.strip().encode("utf-8")).hexdigest()
    return "nt_qq_" + hashlib.md5((uid_hash + "nt_kernel").encode("utf-8")).hexdigest()

"""Builders for the QQ NT tests: exact rows, raw protobuf bytes, file hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.ntqq import sampledb as S

FRIEND_UIN = 1001
FRIEND_UID = "u_friendAJie000000000001"
FRIEND_NICK = "阿杰"
GROUP_CODE = 5555
MEMBER_UIN = 2002
MEMBER_UID = "u_memberXiaoYu0000000002"
UID_ONLY_UID = "u_uidOnlyMember000000003"
UID_ONLY_UIN = 4242
STRANGER_UID = "u_notInTheMappingTable04"
OWNER_UIN = int(S.OWNER_UIN)
T0 = 1_740_000_000


def c2c(msg_id: int, elements: list[dict], *, t: int, seq: int, self_: bool = False, **kw) -> S.SampleRow:
    """A one-to-one row with the friend; `self_` makes the owner the sender."""
    return S.SampleRow(
        msg_id=msg_id,
        chat_type=S.CHAT_C2C,
        peer=FRIEND_UIN,
        peer_uid=FRIEND_UID,
        sender_uin=OWNER_UIN if self_ else FRIEND_UIN,
        sender_uid=S.OWNER_UID if self_ else FRIEND_UID,
        send_type=kw.pop("send_type", S.SEND_SELF if self_ else S.SEND_RECEIVED),
        time=t,
        seq=seq,
        elements=elements,
        nick=kw.pop("nick", S.OWNER_NAME if self_ else FRIEND_NICK),
        **kw,
    )


def group(
    msg_id: int,
    elements: list[dict],
    *,
    t: int,
    seq: int,
    uin: int,
    uid: str,
    card: str = "",
    nick: str = "",
    **kw,
) -> S.SampleRow:
    """A row in the test group."""
    return S.SampleRow(
        msg_id=msg_id,
        chat_type=S.CHAT_GROUP,
        peer=GROUP_CODE,
        peer_uid=str(GROUP_CODE),
        sender_uin=uin,
        sender_uid=uid,
        send_type=kw.pop("send_type", S.SEND_SELF if uin == OWNER_UIN else S.SEND_RECEIVED),
        time=t,
        seq=seq,
        elements=elements,
        card=card,
        nick=nick,
        **kw,
    )


def uid_map() -> dict[str, int]:
    return {
        S.OWNER_UID: OWNER_UIN,
        FRIEND_UID: FRIEND_UIN,
        MEMBER_UID: MEMBER_UIN,
        UID_ONLY_UID: UID_ONLY_UIN,
    }


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand (for bodies the schema would not produce)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(directory: Path) -> dict[str, str]:
    """Name → hash of every file in `directory` (the source and any -wal beside it)."""
    return {p.name: sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}

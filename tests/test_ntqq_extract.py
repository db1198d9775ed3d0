"""Extracting records from generated encrypted databases, checked field by field."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import tempfile
from pathlib import Path

import pytest

from pipeline.ntqq import sampledb as S
from pipeline.ntqq.decrypt import decrypt_db
from pipeline.ntqq.extract import ExtractReport, extract_messages, iter_messages_from_db, record_json
from pipeline.records import ELEMENT_KINDS, Message, iter_messages
from tests.ntqq_helpers import (
    FRIEND_NICK,
    FRIEND_UIN,
    GROUP_CODE,
    MEMBER_UID,
    MEMBER_UIN,
    OWNER_UIN,
    STRANGER_UID,
    T0,
    UID_ONLY_UID,
    UID_ONLY_UIN,
    c2c,
    field_bytes,
    field_varint,
    group,
    tree_hashes,
    uid_map,
)

KEY = "k3y-for-tests-01"


# fmt: off
def history() -> list[S.SampleRow]:
    """One of everything, deliberately inserted out of time order."""
    return [
        c2c(103, [S.text("笑死"), S.face(179), S.sticker("[贴贴]")], t=T0 + 30, seq=3, self_=True),
        c2c(101, [S.text("晚上吃火锅吗")], t=T0 + 10, seq=1),
        c2c(102, [S.image(), S.image("[动画表情]")], t=T0 + 20, seq=2),
        c2c(104, [S.text("在地铁上")], t=T0 + 40, seq=4, self_=True, send_type=S.SEND_SELF_OTHER_DEVICE),
        c2c(105, [S.voice("明天见")], t=T0 + 50, seq=5),
        c2c(106, [S.voice()], t=T0 + 60, seq=6),
        c2c(107, [S.video(), S.file(), S.forward(), S.ark_card()], t=T0 + 70, seq=7),
        c2c(108, [S.face(0, "/微笑"), S.face(99999)], t=T0 + 80, seq=8),
        # An older QQ row without column 40850: the reply element's own seq finds the quote.
        c2c(109, [S.reply(1), S.text("回你")], t=T0 + 90, seq=16),
        # Not messages:
        c2c(150, [S.revoke(S.OWNER_UID)], t=T0 + 81, seq=9, msg_type=S.MSG_GRAY_TIP),
        c2c(151, [S.text("你们已成为好友")], t=T0 + 82, seq=10, send_type=S.SEND_SYSTEM),
        c2c(152, [S.text("没发出去")], t=T0 + 83, seq=11, self_=True, status=S.STATUS_FAILED),
        c2c(153, [], t=T0 + 84, seq=12, msg_type=S.MSG_EMPTY),
        c2c(157, [S.text("类型未知")], t=T0 + 84, seq=17, msg_type=0),
        c2c(154, [S.reply(1)], t=T0 + 85, seq=13),  # a reply with nothing of its own
        c2c(155, [], t=T0 + 86, seq=14, body=S.truncated_body([S.text("坏掉的消息")])),
        c2c(156, [], t=T0 + 87, seq=15, body=S.wrong_wire_type_body()),
        # Group chat:
        group(201, [S.at("小林", S.OWNER_UID), S.text(" 出来打球")], t=T0 + 100, seq=1,
              uin=MEMBER_UIN, uid=MEMBER_UID, card="小雨-球队", nick="小雨"),
        group(202, [S.text("我也去")], t=T0 + 110, seq=2,
              uin=FRIEND_UIN, uid="u_x", card="", nick=FRIEND_NICK),
        group(203, [S.reply(1, MEMBER_UIN, "出来打球"), S.text("好耶")], t=T0 + 120, seq=3,
              uin=OWNER_UIN, uid=S.OWNER_UID, nick=S.OWNER_NAME, reply_seq=1, msg_type=S.MSG_REPLY),
        group(204, [S.reply(99), S.text("引用的消息找不到了")], t=T0 + 130, seq=4,
              uin=MEMBER_UIN, uid=MEMBER_UID, card="小雨-球队", reply_seq=99),
        group(205, [S.text("只有 uid 的人")], t=T0 + 140, seq=5, uin=0, uid=UID_ONLY_UID, nick="风起"),
        group(206, [S.text("查不到的人")], t=T0 + 150, seq=6, uin=0, uid=STRANGER_UID, nick="路人"),
        group(250, [S.gray_tip("路人 加入了群聊")], t=T0 + 151, seq=7, uin=0, uid=STRANGER_UID,
              msg_type=S.MSG_GRAY_TIP),
        group(207, [{"element_type": 99}, S.text("新版本的元素")], t=T0 + 160, seq=8,
              uin=MEMBER_UIN, uid=MEMBER_UID, nick="小雨"),
    ]


EXPECTED = [
    Message("101", "c2c", "1001", "1001", FRIEND_NICK, False, T0 + 10, "晚上吃火锅吗", None, ["text"]),
    Message("102", "c2c", "1001", "1001", FRIEND_NICK, False, T0 + 20, "[图片][动画表情]", None,
            ["image", "sticker"]),
    Message("103", "c2c", "1001", str(OWNER_UIN), S.OWNER_NAME, True, T0 + 30, "笑死[doge][贴贴]", None,
            ["text", "face", "sticker"]),
    Message("104", "c2c", "1001", str(OWNER_UIN), S.OWNER_NAME, True, T0 + 40, "在地铁上", None, ["text"]),
    Message("105", "c2c", "1001", "1001", FRIEND_NICK, False, T0 + 50, "明天见", None, ["voice"]),
    Message("106", "c2c", "1001", "1001", FRIEND_NICK, False, T0 + 60, "[语音]", None, ["voice"]),
    Message("107", "c2c", "1001", "1001", FRIEND_NICK, False, T0 + 70, "[视频][文件][聊天记录][卡片]", None,
            ["video", "file", "forward", "card"]),
    Message("108", "c2c", "1001", "1001", FRIEND_NICK, False, T0 + 80, "[微笑][表情]", None, ["face"]),
    Message("109", "c2c", "1001", "1001", FRIEND_NICK, False, T0 + 90, "回你", "101", ["reply", "text"]),
    Message("201", "group", str(GROUP_CODE), str(MEMBER_UIN), "小雨-球队", False, T0 + 100,
            "@小林 出来打球", None, ["at", "text"]),
    Message("202", "group", str(GROUP_CODE), "1001", FRIEND_NICK, False, T0 + 110, "我也去", None, ["text"]),
    Message("203", "group", str(GROUP_CODE), str(OWNER_UIN), S.OWNER_NAME, True, T0 + 120, "好耶", "201",
            ["reply", "text"]),
    Message("204", "group", str(GROUP_CODE), str(MEMBER_UIN), "小雨-球队", False, T0 + 130,
            "引用的消息找不到了", None, ["reply", "text"]),
    Message("205", "group", str(GROUP_CODE), str(UID_ONLY_UIN), "风起", False, T0 + 140,
            "只有 uid 的人", None, ["text"]),
    Message("206", "group", str(GROUP_CODE), STRANGER_UID, "路人", False, T0 + 150, "查不到的人", None,
            ["text"]),
    Message("207", "group", str(GROUP_CODE), str(MEMBER_UIN), "小雨", False, T0 + 160, "新版本的元素", None,
            ["text"]),
]
# fmt: on


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return S.write_sample_db(tmp_path_factory.mktemp("db"), key=KEY, rows=history(), uid_map=uid_map())


def test_every_record_matches_field_by_field(sample):
    got = list(iter_messages_from_db(sample, key=KEY))
    assert [m.msg_id for m in got] == [m.msg_id for m in EXPECTED]
    for actual, expected in zip(got, EXPECTED, strict=True):
        assert actual == expected, actual.msg_id


def test_report_counts_every_drop_reason_and_kind(sample):
    report = ExtractReport()
    list(iter_messages_from_db(sample, key=KEY, report=report))
    assert report.rows == len(history())
    assert report.messages == len(EXPECTED)
    assert report.per_chat_type == {"c2c": 9, "group": 7}
    assert report.dropped == {
        "revoked": 1,
        "gray_tip": 1,
        "system": 1,
        "failed_send": 1,
        "unknown_type": 1,
        "empty": 2,  # an empty row and a reply with nothing of its own
        "undecodable": 2,
    }
    assert report.undecodable_ids == ["155", "156"]
    assert report.per_kind["face"] == 2 and report.per_kind["sticker"] == 2 and report.per_kind["reply"] == 3
    assert report.unknown_element_types == {"99": 1}
    assert report.unresolved_uids == 1
    assert (report.replies_resolved, report.replies_unresolved) == (2, 1)
    assert (report.first_time, report.last_time) == (T0 + 10, T0 + 160)
    assert (report.layout, report.hmac) == ("qq-nt", "HMAC_SHA1")


def test_revoked_gray_tip_system_and_failed_rows_are_not_extracted(sample):
    ids = {m.msg_id for m in iter_messages_from_db(sample, key=KEY)}
    assert ids.isdisjoint({"150", "151", "152", "153", "154", "155", "156", "157", "250"})


def test_chats_option_selects_c2c_or_group(sample):
    assert {m.chat_type for m in iter_messages_from_db(sample, key=KEY, chats=("group",))} == {"group"}
    assert {m.chat_type for m in iter_messages_from_db(sample, key=KEY, chats=("c2c",))} == {"c2c"}


def test_extract_writes_jsonl_records_and_a_json_report(sample, tmp_path):
    out, report_path = tmp_path / "messages.jsonl", tmp_path / "report.json"
    report = extract_messages(sample, out, key=KEY, report=report_path, progress=False)
    assert list(iter_messages(out)) == EXPECTED
    assert json.loads(report_path.read_text()) == report.to_dict()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_jsonl_lines_are_identical_to_the_record_contract():
    fields = (
        "7",
        "group",
        "5",
        "6",
        '名"字\\',
        True,
        12,
        "一\n二\t\u2028 [贴贴] 😀",
        "3",
        ["text", "sticker"],
    )
    assert record_json(fields) == Message(*fields).to_json() + "\n"
    fields = ("7", "c2c", "5", "6", "", False, 12, "x", None, [])
    assert record_json(fields) == Message(*fields).to_json() + "\n"


def test_rows_only_in_the_wal_are_read(tmp_path):
    rows = history()[:2]
    wal_only = [c2c(900, [S.text("还没写回主文件")], t=T0 + 999, seq=99)]
    db = S.write_sample_db(tmp_path / "db", key=KEY, rows=rows, wal_rows=wal_only, uid_map=uid_map())
    report = ExtractReport()
    got = list(iter_messages_from_db(db, key=KEY, report=report))
    assert got[-1].msg_id == "900" and got[-1].text == "还没写回主文件"
    assert report.wal is True
    # Without the -wal file the row is gone: it really lived only in the WAL.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "nt_msg.db").write_bytes(db.read_bytes())
    assert "900" not in {m.msg_id for m in iter_messages_from_db(alone / "nt_msg.db", key=KEY)}


def test_shm_beside_the_source_is_never_copied_or_touched(tmp_path):
    wal_only = [c2c(900, [S.text("WAL 里的")], t=T0 + 999, seq=99)]
    db = S.write_sample_db(tmp_path, key=KEY, rows=history()[:2], wal_rows=wal_only, uid_map=uid_map())
    # A stale wal-index from QQ's process would describe another WAL; SQLite must rebuild its own.
    db.with_name("nt_msg.db-shm").write_bytes(b"\xff" * 32768)
    before = tree_hashes(tmp_path)
    assert [m.msg_id for m in iter_messages_from_db(db, key=KEY)][-1] == "900"
    assert tree_hashes(tmp_path) == before


def test_generated_history_wal_rows_are_read(tmp_path):
    db = S.write_sample_db(tmp_path, key=KEY, messages=200, wal_messages=30, seed=3)
    assert (tmp_path / "nt_msg.db-wal").stat().st_size > 0
    report = ExtractReport()
    list(iter_messages_from_db(db, key=KEY, report=report))
    assert report.rows == 200


def test_decrypted_copy_is_plain_sqlite_with_wal_rows_and_extracts_the_same(sample, tmp_path):
    wal_only = [c2c(900, [S.text("WAL 里的")], t=T0 + 999, seq=99)]
    db = S.write_sample_db(tmp_path / "db", key=KEY, rows=history(), wal_rows=wal_only, uid_map=uid_map())
    before = tree_hashes(db.parent)
    info = decrypt_db(db, KEY, tmp_path / "plain.db")
    assert (info.layout, info.hmac, info.wal) == ("qq-nt", "HMAC_SHA1", True)
    with sqlite3.connect(tmp_path / "plain.db") as conn:  # the standard library opens it: no cipher left
        assert conn.execute('SELECT count(*) FROM c2c_msg_table WHERE "40001" = 900').fetchone() == (1,)
    report = ExtractReport()
    plain = list(iter_messages_from_db(tmp_path / "plain.db", report=report))
    assert report.layout == "sqlite" and report.hmac is None
    assert plain == list(iter_messages_from_db(db, key=KEY))
    assert tree_hashes(db.parent) == before


def test_work_copies_live_in_a_private_directory_removed_afterwards(sample, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    messages = iter_messages_from_db(sample, key=KEY)
    next(messages)  # the database is open now
    (work,) = scratch.iterdir()
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
    assert "nt_msg.db" in os.listdir(work)
    list(messages)
    assert list(scratch.iterdir()) == []


def test_owner_style_is_recognisable_in_the_generated_history(tmp_path):
    db = S.write_sample_db(tmp_path, messages=3000, seed=0)
    own = [m for m in iter_messages_from_db(db, key=S.SAMPLE_KEY) if m.is_self]
    catchphrase = sum(any(p in m.text for p in S.OWNER_CATCHPHRASES) for m in own) / len(own)
    stickers = sum(any(s in m.text for s in S.OWNER_STICKERS) for m in own) / len(own)
    assert 0.4 <= catchphrase <= 0.6
    assert stickers >= 0.25
    assert sum(len(m.text) for m in own) / len(own) < 10  # short replies
    assert all(m.sender == S.OWNER_UIN for m in own)


def test_generated_history_is_deterministic_and_spans_months(tmp_path):
    first = S.write_sample_db(tmp_path / "a", messages=500, seed=7)
    second = S.write_sample_db(tmp_path / "b", messages=500, seed=7)
    other = S.write_sample_db(tmp_path / "c", messages=500, seed=8)
    a = list(iter_messages_from_db(first, key=S.SAMPLE_KEY))
    assert a == list(iter_messages_from_db(second, key=S.SAMPLE_KEY))
    assert a != list(iter_messages_from_db(other, key=S.SAMPLE_KEY))
    assert {m.chat_type for m in a} == {"c2c", "group"}
    assert a[-1].time - a[0].time > 90 * 86400


def test_generated_history_has_every_element_kind_and_drop_reason(tmp_path):
    db = S.write_sample_db(tmp_path, messages=3000, seed=0, malformed=4)
    report = ExtractReport()
    list(iter_messages_from_db(db, key=S.SAMPLE_KEY, report=report))
    assert set(report.per_kind) == set(ELEMENT_KINDS)  # the sample database holds every kind
    for reason in ("revoked", "gray_tip", "system", "failed_send", "undecodable"):
        assert report.dropped[reason] > 0, reason
    assert report.undecodable == 4 and report.unresolved_uids == 0


def test_unknown_fields_in_a_stored_body_are_skipped(tmp_path):
    element = (
        field_varint(45002, 1) + field_bytes(45101, "正文".encode()) + field_bytes(45102, "元数据".encode())
    )
    row = c2c(1, [], t=T0, seq=1, body=field_bytes(40800, element))
    db = S.write_sample_db(tmp_path, key=KEY, rows=[row], uid_map=uid_map())
    (msg,) = iter_messages_from_db(db, key=KEY)
    assert msg.text == "正文"


def test_replies_quoting_messages_older_than_the_recent_window_are_still_resolved(tmp_path, monkeypatch):
    import pipeline.ntqq.extract as extract_module

    monkeypatch.setattr(extract_module, "REPLY_WINDOW", 4)
    rows = [c2c(i, [S.text(f"第{i}条")], t=T0 + i, seq=i) for i in range(1, 21)]
    rows.append(c2c(21, [S.reply(2), S.text("回第二条")], t=T0 + 21, seq=21, reply_seq=2))
    rows.append(c2c(22, [S.reply(3), S.text("只有元素里有 seq")], t=T0 + 22, seq=22))
    rows.append(c2c(23, [S.reply(999), S.text("不存在的")], t=T0 + 23, seq=23, reply_seq=999))
    rows.append(group(24, [S.text("群里第一条")], t=T0 + 24, seq=1, uin=2002, uid=MEMBER_UID))
    rows += [
        group(30 + i, [S.text("刷屏")], t=T0 + 30 + i, seq=2 + i, uin=2002, uid=MEMBER_UID) for i in range(8)
    ]
    rows.append(group(50, [S.reply(1), S.text("回群里第一条")], t=T0 + 50, seq=20, uin=2002, uid=MEMBER_UID,
                      reply_seq=1))  # fmt: skip
    db = S.write_sample_db(tmp_path, key=KEY, rows=rows, uid_map=uid_map())
    replies = {m.msg_id: m.reply_to for m in iter_messages_from_db(db, key=KEY) if "reply" in m.kinds}
    assert replies == {"21": "2", "22": "3", "23": None, "50": "24"}


def test_a_received_row_is_not_dropped_for_its_send_status(tmp_path):
    rows = [
        c2c(1, [S.text("收到的")], t=T0, seq=1, status=0),
        c2c(2, [S.text("我发失败的")], t=T0 + 1, seq=2, self_=True, status=S.STATUS_FAILED),
    ]
    db = S.write_sample_db(tmp_path, key=KEY, rows=rows, uid_map=uid_map())
    report = ExtractReport()
    assert [m.msg_id for m in iter_messages_from_db(db, key=KEY, report=report)] == ["1"]
    assert report.dropped["failed_send"] == 1


def test_generated_sequence_numbers_grow_with_time_in_every_chat():
    rows, _ = S.generate_history(5000, seed=2)
    last: dict[tuple[int, int], tuple[int, int]] = {}
    for row in rows:  # time-ordered
        key = (row.chat_type, row.peer)
        if key in last:
            assert (row.time, row.seq) >= last[key] and row.seq > last[key][1], key
        last[key] = (row.time, row.seq)

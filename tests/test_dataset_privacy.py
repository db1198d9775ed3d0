"""Canaries planted in an encrypted QQ NT database never reach any file of the built dataset."""

from __future__ import annotations

import dataclasses
from collections import Counter

from pipeline.dataset.build import build_dataset
from pipeline.dataset.settings import DatasetSettings
from pipeline.ntqq.extract import extract_messages
from pipeline.ntqq.sampledb import (
    MSG_NORMAL,
    SAMPLE_KEY,
    SEND_RECEIVED,
    at,
    generate_history,
    text,
    write_sample_db,
)

# (the report's kind, what a friend sends, the value that must vanish); the owner then repeats it bare.
CANARIES = [
    ("phone", [text("我新号 13798765432")], "13798765432"),
    ("id_number", [text("身份证 11010519491231002X 帮我填下")], "11010519491231002X"),
    ("bank_card", [text("打到这张卡 6222021234567890128")], "6222021234567890128"),
    ("email", [text("发我邮箱 canary.zhang@example.org")], "canary.zhang@example.org"),
    ("qq", [text("加我小号 QQ号：31415926")], "31415926"),
    ("wechat", [text("我的微信：zhang_san88")], "zhang_san88"),
    # A mention of someone with no known name renders as their number (`chatformat.at_placeholder`).
    ("qq", [at("27182818", "u_canary_mention"), text(" 你看他")], "27182818"),
    ("phone", [text("换号了 １３８００１３８０００")], "１３８００１３８０００"),
]
# Every form a canary may take in an output file: as planted, and full-width digits folded.
FORMS = [value for _, _, value in CANARIES] + ["13800138000"]


def test_planted_canaries_in_a_database_never_reach_the_dataset(tmp_path):
    rows, uid_map = generate_history(600, seed=5)
    plain = [i for i, r in enumerate(rows) if r.msg_type == MSG_NORMAL and r.body is None and r.elements]
    # Plant every canary in a friend's message and in the owner's next message of the same chat.
    planted = 0
    for n, (_, elements, value) in enumerate(CANARIES):
        for i in plain[40 + n * 60 :]:
            row = rows[i]
            if row.send_type != SEND_RECEIVED:
                continue
            answer = next(
                (
                    j
                    for j in plain
                    if j > i and rows[j].peer == row.peer and rows[j].send_type != SEND_RECEIVED
                ),
                None,
            )
            if answer is None:
                continue
            rows[i] = dataclasses.replace(row, elements=elements)
            rows[answer] = dataclasses.replace(rows[answer], elements=[text(f"好 {value}")])
            planted += 1
            break
    assert planted == len(CANARIES)

    write_sample_db(tmp_path / "qq", rows=rows, uid_map=uid_map, key=SAMPLE_KEY)
    messages = tmp_path / "messages.jsonl"
    extract_messages(tmp_path / "qq" / "nt_msg.db", messages, key=SAMPLE_KEY, progress=False)
    extracted = messages.read_text(encoding="utf-8")
    assert all(value in extracted for _, _, value in CANARIES), "canaries must reach the builder"
    assert "@27182818 你看他" in extracted

    for fmt in ("openai", "sharegpt", "alpaca"):
        out = tmp_path / f"dataset-{fmt}"
        settings = DatasetSettings(format=fmt, val_fraction=0.2, no_reply_samples=0.5)
        report = build_dataset(messages, out, settings, progress=False)
        for kind, planted_kind in Counter(kind for kind, _, _ in CANARIES).items():
            assert report.redactions.get(kind, 0) >= 2 * planted_kind, kind
        blobs = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
        for value in FORMS:
            assert value.encode() not in blobs, f"{value} leaked into {fmt}"

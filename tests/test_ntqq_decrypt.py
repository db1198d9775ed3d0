"""Opening every variant: QQ NT header or not, each HMAC, awkward keys, plain SQLite, Android keys."""

from __future__ import annotations

import hashlib

import pytest

from pipeline.errors import InputError
from pipeline.ntqq import sampledb as S
from pipeline.ntqq.decrypt import decrypt_db, detect_layout, open_database, parse_header
from pipeline.ntqq.extract import ExtractReport, iter_messages_from_db
from pipeline.ntqq.keys import android_db_dirname, android_key, android_rand
from tests.ntqq_helpers import T0, c2c, tree_hashes, uid_map

ROWS = [
    c2c(1, [S.text("第一条")], t=T0, seq=1),
    c2c(2, [S.text("好耶"), S.sticker("[贴贴]")], t=T0 + 5, seq=2),
]


@pytest.mark.parametrize("hmac", ["HMAC_SHA1", "HMAC_SHA256", "HMAC_SHA512"])
@pytest.mark.parametrize("header", [True, False], ids=["qq-nt-header", "headerless"])
def test_each_hmac_variant_opens_with_or_without_the_qq_header(tmp_path, hmac, header):
    db = S.write_sample_db(tmp_path, key="k", rows=ROWS, hmac=hmac, header=header, uid_map=uid_map())
    report = ExtractReport()
    texts = [m.text for m in iter_messages_from_db(db, key="k", report=report)]
    assert texts == ["第一条", "好耶[贴贴]"]
    assert report.hmac == hmac
    assert report.layout == ("qq-nt" if header else "sqlcipher")


@pytest.mark.parametrize(
    "key",
    [
        "it's-a-key'",
        'dq"uote key',
        "  spaces around  ",
        "密钥-ключ-🔑",
        "x'41'",
        "--; DROP TABLE c2c_msg_table",
    ],
)
def test_keys_with_quotes_spaces_and_non_ascii_work(tmp_path, key):
    db = S.write_sample_db(tmp_path, key=key, rows=ROWS, uid_map=uid_map())
    assert len(list(iter_messages_from_db(db, key=key))) == 2
    with pytest.raises(InputError, match="wrong key"):
        list(iter_messages_from_db(db, key=key + "x"))


def test_the_hmac_named_in_the_header_is_tried_first_and_can_be_forced(tmp_path):
    db = S.write_sample_db(tmp_path, key="k", rows=ROWS, hmac="HMAC_SHA512", uid_map=uid_map())
    layout, header = detect_layout(db)
    assert layout == "qq-nt" and header.hmac == "HMAC_SHA512"
    with open_database(db, "k", hmac="HMAC_SHA512") as (_, info):
        assert info.hmac == "HMAC_SHA512"
    with pytest.raises(InputError, match="tried HMAC_SHA1"):
        list(iter_messages_from_db(db, key="k", hmac="HMAC_SHA1"))


def test_plain_sqlite_input_is_read_without_a_key(tmp_path):
    db = S.write_sample_db(tmp_path, key=None, rows=ROWS, uid_map=uid_map())
    assert db.read_bytes().startswith(b"SQLite format 3\x00")
    report = ExtractReport()
    assert len(list(iter_messages_from_db(db, report=report))) == 2
    assert (report.layout, report.hmac) == ("sqlite", None)


def test_decrypt_never_changes_the_source_and_refuses_to_overwrite_it(tmp_path):
    db = S.write_sample_db(tmp_path / "src", key="k", rows=ROWS, uid_map=uid_map())
    before = tree_hashes(db.parent)
    decrypt_db(db, "k", tmp_path / "plain.db")
    with pytest.raises(InputError, match="must not be the source"):
        decrypt_db(db, "k", db)
    assert tree_hashes(db.parent) == before


def test_parse_header_reads_hmac_and_rand():
    header = S.make_header("HMAC_SHA256", "a1b2c3d4")
    assert len(header) == 1024
    parsed = parse_header(header)
    assert (parsed.hmac, parsed.rand) == ("HMAC_SHA256", "a1b2c3d4")
    assert parse_header(b"SQLite format 3\x00" + bytes(1008)) is None


def test_android_key_is_md5_of_md5_uid_plus_rand():
    uid, rand = "u_AbCdEfGhIjKlMnOpQrStUv", "3f9c1a7e"
    uid_hash = hashlib.md5(uid.encode()).hexdigest()
    assert android_key(uid, rand) == hashlib.md5((uid_hash + rand).encode()).hexdigest()
    # A fixed vector, so a change in the recipe cannot go unnoticed.
    assert android_key("u_test", "12345678") == "c978a9f2999e4c7112d1b1b32d210c81"
    assert android_key(uid, rand) == android_key(f" {uid} ", rand)
    assert android_key(uid, rand) == android_key(uid, rand).lower() and len(android_key(uid, rand)) == 32
    with pytest.raises(ValueError):
        android_key("", rand)


def test_android_database_opens_with_the_key_derived_from_uid_and_header_rand(tmp_path):
    uid = "u_AndroidOwner0000000001"
    db = S.write_sample_db(tmp_path, rows=ROWS, android_uid=uid, uid_map=uid_map())
    rand = android_rand(db)
    assert rand == S.sample_rand(0)
    assert len(list(iter_messages_from_db(db, key=android_key(uid, rand)))) == 2


def test_android_db_dirname_follows_the_public_recipe():
    uid = "u_AndroidOwner0000000001"
    inner = hashlib.md5(uid.encode()).hexdigest()
    assert android_db_dirname(uid) == "nt_qq_" + hashlib.md5((inner + "nt_kernel").encode()).hexdigest()

"""`twin sample-db / decrypt / extract / android-key` through the real CLI, bad input included."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest

from deploy.cli import main
from pipeline.ntqq import sampledb as S
from pipeline.ntqq.keys import android_key
from tests.ntqq_helpers import sha256, tree_hashes


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    assert main(["sample-db", "-o", str(out), "--messages", "400", "--seed", "1", "--wal", "10"]) == 0
    return out / "nt_msg.db"


def run_error(args: list[str], capsys) -> str:
    """Run a command that must fail on bad input: exit 2 and exactly one line on stderr."""
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("twin: error: ")
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_sample_db_then_extract_then_decrypt(sample, tmp_path, capsys):
    assert sample.with_name("nt_msg.db-wal").exists()
    out, report = tmp_path / "messages.jsonl", tmp_path / "report.json"
    code = main(["extract", str(sample), "--key", S.SAMPLE_KEY, "-o", str(out), "--report", str(report)])
    assert code == 0
    err = capsys.readouterr().err
    assert "QQ NT database" in err and "HMAC_SHA1" in err and "with -wal" in err
    assert S.SAMPLE_KEY not in err  # the key is never echoed back
    summary = json.loads(report.read_text())
    assert summary["rows"] == 400 and summary["messages"] == len(out.read_text().splitlines())
    assert main(["decrypt", str(sample), "--key", S.SAMPLE_KEY, "-o", str(tmp_path / "plain.db")]) == 0
    with sqlite3.connect(tmp_path / "plain.db") as conn:
        rows = conn.execute(
            "SELECT (SELECT count(*) FROM c2c_msg_table) + (SELECT count(*) FROM group_msg_table)"
        )
        assert rows.fetchone() == (400,)
    group_out = tmp_path / "group.jsonl"
    assert main(["extract", str(tmp_path / "plain.db"), "-o", str(group_out), "--chats", "group"]) == 0
    assert {json.loads(line)["chat_type"] for line in group_out.read_text().splitlines()} == {"group"}


def test_sample_db_with_a_key_of_ones_own(tmp_path, capsys):
    key = "my 'own' 密钥"
    assert (
        main(["sample-db", "-o", str(tmp_path), "--messages", "50", "--key", key, "--hmac", "HMAC_SHA256"])
        == 0
    )
    assert key not in capsys.readouterr().err
    out = tmp_path / "m.jsonl"
    assert main(["extract", str(tmp_path / "nt_msg.db"), "--key", key, "-o", str(out), "--no-progress"]) == 0
    assert out.stat().st_size > 0


def test_android_key_command_and_android_options(tmp_path, capsys):
    uid = "u_AndroidOwner0000000001"
    db = S.write_sample_db(tmp_path, messages=60, android_uid=uid)
    capsys.readouterr()
    assert main(["android-key", "--uid", uid, "--db", str(db)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == android_key(uid, S.sample_rand(0))
    assert main(["android-key", "--uid", uid, "--rand", S.sample_rand(0)]) == 0
    assert capsys.readouterr().out.strip() == printed
    out = tmp_path / "m.jsonl"
    assert main(["extract", str(db), "--android-uid", uid, "-o", str(out)]) == 0
    assert out.stat().st_size > 0
    run_error(
        ["extract", str(db), "--android-uid", "u_wrongAccount", "-o", str(tmp_path / "x.jsonl")], capsys
    )
    run_error(
        ["extract", str(db), "--android-uid", uid, "--key", "k", "-o", str(tmp_path / "x.jsonl")], capsys
    )


# ---------------------------------------------------------------- bad input


def _copy_dir(sample: Path, dest: Path) -> Path:
    dest.mkdir()
    for file in sample.parent.glob("nt_msg.db*"):
        (dest / file.name).write_bytes(file.read_bytes())
    return dest / "nt_msg.db"


def make_bad_input(kind: str, sample: Path, tmp_path: Path) -> tuple[Path, list[str], str]:
    """(source, extra args, expected words in the error) for each kind of bad input."""
    key = ["--key", S.SAMPLE_KEY]
    if kind == "wrong-key":
        return _copy_dir(sample, tmp_path / "src"), ["--key", "not-the-key-0000"], "wrong key"
    if kind == "no-key":
        return _copy_dir(sample, tmp_path / "src"), [], "--key"
    if kind == "truncated-mid-page":
        src = tmp_path / "nt_msg.db"
        src.write_bytes(sample.read_bytes()[: 1024 + 4096 * 3 + 1000])
        return src, key, "truncated"
    if kind == "truncated-at-page":
        src = tmp_path / "nt_msg.db"
        src.write_bytes(sample.read_bytes()[: 1024 + 4096 * 2])
        return src, key, "damaged"
    if kind == "header-only":
        src = tmp_path / "nt_msg.db"
        src.write_bytes(sample.read_bytes()[:1024])
        return src, key, "truncated"
    if kind == "random-bytes":
        src = tmp_path / "nt_msg.db"
        src.write_bytes(random.Random(0).randbytes(4096 * 4))
        return src, key, "not a QQ NT database"
    if kind == "sqlite-without-qq-tables":
        src = tmp_path / "other.db"
        with sqlite3.connect(src) as conn:
            conn.execute("CREATE TABLE notes (body TEXT)")
            conn.execute("INSERT INTO notes VALUES ('hello')")
        conn.close()
        return src, [], "QQ NT message tables"
    if kind == "missing-file":
        return tmp_path / "nowhere" / "nt_msg.db", key, "no such file"
    if kind == "directory":
        (tmp_path / "adir").mkdir()
        return tmp_path / "adir", key, "is a directory"
    if kind == "path-through-a-file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "nt_msg.db", key, "not a directory"
    raise AssertionError(kind)


BAD_INPUTS = [
    "wrong-key",
    "no-key",
    "truncated-mid-page",
    "truncated-at-page",
    "header-only",
    "random-bytes",
    "sqlite-without-qq-tables",
    "missing-file",
    "directory",
    "path-through-a-file",
]


@pytest.mark.parametrize("command", ["extract", "decrypt"])
@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_no_output_source_unchanged(sample, tmp_path, capsys, kind, command):
    src, extra, words = make_bad_input(kind, sample, tmp_path)
    before = tree_hashes(src.parent) if src.parent.is_dir() else {}
    out = tmp_path / "out" / ("messages.jsonl" if command == "extract" else "plain.db")
    line = run_error([command, str(src), *extra, "-o", str(out)], capsys)
    assert str(src) in line
    assert words in line
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no temp leftovers either
    if before:
        assert tree_hashes(src.parent) == before


def test_bad_chats_value_and_bad_hmac_are_one_line_errors(sample, tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    line = run_error(["extract", str(sample), "--key", S.SAMPLE_KEY, "-o", str(out), "--chats", "dm"], capsys)
    assert "unknown chat type dm" in line
    line = run_error(["extract", str(sample), "--key", S.SAMPLE_KEY, "-o", str(out), "--hmac", "MD5"], capsys)
    assert "unknown HMAC" in line
    assert not out.exists()


def test_source_bytes_are_unchanged_after_every_command(sample, tmp_path):
    before = tree_hashes(sample.parent)
    main(["extract", str(sample), "--key", S.SAMPLE_KEY, "-o", str(tmp_path / "m.jsonl")])
    main(["decrypt", str(sample), "--key", S.SAMPLE_KEY, "-o", str(tmp_path / "p.db")])
    main(["extract", str(sample), "--key", "wrong", "-o", str(tmp_path / "n.jsonl")])
    assert tree_hashes(sample.parent) == before
    assert sha256(sample) == before["nt_msg.db"]


def test_key_can_come_from_the_environment_instead_of_the_command_line(sample, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TWIN_QQ_KEY", S.SAMPLE_KEY)
    out = tmp_path / "m.jsonl"
    assert main(["extract", str(sample), "-o", str(out)]) == 0
    assert out.stat().st_size > 0
    assert S.SAMPLE_KEY not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["extract", "decrypt"])
def test_unreadable_source_is_one_line_exit_2(sample, tmp_path, capsys, monkeypatch, command):
    # Tests may run as root, where mode 000 does not stop reads: simulate what any other user gets.
    src = _copy_dir(sample, tmp_path / "locked")
    real_open = Path.open

    def open_denied(self, *args, **kwargs):
        if self.parent == src.parent:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_denied)
    out = tmp_path / "out" / "result"
    line = run_error([command, str(src), "--key", S.SAMPLE_KEY, "-o", str(out)], capsys)
    assert str(src) in line and "permission denied" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["extract", "decrypt"])
def test_output_that_would_overwrite_the_source_is_refused(sample, tmp_path, capsys, command):
    src = _copy_dir(sample, tmp_path / "src")
    before = tree_hashes(src.parent)
    for out in (src, src.with_name("nt_msg.db-wal"), tmp_path):
        line = run_error([command, str(src), "--key", S.SAMPLE_KEY, "-o", str(out)], capsys)
        assert str(out) in line
    (tmp_path / "afile").write_text("x")
    line = run_error([command, str(src), "--key", S.SAMPLE_KEY, "-o", str(tmp_path / "afile" / "o")], capsys)
    assert "not a directory" in line
    assert tree_hashes(src.parent) == before

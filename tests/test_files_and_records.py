"""Outputs are private and all-or-nothing; message records round-trip exactly."""

from __future__ import annotations

import stat

import pytest

from pipeline.errors import InputError
from pipeline.files import atomic_dir, atomic_path, private_dir
from pipeline.records import Message, iter_messages, write_messages


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_is_owner_only(tmp_path):
    assert _mode(private_dir(tmp_path / "a" / "b")) == 0o700


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "dataset"
    with atomic_dir(target) as tmp:
        (tmp / "train.jsonl").write_text("x")
    assert (target / "train.jsonl").read_text() == "x"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "train.jsonl").write_text("y")
        raise RuntimeError("boom")
    assert (target / "train.jsonl").read_text() == "x"
    assert _mode(target) == 0o700


def test_messages_round_trip(tmp_path):
    msg = Message(
        "1", "group", "100", "200", "小王", False, 1_700_000_000, "笑死[doge]", "0", ["text", "face"]
    )
    path = tmp_path / "m.jsonl"
    assert write_messages(path, [msg]) == 1
    assert list(iter_messages(path)) == [msg]
    assert _mode(path) == 0o600


def test_malformed_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "m.jsonl"
    good = Message("1", "c2c", "100", "100", "", False, 1, "hi").to_json()
    path.write_text(f"{good}\nnot json\n{good}\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        list(iter_messages(path))
    bad: list[int] = []
    assert len(list(iter_messages(path, skip_bad=True, bad_lines=bad))) == 2
    assert bad == [2]


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list(iter_messages(tmp_path / "nope.jsonl"))

"""Outputs are private and all-or-nothing; message records round-trip exactly."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from pipeline import files
from pipeline.errors import InputError
from pipeline.files import atomic_dir, atomic_path, disk_full_is_input_error, is_disk_full, private_dir
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


def test_atomic_outputs_are_synced_before_their_rename_and_the_directory_after(tmp_path, monkeypatch):
    """Durable, not only atomic: a power cut right after must not leave an empty file in place."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("sync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(f"rename {os.path.basename(dst)}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_path(tmp_path / "out.jsonl") as tmp:
        tmp.write_text("x")
    assert events[0].startswith("sync .out.jsonl.") and events[1:] == [
        "rename out.jsonl",
        f"sync {tmp_path.name}",
    ]

    events.clear()
    with atomic_dir(tmp_path / "dataset") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "train.jsonl").write_text("x")
    assert events[0] == "sync train.jsonl" and events[1] == "sync sub"
    assert events[2].startswith("sync .dataset.") and events[3:] == [
        "rename dataset",
        f"sync {tmp_path.name}",
    ]


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


# The exceptions below are the ones each library really raised on a full 512 KiB tmpfs.
TORCH_SAVE_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_full_disk_is_recognised_however_the_library_reports_it(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert is_disk_full(SafetensorError(SAFETENSORS_FULL), tmp_path)
    assert not is_disk_full(TORCH_SAVE_FULL, tmp_path)  # plenty of room here: something else broke
    monkeypatch.setattr(files, "free_bytes", lambda where: 1024)
    assert is_disk_full(TORCH_SAVE_FULL, tmp_path)
    assert not is_disk_full(RuntimeError("shape mismatch"), tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)


def test_a_full_disk_becomes_one_input_error_naming_the_output(tmp_path):
    guard = disk_full_is_input_error(tmp_path / "out", "nothing was written")
    with pytest.raises(InputError, match="no space left on device; nothing was written") as caught, guard:
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(tmp_path / "out") in str(caught.value)
    guard = disk_full_is_input_error(tmp_path / "out", "nothing was written")
    with pytest.raises(ValueError), guard:  # anything else passes through untouched
        raise ValueError("bug")


def test_write_text_atomic_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "current"
    files.write_text_atomic(target, "v2\n")
    assert target.read_text() == "v2\n" and _mode(target) == 0o600
    kinds = [(kind, path == str(tmp_path)) for kind, path in events]
    assert kinds == [("fsync", False), ("replace", False), ("fsync", True)]
    assert events[1] == ("replace", str(target))
    assert list(tmp_path.iterdir()) == [target]  # no temp file left


def test_private_file_modes_are_written_out_only_in_pipeline_files() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    home = root / "pipeline" / "files.py"
    written = [
        f"{path.relative_to(root)}:{n}"
        for package in ("bot", "deploy", "pipeline", "trainer")
        for path in sorted((root / package).rglob("*.py"))
        if path != home
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\b0o[67]00\b", line)
    ]
    assert written == [], "use PRIVATE_FILE_MODE / PRIVATE_DIR_MODE from pipeline.files"

"""Every switch of `models/current` goes through one guarded, locked, recorded path.

`/twin model X` from chat, `twin models promote/rollback` and a retrain's promotion all call
`pipeline.registry_ops.switch_current` / `rollback_current`: a bad name, a way out of the
registry or a broken GGUF is refused with `current` and the history untouched; a switch is
recorded with who asked, so rollback and prune act on what really served.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import registry as reg_layout
from pipeline.registry import (
    CURRENT_FILE,
    HISTORY_FILE,
    InvalidVersion,
    RegistryError,
    VersionNotFound,
    check_version,
    current_version,
    read_history,
    resolve_model,
    version_names,
)
from pipeline.registry_ops import (
    CurrentMoved,
    NothingToRollBack,
    prune,
    retrain_lock,
    rollback_current,
    switch_current,
    write_status,
)
from tests.gguf_helpers import gguf_bytes, write_gguf

CHAT = "chat:10001"


def _version(root: Path, name: str, gguf: bytes | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "model-Q4_K_M.gguf").write_bytes(gguf if gguf is not None else gguf_bytes())
    (d / "manifest.json").write_text(json.dumps({"version": name, "gguf": {"Q4_K_M": "model-Q4_K_M.gguf"}}))
    return d


@pytest.fixture
def registry(tmp_path) -> Path:
    """v1..v3, v1 promoted from the CLI."""
    reg = tmp_path / "models"
    for name in ("v1", "v2", "v3"):
        _version(reg, name)
    switch_current(reg, "v1", by="cli")
    return reg


def _state(reg: Path) -> tuple[str, str]:
    return (reg / CURRENT_FILE).read_text(), (reg / HISTORY_FILE).read_text()


# ---------------------------------------------------------------- refused: nothing changes


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "v1/../v2",
        ".hidden",
        "..",
        "current",
        "history.json",
        "retrain.lock",
        "",
        "v2/",
        "v2\n",
        "v" * 65,
    ],
)
def test_a_switch_to_anything_but_a_plain_version_name_is_refused_and_changes_nothing(registry, name):
    _version(registry.parent, "x")  # a valid model just outside the registry
    _version(registry, ".hidden")
    before = _state(registry)
    with pytest.raises(InvalidVersion) as refused:
        switch_current(registry, name, by=CHAT)
    assert isinstance(refused.value, ValueError) and str(registry) in str(refused.value)
    assert _state(registry) == before


def test_an_absolute_path_is_refused_even_when_it_names_a_version(registry):
    before = _state(registry)
    with pytest.raises(InvalidVersion, match="not a version name"):
        switch_current(registry, str(registry / "v2"), by=CHAT)
    assert _state(registry) == before


def test_a_link_to_a_version_outside_the_registry_is_refused(registry, tmp_path):
    (registry / "evil").symlink_to(_version(tmp_path / "elsewhere", "v9"))
    before = _state(registry)
    with pytest.raises(InvalidVersion, match="outside the registry"):
        switch_current(registry, "evil", by=CHAT)
    assert _state(registry) == before


def test_a_missing_version_is_refused_as_not_found_listing_what_exists(registry):
    before = _state(registry)
    with pytest.raises(VersionNotFound, match=r"v9: no such model version \(have: v1, v2, v3\)") as refused:
        switch_current(registry, "v9", by=CHAT)
    assert isinstance(refused.value, FileNotFoundError)
    assert _state(registry) == before


GOOD = gguf_bytes(tensors=2)


@pytest.mark.parametrize(
    ("gguf", "cause"),
    [
        (GOOD[:-16], "truncated: .* its tensors need"),
        (GOOD[:60], "truncated: the GGUF header runs past the end"),
        (GOOD[:12], "truncated: 12 bytes, shorter than a GGUF header"),
        (b"PK\x03\x04" + b"\0" * 100, "not a GGUF model file"),
        (gguf_bytes(tensors=0), "holds no tensors"),
        (gguf_bytes(version=1), "unsupported GGUF version 1"),
    ],
    ids=["data-cut", "header-cut", "stub", "zip", "no-tensors", "gguf-v1"],
)
def test_a_version_whose_gguf_is_broken_is_refused_and_changes_nothing(registry, gguf, cause):
    _version(registry, "v4", gguf)
    before = _state(registry)
    with pytest.raises(InvalidVersion, match=cause):
        switch_current(registry, "v4", by=CHAT)
    assert _state(registry) == before
    assert resolve_model(registry).version == "v1"


def test_a_manifest_cannot_point_the_switch_at_a_file_outside_the_version(registry):
    write_gguf(registry.parent / "outside.gguf")
    d = registry / "v4"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"gguf": {"Q4_K_M": "../../outside.gguf"}}))
    with pytest.raises(InvalidVersion, match=r"no \.gguf model file"):
        switch_current(registry, "v4", by=CHAT)
    assert current_version(registry) == "v1"


def test_a_corrupt_history_refuses_the_switch_and_keeps_current(registry):
    (registry / HISTORY_FILE).write_text("[{not json")
    with pytest.raises(ValueError, match=r"history\.json: corrupt promotion history"):
        switch_current(registry, "v2", by=CHAT)
    assert current_version(registry) == "v1"


def test_a_hand_edited_current_that_leaves_the_registry_is_not_served(registry, tmp_path):
    _version(tmp_path, "x")
    (registry / CURRENT_FILE).write_text("../x\n")
    with pytest.raises(FileNotFoundError, match="current: names no usable version"):
        resolve_model(registry)


# ---------------------------------------------------------------- a switch is recorded


def test_a_chat_switch_serves_the_version_and_records_who_asked(registry):
    assert switch_current(registry, "v2", by=CHAT, reason="/twin model") == "v2"
    assert current_version(registry) == "v2"
    last = read_history(registry)[-1]
    assert (last.action, last.version, last.previous, last.by, last.reason) == (
        "promote",
        "v2",
        "v1",
        CHAT,
        "/twin model",
    )


def test_switching_to_the_serving_version_records_nothing(registry):
    before = _state(registry)
    assert switch_current(registry, "v1", by=CHAT) == "v1"
    assert _state(registry) == before


def test_check_version_tells_the_bot_what_it_would_load_before_switching(registry):
    resolved = check_version(registry, "v2")
    assert resolved.gguf == registry / "v2" / "model-Q4_K_M.gguf" and resolved.version == "v2"
    assert current_version(registry) == "v1"


def test_rollback_after_a_chat_switch_returns_to_what_served_before(registry):
    switch_current(registry, "v3", by="cli")
    switch_current(registry, "v2", by=CHAT)
    assert rollback_current(registry, by="cli") == "v3"
    assert rollback_current(registry, by="cli") == "v1"
    with pytest.raises(NothingToRollBack, match="no earlier promoted version"):
        rollback_current(registry, by="cli")
    assert [(e.action, e.version, e.by) for e in read_history(registry)][-2:] == [
        ("rollback", "v3", "cli"),
        ("rollback", "v1", "cli"),
    ]


def test_a_current_written_before_switches_were_recorded_can_still_be_rolled_back_to(tmp_path):
    reg = tmp_path / "models"
    for name in ("v1", "v2"):
        _version(reg, name)
    (reg / CURRENT_FILE).write_text("v1\n")  # an older registry: no history yet
    switch_current(reg, "v2", by="retrain")
    assert rollback_current(reg, by="cli") == "v1"


def test_a_switch_that_expects_another_serving_version_is_refused(registry):
    before = _state(registry)
    with pytest.raises(CurrentMoved, match="names v1, not v2"):
        switch_current(registry, "v3", by="retrain", expect_current="v2")
    assert _state(registry) == before
    assert switch_current(registry, "v3", by="retrain", expect_current="v1") == "v3"


def _switch_many(registry: str, names: list[str], by: str, start) -> None:
    start.wait(10)
    for name in names:
        switch_current(Path(registry), name, by=by)


def test_concurrent_switches_from_two_processes_leave_a_consistent_history(registry):
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Event()
    workers = [
        spawn.Process(target=_switch_many, args=(str(registry), ["v2", "v1"] * 15, "cli", start)),
        spawn.Process(target=_switch_many, args=(str(registry), ["v3", "v2"] * 15, CHAT, start)),
    ]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    entries = read_history(registry)
    assert len(entries) > 15
    # Each switch starts from what the one before it left serving: no lost or interleaved update.
    for before, after in itertools.pairwise(entries):
        assert after.previous == before.version != after.version
    assert entries[-1].version == current_version(registry)


# ---------------------------------------------------------------- prune keeps what rollback needs


def test_prune_keeps_the_serving_version_and_the_rollback_targets_however_old(registry):
    for name in ("v4", "v5"):
        _version(registry, name)  # registered, never promoted
    switch_current(registry, "v2", by="cli")
    switch_current(registry, "v3", by=CHAT)  # stack v1 v2 v3: rollback goes to v2, then v1
    assert prune(registry, keep=3) == []
    assert version_names(registry) == ["v1", "v2", "v3", "v4", "v5"]
    assert rollback_current(registry, by="cli") == "v2"
    assert rollback_current(registry, by="cli") == "v1"


def test_prune_keeps_the_rollback_target_after_a_chat_switch_to_an_old_version(registry):
    for name in ("v4", "v5"):
        _version(registry, name)
    for name in ("v2", "v3", "v4", "v5"):
        switch_current(registry, name, by="retrain")
    switch_current(registry, "v1", by=CHAT)  # serving the oldest; rollback returns to v5
    assert prune(registry, keep=1) == ["v2", "v3", "v4"]
    assert version_names(registry) == ["v1", "v5"]
    assert rollback_current(registry, by="cli") == "v5"


def test_rollback_targets_beyond_keep_are_pruned_and_rollback_stops_at_what_is_left(registry):
    for name in ("v4", "v5"):
        _version(registry, name)
    for name in ("v2", "v3", "v4", "v5"):
        switch_current(registry, name, by="retrain")
    assert prune(registry, keep=2) == ["v1", "v2", "v3"]
    assert rollback_current(registry, by="cli") == "v4"
    with pytest.raises(NothingToRollBack):
        rollback_current(registry, by="cli")


def test_prune_never_deletes_a_version_a_running_retrain_just_registered(registry):
    switch_current(registry, "v2", by="cli")
    _version(registry, "v4")  # v3 and v4: newer than the serving one, never promoted
    with retrain_lock(registry):
        assert prune(registry, keep=1) == []
    assert prune(registry, keep=1) == ["v3"]  # once no cycle runs it is an ordinary old version
    assert version_names(registry) == ["v1", "v2", "v4"]


# ---------------------------------------------------------------- durable writes


def _record_fsyncs(monkeypatch) -> list[tuple[str, ...]]:
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _written_durably(events: list[tuple[str, ...]], final: Path) -> bool:
    """fsync(temp file) → rename(temp, final) → fsync(its directory), in this order."""
    for i, event in enumerate(events):
        if event[0] == "replace" and event[2] == str(final):
            synced_file = ("fsync", event[1]) in events[:i]
            return synced_file and ("fsync", str(final.parent)) in events[i + 1 :]
    return False


def test_current_and_the_history_are_fsynced_file_then_directory(registry, monkeypatch):
    events = _record_fsyncs(monkeypatch)
    switch_current(registry, "v2", by=CHAT)
    assert _written_durably(events, registry / CURRENT_FILE)
    assert _written_durably(events, registry / HISTORY_FILE)


def test_the_retrain_status_file_is_fsynced_file_then_directory(registry, monkeypatch):
    events = _record_fsyncs(monkeypatch)
    write_status(registry, {"state": "running"})
    assert _written_durably(events, registry / reg_layout.STATUS_FILE)
    assert reg_layout.read_status(registry) == {"state": "running"}


# ---------------------------------------------------------------- reading side


def test_versions_are_listed_in_one_numeric_order(tmp_path):
    for name in ("v10", "v2", "v1", "beta"):
        (tmp_path / name).mkdir()
    (tmp_path / ".v3.deleting").mkdir()
    (tmp_path / CURRENT_FILE).write_text("v2\n")
    assert version_names(tmp_path) == ["v1", "v2", "v10", "beta"]


def test_the_registry_module_the_bot_imports_needs_only_the_standard_library():
    probe = (
        "import sys; before = set(sys.modules); import pipeline.registry; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - sys.stdlib_module_names))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "['pipeline']"


def test_a_registry_error_is_one_line_naming_the_path(registry):
    with pytest.raises(RegistryError) as refused:
        switch_current(registry, "v1/../v2", by=CHAT)
    assert "\n" not in str(refused.value) and str(refused.value).startswith(f"{registry}: ")


def test_the_registry_switch_the_bot_imports_needs_only_the_standard_library():
    probe = (
        "import sys; before = set(sys.modules); import pipeline.registry_ops; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - sys.stdlib_module_names))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "['pipeline']"

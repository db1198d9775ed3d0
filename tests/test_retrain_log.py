"""What a retrain cycle leaves for the console: the bounded loss history, the cycle log, the next window."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from deploy.retrain import MAX_LOSS_POINTS, StatusFile, add_loss_point, run_cycle, run_training_child
from pipeline.registry import (
    CYCLES_FILE,
    MAX_CYCLES,
    InvalidVersion,
    next_window_start,
    read_cycles,
    read_status,
)
from pipeline.registry_ops import append_cycle, write_status
from tests.test_retrain import _conversations, _fill_store, _registry, _settings


def test_the_loss_history_keeps_its_ends_in_order_within_the_cap():
    losses: list[list[float]] = []
    for step in range(1, 1001):
        add_loss_point(losses, step, 1000.0 / step)
        assert len(losses) <= MAX_LOSS_POINTS
    steps = [step for step, _ in losses]
    assert steps[0] == 1 and steps[-1] == 1000 and steps == sorted(set(steps))
    assert len(losses) > MAX_LOSS_POINTS // 2  # halved when full, never emptied


def test_a_repeated_step_replaces_its_loss_instead_of_adding_a_point():
    losses: list[list[float]] = []
    add_loss_point(losses, 5, 2.0)
    add_loss_point(losses, 5, 1.5)
    assert losses == [[5, 1.5]]


def test_a_small_cap_drops_every_other_point_when_full():
    losses: list[list[float]] = []
    for step in range(1, 6):
        add_loss_point(losses, step, float(step), cap=4)
    assert [s for s, _ in losses] == [1, 3, 4, 5]


def test_the_cycle_log_reads_newest_first_and_skips_malformed_lines(tmp_path):
    reg = _registry(tmp_path)
    append_cycle(reg, {"state": "skipped", "started": "2026-01-01T00:00:00+00:00", "new_samples": 3})
    with (reg / CYCLES_FILE).open("a", encoding="utf-8") as log:
        log.write('not json\n[1, 2]\n{"state": 7}\n\n')
        log.write(json.dumps({"state": "promoted", "version": "v0002", "loss": "low", "eval": []}) + "\n")
    cycles = read_cycles(reg)
    assert [c["state"] for c in cycles] == ["promoted", "skipped"]
    assert cycles[0]["loss"] is None and cycles[0]["eval"] == {}  # wrong types are dropped, not shown
    assert cycles[1]["new_samples"] == 3
    append_cycle(reg, {"state": "failed", "reason": "x"})
    lines = (reg / CYCLES_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3  # the malformed lines are not carried on by the next write
    assert (reg / CYCLES_FILE).stat().st_mode & 0o777 == 0o600


def test_the_cycle_log_keeps_the_newest_entries(tmp_path):
    reg = _registry(tmp_path)
    for number in range(MAX_CYCLES + 5):
        append_cycle(reg, {"state": "skipped", "new_samples": number})
    cycles = read_cycles(reg)
    assert len(cycles) == MAX_CYCLES
    assert cycles[0]["new_samples"] == MAX_CYCLES + 4 and cycles[-1]["new_samples"] == 5
    assert read_cycles(reg, limit=2) == cycles[:2]


def test_no_cycle_log_reads_as_no_cycles(tmp_path):
    assert read_cycles(tmp_path) == []


def test_every_finished_cycle_is_logged_skipped_and_failed_alike(tmp_path):
    reg = _registry(tmp_path)
    db = tmp_path / "bot.db"
    asyncio.run(_fill_store(db, _conversations(1)))
    run_cycle(_settings(tmp_path, reg, db))
    (tmp_path / "broken.db").write_bytes(b"not a database" * 100)
    run_cycle(_settings(tmp_path, reg, tmp_path / "broken.db"))
    failed, skipped = read_cycles(reg)
    assert failed["state"] == "failed" and "cannot read the conversation store" in failed["reason"]
    assert skipped["state"] == "skipped" and skipped["new_samples"] == 1
    assert "fewer than the minimum" in skipped["reason"] and skipped["finished"] and skipped["started"]
    assert skipped["stage"] == "build" and skipped["serving"] == "v0001"


def test_a_cycle_that_died_unrecorded_is_logged_as_interrupted_by_the_next(tmp_path):
    reg = _registry(tmp_path)
    write_status(
        reg, {"state": "running", "stage": "train", "started": "2026-01-01T00:00:00+00:00", "loss": 1.25}
    )
    StatusFile(reg, "v0001")
    (entry,) = read_cycles(reg)
    assert entry["state"] == "interrupted" and entry["stage"] == "train" and entry["loss"] == 1.25
    assert read_status(reg)["state"] == "running" and read_status(reg)["losses"] == []


def _set_window(reg, window):
    manifest_path = reg / "v0001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["data_window"] = window
    manifest_path.write_text(json.dumps(manifest))


def test_the_next_window_starts_after_the_serving_versions_window(tmp_path):
    assert next_window_start(tmp_path / "nothing-serves") == 0
    reg = _registry(tmp_path)
    assert next_window_start(reg) == 0  # a first export: every message is new
    _set_window(reg, {"since": 0, "until": 1_700_000_000})
    assert next_window_start(reg) == 1_700_000_001 == next_window_start(reg, "v0001")
    _set_window(reg, {"until": "soon"})
    with pytest.raises(InvalidVersion, match=r"data_window\.until"):
        next_window_start(reg)


# Stands in for the training child: reports two steps a while apart, as the real one at most once a second.
FAKE_TRAINER = """
import json, os, sys, time
progress = sys.argv[1]
for step, loss in ((1, 2.5), (2, 2.25)):
    with open(progress + ".tmp", "w") as out:
        json.dump({"progress": step / 4, "step": step, "steps": 4, "loss": loss}, out)
    os.replace(progress + ".tmp", progress)
    time.sleep(1.6)
"""


def test_training_progress_is_copied_into_the_status_with_its_loss_history(tmp_path, monkeypatch):
    real_popen = subprocess.Popen

    def fake_child(cmd, **kwargs):
        return real_popen([sys.executable, "-c", FAKE_TRAINER, cmd[5]], **kwargs)

    monkeypatch.setattr("deploy.retrain.subprocess.Popen", fake_child)
    reg = _registry(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    status = StatusFile(reg, "v0001")
    run_training_child({"output_dir": str(tmp_path / "run")}, work, status, nice=0, threads=1)
    written = read_status(reg)
    assert written["losses"] == [[1, 2.5], [2, 2.25]] and written["step"] == 2 and written["loss"] == 2.25

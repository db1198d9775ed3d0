"""The retrain cycle's decisions: the quality gate, the held-out split, replay, collection, refusals."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import main as twin
from deploy.retrain import (
    THREAD_ENV,
    EvalNumbers,
    StatusFile,
    collect_messages,
    gate,
    replay_share,
    retrain_threads,
    run_cycle,
    run_training_child,
    split_heldout,
    style_distance,
    training_threads,
)
from pipeline.registry import current_version, read_status
from pipeline.registry_ops import promote, register, retrain_lock
from tests.gguf_helpers import write_gguf

OWNER = "10000"
FRIEND = "20001"
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the gate (pure)


def test_the_gate_passes_a_candidate_that_is_no_worse_beyond_tolerance():
    decision = gate(
        EvalNumbers(10.1, 0.22), EvalNumbers(10.0, 0.20), ppl_tolerance=0.02, style_tolerance=0.05
    )
    assert decision.passed
    assert "within tolerance" in decision.reason


def test_the_gate_rejects_worse_perplexity_and_says_why():
    decision = gate(
        EvalNumbers(10.5, 0.20), EvalNumbers(10.0, 0.20), ppl_tolerance=0.02, style_tolerance=0.05
    )
    assert not decision.passed
    assert "perplexity worse" in decision.reason and "10.500" in decision.reason


def test_the_gate_rejects_worse_style_distance_and_says_why():
    decision = gate(EvalNumbers(9.0, 0.40), EvalNumbers(10.0, 0.20), ppl_tolerance=0.02, style_tolerance=0.05)
    assert not decision.passed
    assert "style distance worse" in decision.reason


def test_the_gate_rejects_a_diverged_candidate():
    assert not gate(
        EvalNumbers(math.nan, 0.1), EvalNumbers(10.0, 0.2), ppl_tolerance=1, style_tolerance=1
    ).passed
    assert not gate(
        EvalNumbers(math.inf, 0.1), EvalNumbers(10.0, 0.2), ppl_tolerance=1, style_tolerance=1
    ).passed


def test_style_distance_adds_the_relative_length_gap_and_the_rate_gaps():
    style = {
        "length_distance": 2.0,
        "reference_mean_length": 8.0,
        "face_sticker_rate": 0.1,
        "reference_face_sticker_rate": 0.3,
        "no_reply_rate": 0.0,
        "reference_no_reply_rate": 0.1,
        "catchphrase_rate": 0.5,
        "reference_catchphrase_rate": 0.5,
    }
    assert style_distance(style) == pytest.approx(0.25 + 0.2 + 0.1)
    same = {**style, "length_distance": 0.0, "face_sticker_rate": 0.3, "no_reply_rate": 0.1}
    assert style_distance(same) == 0.0


# ---------------------------------------------------------------- data shares (pure)


def test_the_newest_samples_are_held_out():
    train, heldout = split_heldout(list(range(20)), 0.1)
    assert heldout == [18, 19] and train == list(range(18))


def test_one_sample_is_never_held_out_and_two_keep_one_for_training():
    assert split_heldout([1], 0.5) == ([1], [])
    assert split_heldout([1, 2], 0.9) == ([1], [2])


def test_replay_draws_a_reproducible_share_of_the_original_data():
    original = [{"i": i} for i in range(100)]
    first = replay_share(original, 10, 2.0, seed=7)
    assert len(first) == 20 and first == replay_share(original, 10, 2.0, seed=7)
    assert len({row["i"] for row in first}) == 20  # without replacement
    assert len(replay_share(original, 500, 1.0, seed=7)) == 100  # capped at what exists
    assert replay_share(original, 10, 0.0, seed=7) == []


# ---------------------------------------------------------------- with a store and a registry


async def _fill_store(path, rows, key=""):
    from bot.store import Store, StoredMessage

    store = await Store.open(path, key)
    try:
        for chat, sender, origin, t, text, approved in rows:
            await store.add(
                StoredMessage(
                    chat_type="c2c",
                    chat=chat,
                    sender=sender,
                    origin=origin,
                    text=text,
                    time=t,
                    approved=approved,
                )
            )
    finally:
        await store.close()


def _conversations(n, start=1_700_000_000, twin_replies=False):
    """n short private chats: a friend asks, the owner answers (or the twin does)."""
    rows = []
    for i in range(n):
        t = start + i * 10_000  # far apart: each is its own session
        chat = str(30000 + i % 3)
        rows.append((chat, chat, "incoming", t, f"在吗 {i}", False))
        origin = "twin" if twin_replies else "owner"
        rows.append((chat, OWNER, origin, t + 5, f"在的 第{i}次", False))
    return rows


def _registry(tmp_path):
    export = tmp_path / "export"
    (export / "adapter").mkdir(parents=True)
    write_gguf(export / "model-Q8_0.gguf")
    (export / "manifest.json").write_text(json.dumps({"base": "tiny"}))
    reg = tmp_path / "models"
    promote(reg, register(reg, export).name)
    return reg


def _settings(tmp_path, reg, db, **extra):
    from bot.config import Config

    return Config(twin_model=str(reg), twin_db=db, **{f"twin_{name}": value for name, value in extra.items()})


def test_collection_takes_the_owners_words_and_only_approved_twin_replies(tmp_path):
    db = tmp_path / "bot.db"
    rows = [
        (FRIEND, FRIEND, "incoming", 100, "hi", False),
        (FRIEND, OWNER, "owner", 101, "typed by the owner", False),
        (FRIEND, OWNER, "twin", 102, "generated, unreviewed", False),
        (FRIEND, OWNER, "twin", 103, "generated, approved", True),
    ]
    asyncio.run(_fill_store(db, rows))
    settings = _settings(tmp_path, tmp_path / "models", db)
    texts = [(m.text, m.is_self) for m in collect_messages(settings, 0)]
    assert texts == [("hi", False), ("typed by the owner", True), ("generated, approved", True)]
    strict = _settings(tmp_path, tmp_path / "models", db, retrain_include_approved=False)
    assert [m.text for m in collect_messages(strict, 0)] == ["hi", "typed by the owner"]
    assert [m.text for m in collect_messages(settings, 102)] == ["generated, approved"]


def test_too_few_new_samples_skips_the_cycle_and_says_so(tmp_path, monkeypatch, capsys):
    reg = _registry(tmp_path)
    db = tmp_path / "bot.db"
    asyncio.run(
        _fill_store(db, _conversations(3) + _conversations(10, start=1_710_000_000, twin_replies=True))
    )
    monkeypatch.setenv("TWIN_MODEL", str(reg))
    monkeypatch.setenv("TWIN_DB", str(db))
    monkeypatch.setenv("TWIN_RETRAIN_MIN_SAMPLES", "5")
    monkeypatch.setenv("TWIN_RETRAIN_NICE", "0")  # in-process here: leave pytest's priority alone
    assert twin(["retrain", "--now"]) == 0
    out = capsys.readouterr().out
    assert "not retraining: 3 new samples" in out and "fewer than the minimum 5" in out
    status = read_status(reg)
    assert status["state"] == "skipped" and status["new_samples"] == 3
    assert "TWIN_RETRAIN_MIN_SAMPLES" in status["reason"]
    assert current_version(reg) == "v0001"


def test_a_second_trigger_is_refused_while_a_cycle_runs(tmp_path, monkeypatch, capsys):
    reg = _registry(tmp_path)
    db = tmp_path / "bot.db"
    asyncio.run(_fill_store(db, _conversations(3)))
    monkeypatch.setenv("TWIN_MODEL", str(reg))
    monkeypatch.setenv("TWIN_DB", str(db))
    monkeypatch.setenv("TWIN_RETRAIN_NICE", "0")
    with retrain_lock(reg):
        assert twin(["retrain", "--now"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a retrain cycle is already running" in err[0]
    assert read_status(reg) == {}  # the running cycle's status is not touched


def test_an_unreadable_store_fails_the_cycle_and_keeps_serving(tmp_path):
    reg = _registry(tmp_path)
    db = tmp_path / "bot.db"
    db.write_bytes(b"this is not a database" * 100)
    result = run_cycle(_settings(tmp_path, reg, db))
    assert result.state == "failed" and "cannot read the conversation store" in result.reason
    assert read_status(reg)["state"] == "failed"
    assert current_version(reg) == "v0001"


def test_nothing_serving_is_a_clear_failure(tmp_path):
    result = run_cycle(_settings(tmp_path, tmp_path / "models", tmp_path / "bot.db"))
    assert result.state == "failed" and "nothing is serving yet" in result.reason


@pytest.mark.parametrize("state", ["skipped"])
def test_the_last_result_is_kept_while_the_next_cycle_runs(tmp_path, state):
    reg = _registry(tmp_path)
    db = tmp_path / "bot.db"
    asyncio.run(_fill_store(db, _conversations(1)))
    run_cycle(_settings(tmp_path, reg, db))
    run_cycle(_settings(tmp_path, reg, db))
    status = read_status(reg)
    assert status["last"]["state"] == state and "fewer than the minimum" in status["last"]["reason"]


def test_twin_retrain_without_now_reports_the_last_cycle_and_the_schedule(tmp_path, monkeypatch, capsys):
    reg = _registry(tmp_path)
    db = tmp_path / "bot.db"
    asyncio.run(_fill_store(db, _conversations(1)))
    monkeypatch.setenv("TWIN_RETRAIN_CRON", "30 3 * * *")
    assert twin(["retrain", "--registry", str(reg)]) == 0
    out = capsys.readouterr().out
    assert "serving v0001" in out and "30 3 * * *" in out and "no retrain cycle has run yet" in out
    run_cycle(_settings(tmp_path, reg, db))
    assert twin(["retrain", "--registry", str(reg)]) == 0
    out = capsys.readouterr().out
    assert "last cycle: skipped" in out and "fewer than the minimum" in out


def test_a_cycle_that_died_without_an_end_shows_as_interrupted(tmp_path, capsys):
    from pipeline.registry_ops import write_status

    reg = _registry(tmp_path)
    write_status(reg, {"state": "running", "stage": "train", "started": "2026-01-01T00:00:00+00:00"})
    assert twin(["retrain", "--registry", str(reg)]) == 0
    assert "last cycle: interrupted (stage train" in capsys.readouterr().out


def test_a_missing_original_dataset_fails_the_cycle_with_its_path(tmp_path):
    reg = _registry(tmp_path)
    db = tmp_path / "bot.db"
    asyncio.run(_fill_store(db, _conversations(3)))
    result = run_cycle(_settings(tmp_path, reg, db, retrain_dataset=tmp_path / "nowhere"))
    assert result.state == "failed" and "nowhere: no such dataset directory" in result.reason
    assert current_version(reg) == "v0001"


def test_replay_needs_the_original_dataset_in_the_messages_format(tmp_path):
    from pipeline.dataset.build import build_dataset
    from pipeline.dataset.settings import DatasetSettings
    from pipeline.records import Message

    history = [
        Message(
            f"m{i}", "c2c", "1", OWNER if i % 2 else "1", "", bool(i % 2), 1_700_000_000 + i * 30, f"话{i}"
        )
        for i in range(12)
    ]
    original = tmp_path / "dataset"
    build_dataset(history, original, DatasetSettings(format="sharegpt"), progress=False)
    reg = _registry(tmp_path)
    db = tmp_path / "bot.db"
    asyncio.run(_fill_store(db, _conversations(3)))
    result = run_cycle(_settings(tmp_path, reg, db, retrain_dataset=original, retrain_min_samples=2))
    assert result.state == "failed"
    assert "train.jsonl: line 1: not an OpenAI `messages` sample" in result.reason
    assert read_status(reg)["stage"] == "build" and current_version(reg) == "v0001"


def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TWIN_RETRAIN_MIN_SAMPLES", "many")
    assert twin(["retrain", "--registry", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TWIN_RETRAIN_MIN_SAMPLES" in err[0]


def test_a_running_status_whose_cycle_is_gone_reads_interrupted_in_twin_status_and_the_cli(tmp_path, capsys):
    import subprocess
    import sys

    from bot.config import Config
    from bot.runtime import Twin
    from pipeline.registry_ops import write_status
    from tests.bot_helpers import ScriptedBackend

    reg = _registry(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names no process now, and it held no lock
    write_status(
        reg,
        {
            "state": "running",
            "stage": "train",
            "progress": 0.4,
            "started": "2026-01-01T00:00:00+00:00",
            "pid": gone.pid,
        },
    )

    assert twin(["retrain", "--registry", str(reg)]) == 0
    (cli_line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("last cycle: ")]

    async def bot_line() -> str:
        config = Config(
            twin_db=tmp_path / "bot.db", twin_model=str(reg), twin_model_poll=3600, twin_retrain_cron=""
        )
        bot = Twin(config, nicknames=["小明"], backend=ScriptedBackend())
        await bot.start()
        try:
            status = await bot.status_text()
        finally:
            await bot.close()
        (line,) = [line for line in status.splitlines() if line.startswith("last retrain: ")]
        return line

    shown = asyncio.run(bot_line()).removeprefix("last retrain: ")
    assert shown == cli_line.removeprefix("last cycle: ")
    assert shown.startswith("interrupted (stage train, started 2026-01-01 00:00")
    assert read_status(reg)["state"] == "running"  # shown, never written


# ---------------------------------------------------------------- training beside the serving bot


def test_training_takes_the_cores_the_bot_leaves_and_never_none():
    assert training_threads(0, serving_threads=1, cores=2) == 1
    assert training_threads(0, serving_threads=2, cores=16) == 14
    assert training_threads(0, serving_threads=4, cores=2) == 1  # an oversubscribed bot still trains
    assert training_threads(3, serving_threads=1, cores=2) == 3  # an explicit TWIN_RETRAIN_THREADS stands


def test_the_thread_bound_reads_both_settings_and_this_machines_cores(tmp_path, monkeypatch):
    monkeypatch.setattr("deploy.retrain.available_cores", lambda: 8)
    db = tmp_path / "bot.db"
    assert retrain_threads(_settings(tmp_path, tmp_path / "models", db, n_threads=2)) == 6
    explicit = _settings(tmp_path, tmp_path / "models", db, n_threads=2, retrain_threads=3)
    assert retrain_threads(explicit) == 3


# Stands in for the trainer inside the real child entry (`python -m deploy.retrain train-child`):
# starts torch's thread pool, then reports what every thread of the process runs at.
TRAINER_PROBE = """
import json, os, sys, types
from pathlib import Path

def probe(settings, progress, on_step):
    import torch

    from deploy.retrain import THREAD_ENV

    torch.ones(1024, 1024) @ torch.ones(1024, 1024)
    report = {
        "threads_setting": settings.threads,
        "torch_threads": torch.get_num_threads(),
        "env": {name: os.environ.get(name) for name in THREAD_ENV},
        "niceness": [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")],
    }
    Path(sys.argv[1]).with_name("probe.json").write_text(json.dumps(report))

# Not by importing trainer.train: that would import torch (and start a thread) before the child
# lowers its priority, which the real child never does.
sys.modules["trainer.train"] = types.SimpleNamespace(train=probe)
from deploy.retrain import main

sys.exit(main(["train-child", *sys.argv[1:]]))
"""


def test_the_training_child_runs_niced_on_the_bounded_threads_every_thread_of_it(tmp_path, monkeypatch):
    real_popen = subprocess.Popen
    launched: list[list[str]] = []

    def child_with_probe(cmd, **kwargs):
        launched.append(cmd)
        return real_popen([cmd[0], "-c", TRAINER_PROBE, *cmd[4:]], cwd=REPO, **kwargs)

    monkeypatch.setattr("deploy.retrain.subprocess.Popen", child_with_probe)
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # inherited from the bot's environment: overridden
    work = tmp_path / "work"
    work.mkdir()
    status = StatusFile(_registry(tmp_path), "v0001")
    settings = {"base_model": "tiny", "data": str(tmp_path), "output_dir": str(tmp_path / "run")}

    run_training_child(settings, work, status, nice=7, threads=2)

    (cmd,) = launched
    assert cmd[1:4] == ["-m", "deploy.retrain", "train-child"] and cmd[-1] == "7"
    probe = json.loads((work / "probe.json").read_text())
    assert probe["threads_setting"] == 2 and probe["torch_threads"] == 2
    assert probe["env"] == dict.fromkeys(THREAD_ENV, "2")
    assert len(probe["niceness"]) > 1  # torch's pool threads, not only the main thread
    assert set(probe["niceness"]) == {max(7, os.nice(0))}


def test_idle_priority_moves_the_retrain_and_the_threads_it_starts_to_sched_idle():
    """SCHED_IDLE: the retrain (and its training child, which inherits it) runs only on CPU
    time the bot does not want, so a reply never waits behind a training step."""
    probe = (
        "import os, threading\n"
        "from deploy.retrain import lower_priority\n"
        "lower_priority(10, idle=True)\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))\n"
        "t.start(); t.join()\n"
        "import subprocess, sys\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(os.sched_getscheduler(0))'],"
        " capture_output=True, text=True).stdout.strip()\n"
        "print(os.sched_getscheduler(0) == os.SCHED_IDLE, seen[0] == os.SCHED_IDLE,"
        " int(child) == os.SCHED_IDLE, os.nice(0))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True", "10"]


def test_a_cycles_samples_know_the_history_before_its_window_as_the_bot_does(tmp_path, monkeypatch):
    """Memory and examples are built from everything said before the window (the imported history
    and the store's older rows), not from the window alone; that history makes no samples."""
    import deploy.retrain as retrain
    from pipeline.dataset.build import build_dataset
    from pipeline.dataset.settings import DatasetSettings
    from pipeline.records import Message, write_messages

    day, t0 = 86_400, 1_700_000_000
    imported = [
        Message("i1", "c2c", FRIEND, FRIEND, "", False, t0, "周末去爬山吗"),
        Message("i2", "c2c", FRIEND, OWNER, "", True, t0 + 30, "好啊去香山"),
    ]
    write_messages(tmp_path / "messages.jsonl", imported)
    original = tmp_path / "dataset"
    settings = DatasetSettings(format="openai", examples=2, memory=True, persona="阿明")
    build_dataset(imported, original, settings, progress=False)
    reg = _registry(tmp_path)
    manifest = reg / "v0001" / "manifest.json"
    before_window = t0 + 2 * day
    manifest.write_text(json.dumps({"base": "tiny", "data_window": {"until": before_window}}))
    db = tmp_path / "bot.db"
    rows = [
        (FRIEND, FRIEND, "incoming", t0 + day, "我下个月5号生日", False),  # in the store, before the window
        (FRIEND, OWNER, "owner", t0 + day + 20, "记住啦", False),
        (FRIEND, FRIEND, "incoming", t0 + 3 * day, "周末去爬山吗", False),  # the window
        (FRIEND, OWNER, "owner", t0 + 3 * day + 30, "这周不行", False),
        (FRIEND, FRIEND, "incoming", t0 + 4 * day, "那下周呢", False),
        (FRIEND, OWNER, "owner", t0 + 4 * day + 30, "下周可以", False),
    ]
    asyncio.run(_fill_store(db, rows))

    def stop(cycle):
        raise RuntimeError("stopped after the build")

    monkeypatch.setattr(retrain, "_train", stop)
    result = run_cycle(
        _settings(
            tmp_path,
            reg,
            db,
            retrain_dataset=original,
            retrain_min_samples=1,
            retrain_heldout_ratio=0.0,
            retrain_replay_ratio=0.0,
            examples_messages=tmp_path / "messages.jsonl",
        )
    )
    assert result.state == "failed" and "stopped after the build" in result.reason
    assert read_status(reg)["new_samples"] == 2  # the history made none
    data = reg / retrain.WORK_DIR / "data"
    samples = [json.loads(line)["messages"] for line in (data / "train.jsonl").read_text().splitlines()]
    samples += [json.loads(line)["messages"] for line in (data / "val.jsonl").read_text().splitlines()]
    by_reply = {m[-1]["content"]: m[0]["content"] for m in samples}
    assert set(by_reply) >= {"这周不行", "下周可以"}
    assert "好啊去香山" in by_reply["这周不行"]  # the imported history's reply is an example
    assert "生日" in by_reply["这周不行"]  # the store's older chat is in the memory

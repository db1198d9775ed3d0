"""Sample replies per version: held-out probes picked once, each version's greedy replies in its
samples.json, `twin models samples`, the retrain candidate's samples and `/twin samples`."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

from bot.admin import run_admin
from bot.config import Config
from bot.runtime import Twin
from deploy.cli import main as twin_cli
from deploy.samples import fill_samples, llama_generate, pick_probes, probe_of, samples_for_export
from pipeline import registry as model_registry
from tests.bot_helpers import ScriptedBackend
from tests.registry_helpers import export_with_adapter, registry_of_versions

OWNER = "10000"


def _row(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "你是小明"},
            {"role": "user", "content": f"在吗 {i}"},
            {"role": "assistant", "content": f"在的 {i}"},
        ]
    }


def _dataset(tmp_path: Path, rows: list[dict]) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "val.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return data


def _echo(gguf: Path, prompts) -> list[str]:
    """Stands in for llama.cpp: names the version and the prompt's last line."""
    return [f"{gguf.parent.name}:{prompt[-1]['content']}<|im_end|>junk" for prompt in prompts]


def test_a_probe_is_the_conversation_before_the_owners_reply_and_picking_is_deterministic() -> None:
    probe = probe_of(_row(1))
    assert probe is not None and probe.owner_reply == "在的 1"
    assert [m["role"] for m in probe.messages] == ["system", "user"]
    assert probe_of({"messages": [{"role": "user", "content": "hi"}]}) is None  # no reply to compare
    assert probe_of({"messages": [{"role": "assistant", "content": "alone"}] * 2}) is None  # no prompt
    rows = [_row(i) for i in range(20)]
    picked = pick_probes(rows, 4)
    assert [p.owner_reply for p in picked] == ["在的 0", "在的 5", "在的 10", "在的 15"]
    assert picked == pick_probes(rows, 4) and len({p.id for p in picked}) == 4
    assert [p.owner_reply for p in pick_probes(rows, 2, latest=True)] == ["在的 18", "在的 19"]


def test_every_version_answers_the_same_probes_once_and_files_are_private(tmp_path: Path) -> None:
    registry = registry_of_versions(tmp_path, 8, 16)
    settings = Config(
        twin_model=str(registry), twin_retrain_dataset=_dataset(tmp_path, [_row(i) for i in range(10)])
    )
    filled, failed = fill_samples(settings, registry, _echo, count=3)
    assert filled == ["v0001", "v0002"] and failed == {}
    probes = model_registry.read_probes(registry)
    digest = model_registry.probes_hash(registry)
    assert len(probes) == 3
    for name in filled:
        replies = model_registry.read_samples(registry / name, digest)
        # cleaned as the bot cleans a reply: cut where the model's turn ended
        assert replies == {p.id: f"{name}:{p.messages[-1]['content']}" for p in probes}
        assert stat.S_IMODE((registry / name / "samples.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((registry / "probes.jsonl").stat().st_mode) == 0o600

    calls: list[str] = []
    again = fill_samples(settings, registry, lambda g, p: calls.append(g.parent.name) or _echo(g, p), count=3)
    assert again == ([], {}) and calls == []  # nothing lacking
    assert fill_samples(settings, registry, _echo, versions=["v0001"], refresh=True)[0] == ["v0001"]


def test_a_version_that_will_not_load_is_reported_and_the_others_still_answer(tmp_path: Path) -> None:
    registry = registry_of_versions(tmp_path, 8, 16)
    settings = Config(twin_model=str(registry), twin_retrain_dataset=_dataset(tmp_path, [_row(1)]))

    def broken_v1(gguf: Path, prompts) -> list[str]:
        if gguf.parent.name == "v0001":
            raise ValueError("cannot load model")
        return _echo(gguf, prompts)

    filled, failed = fill_samples(settings, registry, broken_v1)
    assert filled == ["v0002"] and failed == {"v0001": "cannot load model"}
    assert not (registry / "v0001" / "samples.json").exists()


def test_the_real_llama_path_refuses_a_gguf_that_is_not_a_model_without_writing(tmp_path: Path) -> None:
    registry = registry_of_versions(tmp_path, 8)
    settings = Config(
        twin_model=str(registry), twin_retrain_dataset=_dataset(tmp_path, [_row(1)]), twin_n_threads=1
    )
    filled, failed = fill_samples(settings, registry, llama_generate(settings, max_tokens=4))
    assert filled == [] and list(failed) == ["v0001"]
    assert not (registry / "v0001" / "samples.json").exists()


def test_without_a_dataset_the_probes_come_from_the_store_redacted(tmp_path: Path) -> None:
    from tests.test_retrain import _fill_store

    db = tmp_path / "bot.db"
    rows = []
    for i in range(5):
        t = 1_700_000_000 + i * 10_000
        rows.append(("30001", "30001", "incoming", t, f"电话多少 {i}", False))
        rows.append(("30001", OWNER, "owner", t + 5, f"13812345678 第{i}次", False))
    asyncio.run(_fill_store(db, rows))
    registry = registry_of_versions(tmp_path, 8)
    settings = Config(twin_model=str(registry), twin_db=db)
    fill_samples(settings, registry, _echo, count=2)
    probes = model_registry.read_probes(registry)
    assert [p.owner_reply for p in probes] == ["<手机号> 第3次", "<手机号> 第4次"]  # the latest, redacted
    assert "13812345678" not in (registry / "probes.jsonl").read_text()


def test_the_retrain_candidate_gets_samples_in_its_export_and_a_failure_is_only_a_warning(
    tmp_path: Path,
) -> None:
    registry = registry_of_versions(tmp_path, 8)
    settings = Config(twin_model=str(registry), twin_retrain_dataset=_dataset(tmp_path, [_row(1), _row(2)]))
    export = export_with_adapter(tmp_path, "candidate")
    assert samples_for_export(settings, registry, export, _echo)
    digest = model_registry.probes_hash(registry)
    assert len(model_registry.read_samples(export, digest)) == 2

    def crash(gguf: Path, prompts) -> list[str]:
        raise RuntimeError("out of memory")

    other = export_with_adapter(tmp_path, "candidate2")
    assert samples_for_export(settings, registry, other, crash) is False
    assert not (other / "samples.json").exists()


def test_twin_models_samples_refuses_a_bad_version_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    registry = registry_of_versions(tmp_path, 8)
    monkeypatch.setenv("TWIN_RETRAIN_DATASET", str(_dataset(tmp_path, [_row(1)])))
    assert twin_cli(["models", "samples", "--registry", str(registry), "--version", "../x"]) != 0
    err = capsys.readouterr().err
    assert "not a version name" in err and "Traceback" not in err
    assert twin_cli(["models", "samples", "--registry", str(tmp_path / "none")]) != 0


async def test_the_samples_verb_runs_one_child_at_a_time_and_reports(tmp_path: Path, monkeypatch) -> None:
    import bot.runtime as runtime
    from bot.retrain import RetrainResult

    registry = registry_of_versions(tmp_path, 8)
    release = asyncio.Event()

    async def child(nice, secrets, account=None) -> RetrainResult:
        await release.wait()
        return RetrainResult(0, "samples: v0001")

    monkeypatch.setattr(runtime, "run_samples", child)
    twin = Twin(
        Config(twin_db=tmp_path / "bot.db", twin_model=str(registry)), nicknames=[], backend=ScriptedBackend()
    )
    await twin.start()
    told: list[str] = []

    async def report(text: str) -> None:
        told.append(text)

    try:
        first = await run_admin(twin, ["samples"], chat=None, user="42", quoted=None, report=report)
        assert first.startswith("generating sample replies")
        assert "already" in await run_admin(
            twin, ["samples"], chat=None, user="42", quoted=None, report=report
        )
        release.set()
        assert twin.samples_task is not None
        await twin.samples_task
        assert told == ["samples finished: samples: v0001"]
    finally:
        await twin.close()

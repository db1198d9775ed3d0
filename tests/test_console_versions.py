"""The console's Versions page: the registry's versions, plots, promote and rollback through the
admin verbs, and each version's replies to the held-out probes next to the owner's."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bot.admin import run_admin
from bot.config import Config
from bot.runtime import Twin
from pipeline import registry as model_registry
from pipeline.registry_ops import register
from tests.bot_helpers import ScriptedBackend
from tests.console_helpers import console_client, login, post
from tests.registry_helpers import export_with_adapter, registry_of_versions


async def _twin(tmp_path: Path, registry: Path) -> Twin:
    """A started twin following `registry`, serving what `current` names."""
    config = Config(twin_db=tmp_path / "bot.db", twin_model=str(registry), twin_model_poll=3600)
    backend = ScriptedBackend()
    backend.version = model_registry.current_version(registry) or backend.version
    twin = Twin(config, nicknames=["小明"], backend=backend)
    await twin.start()
    return twin


def _with_numbers(registry: Path, name: str, perplexity: float, style: float) -> None:
    manifest_path = registry / name / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["eval"] = {"perplexity": perplexity, "style_distance": style}
    manifest["data_window"] = {"since": 1_700_000_000, "until": 1_700_600_000, "messages": 120, "samples": 30}
    manifest_path.write_text(json.dumps(manifest))


def _row(html: str, name: str) -> str:
    match = re.search(rf'<tr id="version-{re.escape(name)}"[^>]*>.*?</tr>', html, re.S)
    assert match, f"no row for {name}"
    return match.group(0)


async def test_the_table_lists_every_version_with_its_numbers_and_marks_the_serving_one(
    tmp_path: Path,
) -> None:
    registry = registry_of_versions(tmp_path, 8, 16, 32)
    _with_numbers(registry, "v0002", 12.5, 0.25)
    twin = await _twin(tmp_path, registry)
    async with console_client(tmp_path, twin=twin) as (client, _):
        await login(client)
        html = (await client.get("/versions")).text
    assert (
        html.index('id="version-v0001"') < html.index('id="version-v0002"') < html.index('id="version-v0003"')
    )
    assert 'class="current"' in _row(html, "v0003") and "当前" in _row(html, "v0003")
    assert 'class="current"' not in _row(html, "v0002")
    v2 = _row(html, "v0002")
    assert "12.50" in v2 and "0.250" in v2 and "Q4_K_M" in v2 and ">120<" in v2 and ">30<" in v2
    assert "—" in _row(html, "v0001")  # no eval numbers recorded
    for plot in ("ppl-plot", "style-plot"):
        assert re.search(rf'<img class="plot" id="{plot}" src="data:image/svg\+xml;base64,', html)
    assert 'id="samples"' in html
    actions = re.findall(r'<form method="post" action="([^"]*)"', html)
    for path in ("/promote", "/rollback", "/samples"):
        assert f"/twin/console{path}" in actions
    assert all(a.startswith("/twin/console/") for a in actions)


async def test_without_a_registry_the_page_says_so_and_shows_what_serves(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        await login(client)
        html = (await client.get("/versions")).text
    assert "single model file" in html and twin.backend.version in html
    assert 'id="versions"' not in html


async def test_promote_serves_the_version_and_rollback_goes_back(tmp_path: Path) -> None:
    registry = registry_of_versions(tmp_path, 8, 16)
    twin = await _twin(tmp_path, registry)
    async with console_client(tmp_path, twin=twin) as (client, _):
        await login(client)
        await post(client, "/promote", version="v0001", back="/twin/console/versions")
        assert model_registry.current_version(registry) == "v0001" == twin.backend.version
        html = (await client.get("/versions")).text
        assert "serving v0001" in html and 'class="current"' in _row(html, "v0001")

        await post(client, "/rollback", back="/twin/console/versions")
        assert model_registry.current_version(registry) == "v0002" == twin.backend.version
        assert "rolled back v0001 → v0002" in (await client.get("/versions")).text
        assert model_registry.read_history(registry)[-1].action == "rollback"


async def test_a_bad_version_name_is_refused_without_any_change(tmp_path: Path) -> None:
    registry = registry_of_versions(tmp_path, 8, 16)
    twin = await _twin(tmp_path, registry)
    history = (registry / "history.json").read_text()
    async with console_client(tmp_path, twin=twin) as (client, _):
        await login(client)
        for bad in ("../x", "v9999", "current", ""):
            response = await post(client, "/promote", version=bad, back="/twin/console/versions")
            assert response.status_code == 303
            page = (await client.get("/versions")).text
            assert "not a version name" in page or "no version v9999" in page
    assert model_registry.current_version(registry) == "v0002" == twin.backend.version
    assert (registry / "history.json").read_text() == history


async def test_the_rollback_verb_works_from_chat_and_refuses_when_there_is_nowhere_to_go(
    tmp_path: Path,
) -> None:
    registry = registry_of_versions(tmp_path, 8, 16)
    twin = await _twin(tmp_path, registry)
    told: list[str] = []

    async def report(text: str) -> None:
        told.append(text)

    async def admin(*words: str) -> str:
        return await run_admin(twin, list(words), chat=None, user="42", quoted=None, report=report)

    try:
        assert await admin("rollback") == "rolled back v0002 → v0001"
        assert model_registry.current_version(registry) == "v0001" == twin.backend.version
        assert model_registry.read_history(registry)[-1].by == "chat:42"
        answer = await admin("rollback")
        assert answer.startswith("cannot roll back, still serving v0001") and "no earlier" in answer
        assert model_registry.current_version(registry) == "v0001"
        twin.model_shared_with = ("20000",)
        assert "also serves account 20000" in await admin("rollback")
    finally:
        await twin.close()


async def test_the_rollback_verb_needs_a_registry(tmp_path: Path) -> None:
    twin = Twin(Config(twin_db=tmp_path / "bot.db"), nicknames=[], backend=ScriptedBackend())
    await twin.start()
    try:
        answer = await run_admin(twin, ["rollback"], chat=None, user="42", quoted=None, report=None)  # type: ignore[arg-type]
        assert "not a model registry" in answer and twin.backend.version == "v-test"
    finally:
        await twin.close()


async def test_the_page_shows_each_versions_reply_next_to_the_owners_escaped(tmp_path: Path) -> None:
    registry = registry_of_versions(tmp_path, 8, 16)
    register(registry, export_with_adapter(tmp_path, "export-late"))  # v0003: no samples yet
    probes = [
        {
            "id": "p1",
            "messages": [{"role": "system", "content": "SYS"}, {"role": "user", "content": "<b>吃了吗</b>"}],
            "owner_reply": "还没呢",
        },
    ]
    (registry / "probes.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in probes))
    digest = model_registry.probes_hash(registry)
    for name, text in (("v0001", "吃了"), ("v0002", "<i>刚吃完</i>")):
        (registry / name / "samples.json").write_text(
            json.dumps({"probes": digest, "replies": [{"id": "p1", "text": text}], "created": "now"})
        )
    (registry / "v0003" / "samples.json").write_text(  # made for other probes: stale, not shown
        json.dumps({"probes": "0" * 16, "replies": [{"id": "p1", "text": "OLD"}], "created": "now"})
    )
    twin = await _twin(tmp_path, registry)
    async with console_client(tmp_path, twin=twin) as (client, _):
        await login(client)
        html = (await client.get("/versions")).text
    samples = html[html.index('id="samples"') :]
    assert "&lt;b&gt;吃了吗&lt;/b&gt;" in samples and "<b>" not in samples and "SYS" not in samples
    assert "还没呢" in samples and "吃了" in samples and "&lt;i&gt;刚吃完&lt;/i&gt;" in samples
    assert "OLD" not in samples
    v3 = re.search(r"<code>v0003</code></th><td[^>]*>([^<]*)</td>", samples)
    assert v3 and v3.group(1) == "—"


async def test_an_empty_reply_shows_as_staying_silent_not_as_missing(tmp_path: Path) -> None:
    registry = registry_of_versions(tmp_path, 8, 16)
    probe = {"id": "p1", "messages": [{"role": "user", "content": "在吗"}], "owner_reply": "在"}
    (registry / "probes.jsonl").write_text(json.dumps(probe, ensure_ascii=False) + "\n")
    digest = model_registry.probes_hash(registry)
    # What a model answering only blank lines leaves once cleaned: the twin would say nothing.
    (registry / "v0001" / "samples.json").write_text(
        json.dumps({"probes": digest, "replies": [{"id": "p1", "text": ""}], "created": "now"})
    )
    twin = await _twin(tmp_path, registry)
    async with console_client(tmp_path, twin=twin) as (client, _):
        await login(client)
        html = (await client.get("/versions")).text
    v1 = re.search(r'<tr class="reply" id="reply-p1-v0001">.*?</tr>', html, re.S)
    v2 = re.search(r'<tr class="reply" id="reply-p1-v0002">.*?</tr>', html, re.S)
    assert v1 and 'class="silent"' in v1.group(0) and "stays silent" in v1.group(0)
    assert v2 and '<td class="text">—</td>' in v2.group(0) and "silent" not in v2.group(0)

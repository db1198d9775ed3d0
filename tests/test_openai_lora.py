"""vLLM with one LoRA per version: what the registry publishes (`twin models vllm-args`), the
openai backend asking for `twin-<version>-<fingerprint>`, runtime loading on promotion and rollback, timeouts,
and failover between servers — all against FakeOpenAI over real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from openai import APITimeoutError

from bot.backends import OpenAIBackend
from bot.config import Config
from bot.runtime import Twin
from deploy.cli import main as twin
from pipeline.registry import lora_module_name, lora_modules
from pipeline.registry_ops import promote, register, rollback
from tests.e2e.conftest import wait_until
from tests.fake_openai import FakeOpenAI
from tests.registry_helpers import export_with_adapter, lora_name, registry_of_versions

CHAT = [{"role": "system", "content": "你是小明"}, {"role": "user", "content": "在吗"}]


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    yield server
    server.close()


@pytest.fixture
def second() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    yield server
    server.close()


def closed_port_url() -> str:
    """A URL nothing listens on: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ---------------------------------------------------------------- what the registry publishes


def test_vllm_args_publish_the_serving_version_and_its_rollback_target(tmp_path, capsys) -> None:
    reg = registry_of_versions(tmp_path, 8, 16, 40)
    assert twin(["models", "vllm-args", "--registry", str(reg)]) == 0
    captured = capsys.readouterr()
    adapters = reg.resolve()
    assert captured.out.split() == [
        "--enable-lora",
        "--max-lora-rank",
        "64",  # rank 40 rounded up to a value vLLM accepts
        "--lora-modules",
        f"{lora_name(reg, 'v0003')}={adapters}/v0003/adapter",
        f"{lora_name(reg, 'v0002')}={adapters}/v0002/adapter",
    ]
    assert "base model: Qwen/Qwen3-0.6B" in captured.err


def test_vllm_args_all_versions_under_the_containers_mount(tmp_path, capsys) -> None:
    reg = registry_of_versions(tmp_path, 16, 16)
    assert twin(["models", "vllm-args", "--all", "--path-prefix", "/models", "--registry", str(reg)]) == 0
    assert capsys.readouterr().out.split() == [
        "--enable-lora",
        "--max-lora-rank",
        "16",
        "--lora-modules",
        f"{lora_name(reg, 'v0001')}=/models/v0001/adapter",
        f"{lora_name(reg, 'v0002')}=/models/v0002/adapter",
    ]


def refusal(reg: Path, capsys, *args: str) -> str:
    assert twin(["models", "vllm-args", "--registry", str(reg), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twin: error: ")
    return err[0]


def test_vllm_args_refuse_an_adapter_without_its_config_or_weights(tmp_path, capsys) -> None:
    reg = registry_of_versions(tmp_path, 16, 16)
    (reg / "v0002" / "adapter" / "adapter_config.json").unlink()
    assert "v0002/adapter/adapter_config.json: missing" in refusal(reg, capsys)
    (reg / "v0001" / "adapter" / "adapter_model.safetensors").unlink()
    assert "v0001/adapter/adapter_model.safetensors: missing" in refusal(reg, capsys, "--all")


def test_vllm_args_refuse_an_adapter_linked_out_of_the_registry(tmp_path, capsys) -> None:
    reg = registry_of_versions(tmp_path, 16, 16)
    outside = export_with_adapter(tmp_path, "elsewhere") / "adapter"
    target = reg / "v0002" / "adapter"
    for child in target.iterdir():
        child.unlink()
    target.rmdir()
    target.symlink_to(outside)
    assert "outside the registry" in refusal(reg, capsys)


def test_vllm_args_refuse_adapters_of_different_bases(tmp_path, capsys) -> None:
    reg = registry_of_versions(tmp_path, 16)
    other = register(reg, export_with_adapter(tmp_path, "other", base="meta-llama/Llama-3.2-1B"))
    promote(reg, other.name)
    line = refusal(reg, capsys)
    assert "different base models" in line and "Llama-3.2-1B" in line and "Qwen3-0.6B" in line


def test_vllm_args_refuse_a_rank_beyond_vllms_largest(tmp_path, capsys) -> None:
    reg = registry_of_versions(tmp_path, 1024)
    assert "exceeds vLLM's largest --max-lora-rank 512" in refusal(reg, capsys)


def test_vllm_args_refuse_a_relative_path_prefix(tmp_path, capsys) -> None:
    reg = registry_of_versions(tmp_path, 16)
    assert "must be an absolute path" in refusal(reg, capsys, "--path-prefix", "models")


@pytest.mark.parametrize("name", ["../v0001", "v1/x", ".hidden", "current", ""])
def test_a_lora_name_is_made_only_from_a_version_name(name, tmp_path) -> None:
    adapter = export_with_adapter(tmp_path, "export") / "adapter"
    with pytest.raises(ValueError):
        lora_module_name(name, adapter)
    weights = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert lora_module_name("v0007", adapter) == f"twin-v0007-{weights[:12]}"


def test_two_registries_versions_of_one_name_get_different_lora_names(tmp_path, capsys) -> None:
    """Two accounts' registries both start at v0001: on one vLLM they must not share a name."""
    alice, bob = registry_of_versions(tmp_path / "alice", 16), registry_of_versions(tmp_path / "bob", 16)
    assert lora_name(alice, "v0001") != lora_name(bob, "v0001")
    published = []
    for reg in (alice, bob):
        assert twin(["models", "vllm-args", "--all", "--registry", str(reg)]) == 0
        published += capsys.readouterr().out.split()[4:]
    assert len({spec.split("=")[0] for spec in published}) == 2
    # the same weights copied elsewhere (a restored backup) keep their name
    copy = tmp_path / "copy"
    shutil.copytree(alice / "v0001" / "adapter", copy)
    assert lora_module_name("v0001", copy) == lora_name(alice, "v0001")


def test_a_lora_name_follows_new_weights_and_refuses_missing_ones(tmp_path) -> None:
    adapter = export_with_adapter(tmp_path, "export") / "adapter"
    before = lora_module_name("v0001", adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"retrained, longer than before")
    assert lora_module_name("v0001", adapter) != before
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: unreadable adapter weights"):
        lora_module_name("v0001", adapter)


async def test_a_lora_backend_needs_the_adapter(fake) -> None:
    with pytest.raises(ValueError, match="needs its adapter directory"):
        OpenAIBackend(fake.base_url, "v0001", lora=True)


def test_lora_modules_of_a_registry_without_current_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match="names no serving version"):
        lora_modules(tmp_path / "models")


# ---------------------------------------------------------------- the bot following the registry


def lora_config(tmp_path: Path, reg: Path, *urls: str, **settings: object) -> Config:
    return Config(
        twin_db=tmp_path / "bot.db",
        twin_backend="openai",
        twin_model=str(reg),
        twin_openai_base_url=urls[0],
        twin_openai_fallback_urls=list(urls[1:]),
        twin_openai_lora=True,
        twin_openai_retries=0,
        twin_openai_timeout=5,
        twin_model_poll=0.05,
        **settings,
    )


@pytest_asyncio.fixture(loop_scope="function")  # the twin's watcher runs on the test's loop
async def running(tmp_path: Path, fake: FakeOpenAI) -> AsyncIterator[tuple[Twin, Path]]:
    """A twin on vLLM with runtime LoRA loading, serving v0001 of a two-version registry."""
    reg = registry_of_versions(tmp_path, 16, 16)
    rollback(reg)  # v0001 serves, v0002 is registered
    fake.loaded.add(lora_name(reg, "v0001"))  # vLLM started with `twin models vllm-args`
    twin_ = Twin(lora_config(tmp_path, reg, fake.base_url, twin_vllm_runtime_lora=True), nicknames=["小明"])
    await twin_.start()
    yield twin_, reg
    await twin_.close()


async def test_requests_ask_for_the_serving_versions_lora(tmp_path, fake) -> None:
    reg = registry_of_versions(tmp_path, 16)
    backend = OpenAIBackend(fake.base_url, "v0001", retries=0, lora=True, adapter=reg / "v0001" / "adapter")
    try:
        generation = await backend.generate(CHAT)
    finally:
        await backend.close()
    assert fake.requests[-1]["model"] == lora_name(reg, "v0001")
    assert generation.version == "v0001"
    assert fake.lora_calls == []  # without runtime loading vLLM was started with the modules
    assert reg.is_dir()


async def test_a_promotion_loads_the_adapter_first_then_chats_use_its_name(running, fake) -> None:
    twin_, reg = running
    assert fake.lora_calls == []  # vLLM was started with the serving version's module
    promote(reg, "v0002")
    assert await wait_until(lambda: twin_.backend.version == "v0002", 10, interval=0.05)
    adapter = str((reg / "v0002" / "adapter").resolve())
    assert fake.lora_calls == [("load", {"lora_name": lora_name(reg, "v0002"), "lora_path": adapter})]
    await twin_.backend.generate(CHAT)
    assert fake.requests[-1]["model"] == lora_name(reg, "v0002")
    assert (
        "unload",
        {"lora_name": lora_name(reg, "v0001")},
    ) not in fake.lora_calls  # the rollback target stays
    assert "model: v0002 (openai)" in await twin_.status_text()


async def test_a_rollback_returns_to_the_previous_name(running, fake) -> None:
    twin_, reg = running
    promote(reg, "v0002")
    assert await wait_until(lambda: twin_.backend.version == "v0002", 10, interval=0.05)
    rollback(reg)
    assert await wait_until(lambda: twin_.backend.version == "v0001", 10, interval=0.05)
    await twin_.backend.generate(CHAT)
    assert fake.requests[-1]["model"] == lora_name(reg, "v0001")
    # Loading a name the server has is vLLM's 400 "already been loaded": success for the bot.
    assert [call for call in fake.lora_calls if call[0] == "load"][-1][1]["lora_name"] == lora_name(
        reg, "v0001"
    )


async def test_versions_beyond_the_rollback_target_are_unloaded(tmp_path, fake) -> None:
    reg = registry_of_versions(tmp_path, 16, 16, 16)
    rollback(reg)
    rollback(reg)  # v0001 serves
    twin_ = Twin(lora_config(tmp_path, reg, fake.base_url, twin_vllm_runtime_lora=True), nicknames=["小明"])
    await twin_.start()
    try:
        for version in ("v0002", "v0003"):
            promote(reg, version)
            assert await wait_until(lambda v=version: twin_.backend.version == v, 10, interval=0.05)
    finally:
        await twin_.close()
    assert ("unload", {"lora_name": lora_name(reg, "v0001")}) in fake.lora_calls
    assert fake.loaded == {lora_name(reg, "v0002"), lora_name(reg, "v0003")}


async def test_a_failed_load_keeps_the_old_name_and_status_says_so(running, fake) -> None:
    twin_, reg = running
    fake.fail_loads = True
    promote(reg, "v0002")
    problem = await wait_until(lambda: twin_.switch_problem, 10, interval=0.05)
    assert problem and problem.startswith("v0002 failed") and "HTTP 500" in problem
    assert problem.endswith("still serving v0001")
    await twin_.backend.generate(CHAT)
    assert fake.requests[-1]["model"] == lora_name(reg, "v0001")
    assert "last switch: v0002 failed" in await twin_.status_text()
    fake.fail_loads = False
    await twin_.switch_model("v0002")  # `/twin model v0002` tries again
    assert twin_.switch_problem is None and twin_.backend.version == "v0002"


async def test_an_adapter_a_restarted_vllm_forgot_is_loaded_on_first_use(running, fake) -> None:
    twin_, reg = running
    fake.loaded.clear()  # vLLM restarted with other --lora-modules
    fake.strict_models = True
    generation = await twin_.backend.generate(CHAT)
    assert generation.text == "收到:在吗" and fake.requests[-1]["model"] == lora_name(reg, "v0001")
    assert fake.lora_calls[-1][0] == "load" and lora_name(reg, "v0001") in fake.loaded


async def test_the_openai_lora_setting_needs_a_registry(tmp_path, fake) -> None:
    with pytest.raises(FileNotFoundError, match="TWIN_OPENAI_LORA needs TWIN_MODEL"):
        Twin(lora_config(tmp_path, tmp_path / "nothing", fake.base_url), nicknames=["小明"])


# ---------------------------------------------------------------- timeouts and failover


async def test_a_server_slower_than_the_timeout_is_given_up(fake) -> None:
    fake.delay = 3.0
    backend = OpenAIBackend(fake.base_url, "twin", timeout=0.5, retries=0)
    started = time.monotonic()
    try:
        with pytest.raises(APITimeoutError):
            await backend.generate(CHAT)
    finally:
        await backend.close()
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("failure", ["closed port", "503", "timeout"])
async def test_the_second_url_answers_when_the_first_fails(fake, second, failure) -> None:
    first = closed_port_url() if failure == "closed port" else fake.base_url
    fake.status = 503 if failure == "503" else None
    fake.delay = 3.0 if failure == "timeout" else 0.0
    backend = OpenAIBackend(first, "twin", timeout=0.5, retries=1, fallback_urls=[second.base_url])
    try:
        generation = await backend.generate(CHAT)
    finally:
        await backend.close()
    assert generation.text == "收到:在吗" and len(second.requests) == 1
    assert backend.serving_url == second.base_url
    if failure != "closed port":
        assert len(fake.requests) == 2  # its own retry first, then the next server


async def test_a_failed_server_rests_then_is_tried_again(fake, second) -> None:
    fake.status = 503
    backend = OpenAIBackend(fake.base_url, "twin", retries=0, fallback_urls=[second.base_url], cooldown=0.5)
    try:
        for _ in range(3):
            await backend.generate(CHAT)
        assert len(fake.requests) == 1 and len(second.requests) == 3  # not every request pays for it
        await asyncio.sleep(0.6)
        fake.status = None
        await backend.generate(CHAT)
    finally:
        await backend.close()
    assert len(fake.requests) == 2 and len(second.requests) == 3
    assert backend.serving_url == fake.base_url


async def test_a_bad_request_is_not_failed_over(fake, second) -> None:
    fake.strict_models = True  # 404 for an unknown model: the request, not the server, is wrong
    backend = OpenAIBackend(fake.base_url, "nope", retries=0, fallback_urls=[second.base_url])
    try:
        with pytest.raises(Exception, match="does not exist"):
            await backend.generate(CHAT)
    finally:
        await backend.close()
    assert second.requests == []


async def test_the_status_names_the_serving_url(tmp_path, fake, second) -> None:
    fake.status = 503
    config = Config(
        twin_db=tmp_path / "bot.db",
        twin_backend="openai",
        twin_openai_base_url="http://user:secret@127.0.0.1:1/v1",
        twin_openai_fallback_urls=f"{fake.base_url}, {second.base_url}",
        twin_openai_retries=0,
    )
    assert config.openai_urls[1:] == [fake.base_url, second.base_url]
    twin_ = Twin(config, nicknames=["小明"])
    await twin_.start()
    try:
        assert "server: http://127.0.0.1:1/v1" in await twin_.status_text()  # no credentials shown
        await twin_.backend.generate(CHAT)
        assert f"server: {second.base_url}" in await twin_.status_text()
    finally:
        await twin_.close()


@pytest.mark.parametrize(
    ("raw", "urls"),
    [
        ("", []),
        ("http://a:8000/v1,http://b:8000/v1", ["http://a:8000/v1", "http://b:8000/v1"]),
        ('["http://a:8000/v1"]', ["http://a:8000/v1"]),
    ],
)
def test_fallback_urls_read_a_comma_list_or_json(raw, urls) -> None:
    assert Config(twin_openai_fallback_urls=raw).twin_openai_fallback_urls == urls


def test_a_fallback_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Config(twin_openai_fallback_urls="ftp://x")

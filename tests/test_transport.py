"""How the QQ side may reach the bot: the token bootstrap, the secret mask and the hardened adapter."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from loguru import logger
from nonebot.config import Config as NoneBotConfig
from nonebot.config import Env
from nonebot.drivers.fastapi import Driver as FastAPIDriver
from nonebot.utils import escape_tag
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from bot import transport
from bot.log_mask import MASK, MaskedStream, SecretMask, secret_values
from bot.transport import (
    AccessToken,
    HardenedAdapter,
    TokenFileError,
    bootstrap_access_token,
    configured_token,
    merge_layers,
    settings_layers,
    transport_problem,
)
from deploy.onebot_client import free_port

TOKEN = "correct-horse-battery-staple-42"
REPO = Path(__file__).resolve().parents[1]
SECRET = "hmac-secret-for-posts"
SELF_ID = "10000"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------- the token bootstrap


def test_an_empty_token_is_generated_once_and_kept_owner_only_beside_the_store(tmp_path: Path) -> None:
    access = bootstrap_access_token(
        {"onebot_access_token": "", "twin_db": str(tmp_path / "store" / "bot.db")}
    )

    kept = tmp_path / "store" / "onebot-token"
    assert access.file == kept and access.created
    assert len(access.value) >= 40  # secrets.token_urlsafe(32)
    assert kept.read_text().strip() == access.value
    assert mode(kept) == 0o600 and mode(kept.parent) == 0o700


def test_the_generated_token_overrides_both_names_nonebot_reads(tmp_path: Path) -> None:
    access = bootstrap_access_token({"onebot_v11_access_token": " ", "twin_db": str(tmp_path / "bot.db")})
    assert access.nonebot_settings() == {
        "onebot_v11_access_token": access.value,
        "onebot_access_token": access.value,
    }


def test_later_starts_reuse_the_kept_token(tmp_path: Path) -> None:
    settings = {"twin_db": str(tmp_path / "bot.db")}
    first = bootstrap_access_token(settings)
    second = bootstrap_access_token(settings)
    assert second == AccessToken(first.value, tmp_path / "onebot-token", created=False)


def test_the_default_store_directory_is_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    access = bootstrap_access_token({})
    assert access.file == Path("data/onebot-token") and (tmp_path / "data" / "onebot-token").is_file()


def test_a_configured_token_wins_and_nothing_is_written(tmp_path: Path) -> None:
    settings = merge_layers(settings_layers({"ONEBOT_ACCESS_TOKEN": TOKEN}, tmp_path))
    access = bootstrap_access_token(settings | {"twin_db": str(tmp_path / "bot.db")})
    assert access == AccessToken(TOKEN) and access.nonebot_settings() == {}
    assert not (tmp_path / "onebot-token").exists()


def test_dotenv_files_are_read_as_nonebot_reads_them(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ENVIRONMENT=dev\nONEBOT_ACCESS_TOKEN=\nTWIN_DB=store/bot.db\n")
    (tmp_path / ".env.dev").write_text("ONEBOT_ACCESS_TOKEN=from-env-dev\n")
    assert configured_token(merge_layers(settings_layers({}, tmp_path))) == "from-env-dev"
    # the environment wins over every file
    environ = {"onebot_access_token": "from-environment"}
    assert configured_token(merge_layers(settings_layers(environ, tmp_path))) == "from-environment"
    # the adapter's `v11` alias wins over the plain name, as in NoneBot
    environ = {"ONEBOT_V11_ACCESS_TOKEN": "from-alias"}
    assert configured_token(merge_layers(settings_layers(environ, tmp_path))) == "from-alias"


def test_a_token_file_others_could_read_or_plant_is_refused(tmp_path: Path) -> None:
    settings = {"twin_db": str(tmp_path / "bot.db")}
    kept = bootstrap_access_token(settings).file
    kept.chmod(0o644)
    with pytest.raises(TokenFileError, match="mode 0600 \\(it is 0644\\)"):
        bootstrap_access_token(settings)

    kept.unlink()
    planted = tmp_path / "planted"
    planted.write_text("attacker-chosen-token\n")
    planted.chmod(0o600)
    kept.symlink_to(planted)
    with pytest.raises(TokenFileError, match="delete it"):
        bootstrap_access_token(settings)

    kept.unlink()
    os.mkfifo(kept, 0o600)  # would block a plain open() forever
    with pytest.raises(TokenFileError, match="regular file"):
        bootstrap_access_token(settings)


def test_an_empty_token_file_is_replaced_by_a_new_token(tmp_path: Path) -> None:
    kept = tmp_path / "onebot-token"
    kept.touch(mode=0o600)
    access = bootstrap_access_token({"twin_db": str(tmp_path / "bot.db")})
    assert access.created and kept.read_text().strip() == access.value


def test_the_log_line_says_where_the_token_is_never_what_it_is(tmp_path: Path) -> None:
    access = bootstrap_access_token({"twin_db": str(tmp_path / "bot.db")})
    line = access.describe()
    assert str(tmp_path / "onebot-token") in line and "NapCat" in line
    assert access.value not in line and "\n" not in line


# ------------------------------------------------------------------------- start-up checks


def test_a_short_token_is_refused_only_off_loopback() -> None:
    problem = transport_problem("0.0.0.0", "short-token", http_post=False, secret="")
    assert problem is not None and "only 11 characters" in problem and "token_urlsafe" in problem
    assert transport_problem("127.0.0.1", "short-token", http_post=False, secret="") is None
    assert transport_problem("::1", "t", http_post=False, secret="") is None
    assert transport_problem("0.0.0.0", TOKEN, http_post=False, secret="") is None


def test_no_token_at_all_is_refused_on_every_host() -> None:
    assert "ONEBOT_ACCESS_TOKEN is empty" in transport_problem("127.0.0.1", "", http_post=False, secret="")


def test_http_post_without_a_signing_secret_is_refused() -> None:
    problem = transport_problem("127.0.0.1", TOKEN, http_post=True, secret="")
    assert problem is not None and "ONEBOT_SECRET" in problem
    assert transport_problem("127.0.0.1", TOKEN, http_post=True, secret=SECRET) is None


# ------------------------------------------------------------------------- the secret mask

SECRET_SETTINGS = {
    "ONEBOT_ACCESS_TOKEN": "tok-AAAA1111",
    "ONEBOT_SECRET": "sig-BBBB2222",
    "TWIN_DB_KEY": "db-CCCC3333",
    "TWIN_OPENAI_API_KEY": "sk-DDDD4444",
    "SMTP_PASSWORD": "pw-EEEE5555",
    "hf_token": "hf-FFFF6666",  # any case
}


def test_the_secret_settings_are_found_by_name() -> None:
    settings = {**SECRET_SETTINGS, "TWIN_PERSONA": "小明", "HOST": "127.0.0.1"}
    assert secret_values(settings) == set(SECRET_SETTINGS.values())
    # the openai client's placeholder key and values too short to mask without garbling the log
    assert secret_values({"TWIN_OPENAI_API_KEY": "EMPTY", "TWIN_DB_KEY": "", "X_TOKEN": "abc"}) == set()


def test_a_password_inside_any_settings_url_is_a_secret_too() -> None:
    settings = {
        "TWIN_OPENAI_BASE_URL": "http://vllm:pw-GGGG7777@10.0.0.5:8000/v1",
        "TWIN_OPENAI_FALLBACK_URLS": ["https://u:pw-HHHH8888@backup/v1", "http://plain:8000/v1"],
        "ONEBOT_WS_URLS": '["ws://bot:pw-IIII9999@127.0.0.1:3001"]',
        "TWIN_LLM_BASE_URL": "http://localhost:8000/v1",  # a port is not a password
    }
    assert secret_values(settings) == {"pw-GGGG7777", "pw-HHHH8888", "pw-IIII9999"}
    line = SecretMask(secret_values(settings))(f"asking {settings['TWIN_OPENAI_BASE_URL']}")
    assert line == "asking http://vllm:***@10.0.0.5:8000/v1"


def test_every_secret_is_masked_as_is_and_inside_a_dict_repr_or_json() -> None:
    mask = SecretMask(secret_values(SECRET_SETTINGS))
    tricky = 'pa"ss\\wörd<x>'  # needs escaping in a repr and in JSON
    mask.add(tricky)
    for value in [*SECRET_SETTINGS.values(), tricky]:
        for text in (value, f"token={value}!", str({"key": value}), json.dumps({"key": value})):
            masked = mask(text)
            assert value not in masked and MASK in masked, text
        assert mask(json.dumps({"key": value}, ensure_ascii=True)) == '{"key": "***"}'
        assert mask(str({"key": value})) == "{'key': '***'}"
    assert mask("nothing secret here") == "nothing secret here"


def test_a_log_record_is_masked_in_its_message_extra_fields_and_traceback() -> None:
    mask = SecretMask(secret_values(SECRET_SETTINGS))
    out = io.StringIO()
    sink = logger.add(MaskedStream(out, mask), format="{message} | {extra}", colorize=False, level=0)
    try:
        log = logger.patch(mask.patch_record)
        for name, value in SECRET_SETTINGS.items():
            log.bind(setting={name: value}, listed=[value]).info(f"{name}={value}")
        try:
            raise ValueError(f"bad key {SECRET_SETTINGS['TWIN_DB_KEY']}")
        except ValueError:
            log.exception("failed")
    finally:
        logger.remove(sink)
    written = out.getvalue()
    assert "ONEBOT_ACCESS_TOKEN=***" in written and "Traceback" in written
    for value in SECRET_SETTINGS.values():
        assert value not in written


def test_nonebots_colored_config_dump_is_masked() -> None:
    token = "tok<with>tag-chars"
    mask = SecretMask([token])
    for colorize in (False, True):
        out = io.StringIO()
        sink = logger.add(MaskedStream(out, mask), format="{message}", colorize=colorize, level=0)
        try:  # exactly how nonebot.init logs its configuration
            config = {"onebot_access_token": token, "port": 8080}
            logger.opt(colors=True).debug(f"Loaded <y><b>Config</b></y>: {escape_tag(str(config))}")
        finally:
            logger.remove(sink)
        assert token not in out.getvalue() and "'onebot_access_token': '***'" in out.getvalue()


def test_the_record_patcher_keeps_a_previous_patcher() -> None:
    mask = SecretMask(["tok-AAAA1111"])
    record = {"message": "x tok-AAAA1111", "extra": {"nested": {"t": ("tok-AAAA1111",)}}, "name": "m"}
    mask.chain(lambda r: r.update(name="renamed"))(record)
    assert record == {"message": "x ***", "extra": {"nested": {"t": ("***",)}}, "name": "renamed"}


# ------------------------------------------------------------------------- the adapter


@pytest.fixture
def make_adapter(monkeypatch: pytest.MonkeyPatch):
    """A hardened adapter on its own FastAPI app, with our token and superuser 42."""

    def make(*, http_post: bool = False, secret: str = "") -> tuple[HardenedAdapter, TestClient]:
        monkeypatch.setenv("ONEBOT_ACCESS_TOKEN", TOKEN)
        monkeypatch.setenv("ONEBOT_SECRET", secret)
        monkeypatch.setenv("TWIN_ONEBOT_HTTP_POST", json.dumps(http_post))
        driver = FastAPIDriver(Env(environment="test"), NoneBotConfig(superusers={"42"}, _env_file=None))
        adapter = HardenedAdapter(driver)
        return adapter, TestClient(driver.server_app)

    return make


def headers(token: str | None = TOKEN, self_id: str = SELF_ID, **extra: str) -> dict[str, str]:
    out = {"X-Self-ID": self_id, "X-Client-Role": "Universal", **extra}
    if token is not None:
        out["Authorization"] = f"Bearer {token}"
    return out


EVENT = json.dumps(
    {
        "time": 0,
        "self_id": int(SELF_ID),
        "post_type": "meta_event",
        "meta_event_type": "heartbeat",
        "interval": 5000,
        "status": {},
    }
).encode()


def signature(body: bytes, secret: str = SECRET) -> str:
    return "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def test_only_the_websocket_routes_are_served_by_default(make_adapter) -> None:
    adapter, client = make_adapter()
    routes = adapter.driver.server_app.routes
    assert {r.path for r in routes if isinstance(r, WebSocketRoute)} == {
        "/onebot/v11/",
        "/onebot/v11/ws",
        "/onebot/v11/ws/",
    }
    assert not [r for r in routes if "POST" in (getattr(r, "methods", None) or ())]
    for path in ("/onebot/v11/", "/onebot/v11/http", "/onebot/v11/http/"):
        response = client.post(path, content=EVENT, headers=headers(**{"X-Signature": signature(EVENT)}))
        assert response.status_code in (404, 405), path


def test_http_post_when_enabled_needs_both_the_token_and_the_signature(make_adapter) -> None:
    _, client = make_adapter(http_post=True, secret=SECRET)
    signed = {"X-Signature": signature(EVENT)}
    assert client.post("/onebot/v11/", content=EVENT, headers=headers(None, **signed)).status_code == 403
    assert client.post("/onebot/v11/", content=EVENT, headers=headers("wrong", **signed)).status_code == 403
    assert client.post("/onebot/v11/", content=EVENT, headers=headers()).status_code == 401
    wrong = {"X-Signature": signature(EVENT, "not-the-secret")}
    assert client.post("/onebot/v11/", content=EVENT, headers=headers(**wrong)).status_code == 403
    assert client.post("/onebot/v11/http", content=EVENT, headers=headers(**signed)).status_code == 204


def test_http_post_is_never_served_without_a_signing_secret(make_adapter) -> None:
    _, client = make_adapter(http_post=True, secret="")
    assert client.post("/onebot/v11/", content=EVENT, headers=headers()).status_code == 403


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        ("/onebot/v11/ws", headers(None)),
        ("/onebot/v11/ws", headers("wrong")),
        ("/onebot/v11/ws", headers(TOKEN[:-1])),
        ("/onebot/v11/ws", headers(TOKEN + "x")),
        ("/onebot/v11/ws", {**headers(None), "Authorization": TOKEN}),  # no scheme
        (f"/onebot/v11/ws?access_token={TOKEN}", headers(None)),  # a query string is no credential
        ("/onebot/v11/", headers(None)),
    ],
    ids=["none", "wrong", "prefix", "longer", "no-scheme", "query-string", "root-path"],
)
def test_the_websocket_needs_exactly_the_token(make_adapter, path: str, sent: dict[str, str]) -> None:
    adapter, client = make_adapter()
    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(path, headers=sent):
        pass
    assert refused.value.code == 1008 and not adapter.bots


def test_the_websocket_accepts_the_token(make_adapter) -> None:
    adapter, client = make_adapter()
    with client.websocket_connect("/onebot/v11/ws", headers=headers()):
        assert list(adapter.bots) == [SELF_ID]


def test_tokens_are_compared_in_constant_time(make_adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    _, client = make_adapter()
    compared, constant_time = [], hmac.compare_digest
    monkeypatch.setattr(
        transport.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or constant_time(a, b)
    )
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/onebot/v11/ws", headers=headers("x")):
        pass
    assert compared == [(b"x", TOKEN.encode())]


def test_an_account_that_is_its_own_superuser_is_refused(make_adapter) -> None:
    adapter, client = make_adapter()
    out = io.StringIO()
    sink = logger.add(out, format="{message}", level="ERROR")
    try:
        for listed in ("42", "onebot:42"):
            adapter.driver.config.superusers = {listed}
            with (
                pytest.raises(WebSocketDisconnect),
                client.websocket_connect("/onebot/v11/ws", headers=headers(self_id="42")),
            ):
                pass
    finally:
        logger.remove(sink)
    assert not adapter.bots
    assert out.getvalue().count("SUPERUSERS contains the bot's own account 42: refusing the connection") == 2


def test_only_the_hardened_adapter_may_carry_the_twin() -> None:
    from nonebot.adapters.onebot.v11 import Adapter

    stock, hardened = object.__new__(Adapter), object.__new__(HardenedAdapter)
    problem = transport.adapter_problem([stock])
    assert problem is not None and "stock" in problem and "python bot.py" in problem
    assert transport.adapter_problem([hardened]) is None
    assert transport.adapter_problem([]) is None


def test_an_entry_point_with_the_stock_adapter_refuses_to_start(tmp_path: Path) -> None:
    """What `nb run` without bot.py does: NoneBot's own adapter, then the plugin. It must not serve."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import nonebot\n"
        "from nonebot.adapters.onebot.v11 import Adapter\n"
        "nonebot.init()\n"
        "nonebot.get_driver().register_adapter(Adapter)\n"
        f"nonebot.load_from_toml({str(REPO / 'pyproject.toml')!r})\n"
        "nonebot.run()\n",
        encoding="utf-8",
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TWIN_", "ONEBOT_"))},
        "DRIVER": "~fastapi+~websockets",
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "ONEBOT_ACCESS_TOKEN": TOKEN,
        "TWIN_DB": str(tmp_path / "bot.db"),
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "NoneBot's stock one, not qq-twin's hardened adapter" in done.stderr + done.stdout

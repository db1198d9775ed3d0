"""`twin health`, `twin napcat-config` and the JSON log line: what operators and containers rely on."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from bot.log_json import json_line, log_format
from deploy.cli import main
from deploy.health import local_url, probe
from deploy.napcat import CLIENT_NAME, COMPOSE_URL

TOKEN = "ops-test-token-0123456789"


class TinyBot:
    """An HTTP server answering `/twin/health` and `/twin/ready` as the bot does, with a settable state."""

    def __init__(self) -> None:
        self.ready = True
        self.seen_auth: list[str | None] = []
        tiny = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                tiny.seen_auth.append(self.headers.get("Authorization"))
                if self.path == "/twin/health":
                    self.answer(200, {"status": "ok"})
                elif self.path == "/twin/ready" and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self.answer(401, {"error": "unauthorized"})
                elif self.path == "/twin/ready":
                    body = {
                        "ready": tiny.ready,
                        "model": "v0003" if tiny.ready else None,
                        "store_writable": True,
                        "onebot_connections": int(tiny.ready),
                        "paused": False,
                        "sending": "ok",
                        "last_retrain": "never",
                    }
                    self.answer(200 if tiny.ready else 503, body)
                elif self.path == "/garbage":
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"<html>not the bot</html>")
                else:
                    self.answer(404, {"detail": "Not Found"})

            def answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tiny() -> Iterator[TinyBot]:
    server = TinyBot()
    yield server
    server.close()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and an environment without the bot's settings."""
    bot_settings = {
        "HOST",
        "PORT",
        "ONEBOT_ACCESS_TOKEN",
        "ONEBOT_V11_ACCESS_TOKEN",
        "ENVIRONMENT",
        "NAPCAT_ACCOUNT",
    }
    for name in list(os.environ):
        if name.upper() in bot_settings or name.upper().startswith("TWIN_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------ twin health


def test_health_finds_the_bot_from_host_and_port_in_dotenv(
    home: Path, tiny: TinyBot, capsys: pytest.CaptureFixture[str]
) -> None:
    (home / ".env").write_text(f"HOST=0.0.0.0\nPORT={tiny.port}\n", encoding="utf-8")
    assert main(["health"]) == 0
    assert capsys.readouterr().out == f"healthy: http://127.0.0.1:{tiny.port}/twin/health\n"
    assert tiny.seen_auth == [None]  # liveness never sends the token


def test_health_exits_1_in_one_line_when_nothing_listens(
    home: Path, tiny: TinyBot, capsys: pytest.CaptureFixture[str]
) -> None:
    port = tiny.port
    tiny.close()
    assert main(["health", "--url", f"http://127.0.0.1:{port}/twin/health", "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"unhealthy: http://127.0.0.1:{port}/twin/health: ") and out.count("\n") == 1


def test_health_is_not_fooled_by_another_server(home: Path, tiny: TinyBot, capsys) -> None:
    assert main(["health", "--url", f"http://127.0.0.1:{tiny.port}/garbage"]) == 1
    assert main(["health", "--url", f"http://127.0.0.1:{tiny.port}/elsewhere"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"unhealthy: http://127.0.0.1:{tiny.port}/garbage: HTTP 200, not a qq-twin answer",
        f"unhealthy: http://127.0.0.1:{tiny.port}/elsewhere: HTTP 404",
    ]


def test_ready_sends_the_token_from_the_environment_and_reports_the_details(
    home: Path, tiny: TinyBot, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("PORT", str(tiny.port))
    monkeypatch.setenv("ONEBOT_ACCESS_TOKEN", TOKEN)
    assert main(["health", "--ready"]) == 0
    tiny.ready = False
    assert main(["health", "--ready"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "ready: model v0003, store writable, 1 OneBot connection(s), sending ok",
        "not ready (HTTP 503): model not loaded, store writable, 0 OneBot connection(s), sending ok",
    ]
    assert tiny.seen_auth == [f"Bearer {TOKEN}"] * 2
    assert TOKEN not in "".join(out)


def test_ready_with_a_wrong_token_is_unhealthy(home: Path, tiny: TinyBot, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ONEBOT_ACCESS_TOKEN", "not-the-token-at-all")
    assert main(["health", "--ready", "--url", f"http://127.0.0.1:{tiny.port}/twin/ready"]) == 1
    out = capsys.readouterr().out
    assert "HTTP 401, the access token was refused" in out and "not-the-token" not in out


def test_a_hostile_answer_is_printed_on_one_line() -> None:
    class Answer(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            data = json.dumps({"ready": True, "model": "v1\n\x1b[2Jforged line" + "x" * 500}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = probe(f"http://127.0.0.1:{server.server_address[1]}/twin/ready", token="t")
    finally:
        server.shutdown()
        server.server_close()
    assert "\n" not in result.line and "\x1b" not in result.line and len(result.line) < 200


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8080/twin/health"),
        ("::", "http://[::1]:8080/twin/health"),
        ("127.0.0.1", "http://127.0.0.1:8080/twin/health"),
        ("twin", "http://twin:8080/twin/health"),
    ],
)
def test_a_wildcard_listen_address_is_probed_on_loopback(host: str, url: str) -> None:
    assert local_url(host, 8080, "/twin/health") == url


# ------------------------------------------------------------------------------ twin napcat-config


def test_napcat_config_points_napcat_at_the_twin_service_with_the_one_token(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (home / ".env").write_text(f"ONEBOT_ACCESS_TOKEN={TOKEN}\n", encoding="utf-8")
    assert main(["napcat-config", "--uin", "123456789"]) == 0
    path = home / "napcat" / "config" / "onebot11_123456789.json"
    assert TOKEN not in capsys.readouterr().out
    config = json.loads(path.read_text(encoding="utf-8"))
    (client,) = config["network"]["websocketClients"]
    assert client["url"] == COMPOSE_URL == "ws://twin:8080/onebot/v11/ws"
    assert client["token"] == TOKEN and client["enable"] is True
    # The owner's own messages are the retraining signal; segments arrive as arrays.
    assert client["reportSelfMessage"] is True and client["messagePostFormat"] == "array"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_without_a_uin_napcats_default_template_is_written(home: Path, monkeypatch) -> None:
    monkeypatch.setenv("ONEBOT_ACCESS_TOKEN", TOKEN)
    assert main(["napcat-config", "-o", "cfg", "--url", "ws://10.0.0.5:8080/onebot/v11/ws"]) == 0
    config = json.loads((home / "cfg" / "onebot11.json").read_text(encoding="utf-8"))
    assert config["network"]["websocketClients"][0]["url"] == "ws://10.0.0.5:8080/onebot/v11/ws"


def test_napcat_config_keeps_the_other_connections_and_replaces_its_own(home: Path, monkeypatch) -> None:
    monkeypatch.setenv("ONEBOT_ACCESS_TOKEN", TOKEN)
    path = home / "napcat" / "config" / "onebot11_10001.json"
    path.parent.mkdir(parents=True)
    other = {"name": "other-bot", "enable": True, "url": "ws://elsewhere:9000", "token": "x"}
    stale = {"name": CLIENT_NAME, "url": "ws://old:1/onebot/v11/ws", "token": "old-token"}
    server = {"name": "ws", "enable": True, "host": "0.0.0.0", "port": 3001}
    existing = {
        "network": {"websocketServers": [server], "websocketClients": [other, stale], "plugins": []},
        "musicSignUrl": "https://sign.example",
    }
    path.write_text(json.dumps(existing), encoding="utf-8")
    assert main(["napcat-config", "--uin", "10001"]) == 0
    config = json.loads(path.read_text(encoding="utf-8"))
    assert config["musicSignUrl"] == "https://sign.example" and config["network"]["plugins"] == []
    assert config["network"]["websocketServers"] == [server]
    clients = config["network"]["websocketClients"]
    assert [c["name"] for c in clients] == ["other-bot", CLIENT_NAME]
    assert clients[1]["token"] == TOKEN and "old-token" not in path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("argv", "env", "file_text", "message"),
    [
        (["--uin", "123456"], "", None, "ONEBOT_ACCESS_TOKEN is empty"),
        (["--uin", "123456"], "short", None, "shorter than 16 characters"),
        (["--uin", "../../etc/x"], TOKEN, None, "not a QQ number"),
        (["--url", "http://twin:8080/"], TOKEN, None, "not a WebSocket URL"),
        (["--uin", "123456"], TOKEN, "{not json", "not JSON"),
        (
            ["--uin", "123456"],
            TOKEN,
            '{"network": {"websocketClients": "x"}}',
            "not a NapCat onebot11 config",
        ),
        (["--uin", "123456"], TOKEN, "[1, 2]", "not a NapCat onebot11 config"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    home: Path, monkeypatch, capsys, argv: list[str], env: str, file_text: str | None, message: str
) -> None:
    monkeypatch.setenv("ONEBOT_ACCESS_TOKEN", env)
    target = home / "napcat" / "config" / "onebot11_123456.json"
    if file_text is not None:
        target.parent.mkdir(parents=True)
        target.write_text(file_text, encoding="utf-8")
    assert main(["napcat-config", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twin: error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err and (not env or env not in err or env == "short")
    if file_text is not None:
        assert target.read_text(encoding="utf-8") == file_text  # left as it was


# ------------------------------------------------------------------------------------- JSON lines


def _record(message: str, exception: object = None) -> dict:
    return {
        "time": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc),
        "level": SimpleNamespace(name="INFO"),
        "name": "nonebot",
        "message": message,
        "exception": exception,
    }


def test_a_json_log_line_is_one_object_with_time_level_name_and_message() -> None:
    line = json_line(_record('收到 "quoted"\nsecond line'))
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "time": "2026-01-02T03:04:05.678+00:00",
        "level": "INFO",
        "name": "nonebot",
        "message": '收到 "quoted"\nsecond line',
    }


def test_a_json_log_line_carries_the_traceback_without_local_values() -> None:
    def fail(secret_local: str) -> None:
        raise ValueError("bad")

    try:
        fail("value-" + "of-a-local")  # as source text the joined value never appears
    except ValueError:
        line = json.loads(json_line(_record("boom", sys.exc_info())))
    assert line["exception"].startswith("Traceback") and line["exception"].endswith("ValueError: bad")
    assert "value-of-a-local" not in line["exception"]


@pytest.mark.parametrize(
    ("value", "shown"), [(None, "text"), ("", "text"), ("json", "json"), (" json ", "json"), ("xml", "text")]
)
def test_the_log_format_setting_is_read_before_nonebot(value: str | None, shown: str) -> None:
    assert log_format({} if value is None else {"twin_log_format": value}) == shown

"""NapCat's OneBot 11 network config, generated so that NapCat dials the bot with the bot's token.

NapCat (NapCatQQ v4, the `mlikiowa/napcat-docker` image) reads no environment variable for its
connections: it reads `config/onebot11_<uin>.json`, and when that is missing copies
`config/onebot11.json` to it on login (NapCatQQ `packages/napcat-common/src/config-base.ts`).
`twin napcat-config` writes our reverse-WebSocket client into that file, keeping every other
connection already there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import InputError
from pipeline.files import write_text_atomic

CLIENT_NAME = "qq-twin"
COMPOSE_URL = "ws://twin:8080/onebot/v11/ws"  # the compose service `twin`, the bot's PORT
UIN = re.compile(r"[1-9][0-9]{4,11}")  # a QQ number; it becomes part of a file name
NETWORK_KINDS = ("httpServers", "httpSseServers", "httpClients", "websocketServers", "websocketClients")


def config_file(config_dir: Path, uin: str | None) -> Path:
    """`onebot11_<uin>.json` for one account, `onebot11.json` (NapCat's default) without one."""
    if uin is None:
        return config_dir / "onebot11.json"
    if not UIN.fullmatch(uin):
        raise InputError(uin, "not a QQ number (5 to 12 digits)")
    return config_dir / f"onebot11_{uin}.json"


def twin_client(url: str, token: str) -> dict:
    """The reverse-WebSocket client entry: array messages, the owner's own messages reported
    (`message_sent`: the retraining signal), NapCat's default heartbeat."""
    return {
        "name": CLIENT_NAME,
        "enable": True,
        "url": url,
        "messagePostFormat": "array",
        "reportSelfMessage": True,
        "reconnectInterval": 5000,
        "token": token,
        "debug": False,
        "heartInterval": 30000,
    }


def with_twin_client(existing: dict, url: str, token: str) -> dict:
    """`existing` (a NapCat onebot11 config) with our client replacing any earlier one of that name."""
    config = {"network": {}, "musicSignUrl": "", "enableLocalFile2Url": False, "parseMultMsg": False}
    config.update(existing)
    network = {kind: [] for kind in NETWORK_KINDS}
    network.update(config["network"])
    clients = [c for c in network["websocketClients"] if c.get("name") != CLIENT_NAME]
    network["websocketClients"] = [*clients, twin_client(url, token)]
    config["network"] = network
    return config


def read_config(path: Path) -> dict:
    """The config already at `path` ({} when there is none); anything NapCat did not write is refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read it ({exc})") from None
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise InputError(path, f"not JSON ({exc}); fix or delete it") from None
    network = config.get("network", {}) if isinstance(config, dict) else None
    if not isinstance(network, dict) or not all(
        isinstance(network.get(kind, []), list) and all(isinstance(c, dict) for c in network.get(kind, []))
        for kind in NETWORK_KINDS
    ):
        raise InputError(path, "not a NapCat onebot11 config (`network` must hold lists of objects)")
    return config


def check_url(url: str) -> str:
    """A ws:// or wss:// URL with a host, as NapCat dials it."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise InputError(url, "not a WebSocket URL (ws://HOST:PORT/onebot/v11/ws)")
    return url


def write_config(config_dir: Path, uin: str | None, url: str, token: str) -> Path:
    """Write (or update) NapCat's onebot11 config owner-only; returns its path."""
    path = config_file(config_dir, uin)
    config = with_twin_client(read_config(path), check_url(url), token)
    write_text_atomic(path, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    return path

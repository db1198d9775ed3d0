"""Settings: every effective `TWIN_*` setting of the account (and NoneBot's few), secrets masked,
each with where its value came from."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dotenv import dotenv_values
from starlette.responses import Response

from bot.config import Config, env_files
from bot.console.web import View, page
from bot.log_mask import is_secret_setting

# NoneBot's own settings worth seeing next to ours (never their secrets: masked like ours).
NONEBOT_SETTINGS = (
    "driver",
    "host",
    "port",
    "superusers",
    "nickname",
    "command_start",
    "log_level",
    "onebot_access_token",
)
SECRET_SET = "•••••• (set / 已设置)"


def _file(path: Path) -> dict[str, str | None]:
    if not path.is_file():
        return {}
    try:
        return {name.lower(): value for name, value in dotenv_values(path, encoding="utf-8").items()}
    except (OSError, UnicodeDecodeError):
        return {}


def account_file(config: Config, cwd: Path = Path()) -> Path | None:
    """The `TWIN_ACCOUNTS` file that names this account (None without several accounts)."""
    if not config.twin_accounts or not config.twin_account:
        return None
    for name in config.twin_accounts:
        path = cwd / name
        value = _file(path).get("twin_account")
        if value is not None and value.strip() == str(config.twin_account):
            return path
    return None


def sources(
    config: Config, environ: os._Environ | dict[str, str] = os.environ, cwd: Path = Path()
) -> list[tuple[str, Path | None, dict]]:
    """Where settings are read, highest priority first: (label, file, values)."""
    base, named = env_files(environ, cwd)
    layers: list[tuple[str, Path | None, dict]] = []
    own = account_file(config, cwd)
    if own is not None:
        layers.append((f"account file {own}", own, _file(own)))
    layers.append(("environment", None, {name.lower(): value for name, value in environ.items()}))
    layers.append((str(named), named, _file(named)))
    layers.append((str(base), base, _file(base)))
    return layers


# `scheme://user:password@host`: the credentials in a server URL are a secret too.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


def _no_credentials(value: object) -> object:
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(r"\1***@", value)
    if isinstance(value, list):
        return [_no_credentials(item) for item in value]
    return value


def shown(name: str, value: object) -> str:
    """A value as the page shows it: secrets masked whatever they are, and URL credentials."""
    if is_secret_setting(name):
        return SECRET_SET if value not in (None, "", "EMPTY") else "(empty / 未设置)"
    value = _no_credentials(value)
    if isinstance(value, (list, dict, bool)):
        # default=str: a list of paths (TWIN_ACCOUNTS) is shown as the paths it names.
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, (set, frozenset)):
        return json.dumps(sorted(value), ensure_ascii=False)
    return str(value)


def rows(config: Config, nonebot: dict[str, object], environ=os.environ, cwd: Path = Path()) -> list[dict]:
    layers = sources(config, environ, cwd)
    table = []
    for name, field in Config.model_fields.items():
        source = next((label for label, _, values in layers if name in values), "default / 默认")
        table.append(
            {
                "name": name.upper(),
                "value": shown(name, getattr(config, name)),
                "source": source,
                "help": field.description,
            }
        )
    for name in NONEBOT_SETTINGS:
        if name not in nonebot:
            continue
        source = next((label for label, _, values in layers[-3:] if name in values), "default / 默认")
        table.append(
            {"name": name.upper(), "value": shown(name, nonebot[name]), "source": source, "help": "NoneBot"}
        )
    return table


@page("/settings", nav=("设置", "Settings"))
async def settings(view: View) -> Response:
    try:
        import nonebot

        driver_config = nonebot.get_driver().config
        nonebot_values = {name: getattr(driver_config, name, None) for name in NONEBOT_SETTINGS}
        nonebot_values["onebot_access_token"] = os.environ.get("ONEBOT_ACCESS_TOKEN") or "set"
    except ValueError:  # NoneBot not initialised (unit tests of the console alone)
        nonebot_values = {}
    return view.render("settings.html", rows=rows(view.twin.config, nonebot_values))

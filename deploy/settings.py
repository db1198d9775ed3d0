"""The `TWIN_*` settings for `twin retrain` and the retrain child: the bot's own schema
(`bot.config.Config`), read from the same `.env` / environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from bot.config import Config, account_settings, load_config
from pipeline.errors import InputError


def load_settings(account: int | None = None, cwd: Path = Path(), **overrides: object) -> Config:
    """The settings from the environment and `cwd`'s `.env`, or with `account` that account's file
    of `TWIN_ACCOUNTS` over them; a bad value is one InputError naming where it is."""
    try:
        settings = load_config(cwd, **overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = "_".join(str(p) for p in error["loc"]).upper()
        raise InputError(".env / environment", f"{name}: {error['msg']}") from None
    return settings if account is None else account_settings(settings, account, cwd, **overrides)

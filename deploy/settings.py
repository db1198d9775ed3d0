"""The `TWIN_*` settings for `twin retrain` and the retrain child: the bot's own schema
(`bot.config.Config`), read from the same `.env` / environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from bot.config import Config, load_config
from pipeline.errors import InputError


def load_settings(cwd: Path = Path(), **overrides: object) -> Config:
    """The settings from the environment and `cwd`'s `.env`; a bad value is one InputError naming it."""
    try:
        return load_config(cwd, **overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = "_".join(str(p) for p in error["loc"]).upper()
        raise InputError(".env / environment", f"{name}: {error['msg']}") from None

"""One `TWIN_*` schema: the bot, `twin retrain` and the retrain child read the same values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from nonebot.compat import model_dump, type_validate_python
from nonebot.config import BaseSettings as NoneBotSettings
from nonebot.config import Config as NoneBotConfig
from nonebot.config import Env
from pydantic.fields import FieldInfo

from bot.config import Config, load_config
from deploy.commands import settings_json
from deploy.settings import load_settings

ROOT = Path(__file__).parents[1]


def _not_the_default(name: str, field: FieldInfo) -> str:
    """A valid `.env` value for the setting that differs from its default."""
    default = field.default
    if name == "twin_retrain_cron":
        return "30 5 * * 1"
    if name == "twin_openai_fallback_urls":
        return '["http://甲:8000/v1", "http://c/v1"]'
    if get_origin(field.annotation) is Literal:
        return next(choice for choice in get_args(field.annotation) if choice != default)
    if isinstance(default, bool):
        return json.dumps(not default)
    if isinstance(default, int):
        return str(default + 1)
    if isinstance(default, float):
        return str(round(default + 0.05, 4))
    if isinstance(default, list):
        return "[7, 8]" if get_args(field.annotation) == (int,) else '["甲 乙", "c"]'
    return f"set-{name}"  # text, paths, optional ones


def _as_the_bot_reads_it(cwd: Path) -> Config:
    """What `get_plugin_config(Config)` returns in a bot started in `cwd` (as `nonebot.init` reads)."""
    env_file = (cwd / ".env", cwd / f".env.{Env().environment}")
    global_config = NoneBotConfig(_env_file=env_file)
    values = NoneBotSettings._settings_build_values(
        Config,
        model_dump(global_config),
        env_file=env_file,
        env_file_encoding="utf-8",
        env_nested_delimiter=None,
    )
    return type_validate_python(Config, values)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.upper().startswith("TWIN_") or name.upper() == "ENVIRONMENT":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_bot_the_cli_and_the_retrain_child_read_the_same_value_of_every_setting(clean_env: Path) -> None:
    lines = [f"{name.upper()}={_not_the_default(name, field)}" for name, field in Config.model_fields.items()]
    (clean_env / ".env").write_text("HOST=127.0.0.1\n" + "\n".join(lines) + "\n", encoding="utf-8")

    bot = _as_the_bot_reads_it(clean_env)
    cli = load_settings()
    child = subprocess.run(
        [sys.executable, "-m", "deploy", "retrain", "--print-settings"],
        cwd=clean_env,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    defaults = Config()
    unchanged = [name for name in Config.model_fields if getattr(bot, name) == getattr(defaults, name)]
    assert not unchanged, f"the .env did not change {unchanged}"
    assert bot.model_dump() == cli.model_dump()
    assert settings_json(bot) == settings_json(cli) == child.splitlines()[-1]
    assert json.loads(child)["TWIN_DB_KEY"] == "***"  # never printed


def test_the_environment_wins_over_the_env_file_for_every_reader(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_env / ".env").write_text("TWIN_MODEL=from-file\nTWIN_PERSONA=小明\n", encoding="utf-8")
    monkeypatch.setenv("TWIN_MODEL", "from-env")
    for settings in (_as_the_bot_reads_it(clean_env), load_config()):
        assert (settings.twin_model, settings.twin_persona) == ("from-env", "小明")


def test_defaults_agree_everywhere(clean_env: Path) -> None:
    defaults = Config().model_dump()
    assert Config().twin_model == "models"  # the registry `twin export` / `twin retrain` write
    assert _as_the_bot_reads_it(clean_env).model_dump() == defaults
    assert load_config().model_dump() == defaults
    shutil.copy(ROOT / ".env.example", clean_env / ".env")  # what it shows is the default
    from_example = _as_the_bot_reads_it(clean_env).model_dump()
    assert {k: v for k, v in from_example.items() if v != defaults[k]} == {}
    assert load_config().model_dump() == defaults


def test_fallback_urls_are_read_as_a_comma_list_by_the_bot_and_the_cli(clean_env: Path) -> None:
    (clean_env / ".env").write_text("TWIN_OPENAI_FALLBACK_URLS=http://a:8000/v1, http://b:8000/v1\n")
    for settings in (_as_the_bot_reads_it(clean_env), load_config()):
        assert settings.twin_openai_fallback_urls == ["http://a:8000/v1", "http://b:8000/v1"]

"""NoneBot entry point: `python bot.py` (or `twin serve`) runs the qq-twin bot.

Settings come from the environment and `.env` (see `.env.example`); plugins from
`[tool.nonebot]` in pyproject.toml. Before NoneBot starts, every secret setting is masked in
the log and an empty `ONEBOT_ACCESS_TOKEN` is replaced by a generated one (bot/transport.py);
`TWIN_LOG_FORMAT=json` writes one JSON object per log line (bot/log_json.py).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import nonebot
from nonebot.log import LoguruHandler, default_filter, default_format, logger
from pydantic import ValidationError

from bot import transport
from bot.log_json import JsonLines, log_format
from bot.log_mask import MaskedStream, SecretMask, secret_values


def _quiet_filter(record) -> bool:
    """NoneBot logs every event with its text at SUCCESS; message text is shown only at DEBUG."""
    if record["function"] == "handle_event" and record["level"].name == "SUCCESS":
        level = record["extra"].get("nonebot_log_level", "INFO")
        return (logger.level(level).no if isinstance(level, str) else level) <= logger.level("DEBUG").no
    return default_filter(record)


def _log_uncaught(kind, value, traceback) -> None:
    """Uncaught errors go through the masked log instead of straight to stderr."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logger.opt(exception=(kind, value, traceback)).critical("qq-twin: stopped by an unexpected error")


# Masked before NoneBot logs anything: at DEBUG it logs its whole configuration.
setting_layers = transport.settings_layers(os.environ)
masked_layers = [*setting_layers, *transport.account_layers(transport.merge_layers(setting_layers))]
secret_mask = SecretMask(value for layer in masked_layers for value in secret_values(layer))
logger.remove()
if log_format(transport.merge_layers(setting_layers)) == "json":
    json_sink = JsonLines(MaskedStream(sys.stdout, secret_mask))
    logger.add(json_sink, level=0, diagnose=False, filter=_quiet_filter)
else:
    logger.add(
        MaskedStream(sys.stdout, secret_mask),
        level=0,
        diagnose=False,
        filter=_quiet_filter,
        format=default_format,
        colorize=sys.stdout.isatty(),
    )
logging.lastResort = LoguruHandler(logging.WARNING)  # libraries' unhandled warnings, else raw on stderr
sys.excepthook = _log_uncaught

try:
    access_token = transport.bootstrap_access_token(transport.merge_layers(setting_layers))
except transport.TokenFileError as exc:
    logger.error(f"qq-twin: {exc}")
    sys.exit(2)
secret_mask.add(access_token.value)
if access_token.file is not None:
    logger.info(access_token.describe())

nonebot.init(**access_token.nonebot_settings())
# NoneBot installs its own patcher (plugin names); keep it, then mask every record for every sink.
logger.configure(patcher=secret_mask.chain(getattr(nonebot, "_log_patcher", None)))
driver = nonebot.get_driver()
try:  # the adapter reads the plugin's settings: a bad one stops here, in one line
    driver.register_adapter(transport.HardenedAdapter)
except ValidationError as exc:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    logger.error(f"qq-twin: the plugin did not load: bad setting ({problems})")
    sys.exit(2)
# Importing bot.transport ran `bot/__init__.py` as a plain package: NoneBot must run it again as
# the plugin (its submodules, already imported, stay as they are).
del sys.modules["bot"]
nonebot.load_from_toml(str(Path(__file__).with_name("pyproject.toml")))
if nonebot.get_plugin("bot") is None:  # NoneBot logs a failed plugin and runs on without it
    logger.error("qq-twin: the plugin did not load (see the error above, usually a bad TWIN_* setting)")
    sys.exit(2)

if __name__ == "__main__":
    from bot.handlers import startup_problem

    problem = startup_problem()
    if problem:  # one line and status 2, rather than uvicorn's startup traceback
        logger.error(f"qq-twin: {problem}")
        sys.exit(2)
    nonebot.run()

"""NoneBot entry point: `python bot.py` (or `twin serve`) runs the qq-twin bot.

Settings come from the environment and `.env` (see `.env.example`); plugins from
`[tool.nonebot]` in pyproject.toml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nonebot
from nonebot.adapters.onebot.v11 import Adapter as OneBotV11Adapter
from nonebot.log import default_filter, default_format, logger


def _quiet_filter(record) -> bool:
    """NoneBot logs every event with its text at SUCCESS; message text is shown only at DEBUG."""
    if record["function"] == "handle_event" and record["level"].name == "SUCCESS":
        level = record["extra"].get("nonebot_log_level", "INFO")
        return (logger.level(level).no if isinstance(level, str) else level) <= logger.level("DEBUG").no
    return default_filter(record)


logger.remove()
logger.add(sys.stdout, level=0, diagnose=False, filter=_quiet_filter, format=default_format)

nonebot.init()
driver = nonebot.get_driver()
driver.register_adapter(OneBotV11Adapter)
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

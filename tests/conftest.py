"""What the whole test run shares: a header line saying whether the console's browser tests can run."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

# Debian's packages `chromium` and `chromium-driver`: the browser tests use these, never a download.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "apt-get install chromium chromium-driver"


def console_browser_problem() -> str | None:
    """Why the console's browser tests cannot run here, or None when they can."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        return f"no chromium/chromedriver ({INSTALL_HINT})"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def chromium_version() -> str:
    """`chromium 150`, or plain `chromium` when it does not say."""
    try:
        shown = subprocess.run(
            [str(CHROMIUM), "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        shown = ""
    match = re.search(r"Chromium (\d+)", shown)
    return f"chromium {match.group(1)}" if match else "chromium"


def pytest_report_header(config: pytest.Config) -> str:
    problem = console_browser_problem()
    if problem is not None:
        return f"console browser tests: SKIPPED — {problem}"
    return f"console browser tests: {chromium_version()} at {CHROMIUM}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    # `make test` runs quietly (-q), which hides the header: say it once at the end instead.
    if config.get_verbosity() < 0:
        terminalreporter.write_line(pytest_report_header(config))

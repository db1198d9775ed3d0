"""A headless Debian Chromium for the console's browser tests: started offline, its console read.

Selenium is given chromedriver's path and `SE_OFFLINE=true`, so Selenium Manager never looks for
(or downloads) a browser or a driver; without Debian's packages the tests are skipped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MISSING = (
    "console browser tests need Debian's chromium and chromium-driver: "
    "apt-get install chromium chromium-driver"
)
REPO = Path(__file__).resolve().parents[2]
DESKTOP = (1280, 900)
PHONE = (390, 844)
FULL_PAGE = (DESKTOP[0], 0)  # the desktop's width, as tall as the page (up to MAX_HEIGHT)
MAX_HEIGHT = 2400
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
)


def installed() -> tuple[Path, Path]:
    """Chromium and chromedriver (Debian's paths first, then PATH); skips the test without them."""
    chromium = CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or "")
    driver = CHROMEDRIVER if CHROMEDRIVER.exists() else Path(shutil.which("chromedriver") or "")
    if not chromium.name or not driver.name:
        pytest.skip(MISSING)
    return chromium, driver


@contextmanager
def chromium(profile: Path) -> Iterator[object]:
    """A headless Chromium with a fresh profile in `profile`, its console log kept; quit afterwards."""
    browser, driver_path = installed()
    # Imported here so that a missing selenium skips like a missing browser would, not at collection.
    webdriver = pytest.importorskip("selenium.webdriver", reason=MISSING)
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never reach the network
    options = webdriver.ChromeOptions()
    options.binary_location = str(browser)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={DESKTOP[0]},{DESKTOP[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        with suppress(Exception):  # a browser that already died has nothing left to quit
            driver.quit()


def console_errors(driver: object) -> list[str]:
    """The SEVERE entries the browser logged since the last call (the log is drained by reading)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot_dir() -> Path:
    """`$TWIN_CONSOLE_SCREENSHOTS` (relative to the repo root), else test-artifacts/console/."""
    chosen = os.environ.get("TWIN_CONSOLE_SCREENSHOTS")
    folder = REPO / chosen if chosen else REPO / "test-artifacts" / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(driver: object, name: str, size: tuple[int, int] = DESKTOP) -> Path:
    """The current page, its viewport exactly `size` (a phone's when narrow; with height 0 the whole
    page, up to MAX_HEIGHT), saved as `<name>.png`."""
    width, height = size
    if not height:
        height = min(MAX_HEIGHT, int(driver.execute_script("return document.documentElement.scrollHeight")))
    # The window's size includes the browser's own frame; the device metrics are the page's.
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    path = screenshot_dir() / f"{name}.png"
    try:
        assert driver.save_screenshot(str(path)), f"no screenshot of {name}"
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path

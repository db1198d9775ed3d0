"""The test run says whether the console's browser tests run, and if not, what to install."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import conftest


def test_the_header_names_the_missing_browser_and_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(conftest, "CHROMEDRIVER", tmp_path / "no-chromedriver")
    line = conftest.pytest_report_header(None)  # type: ignore[arg-type]
    assert line == (
        "console browser tests: SKIPPED — no chromium/chromedriver (apt-get install chromium chromium-driver)"
    )


def test_the_header_names_the_chromium_it_will_drive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("chromium", "chromedriver"):
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\necho 'Chromium 150.0.7871.100 built on Debian GNU/Linux 12 (bookworm)'\n")
        fake.chmod(0o755)
    monkeypatch.setattr(conftest, "CHROMIUM", tmp_path / "chromium")
    monkeypatch.setattr(conftest, "CHROMEDRIVER", tmp_path / "chromedriver")
    monkeypatch.setattr(conftest.importlib.util, "find_spec", lambda name: object())
    line = conftest.pytest_report_header(None)  # type: ignore[arg-type]
    assert line == f"console browser tests: chromium 150 at {tmp_path / 'chromium'}"

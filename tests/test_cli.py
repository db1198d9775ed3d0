"""The `twin` shell: usage mistakes are one message and status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deploy.cli import main

COMMANDS = (
    "sample-db",
    "decrypt",
    "extract",
    "build-dataset",
    "train",
    "eval",
    "export",
    "chat",
    "serve",
    "simulate",
    "health",
    "napcat-config",
    "retrain",
    "models",
    "demo",
    "backup",
    "restore",
    "doctor",
    "memory",
)


def test_every_architecture_command_is_there(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    for name in COMMANDS:
        assert name in listing


@pytest.mark.parametrize(
    "argv", [["extract"], ["nosuch"], ["models", "-r"], ["train", "--max-steps", "many"]]
)
def test_usage_mistakes_exit_2_without_a_traceback(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Error" in err


def test_the_console_entry_point_reports_bad_input_in_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy",
            "extract",
            str(tmp_path / "missing.db"),
            "-o",
            str(tmp_path / "m.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing.db" in lines[0]
    assert not (tmp_path / "m.jsonl").exists()


def test_a_full_disk_in_any_command_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import errno

    import pipeline.dataset.build

    out = tmp_path / "dataset"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "train.jsonl"))

    monkeypatch.setattr(pipeline.dataset.build, "build_dataset", full_disk)
    (tmp_path / "messages.jsonl").write_text("", encoding="utf-8")

    code = main(["build-dataset", str(tmp_path / "messages.jsonl"), "-o", str(out)])

    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == f"twin: error: {out / 'train.jsonl'}: no space left on device; the output was not written"

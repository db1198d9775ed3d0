"""`twin build-dataset` from the command line: flags, config files and one-line errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from deploy.cli import main
from pipeline.records import Message, write_messages

T0 = 1_700_000_000
OWNER = "999"


@pytest.fixture
def messages_file(tmp_path: Path) -> Path:
    rows = []
    for d in range(8):
        t = T0 + d * 86400
        rows += [
            Message(f"{d}a", "group", "200", "300", "王大锤", False, t, f"王大锤说第{d}天开会"),
            Message(f"{d}b", "group", "200", OWNER, "", True, t + 20, "收到 王大锤"),
        ]
    path = tmp_path / "messages.jsonl"
    write_messages(path, rows)
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["build-dataset", *args, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_build_dataset_writes_the_dataset_and_a_summary(tmp_path, messages_file, capsys):
    names = tmp_path / "names.txt"
    names.write_text("# people to hide\n王大锤\n", encoding="utf-8")
    config = tmp_path / "my.toml"
    config.write_text('persona = "小林"\nval_fraction = 0.25\n[rules]\nmax_repeats = 3\n', encoding="utf-8")
    code, out, err = run(
        capsys, str(messages_file), "-o", str(tmp_path / "ds"), "--config", str(config),
        "--format", "sharegpt", "--context-turns", "2", "--redact-names", str(names), "--seed", "3",
    )  # fmt: skip
    assert code == 0, err
    assert "6 train + 2 val samples" in out
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert report["settings"]["persona"] == "小林"
    assert report["settings"]["context_turns"] == 2
    assert report["settings"]["rules"]["max_repeats"] == 3
    assert report["redactions"] == {"name": 24}
    train = (tmp_path / "ds" / "train.jsonl").read_text(encoding="utf-8")
    assert "王大锤" not in train
    assert '"from": "gpt"' in train


def one_line_error(code: int, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("twin: error: ")
    return lines[0]


def test_a_malformed_line_is_one_line_error_naming_file_and_line(tmp_path, messages_file, capsys):
    with messages_file.open("a", encoding="utf-8") as handle:
        handle.write("not json\n")
    line = one_line_error(*run(capsys, str(messages_file), "-o", str(tmp_path / "ds"))[::2])
    assert f"{messages_file}: line 17" in line
    assert not (tmp_path / "ds").exists()
    code, out, _ = run(capsys, str(messages_file), "-o", str(tmp_path / "ds"), "--skip-bad")
    assert code == 0
    assert "skipped 1 malformed lines" in out


@pytest.mark.parametrize(
    ("extra", "cause"),
    [
        (["--format", "csv"], "unknown format"),
        (["--config", "missing.toml"], "no such settings file"),
        (["--mix", "missing.jsonl", "--mix-ratio", "0.2"], "no such mix file"),
        (["--redact-names", "missing.txt"], "no such names file"),
        (["--session-gap", "0"], "--session-gap: bad value"),
        (["--concurrency", "0", "--llm-clean"], "--concurrency: bad value"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, messages_file, capsys, extra, cause):
    code, _, err = run(capsys, str(messages_file), "-o", str(tmp_path / "ds"), *extra)
    assert cause in one_line_error(code, err)
    assert not (tmp_path / "ds").exists()


def test_a_missing_input_file_is_one_line_error(tmp_path, capsys):
    code, _, err = run(capsys, str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "ds"))
    assert "nope.jsonl: no such file" in one_line_error(code, err)


def test_an_unreachable_llm_server_is_one_line_error_unless_optional(tmp_path, messages_file, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    args = [
        str(messages_file),
        "-o",
        str(tmp_path / "ds"),
        "--llm-clean",
        "--api-base",
        base,
        "--api-key",
        "sk-x",
    ]
    code, _, err = run(capsys, *args)
    assert "LLM server unreachable" in one_line_error(code, err)
    assert "sk-x" not in err
    code, out, _ = run(capsys, *args, "--llm-optional")
    assert code == 0
    assert "LLM pass skipped" in out
    assert "sk-x" not in (tmp_path / "ds" / "report.json").read_text()


def test_build_dataset_examples_flags_put_earlier_replies_of_the_chat_in_the_system_prompt(
    tmp_path, messages_file, capsys
):
    from pipeline.chatformat import EXAMPLES_HEADING

    out = tmp_path / "ds"
    code, _, err = run(
        capsys, str(messages_file), "-o", str(out), "--examples", "2", "--examples-tokens", "40"
    )
    assert code == 0, err
    lines = [json.loads(line) for name in ("train.jsonl", "val.jsonl") for line in (out / name).open()]
    systems = [row["messages"][0]["content"] for row in lines]
    assert EXAMPLES_HEADING not in systems[0]  # the first answer has nothing before it
    assert all(f"{EXAMPLES_HEADING}\n- 收到 " in system for system in systems[1:])
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["settings"]["examples"] == 2 and report["settings"]["examples_tokens"] == 40

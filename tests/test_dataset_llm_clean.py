"""The LLM cleaning pass against a real local OpenAI-compatible HTTP server started by the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.dataset.build import build_dataset
from pipeline.dataset.llm_clean import LLMUnavailable, parse_verdict
from pipeline.dataset.settings import DatasetSettings, LLMSettings
from pipeline.records import Message, write_messages

T0 = 1_700_000_000
OWNER = "999"
REPO = Path(__file__).resolve().parents[1]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that went away mid-answer (the Ctrl-C test) is expected


class FakeJudge:
    """An OpenAI-compatible chat-completions server: rejects replies that advertise, keeps the rest."""

    def __init__(self, *, fail_first: int = 0, garbage_first: int = 0, refuse_after: int | None = None,
                 latency_s: float = 0.0) -> None:  # fmt: skip
        self.fail_first = fail_first
        self.garbage_first = garbage_first
        self.refuse_after = refuse_after
        self.latency_s = latency_s
        self.requests = 0
        self.answered = 0
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._send(
                    200, {"object": "list", "data": [{"id": "judge", "object": "model", "owned_by": "test"}]}
                )

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests += 1
                    if judge.fail_first > 0:
                        judge.fail_first -= 1
                        status = 500
                    elif judge.garbage_first > 0:
                        judge.garbage_first -= 1
                        status = 0
                    elif judge.refuse_after is not None and judge.answered >= judge.refuse_after:
                        status = 400
                    else:
                        judge.answered += 1
                        status = 200
                time.sleep(judge.latency_s)
                if status in (400, 500):
                    self._send(status, {"error": {"message": "simulated", "type": "server_error"}})
                    return
                conversation = request["messages"][-1]["content"]
                verdict = {"keep": "广告" not in conversation, "score": 1 if "广告" in conversation else 4,
                           "reason": "测试"}  # fmt: skip
                content = (
                    "嗯……" if status == 0 else f"<think>想想</think>{json.dumps(verdict, ensure_ascii=False)}"
                )
                self._send(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": request["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })  # fmt: skip

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def history(days: int = 6) -> list[Message]:
    out = []
    for d in range(days):
        t = T0 + d * 86400
        reply = "买吗 加我看广告" if d == 2 else f"好耶{d}"
        out += [
            Message(f"{d}a", "c2c", "100", "100", "小王", False, t, f"第{d}天 在吗"),
            Message(f"{d}b", "c2c", "100", OWNER, "", True, t + 30, reply),
        ]
    return out


def settings(base: str, cache: Path, **llm) -> DatasetSettings:
    options = {
        "enabled": True,
        "api_base": base,
        "model": "judge",
        "cache": str(cache),
        "backoff_s": 0.01,
        **llm,
    }
    return DatasetSettings(val_fraction=0.0, llm=LLMSettings(**options))


def test_the_judge_drops_rejected_samples_and_the_report_counts_verdicts(tmp_path):
    with FakeJudge() as judge:
        report = build_dataset(
            history(), tmp_path / "d", settings(judge.base, tmp_path / "c.jsonl"), progress=False
        )
    train = (tmp_path / "d" / "train.jsonl").read_text(encoding="utf-8")
    assert "广告" not in train
    assert report.samples["train"] == 5
    assert report.samples["llm_dropped"] == 1
    assert report.llm["judged"] == 6
    assert report.llm["dropped"] == 1
    assert report.llm["scores"] == {"1": 1, "2": 0, "3": 0, "4": 5, "5": 0}


def test_server_errors_and_unreadable_answers_are_retried(tmp_path):
    with FakeJudge(fail_first=3, garbage_first=2) as judge:
        report = build_dataset(
            history(), tmp_path / "d", settings(judge.base, tmp_path / "c.jsonl"), progress=False
        )
    assert report.llm["errors"] == 0
    assert report.llm["retries"] == 5
    assert report.llm["judged"] == 6
    assert judge.requests == 11


def test_a_rerun_is_answered_from_the_cache(tmp_path):
    cache = tmp_path / "c.jsonl"
    with FakeJudge() as judge:
        build_dataset(history(), tmp_path / "d", settings(judge.base, cache), progress=False)
        first = judge.requests
        report = build_dataset(history(), tmp_path / "d", settings(judge.base, cache), progress=False)
    assert judge.requests == first
    assert (report.llm["cached"], report.llm["judged"]) == (6, 0)
    assert report.samples["llm_dropped"] == 1
    assert oct(cache.stat().st_mode & 0o777) == "0o600"


def test_samples_left_unjudged_are_kept_and_judged_on_the_next_run(tmp_path):
    cache = tmp_path / "c.jsonl"
    with FakeJudge(refuse_after=4) as judge:
        report = build_dataset(history(), tmp_path / "d", settings(judge.base, cache), progress=False)
    assert (report.llm["judged"], report.llm["errors"]) == (4, 2)
    with FakeJudge() as judge:
        report = build_dataset(history(), tmp_path / "d", settings(judge.base, cache), progress=False)
    assert (report.llm["cached"], report.llm["judged"], judge.requests) == (4, 2, 2)


def closed_port_base() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_an_unreachable_server_fails_fast_with_one_clear_line(tmp_path):
    started = time.monotonic()
    with pytest.raises(LLMUnavailable, match=r"unreachable.*--llm-optional") as info:
        build_dataset(
            history(), tmp_path / "d", settings(closed_port_base(), tmp_path / "c.jsonl"), progress=False
        )
    assert time.monotonic() - started < 5
    assert "\n" not in str(info.value)
    assert not (tmp_path / "d").exists()


def test_llm_optional_continues_rule_only(tmp_path):
    s = settings(closed_port_base(), tmp_path / "c.jsonl", optional=True)
    report = build_dataset(history(), tmp_path / "d", s, progress=False)
    assert report.samples["train"] == 6
    assert report.llm["enabled"] is False
    assert "unreachable" in report.llm["skipped_because"]


def test_llm_optional_still_applies_verdicts_already_in_the_cache(tmp_path):
    cache = tmp_path / "c.jsonl"
    with FakeJudge() as judge:
        build_dataset(history(), tmp_path / "d", settings(judge.base, cache), progress=False)
    report = build_dataset(
        history(), tmp_path / "d", settings(closed_port_base(), cache, optional=True), progress=False
    )
    assert (report.samples["train"], report.samples["llm_dropped"]) == (5, 1)
    assert report.llm["cached"] == 6
    assert "unreachable" in report.llm["skipped_because"]


def test_ctrl_c_keeps_finished_verdicts_and_the_rerun_resumes(tmp_path):
    src = tmp_path / "messages.jsonl"
    write_messages(src, history(40))
    cache = tmp_path / "cache.jsonl"
    out = tmp_path / "d"
    # Slow enough that 30 verdicts are still outstanding when the signal lands, even on a quiet machine.
    with FakeJudge(latency_s=0.2) as judge:
        args = [sys.executable, "-m", "deploy.cli", "build-dataset", str(src), "-o", str(out), "--quiet",
                "--llm-clean", "--api-base", judge.base, "--model", "judge", "--concurrency", "2",
                "--cache", str(cache)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
        )
        deadline = time.monotonic() + 60
        while _lines(cache) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr
        assert not out.exists()
        done = _lines(cache)
        assert 10 <= done < 40

        before = judge.requests
        report = build_dataset(src, out, settings(judge.base, cache), progress=False)
    assert report.llm["cached"] == done
    assert judge.requests - before == 40 - done
    assert report.samples["train"] == 39


def _default_sigint() -> None:
    """Ctrl-C as a terminal delivers it: a background job (as CI may be) inherits SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


def test_verdicts_are_read_from_chatty_answers():
    assert parse_verdict('好的：{"keep": "false", "score": 9, "reason": "广告"}').keep is False
    assert parse_verdict('{"keep": true, "score": 0}').score == 1
    with pytest.raises(ValueError):
        parse_verdict("保留")

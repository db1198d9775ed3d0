"""Benchmark of the LLM cleaning pass: bounded concurrency vs a sequential client, in one run.

A local fake OpenAI-compatible server answers every chat completion after a fixed
latency (a real judge model spends most of a request generating). The same samples are
judged by (a) a plain sequential loop over the synchronous `openai` client, (b) our
async pass at concurrency 1, (c) at `--concurrency` (default 8), and (d) re-run from the
cache. Goal: (c) ≥ 4× (a).

    .venv/bin/python bench/llm_clean.py [--samples 160] [--latency-ms 50] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _docs import DOCS, replace_section  # noqa: E402  (bench/ is on sys.path when a script runs)

from pipeline.dataset.build import build_samples  # noqa: E402
from pipeline.dataset.llm_clean import (  # noqa: E402
    JUDGE_PROMPT,
    VerdictCache,
    judge_samples,
    parse_verdict,
    render_for_judge,
)
from pipeline.dataset.samples import Sample  # noqa: E402
from pipeline.dataset.settings import DatasetSettings, LLMSettings  # noqa: E402
from pipeline.records import Message  # noqa: E402

SECTION = "## LLM cleaning pass (`bench/llm_clean.py`)"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def start_server(latency_s: float) -> tuple[_Server, str]:
    """A fake judge on 127.0.0.1 that answers each request after `latency_s`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self._send({"object": "list", "data": [{"id": "judge", "object": "model"}]})

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency_s)
            verdict = json.dumps({"keep": True, "score": 4, "reason": "ok"})
            self._send({
                "id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": verdict}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })  # fmt: skip

        def _send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def make_samples(count: int) -> list[Sample]:
    """`count` distinct owner-reply samples from a generated two-person history."""
    messages = []
    t = 1_700_000_000
    for i in range(count):
        messages.append(Message(f"{i}a", "c2c", "1", "1", "小王", False, t + i * 200, f"第{i}个问题 在吗"))
        messages.append(Message(f"{i}b", "c2c", "1", "9", "", True, t + i * 200 + 30, f"在的 {i} 号回答"))
    return list(build_samples(messages, DatasetSettings(context_turns=2)))[:count]


def sequential(samples: list[Sample], base: str) -> float:
    """The naive client: one blocking request after another."""
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key="EMPTY", max_retries=0)
    started = time.perf_counter()
    for sample in samples:
        response = client.chat.completions.create(
            model="judge",
            messages=[
                {"role": "system", "content": JUDGE_PROMPT},
                {"role": "user", "content": render_for_judge(sample)},
            ],
            temperature=0,
        )
        parse_verdict(response.choices[0].message.content or "")
    client.close()
    return time.perf_counter() - started


def ours(samples: list[Sample], base: str, concurrency: int, cache_path: Path) -> tuple[float, int]:
    settings = LLMSettings(enabled=True, api_base=base, model="judge", concurrency=concurrency)
    cache = VerdictCache(cache_path)
    started = time.perf_counter()
    try:
        _, stats = asyncio.run(judge_samples(samples, settings, cache))
    finally:
        cache.close()
    return time.perf_counter() - started, stats.judged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS.name}")
    args = parser.parse_args()

    samples = make_samples(args.samples)
    server, base = start_server(args.latency_ms / 1000)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t_seq = sequential(samples, base)
            rows.append(("sequential `openai.OpenAI` loop", t_seq, len(samples)))
            t_one, judged = ours(samples, base, 1, Path(tmp) / "one.jsonl")
            rows.append(("ours, concurrency 1", t_one, judged))
            t_many, judged = ours(samples, base, args.concurrency, Path(tmp) / "many.jsonl")
            rows.append((f"ours, concurrency {args.concurrency}", t_many, judged))
            t_cached, judged = ours(samples, base, args.concurrency, Path(tmp) / "many.jsonl")
            rows.append(("re-run from the cache", t_cached, len(samples)))
    finally:
        server.shutdown()
        server.server_close()

    speedup = t_seq / t_many
    table = [
        "| client | seconds | samples/s | vs sequential |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {secs:.2f} | {n / secs:,.0f} | {t_seq / secs:.1f}× |" for name, secs, n in rows),
    ]
    summary = (
        f"{len(samples)} samples, simulated latency {args.latency_ms:.0f} ms per request, "
        f"{platform.python_implementation()} {platform.python_version()}, {time.strftime('%Y-%m-%d')}. "
        f"Concurrency {args.concurrency} is **{speedup:.1f}×** the sequential client (goal ≥ 4×)."
    )
    print("\n".join(table))
    print(summary)
    if args.write_docs:
        write_section(table, summary)
    return 0 if speedup >= 4 else 1


def write_section(table: list[str], summary: str) -> None:
    """Replace only this benchmark's section of docs/benchmarks.md (others own the rest)."""
    replace_section(SECTION, [
        "A local fake OpenAI-compatible server (`http.server`, one thread per request) answers",
        "every chat completion after a fixed latency, standing in for a judge model that spends",
        "its time generating. The same samples are judged by a plain sequential loop over the",
        "synchronous `openai` client and by `pipeline.dataset.llm_clean.judge_samples` (the",
        "`--llm-clean` pass: `AsyncOpenAI`, bounded worker pool, retries, verdict cache).",
        "",
        *table,
        "",
        summary,
        "",
        "Against a real server the gain is bounded by how many requests it batches at once",
        "(vLLM and llama-server with `--parallel N` batch; a single-slot server does not), so",
        "set `--concurrency` to the server's parallel slots. The cache makes re-runs free.",
        "",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

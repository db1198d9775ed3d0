"""A tiny OpenAI-compatible chat-completions server on 127.0.0.1 for tests: scripted answers,
injectable failures, and every request body kept."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    """A chat-completions endpoint whose answer depends on the last user message.

    Keyed on the last line: `boom` → HTTP 500, `沉默` → empty reply, `多条` → six lines,
    `链接` → a link and a line, anything else → `收到:` + that line. Every request body is kept in `requests`.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                turn = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
                last = turn.split("\n")[-1]
                if "boom" in last:
                    self.send_response(500)
                    self.end_headers()
                    return
                if "慢" in last:
                    time.sleep(2)
                if "沉默" in last:
                    text = ""
                elif "多条" in last:
                    text = "一\n二\n三\n四\n五\n六"
                elif "链接" in last:
                    text = "看这个 https://example.com/x\n好的"
                else:
                    text = "收到:" + last
                payload = json.dumps(
                    {
                        "id": "c1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text},
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def requests_mentioning(self, text: str) -> list[dict]:
        return [r for r in self.requests if any(text in m["content"] for m in r["messages"])]

    def close(self) -> None:
        self.server.shutdown()

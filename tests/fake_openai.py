"""A tiny OpenAI-compatible chat-completions server on 127.0.0.1 for tests: scripted answers,
injectable failures and delays, vLLM's runtime LoRA endpoints, and every request body kept."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    """A chat-completions endpoint whose answer depends on the last user message.

    Keyed on the last line: `boom` → HTTP 500, `沉默` → empty reply, `多条` → six lines,
    `链接` → a link and a line, anything else → `收到:` + that line. Every request body is kept in `requests`.

    Like vLLM (docs.vllm.ai, "Dynamically serving LoRA Adapters") it serves
    `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` (200 text; 400 "has already been
    loaded" for a name it has) and `POST /v1/unload_lora_adapter {"lora_name"}` (404 for a name
    it lacks); `lora_calls` keeps them in order. Set `status` to answer every chat with that
    HTTP status, `delay` to answer chats that many seconds late, `fail_loads` to answer loads
    with 500, and `strict_models` to answer 404 for a model name that is not loaded.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lora_calls: list[tuple[str, dict]] = []  # (endpoint, body)
        self.loaded: set[str] = set()
        self.status: int | None = None
        self.delay = 0.0
        self.fail_loads = False
        self.strict_models = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def reply(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def error(self, status: int, message: str, kind: str) -> None:
                body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
                self.reply(status, json.dumps(body).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("/load_lora_adapter"):
                    return self.load(body)
                if self.path.endswith("/unload_lora_adapter"):
                    return self.unload(body)
                fake.requests.append(body)
                if fake.delay:
                    time.sleep(fake.delay)
                if fake.status is not None:
                    return self.error(fake.status, "unavailable", "ServiceUnavailableError")
                if fake.strict_models and body["model"] not in fake.loaded:
                    return self.error(404, f"The model `{body['model']}` does not exist.", "NotFoundError")
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
                payload = {
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
                self.reply(200, json.dumps(payload).encode())

            def load(self, body: dict) -> None:
                fake.lora_calls.append(("load", body))
                name = body.get("lora_name")
                if fake.fail_loads:
                    return self.error(500, f"failed to load LoRA adapter '{name}'", "InternalServerError")
                if name in fake.loaded:
                    return self.error(
                        400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput"
                    )
                fake.loaded.add(name)
                self.reply(200, f"Success: LoRA adapter '{name}' added successfully.".encode(), "text/plain")

            def unload(self, body: dict) -> None:
                fake.lora_calls.append(("unload", body))
                name = body.get("lora_name")
                if name not in fake.loaded:
                    return self.error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
                fake.loaded.discard(name)
                self.reply(
                    200, f"Success: LoRA adapter '{name}' removed successfully.".encode(), "text/plain"
                )

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
        self.server.server_close()

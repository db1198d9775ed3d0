"""A OneBot v11 client that plays the QQ side: for the demo, the tests and `twin simulate`.

It connects to the bot's reverse WebSocket like NapCat would, sends events, and answers
every API call the bot makes, keeping what the bot sent::

    async with OneBotClient("ws://127.0.0.1:8080/onebot/v11/ws", token="t", self_id=10000) as qq:
        await qq.send_private(20001, "在吗")
        replies = await qq.wait_reply(user_id=20001, timeout=30)
        print([r.text for r in replies])
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipeline.chatformat import face_placeholder, sticker_placeholder

Segments = str | Sequence[dict[str, Any]]


class OneBotRefused(ConnectionError):
    """The bot refused the connection (wrong or missing access token, or not listening)."""


@dataclass(slots=True)
class SentMessage:
    """One message the bot sent through an API call."""

    action: str
    message_type: str  # "private" or "group"
    user_id: int | None
    group_id: int | None
    segments: list[dict[str, Any]]
    message_id: int
    time: float = field(default_factory=time.monotonic)

    @property
    def text(self) -> str:
        """The message as the pipeline renders it: text as is, QQ faces and market stickers as `[名字]`."""
        parts = []
        for segment in self.segments:
            if segment["type"] == "text":
                parts.append(segment["data"].get("text", ""))
            elif segment["type"] == "face":
                parts.append(face_placeholder(segment["data"].get("id")))
            elif segment["type"] == "mface":
                parts.append(sticker_placeholder(str(segment["data"].get("summary", ""))))
        return "".join(parts)


def market_face(
    emoji_package_id: int, emoji_id: str, key: str, summary: str, *, shape: str = "napcat"
) -> dict[str, Any]:
    """A market sticker (商城表情) segment as the QQ side reports it.

    "napcat": NapCat reports one as an `image` segment that also carries the market face's
    fields (napcat-onebot `api/msg.ts`, `marketFaceElement`); "mface": the segment NapCat sends
    one with (`OB11MessageMFace`), which LLOneBot and Lagrange also report.
    """
    fields = {"emoji_package_id": emoji_package_id, "emoji_id": emoji_id, "key": key, "summary": summary}
    if shape == "mface":
        return {"type": "mface", "data": fields}
    folder = str(emoji_id)[:2]
    return {
        "type": "image",
        "data": {
            "summary": summary,
            "file": f"{folder}-{emoji_id}.gif",
            "url": f"https://gxh.vip.qq.com/club/item/parcel/item/{folder}/{emoji_id}/raw300.gif",
            **fields,
        },
    }


def _as_napcat_reports(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A sent message as NapCat reports it back: an `mface` comes back as its `image` shape."""
    return [
        market_face(**{k: s["data"].get(k) for k in ("emoji_package_id", "emoji_id", "key", "summary")})
        if s.get("type") == "mface"
        else s
        for s in segments
    ]


def text_segments(message: Segments) -> list[dict[str, Any]]:
    """A string is one text segment; lists of segments pass through."""
    if isinstance(message, str):
        return [{"type": "text", "data": {"text": message}}]
    return [dict(segment) for segment in message]


def _raw(segments: list[dict[str, Any]]) -> str:
    out = []
    for s in segments:
        if s["type"] == "text":
            out.append(s["data"]["text"].replace("&", "&amp;").replace("[", "&#91;").replace("]", "&#93;"))
        else:
            out.append("[CQ:{},{}]".format(s["type"], ",".join(f"{k}={v}" for k, v in s["data"].items())))
    return "".join(out)


def private_message_event(
    self_id: int, user_id: int, message: list[dict[str, Any]] | str, message_id: int, *, nickname: str = ""
) -> dict[str, Any]:
    """A friend's private message as the QQ side posts it; `message` is segments or a CQ-code string."""
    return {
        "time": int(time.time()),
        "self_id": self_id,
        "post_type": "message",
        "message_type": "private",
        "sub_type": "friend",
        "message_id": message_id,
        "user_id": user_id,
        "message": message,
        "raw_message": message if isinstance(message, str) else _raw(message),
        "font": 0,
        "sender": {"user_id": user_id, "nickname": nickname or f"user{user_id}", "sex": "unknown", "age": 0},
    }


class OneBotClient:
    """The QQ side of a OneBot v11 reverse WebSocket connection."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        self_id: int = 10000,
        nickname: str = "twin",
        heartbeat: float = 5.0,
        echo: str | None = None,
        echo_shape: str = "napcat",
    ) -> None:
        """`echo` makes every message the bot sends come back as the account's own, as real QQ
        sides report it: "before" or "after" answering the API call, or "lost" (the echo comes,
        the answer never does). `echo_shape` is whose event shape: "napcat" (`message_sent` with
        `target_id`), "llonebot" (`message_sent`, CQ-code string, no target), "lagrange" (a
        `message` event from the account itself)."""
        self.url = url
        self.token = token
        self.self_id = self_id
        self.nickname = nickname
        self.heartbeat = heartbeat
        self.sent: list[SentMessage] = []  # everything the bot sent, in order
        self.calls: list[dict[str, Any]] = []  # every API call the bot made
        self.members: dict[tuple[int, int], dict[str, Any]] = {}  # (group, user) → member info
        self._messages: dict[int, dict[str, Any]] = {}  # message id → message, for get_msg
        self._ids = itertools.count(1000)
        self._ws: ClientConnection | None = None
        self._tasks: list[asyncio.Task] = []
        self._changed = asyncio.Condition()
        self.echo, self.echo_shape = echo, echo_shape
        self.echo_mangle: Any = None  # segments → segments: what the QQ side does to an echo
        self.fail_sends = 0  # the next N sends are refused (retcode 1200), as under risk control

    async def __aenter__(self) -> OneBotClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and announce the session (lifecycle event); raises OneBotRefused on 401/403."""
        headers = {"X-Self-ID": str(self.self_id), "X-Client-Role": "Universal", "User-Agent": "OneBot/11"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            self._ws = await asyncio.wait_for(
                connect(self.url, additional_headers=headers, max_size=None), timeout
            )
        except InvalidStatus as exc:
            raise OneBotRefused(f"{self.url}: refused with HTTP {exc.response.status_code}") from exc
        except OSError as exc:
            raise OneBotRefused(f"{self.url}: {exc}") from exc
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._beat())]
        await self._post({"post_type": "meta_event", "meta_event_type": "lifecycle", "sub_type": "connect"})

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._tasks and not self._tasks[0].done()

    # ---------------------------------------------------------------- events to the bot
    def next_message_id(self) -> int:
        return next(self._ids)

    async def send_private(self, user_id: int, message: Segments, *, nickname: str = "") -> int:
        """A friend's private message to the account; returns its message id."""
        segments = text_segments(message)
        message_id = self.next_message_id()
        event = private_message_event(self.self_id, user_id, segments, message_id, nickname=nickname)
        self._messages[message_id] = {
            "message_type": "private",
            "sender": event["sender"],
            "message": segments,
        }
        await self._post(event)
        return message_id

    async def send_group(
        self, group_id: int, user_id: int, message: Segments, *, card: str = "", nickname: str = ""
    ) -> int:
        """A group member's message; returns its message id."""
        segments = text_segments(message)
        message_id = self.next_message_id()
        sender = {
            "user_id": user_id,
            "nickname": nickname or f"user{user_id}",
            "card": card,
            "role": "member",
        }
        self.members.setdefault((group_id, user_id), {"group_id": group_id, **sender})
        event = {
            "post_type": "message",
            "message_type": "group",
            "sub_type": "normal",
            "message_id": message_id,
            "group_id": group_id,
            "user_id": user_id,
            "message": segments,
            "raw_message": _raw(segments),
            "font": 0,
            "sender": sender,
            "anonymous": None,
        }
        self._messages[message_id] = {"message_type": "group", "sender": sender, "message": segments}
        await self._post(event)
        return message_id

    async def send_message_sent(
        self,
        message: Segments,
        *,
        target_id: int | None = None,
        group_id: int | None = None,
        message_id: int | None = None,
    ) -> int:
        """The owner's own message typed on another device (`post_type: message_sent`).

        Pass the `message_id` of one of the bot's replies to imitate NapCat echoing it.
        """
        segments = text_segments(message)
        message_id = self.next_message_id() if message_id is None else message_id
        await self._post(self._own_message(segments, message_id, group_id=group_id, target_id=target_id))
        return message_id

    def _own_message(
        self, segments: list[dict[str, Any]], message_id: int, *, group_id: int | None, target_id: int | None
    ) -> dict[str, Any]:
        """A `message_sent` event: the account's own message, as NapCat reports it."""
        event: dict[str, Any] = {
            "post_type": "message_sent",
            "message_type": "group" if group_id else "private",
            "sub_type": "normal" if group_id else "friend",
            "message_id": message_id,
            "user_id": self.self_id,
            "message": segments,
            "raw_message": _raw(segments),
            "font": 0,
            "sender": {"user_id": self.self_id, "nickname": self.nickname},
        }
        if group_id:
            event["group_id"] = group_id
        else:
            event["target_id"] = target_id
        return event

    async def _post(self, event: dict[str, Any]) -> None:
        if self._ws is None:
            raise OneBotRefused("not connected")
        await self._ws.send(json.dumps({"time": int(time.time()), "self_id": self.self_id, **event}))

    async def send_raw(self, frame: str) -> None:
        """Send one frame exactly as given (malformed and hostile events)."""
        if self._ws is None:
            raise OneBotRefused("not connected")
        await self._ws.send(frame)

    async def _echo(self, sent: SentMessage) -> None:
        """The QQ side reporting the account's own message back, in `echo_shape`."""
        segments = self.echo_mangle(sent.segments) if self.echo_mangle else sent.segments
        if self.echo_shape == "napcat":
            segments = _as_napcat_reports(segments)
        event = self._own_message(segments, sent.message_id, group_id=sent.group_id, target_id=sent.user_id)
        if self.echo_shape == "llonebot":
            event.pop("target_id", None)
            event["message"] = _raw(segments)
        elif self.echo_shape == "lagrange":
            event["post_type"] = "message"
        await self._post(event)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            await self._post(
                {
                    "post_type": "meta_event",
                    "meta_event_type": "heartbeat",
                    "interval": int(self.heartbeat * 1000),
                    "status": {"online": True, "good": True},
                }
            )

    # ---------------------------------------------------------------- API calls from the bot
    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for frame in self._ws:
                request = json.loads(frame)
                if "action" in request:
                    answer = await self._answer(request)
                    if answer is not None:
                        await self._ws.send(json.dumps(answer))
        except ConnectionClosed:
            pass
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def _answer(self, request: dict[str, Any]) -> dict[str, Any] | None:
        action, params = request["action"], request.get("params") or {}
        self.calls.append(request)
        data: Any = None
        sending = action in ("send_msg", "send_private_msg", "send_group_msg")
        if sending and self.fail_sends > 0:
            self.fail_sends -= 1
            return {"status": "failed", "retcode": 1200, "data": None, "echo": request.get("echo")}
        if sending:
            message_type = params.get("message_type") or (
                "group" if action == "send_group_msg" or params.get("group_id") else "private"
            )
            message = params.get("message", "")
            segments = text_segments(message) if isinstance(message, str) else list(message)
            message_id = self.next_message_id()
            self._messages[message_id] = {
                "message_type": message_type,
                "message": segments,
                "sender": {"user_id": self.self_id, "nickname": self.nickname},
            }
            sent = SentMessage(
                action, message_type, params.get("user_id"), params.get("group_id"), segments, message_id
            )
            if self.echo == "before" or self.echo == "lost":
                await self._echo(sent)
            async with self._changed:
                self.sent.append(sent)
                self._changed.notify_all()
            if self.echo == "lost":
                return None
            if self.echo == "after":
                asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self._echo(sent)))
            data = {"message_id": message_id}
        elif action == "get_login_info":
            data = {"user_id": self.self_id, "nickname": self.nickname}
        elif action == "get_msg":
            stored = self._messages.get(int(params.get("message_id", 0)))
            if stored is None:
                return {"status": "failed", "retcode": 1404, "data": None, "echo": request.get("echo")}
            data = {
                "time": int(time.time()),
                "message_id": int(params["message_id"]),
                "real_id": int(params["message_id"]),
                **stored,
            }
        elif action == "get_group_member_info":
            key = (int(params.get("group_id", 0)), int(params.get("user_id", 0)))
            data = self.members.get(key) or {
                "group_id": key[0],
                "user_id": key[1],
                "nickname": f"user{key[1]}",
                "card": "",
                "role": "member",
            }
        elif action == "get_stranger_info":
            user_id = int(params.get("user_id", 0))
            data = {"user_id": user_id, "nickname": f"user{user_id}", "sex": "unknown", "age": 0}
        return {"status": "ok", "retcode": 0, "data": data, "echo": request.get("echo")}

    # ---------------------------------------------------------------- waiting for replies
    def replies(self, *, user_id: int | None = None, group_id: int | None = None) -> list[SentMessage]:
        """What the bot sent to one private chat (`user_id`) or group (`group_id`) so far."""
        return [
            m
            for m in self.sent
            if (group_id is None or m.group_id == group_id)
            and (user_id is None or (m.user_id == user_id and m.message_type == "private"))
        ]

    async def wait_reply(
        self,
        *,
        user_id: int | None = None,
        group_id: int | None = None,
        count: int = 1,
        timeout: float = 30.0,
        after: int = 0,
    ) -> list[SentMessage]:
        """Wait until the chat has `count` new messages beyond the first `after` (else TimeoutError)."""

        def ready() -> bool:
            return len(self.replies(user_id=user_id, group_id=group_id)) >= after + count

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError on every Python (3.10's differs)
            got = len(self.replies(user_id=user_id, group_id=group_id)) - after
            raise TimeoutError(f"{got} of {count} replies within {timeout:g}s") from None
        return self.replies(user_id=user_id, group_id=group_id)[after:]

    async def wait_quiet(
        self, seconds: float, *, user_id: int | None = None, group_id: int | None = None
    ) -> list[SentMessage]:
        """Wait `seconds` and return what the chat got meanwhile (expected empty for silence)."""
        before = len(self.replies(user_id=user_id, group_id=group_id))
        await asyncio.sleep(seconds)
        return self.replies(user_id=user_id, group_id=group_id)[before:]


# ------------------------------------------------------------------------------ the bot process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Settings for a bot driven by a program (the demo, the benchmark, the tests): it answers at once,
# with no burst window or typing delay, limits no single sender, and runs no scheduled retrain.
NO_PACING = {
    "TWIN_BURST_WINDOW": "0",
    "TWIN_TYPING_DELAY": "0",
    "TWIN_TYPING_PER_CHAR": "0",
    "TWIN_TYPING_JITTER": "0",
    "TWIN_RETRAIN_CRON": "",
    # A program talks faster than any friend: per-person limits would silence it.
    "TWIN_RATE_PER_SENDER": "1000",
    "TWIN_SENDER_HOURLY_CAP": "0",
    "TWIN_SENDER_DAILY_CAP": "0",
}


class BotProcess:
    """`python bot.py` as a child process with the given settings (the demo's and the tests' bot).

    `settings` are environment variables (`HOST`, `PORT`, `ONEBOT_ACCESS_TOKEN`, `TWIN_*`…);
    `DRIVER` defaults to `~fastapi+~websockets`. The child runs in `cwd`, so no stray `.env`.
    """

    def __init__(self, settings: dict[str, str], *, cwd: Path, log_file: Path | None = None) -> None:
        self.settings = {"DRIVER": "~fastapi+~websockets", "HOST": "127.0.0.1", **settings}
        self.settings.setdefault("PORT", str(free_port()))
        self.cwd = Path(cwd)
        self.log_file = log_file or self.cwd / "bot.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.settings['HOST']}:{self.settings['PORT']}/onebot/v11/ws"

    @property
    def token(self) -> str | None:
        """The bot's access token: the one in `settings`, else the one the bot generated and kept."""
        if self.settings.get("ONEBOT_ACCESS_TOKEN"):
            return self.settings["ONEBOT_ACCESS_TOKEN"]
        from bot.config import DEFAULT_DB
        from bot.transport import kept_token

        return kept_token({"twin_db": str(self.cwd / self.settings.get("TWIN_DB", DEFAULT_DB))})

    def client(self, **kwargs: Any) -> OneBotClient:
        """A test client for this bot, with its access token."""
        return OneBotClient(self.url, token=self.token, **kwargs)

    def log(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace") if self.log_file.exists() else ""

    def start(self, timeout: float = 120.0) -> None:
        """Start the bot and wait until it listens (its model is loaded by then)."""
        self.cwd.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings}
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(BOT_PY)], cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bot exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex((self.settings["HOST"], int(self.settings["PORT"]))) == 0:
                    return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"bot did not listen within {timeout:.0f}s:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait up to `timeout` s (killed after that); returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


BOT_PY = Path(__file__).resolve().parents[1] / "bot.py"

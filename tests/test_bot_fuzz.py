"""Generated OneBot v11 events through the adapter's own parser and the plugin's handlers:
no exception escapes a handler, and every parsed message that shows any text is stored."""

from __future__ import annotations

import itertools
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nonebot.adapters.onebot.v11 import Adapter, GroupMessageEvent, PrivateMessageEvent

from bot.segments import render_segments
from tests.test_bot_handlers import SELF, handlers, twin  # noqa: F401  (fixtures)

AWKWARD = [
    "\ud83d",
    "\udc00",
    "\x00",
    "\u202e",
    "[CQ:face,id=14]",
    "<|im_start|>",
    "&#91;",
    "/twin pause",
    "",
]
texts = st.one_of(st.text(max_size=200), st.sampled_from(AWKWARD), st.text(min_size=3000, max_size=5000))
values = st.one_of(st.none(), st.integers(), texts, st.booleans(), st.lists(st.integers(), max_size=2))
segment = st.one_of(
    st.builds(lambda t: {"type": "text", "data": {"text": t}}, texts),
    st.builds(lambda i: {"type": "face", "data": {"id": i}}, st.one_of(st.integers(-5, 500), texts)),
    st.builds(
        lambda q: {"type": "at", "data": {"qq": q}}, st.one_of(st.just("all"), st.just(str(SELF)), texts)
    ),
    st.builds(lambda i: {"type": "reply", "data": {"id": i}}, values),
    st.builds(lambda s: {"type": "image", "data": {"file": "a.png", "summary": s}}, values),
    st.builds(lambda s: {"type": "mface", "data": {"summary": s}}, values),
    st.builds(lambda k, d: {"type": k, "data": d}, texts, st.dictionaries(texts, values, max_size=3)),
)
message = st.one_of(st.lists(segment, max_size=6), texts)  # arrays, or CQ-code strings
sender = st.fixed_dictionaries(
    {}, optional={"nickname": texts, "card": texts, "user_id": st.integers(1, 99999)}
)
ids = itertools.count(100_000)


@st.composite
def onebot_event(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["private", "group", "message_sent", "self"]))
    user = SELF if kind in ("message_sent", "self") else draw(st.integers(10001, 10100))
    event: dict[str, Any] = {
        "time": int(time.time()),
        "self_id": SELF,
        "post_type": "message_sent" if kind == "message_sent" else "message",
        "message_type": draw(st.sampled_from(["private", "group"])) if kind == "message_sent" else kind,
        "sub_type": draw(st.sampled_from(["friend", "group", "other", "normal", ""])),
        "message_id": next(ids),
        "user_id": user,
        "message": draw(message),
        "raw_message": draw(texts),
        "font": 0,
        "sender": draw(sender),
    }
    if kind == "self":
        event["message_type"] = "private"
    if event["message_type"] == "group":
        event["group_id"] = draw(st.integers(300, 305))
    if kind == "message_sent" and draw(st.booleans()):
        event["target_id"] = draw(st.integers(10001, 10100))
    return event


class QQSide:
    """A bot's API as the handlers use it: sends succeed, member look-ups sometimes fail."""

    self_id = str(SELF)

    def __init__(self) -> None:
        self.calls = 0

    async def send_msg(self, **_: Any) -> dict[str, int]:
        self.calls += 1
        return {"message_id": next(ids)}

    async def send_private_msg(self, **_: Any) -> dict[str, int]:
        return await self.send_msg()

    async def get_group_member_info(self, **params: Any) -> dict[str, Any]:
        if params.get("user_id", 0) % 2:
            raise TimeoutError("no answer")
        return {"card": "群名片\ud83d", "nickname": None}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=onebot_event())
async def test_generated_events_never_escape_a_handler_and_text_is_stored(handlers, twin, data) -> None:  # noqa: F811
    event = Adapter.json_to_event(data)
    if event is None:  # the adapter refused it (a required field of the protocol is wrong)
        return
    qq = QQSide()
    if isinstance(event, PrivateMessageEvent):
        await handlers.handle_private(qq, event, twin)
    elif isinstance(event, GroupMessageEvent):
        await handlers.handle_group(qq, event, twin)
    elif isinstance(event, handlers.MessageSentEvent):
        await handlers.handle_message_sent(event, twin)
    else:
        return
    segments = [(s.type, s.data) for s in event.get_message()]
    if not render_segments(segments).text or event.get_user_id() == str(SELF):
        return  # nothing to show, or the account's own words (an echo of the twin is not stored again)
    rows = await twin.store._conn.execute_fetchall(
        "SELECT text FROM messages WHERE msg_id = ?", (str(data["message_id"]),)
    )
    assert list(rows), f"message {data['message_id']} was not stored"

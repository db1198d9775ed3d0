"""Conversations: every chat of the account, a chat's timeline, search, and per-message actions
(approve, exclude/include, block/unblock), each through the admin verb of the same name."""

from __future__ import annotations

import time

from starlette.responses import Response

from bot.console.web import Form, View, action, page
from bot.store import EXCLUDED_OPERATOR, Store, StoredMessage
from pipeline.chatformat import parse_chat

CHATS_SHOWN = 200
PAGE_ROWS = 100
SEARCH_ROWS = 100
MAX_QUERY_CHARS = 200
MAX_ID_DIGITS = 18  # below SQLite's largest rowid: a longer "id" is no row of ours


def local_time(ts: int) -> str:
    """A unix time as the operator reads it: local, to the minute."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def row_id(value: str) -> int | None:
    """A row id from a form or query (ASCII digits only), or None."""
    value = value.strip()
    if not value or not value.isascii() or not value.isdigit() or len(value) > MAX_ID_DIGITS:
        return None
    return int(value)


def chat_param(message: StoredMessage) -> str:
    return f"{message.chat_type}:{message.chat}"


def _store(view: View) -> Store:
    store = view.twin.store
    assert store is not None  # the console lists only running twins with a store
    return store


@page("/conversations", nav=("对话", "Conversations"))
async def conversations(view: View) -> Response:
    store = _store(view)
    problems: list[str] = []
    key = None
    chat_text = view.query.get("chat", "").strip()
    if chat_text:
        try:
            key = parse_chat(chat_text)
        except ValueError:
            problems.append("not a chat: write c2c:<QQ number> or group:<group number> / 不是有效的聊天")
    before = None
    if view.query.get("before"):
        before = row_id(view.query.get("before", ""))
        if before is None:
            problems.append("not a message position / 不是有效的位置")
    query = view.query.get("q", "").strip()[:MAX_QUERY_CHARS]
    values: dict[str, object] = {
        "problems": problems,
        "chat": key,
        "chat_text": f"{key[0]}:{key[1]}" if key else "",
        "query": query,
        "when": local_time,
        "chat_param": chat_param,
        "is_blocked": lambda sender: (
            sender.isascii() and sender.isdigit() and int(sender) in view.twin.blocked
        ),
        "operator": EXCLUDED_OPERATOR,
    }
    if query and not (chat_text and key is None):  # a bad chat filter searches nothing, not everything
        values["results"] = await store.search(query, chat=key, limit=SEARCH_ROWS)
        values["results_cap"] = SEARCH_ROWS
    elif key is not None:
        rows, older = await store.timeline(key[0], key[1], before_id=before, limit=PAGE_ROWS)
        values["rows"] = rows
        values["older"] = (
            view.url("/conversations", chat=values["chat_text"], before=rows[0].id) if older else None
        )
        values["newer"] = view.url("/conversations", chat=values["chat_text"]) if before is not None else None
    else:
        chats, total = await store.chat_list(CHATS_SHOWN)
        values["chats"] = chats
        values["total"] = total
    return view.render("conversations.html", **values)


async def _quoting(view: View, form: Form, *words: str) -> str:
    """Run a quoting admin verb on the row the form names, looked up in this account's store."""
    wanted = row_id(form.get("message"))
    if wanted is None:
        return "not a message id / 不是有效的消息编号"
    message = await _store(view).message(wanted)
    if message is None:
        return f"no message #{wanted} in this account's store / 没有这条消息"
    if message.msg_id is None:
        return f"message #{wanted} has no QQ message id: nothing quotes it, and it never trains"
    return await view.admin(*words, quoted=message.msg_id, quoted_chat=(message.chat_type, message.chat))


@action("/approve")
async def approve(view: View, form: Form) -> str:
    return await _quoting(view, form, "approve")


@action("/unapprove")
async def unapprove(view: View, form: Form) -> str:
    return await _quoting(view, form, "unapprove")


@action("/exclude")
async def exclude(view: View, form: Form) -> str:
    return await _quoting(view, form, "exclude")


@action("/include")
async def include(view: View, form: Form) -> str:
    return await _quoting(view, form, "include")


async def _block_or_unblock(view: View, form: Form, verb: str) -> str:
    uin = form.get("uin").strip()
    if not uin.isascii() or not uin.isdigit() or len(uin) > MAX_ID_DIGITS:
        return "not a QQ number / 不是有效的 QQ 号"
    return await view.admin(verb, str(int(uin)))


@action("/block")
async def block(view: View, form: Form) -> str:
    return await _block_or_unblock(view, form, "block")


@action("/unblock")
async def unblock(view: View, form: Form) -> str:
    return await _block_or_unblock(view, form, "unblock")

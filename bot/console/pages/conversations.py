"""Conversations (built out in its own change)."""

from __future__ import annotations

from starlette.responses import Response

from bot.console.web import View, page


@page("/conversations", nav=("对话", "Conversations"))
async def conversations(view: View) -> Response:
    return view.render("conversations.html")

"""Learning (built out in its own change)."""

from __future__ import annotations

from starlette.responses import Response

from bot.console.web import View, page


@page("/learning", nav=("学习", "Learning"))
async def learning(view: View) -> Response:
    return view.render("learning.html")

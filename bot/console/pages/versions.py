"""Versions (built out in its own change)."""

from __future__ import annotations

from starlette.responses import Response

from bot.console.web import View, page


@page("/versions", nav=("版本", "Versions"))
async def versions(view: View) -> Response:
    return view.render("versions.html")

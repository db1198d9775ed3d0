"""Every form on every console page posts to the console (a macro imported without the template's
context once rendered `action="/pause"`, which a browser sends to the bot's server root)."""

from __future__ import annotations

import re
from pathlib import Path

from bot.console.web import NAV, PREFIX
from tests.console_helpers import BASE, ORIGIN, console_client, login

ACTION = re.compile(r'<form\b[^>]*\baction="([^"]*)"')


async def test_every_form_on_every_page_posts_below_the_console(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, _):
        await login(client)
        for path, _zh, _en in NAV:
            page = await client.get(path)
            assert page.status_code == 200, path
            actions = ACTION.findall(page.text)
            assert actions, f"{path} has no form (not even Log out)"
            outside = [a for a in actions if not a.startswith(PREFIX + "/")]
            assert not outside, f"{path} has forms posting outside the console: {outside}"


async def test_the_overview_pause_button_pauses_the_twin(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        await login(client)
        page = (await client.get("/")).text
        (pause,) = [a for a in ACTION.findall(page) if a.endswith("/pause")]
        token = re.search(r'name="csrf" value="([^"]*)"', page).group(1)
        # where a browser would send it: the action as written, from the server's root
        answer = await client.post(BASE + pause, data={"csrf": token, "back": f"{PREFIX}/"}, headers=ORIGIN)
        assert answer.status_code == 303
        assert twin.paused

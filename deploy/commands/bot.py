"""`twin serve` runs the bot; `twin simulate` chats with a running bot from the terminal."""

from __future__ import annotations

import os
import sys

import typer

from pipeline.errors import InputError


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `twin` app."""
    app.command("serve")(serve)
    app.command("simulate")(simulate)


def serve() -> None:
    """Run the bot (the same as `python bot.py`); settings come from `.env` and the environment."""
    from deploy.onebot_client import BOT_PY

    if not BOT_PY.is_file():
        raise InputError(BOT_PY, "bot.py not found (run `twin serve` from a qq-twin checkout)")
    os.execv(sys.executable, [sys.executable, str(BOT_PY)])


def simulate(
    url: str = typer.Option(None, help="the bot's reverse WebSocket (default: ws://HOST:PORT/onebot/v11/ws)"),
    token: str = typer.Option(
        None,
        envvar="ONEBOT_ACCESS_TOKEN",
        help="ONEBOT_ACCESS_TOKEN of the bot (default: .env, else the generated one)",
    ),
    self_id: int = typer.Option(10000, help="the QQ number the bot plays (X-Self-ID)"),
    user_id: int = typer.Option(20000, help="your QQ number in this simulated chat"),
    group: int = typer.Option(None, help="talk in this group instead of a private chat"),
    card: str = typer.Option("", help="your group card (display name) in --group"),
    wait: float = typer.Option(60.0, help="seconds to wait for replies after each message"),
) -> None:
    """Chat with a running bot as a QQ friend (or group member), from the terminal; Ctrl-D ends."""
    import asyncio

    from dotenv import dotenv_values
    from rich.console import Console

    from bot.transport import kept_token
    from deploy.onebot_client import OneBotClient, OneBotRefused

    # Same sources as the bot: the environment first, then ./.env.
    settings = {**{k: v for k, v in dotenv_values(".env").items() if v is not None}, **os.environ}
    if url is None:
        url = f"ws://{settings.get('HOST', '127.0.0.1')}:{settings.get('PORT', '8080')}/onebot/v11/ws"
    # An empty token in .env: the bot generated one and keeps it beside its store.
    token = token or settings.get("ONEBOT_ACCESS_TOKEN") or kept_token({"twin_db": settings.get("TWIN_DB")})
    console = Console()

    async def run() -> None:
        async with OneBotClient(url, token=token, self_id=self_id) as client:
            where = f"group {group} as {card or user_id}" if group else f"private chat as {user_id}"
            console.print(f"[green]connected[/] to {url} — {where}; type a message, Ctrl-D to quit")
            while True:
                try:
                    line = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    return
                if not line.strip():
                    continue
                if group:
                    before = len(client.replies(group_id=group))
                    await client.send_group(group, user_id, line, card=card)
                else:
                    before = len(client.replies(user_id=user_id))
                    await client.send_private(user_id, line)
                await _print_replies(client, console, before, wait)

    async def _print_replies(client: OneBotClient, console: Console, before: int, wait: float) -> None:
        # Replies come as one or more bubbles; stop once the chat has been quiet for a moment.
        target = {"group_id": group} if group else {"user_id": user_id}
        try:
            got = await client.wait_reply(after=before, timeout=wait, **target)
        except TimeoutError:
            console.print("[dim](no reply)[/]")
            return
        shown = before
        while True:
            for message in got:
                console.print(f"[cyan]twin>[/] {message.text}")
            shown += len(got)
            try:
                got = await client.wait_reply(after=shown, timeout=3.0, **target)
            except TimeoutError:
                return

    try:
        asyncio.run(run())
    except OneBotRefused as exc:
        raise InputError(url, str(exc).removeprefix(f"{url}: ")) from None
    except KeyboardInterrupt:
        pass

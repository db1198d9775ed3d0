"""The console's pages; importing this package registers their routes (`bot/console/web.py`)."""

from bot.console.pages import conversations, learning, overview, settings, versions  # noqa: F401

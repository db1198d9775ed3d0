"""The `/twin …` admin verbs: one table (verb, arguments, help, action) that the command
dispatches on and that the plugin's usage text and the answer to an unknown verb
are generated from.

NoneBot-free: `bot/handlers.py` reduces the command event to an `AdminRequest`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `bot/__init__.py` reads the table: no runtime (backends, store) for that
    from bot.runtime import ChatKey, Twin

COMMAND = "twin"


@dataclass(slots=True)
class AdminRequest:
    """One admin command, with what its verb may need to know about where it was sent."""

    twin: Twin
    verb: str
    arguments: list[str]
    chat: ChatKey | None  # the chat it was sent in
    user: str  # the superuser who sent it
    quoted: str | None  # the message id it quotes, if any
    report: Callable[[str], Awaitable[None]]  # tells the superusers later (a retrain's outcome)


@dataclass(frozen=True, slots=True)
class AdminVerb:
    verb: str
    arguments: str
    help: str
    run: Callable[[AdminRequest], Awaitable[str]]

    @property
    def synopsis(self) -> str:
        return f"{self.verb} {self.arguments}".strip()


async def _status(request: AdminRequest) -> str:
    return await request.twin.status_text()


async def _pause_or_resume(request: AdminRequest) -> str:
    await request.twin.set_paused(request.verb == "pause")
    return "paused" if request.verb == "pause" else "resumed"


async def _reset(request: AdminRequest) -> str:
    if request.chat is None:
        return "no chat to clear here"
    await request.twin.reset(request.chat)
    return "memory of this chat cleared"


async def _probability(request: AdminRequest) -> str:
    twin = request.twin
    try:
        probability = float(request.arguments[0])
    except (IndexError, ValueError):
        return f"group probability: {twin.probability:g} (set with /{COMMAND} prob <0..1>)"
    if not 0.0 <= probability <= 1.0:
        return "probability must be between 0 and 1"
    await twin.set_probability(probability)
    return f"group probability: {probability:g}"


async def _model(request: AdminRequest) -> str:
    twin = request.twin
    if not request.arguments:
        versions = ", ".join(twin.versions()) or "-"
        return f"serving {twin.backend.version}; versions: {versions}"
    version = request.arguments[0]
    try:
        await twin.switch_model(version, by=f"chat:{request.user}")
    except Exception as exc:  # a version that does not load leaves the old one serving
        return f"cannot switch to {version}, still serving {twin.backend.version}: {exc}"
    return f"serving {version}"


async def _retrain(request: AdminRequest) -> str:
    return request.twin.start_retrain(request.report)


async def _approve_or_unapprove(request: AdminRequest) -> str:
    if request.quoted is None:
        return f"quote one of the twin's replies with /{COMMAND} {request.verb}"
    assert request.twin.store is not None
    changed = await request.twin.store.approve_sent(request.quoted, request.verb == "approve")
    return f"{request.verb}d for retraining" if changed else "that is not one of the twin's replies"


async def _block_or_unblock(request: AdminRequest) -> str:
    if not request.arguments or not request.arguments[0].isdigit():
        return f"usage: /{COMMAND} {request.verb} <uin>"
    await request.twin.set_blocked(int(request.arguments[0]), request.verb == "block")
    return f"{request.verb}ed {request.arguments[0]}"


async def _stickers(request: AdminRequest) -> str:
    twin = request.twin
    if request.arguments[:1] == ["forget"] and len(request.arguments) == 2:
        name = request.arguments[1].strip("[]")
        forgotten = await twin.forget_sticker(name)
        return f"forgot [{name}]" if forgotten else f"no sticker [{name}]"
    if request.arguments:
        return f"usage: /{COMMAND} stickers [forget <名字>]"
    sent = twin.sendable_stickers()
    shown = [f"[{s.name}] {s.source}{'' if s.name in sent else ', not sent'}" for s in twin.stickers.values()]
    mode = twin.config.twin_stickers
    return "\n".join([f"stickers: {len(shown)} kept, TWIN_STICKERS={mode}", *sorted(shown)])


QUOTING = "(quoting a twin reply)"
ADMIN_VERBS: tuple[AdminVerb, ...] = (
    AdminVerb("status", "", "model, uptime, sending, queue, today's counts, last retrain", _status),
    AdminVerb("pause", "", "stop answering (messages are still stored)", _pause_or_resume),
    AdminVerb("resume", "", "answer again, also after a stop for failed sends", _pause_or_resume),
    AdminVerb("reset", "", "forget this chat's memory (the store keeps it for retraining)", _reset),
    AdminVerb("prob", "<0..1>", "chance to join a group chat unprompted", _probability),
    AdminVerb("model", "[version]", "the registry's versions, or serve one now", _model),
    AdminVerb("retrain", "", "start one retrain cycle now", _retrain),
    AdminVerb("block", "<uin>", "never answer this person", _block_or_unblock),
    AdminVerb("unblock", "<uin>", "answer this person again", _block_or_unblock),
    AdminVerb("approve", QUOTING, "train on that reply", _approve_or_unapprove),
    AdminVerb("unapprove", QUOTING, "do not train on that reply", _approve_or_unapprove),
    AdminVerb(
        "stickers", "[forget <名字>]", "the market stickers kept, whose, and which are sent", _stickers
    ),
)
DEFAULT_VERB = "status"  # a bare `/twin`
_BY_NAME = {verb.verb: verb for verb in ADMIN_VERBS}

# The answer to an unknown verb, and the synopsis in the plugin's usage text.
ADMIN_HELP = f"/{COMMAND} " + " | ".join(verb.synopsis for verb in ADMIN_VERBS)


def admin_usage() -> str:
    """One line per verb, for `__plugin_meta__.usage`."""
    return "\n".join(f"/{COMMAND} {verb.synopsis}: {verb.help}" for verb in ADMIN_VERBS)


async def run_admin(
    twin: Twin,
    words: list[str],
    *,
    chat: ChatKey | None,
    user: str,
    quoted: str | None,
    report: Callable[[str], Awaitable[None]],
) -> str:
    """Carry out one admin command (`words` after `/twin`); returns the answer to send."""
    name, arguments = (words[0].lower(), words[1:]) if words else (DEFAULT_VERB, [])
    verb = _BY_NAME.get(name)
    if verb is None:
        return ADMIN_HELP
    return await verb.run(AdminRequest(twin, name, arguments, chat, user, quoted, report))

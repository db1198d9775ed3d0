"""The `/twin …` admin verbs: one table (verb, arguments, help, action) that the command
dispatches on and that the plugin's usage text and the answer to an unknown verb
are generated from.

NoneBot-free: `bot/handlers.py` reduces the command event to an `AdminRequest`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.chatformat import PRIVATE, chat_name, parse_chat
from pipeline.friend_memory import describe_memory

if TYPE_CHECKING:  # `bot/__init__.py` reads the table: no runtime (backends, store) for that
    from bot.runtime import ChatKey, Twin
    from bot.store import StoredMessage

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
    quoted_chat: ChatKey | None = None  # the chat the quoted message is in (ids repeat across chats)


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


MEMORY_USAGE = f"usage: /{COMMAND} memory [c2c:<uin>|group:<gid>] [forget <n>|clear]"
MEMORY_SHOWN_FACTS = 20  # a chat message, not a dump: `twin memory show` prints them all


async def _memory(request: AdminRequest) -> str:
    """A chat's memory: the chat it was sent in, or (from a private chat only) the chat named."""
    twin, words, key = request.twin, list(request.arguments), request.chat
    if words and ":" in words[0]:
        try:
            named = parse_chat(words.pop(0))
        except ValueError as exc:
            return str(exc)
        if named != key and (key is None or key[0] != PRIVATE):
            return "name another chat only in a private chat with the bot"
        key = named
    if key is None:
        return MEMORY_USAGE
    action = words[0].lower() if words else "show"
    if action == "clear" and len(words) == 1:
        await twin.clear_memory(key)
        return f"memory of {key[0]}:{key[1]} cleared"
    if action == "forget" and len(words) == 2 and words[1].isdigit():
        try:
            memory = await twin.forget_fact(key, int(words[1]))
        except ValueError as exc:
            return str(exc)
        return f"forgot fact {words[1]}; {len(memory.facts)} left"
    if action != "show" or len(words) > 1:
        return MEMORY_USAGE
    await twin.refresh_memory(key)
    return describe_memory(await twin.stored_memory(key), last=MEMORY_SHOWN_FACTS)


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


async def _rollback(request: AdminRequest) -> str:
    twin = request.twin
    before = twin.backend.version
    try:
        served = await twin.rollback(by=f"chat:{request.user}")
    except Exception as exc:  # a version that does not load leaves the old one serving
        return f"cannot roll back, still serving {twin.backend.version}: {exc}"
    return f"rolled back {before} → {served}"


async def _samples(request: AdminRequest) -> str:
    return request.twin.start_samples(request.report)


async def _retrain(request: AdminRequest) -> str:
    return request.twin.start_retrain(request.report)


async def _approve_or_unapprove(request: AdminRequest) -> str:
    if request.quoted is None:
        return f"quote one of the twin's replies with /{COMMAND} {request.verb}"
    changed = await request.twin.approve(request.quoted, request.verb == "approve", request.quoted_chat)
    return f"{request.verb}d for retraining" if changed else "that is not one of the twin's replies"


async def _exclude(request: AdminRequest) -> str:
    if request.quoted is None:
        return f"quote a message with /{COMMAND} exclude"
    from bot.store import EXCLUDED_OPERATOR  # here: the table must import without the store

    if await request.twin.exclude(request.quoted, EXCLUDED_OPERATOR, request.quoted_chat):
        return "excluded from prompts and training"
    rows = await _quoted_rows(request)
    if not rows:
        return "that message is not in the store"
    return f"that message is already excluded ({_reasons(rows)})"


async def _include(request: AdminRequest) -> str:
    if request.quoted is None:
        return f"quote a message with /{COMMAND} include"
    if await request.twin.include(request.quoted, request.quoted_chat):
        return "included again in prompts and training"
    rows = await _quoted_rows(request)
    if not rows:
        return "that message is not in the store"
    if all(row.excluded is None for row in rows):
        return "that message is not excluded"
    # Only an operator's own exclusion is undone here: a recall or a command line is not chat.
    return f"that message stays excluded ({_reasons(rows)}): only an operator's exclusion is undone"


async def _quoted_rows(request: AdminRequest) -> list[StoredMessage]:
    assert request.twin.store is not None and request.quoted is not None
    return await request.twin.store.by_msg_id(request.quoted, request.quoted_chat)


def _reasons(rows: list[StoredMessage]) -> str:
    return ", ".join(sorted({row.excluded for row in rows if row.excluded is not None}))


async def _block_or_unblock(request: AdminRequest) -> str:
    uin = request.arguments[0] if request.arguments else ""
    if not uin.isascii() or not uin.isdigit():  # `²` is a digit to isdigit, not to int
        return f"usage: /{COMMAND} {request.verb} <uin>"
    await request.twin.set_blocked(int(request.arguments[0]), request.verb == "block")
    return f"{request.verb}ed {request.arguments[0]}"


async def _takeover(request: AdminRequest) -> str:
    twin, words = request.twin, [word.lower() for word in request.arguments]
    usage = f"usage: /{COMMAND} takeover on|off here, or /{COMMAND} takeover <c2c:UIN|group:GID> on|off"
    if not words:
        return "\n".join([*twin.takeover_lines(), usage])
    if len(words) == 1:
        chat = request.chat
    elif len(words) == 2:
        try:
            chat = parse_chat(words[0])
        except ValueError:
            return usage
    else:
        return usage
    if chat is None or words[-1] not in ("on", "off"):
        return usage
    await twin.set_takeover(chat, words[-1] == "on")
    if words[-1] == "on":
        return f"{chat_name(chat)}: taken over, the twin stays quiet there until /{COMMAND} takeover off"
    return f"{chat_name(chat)}: the twin answers there again"


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
QUOTING_ANY = "(quoting a message)"
ADMIN_VERBS: tuple[AdminVerb, ...] = (
    AdminVerb("status", "", "model, uptime, sending, queue, today's counts, last retrain", _status),
    AdminVerb("pause", "", "stop answering (messages are still stored)", _pause_or_resume),
    AdminVerb("resume", "", "answer again, also after a stop for failed sends", _pause_or_resume),
    AdminVerb("reset", "", "forget this chat's memory (the store keeps it for retraining)", _reset),
    AdminVerb(
        "memory",
        "[chat] [forget <n>|clear]",
        "what the twin remembers of this chat (or, privately, of c2c:<uin> / group:<gid>)",
        _memory,
    ),
    AdminVerb("prob", "<0..1>", "chance to join a group chat unprompted", _probability),
    AdminVerb("model", "[version]", "the registry's versions, or serve one now", _model),
    AdminVerb("rollback", "", "serve the previously promoted version again", _rollback),
    AdminVerb("retrain", "", "start one retrain cycle now", _retrain),
    AdminVerb(
        "samples", "", "answer the held-out probes with every version (`twin models samples`)", _samples
    ),
    AdminVerb(
        "takeover",
        "[c2c:UIN|group:GID] on|off",
        "you take this chat over (the twin stays quiet there until off) / hand it back",
        _takeover,
    ),
    AdminVerb("block", "<uin>", "never answer this person", _block_or_unblock),
    AdminVerb("unblock", "<uin>", "answer this person again", _block_or_unblock),
    AdminVerb("approve", QUOTING, "train on that reply", _approve_or_unapprove),
    AdminVerb("unapprove", QUOTING, "do not train on that reply", _approve_or_unapprove),
    AdminVerb("exclude", QUOTING_ANY, "keep that message out of prompts and training", _exclude),
    AdminVerb("include", QUOTING_ANY, "undo an operator's exclude of that message", _include),
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
    quoted_chat: ChatKey | None = None,
) -> str:
    """Carry out one admin command (`words` after `/twin`); returns the answer to send. A quoted
    message is looked up in `quoted_chat` (where a reply in QQ can only point)."""
    name, arguments = (words[0].lower(), words[1:]) if words else (DEFAULT_VERB, [])
    verb = _BY_NAME.get(name)
    if verb is None:
        return ADMIN_HELP
    return await verb.run(AdminRequest(twin, name, arguments, chat, user, quoted, report, quoted_chat))

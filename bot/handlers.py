"""The plugin's matchers: OneBot events in, calls on the running `Twin`, replies out.

Imported by `bot/__init__.py` only when NoneBot loads the package as a plugin, because
matchers, `get_driver()` and `get_plugin_config()` need an initialised NoneBot.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from nonebot import get_bots, get_driver, get_plugin_config, logger, on_command, on_message, on_type, require
from nonebot.adapters.onebot.v11 import (
    Adapter,
    Bot,
    Event,
    FriendRecallNoticeEvent,
    GroupMessageEvent,
    GroupRecallNoticeEvent,
    Message,
    MessageEvent,
    MessageSegment,
    PrivateMessageEvent,
)
from nonebot.log import LoguruHandler
from nonebot.params import CommandArg
from nonebot.permission import SUPERUSER
from nonebot.rule import Rule
from typing_extensions import override

require("nonebot_plugin_apscheduler")
from apscheduler.triggers.cron import CronTrigger  # noqa: E402
from nonebot_plugin_apscheduler import scheduler  # noqa: E402

from bot import transport  # noqa: E402
from bot.config import Config  # noqa: E402
from bot.runtime import ChatKey, SendBubble, Twin  # noqa: E402
from bot.segments import RenderedMessage, outgoing_parts, render_segments  # noqa: E402
from bot.store import EXCLUDED_RECALLED, StoredMessage  # noqa: E402
from bot.triggers import answers_group, answers_private, is_ignored_sender  # noqa: E402
from pipeline import registry as model_registry  # noqa: E402

plugin_config = get_plugin_config(Config)
driver = get_driver()
twin: Twin | None = None  # created on startup, closed on shutdown

# The plugin's own modules log through stdlib logging; show them in NoneBot's (loguru) log.
_twin_log = logging.getLogger("qq-twin")
if not _twin_log.handlers:
    _twin_log.addHandler(LoguruHandler())
    _twin_log.setLevel(logging.DEBUG)
    _twin_log.propagate = False


class MessageSentEvent(Event):
    """The account's own message sent from another device (NapCat / LLOneBot `message_sent`).

    Not a `MessageEvent` in the adapter, so `on_message` never sees it; registered as a custom
    event model and matched with `on_type`. Everything but the message is optional: QQ sides
    differ in what they send, and a missing field must not lose the owner's words.
    """

    post_type: Literal["message_sent"]  # type: ignore[assignment]
    message_type: str = "private"
    sub_type: str = ""
    message_id: int | str = 0
    user_id: int = 0
    target_id: int | None = None
    group_id: int | None = None
    message: Message = Message()
    raw_message: str = ""

    @override
    def get_event_name(self) -> str:
        return f"message_sent.{self.message_type}"

    @override
    def get_event_description(self) -> str:
        return f"Message {self.message_id} sent by the account"  # no text at INFO

    @override
    def get_message(self) -> Message:
        return self.message

    @override
    def get_user_id(self) -> str:
        return str(self.user_id)

    @override
    def get_session_id(self) -> str:
        return str(self.user_id)

    @property
    def chat_key(self) -> ChatKey | None:
        """The chat it was sent in; None when the QQ side did not say (any chat's echo may match)."""
        if self.message_type == "group":
            return ("group", str(self.group_id)) if self.group_id is not None else None
        return ("c2c", str(self.target_id)) if self.target_id is not None else None


Adapter.add_custom_model(MessageSentEvent)


# ------------------------------------------------------------------------------- lifecycle


def startup_problem() -> str | None:
    """What would stop the bot from serving, as one line for the operator (None when all is well)."""
    problem = transport.startup_problem()  # no token, a weak one off loopback, HTTP POST unsigned
    if problem:
        return problem
    if plugin_config.twin_backend == "llama_cpp":
        if not plugin_config.twin_model:
            return "TWIN_MODEL is not set: name a .gguf file, a model directory or a registry"
        try:
            model_registry.resolve_model(plugin_config.twin_model)
        except (FileNotFoundError, ValueError) as exc:
            return f"TWIN_MODEL: {exc}"
    return None


@driver.on_startup
async def start_twin() -> None:
    global twin
    problem = startup_problem()
    if problem:
        raise RuntimeError(problem)
    twin = Twin(
        plugin_config,
        nicknames=sorted(driver.config.nickname),
        command_prefixes=sorted(driver.config.command_start),
    )
    await twin.start()
    if plugin_config.twin_retrain_cron:
        scheduler.add_job(
            scheduled_retrain,
            CronTrigger.from_crontab(plugin_config.twin_retrain_cron),
            id="qq-twin-retrain",
            replace_existing=True,
        )


@driver.on_shutdown
async def stop_twin() -> None:
    global twin
    if twin is not None:
        await twin.close()
        twin = None


# ------------------------------------------------------------------------------- chat


def _not_admin_command(event: MessageEvent) -> bool:
    """`/twin …` from anyone is a command attempt, never chat (and never stored)."""
    text = event.get_plaintext().lstrip()
    return not any(text.startswith(f"{start}twin") for start in driver.config.command_start if start)


chat = on_message(rule=Rule(_not_admin_command), priority=99, block=False)
owner_sent = on_type(MessageSentEvent, priority=1, block=True)
recalled = on_type((FriendRecallNoticeEvent, GroupRecallNoticeEvent), priority=1, block=False)


def chat_key(event: MessageEvent) -> ChatKey:
    """The chat a message event belongs to: ("c2c", friend) or ("group", group)."""
    if isinstance(event, GroupMessageEvent):
        return ("group", str(event.group_id))
    return ("c2c", str(event.user_id))


def _sender(bot: Bot, key: ChatKey) -> SendBubble:
    chat_type, chat_id = key

    async def send(text: str) -> int | None:
        message = Message()
        for kind, value in outgoing_parts(text):
            message += MessageSegment.face(int(value)) if kind == "face" else MessageSegment.text(value)
        if not message:
            return None
        target = {"user_id": int(chat_id)} if chat_type == "c2c" else {"group_id": int(chat_id)}
        result = await bot.send_msg(
            message_type="private" if chat_type == "c2c" else "group", message=message, **target
        )
        return (result or {}).get("message_id") if isinstance(result, dict) else None

    return send


def _segments(message: Message) -> list[tuple[str, dict]]:
    return [(segment.type, segment.data if isinstance(segment.data, dict) else {}) for segment in message]


def _known_names(event: MessageEvent) -> dict[str, str]:
    """Display names of @-targets known without asking the QQ side (the account's own, the cache)."""
    assert twin is not None
    names = dict(twin.names)
    names[str(event.self_id)] = twin.nicknames[0] if twin.nicknames else twin.config.twin_persona
    return names


async def _look_up_names(bot: Bot, event: MessageEvent, mentions: list[str]) -> bool:
    """Ask the QQ side for the names of unknown @-targets (groups only); True when one was learned."""
    assert twin is not None
    learned = False
    if not isinstance(event, GroupMessageEvent):
        return False
    for target in mentions:
        if target in ("all", str(event.self_id)) or target in twin.names or not target.isdigit():
            continue
        try:
            info = await asyncio.wait_for(
                bot.get_group_member_info(group_id=event.group_id, user_id=int(target)), 5
            )
            twin.names[target] = str(info.get("card") or info.get("nickname") or "")
            learned = learned or bool(twin.names[target])
        except Exception as exc:  # the name is a nicety; the number will do
            logger.debug(f"get_group_member_info failed: {type(exc).__name__}")
            twin.names[target] = ""
    return learned


async def _store_first(bot: Bot, event: MessageEvent) -> tuple[int, RenderedMessage] | None:
    """Store a chat message before anything that can fail or wait on the network, then enrich it.

    Returns its row id and rendering, or None when the twin must not answer it: nothing to show,
    the account's own message (the owner's words or the QQ side's echo of a twin bubble), or an
    ignored or blocked sender (stored for context all the same).
    """
    assert twin is not None
    key = chat_key(event)
    rendered = render_segments(_segments(event.original_message), _known_names(event))
    if not rendered.text:
        return None
    sender = event.sender
    name = (getattr(sender, "card", None) or sender.nickname or "") if sender is not None else ""
    message = StoredMessage(
        chat_type=key[0],
        chat=key[1],
        sender=str(event.user_id),
        sender_name=name,
        origin="incoming",
        text=rendered.text,
        time=int(event.time),
        msg_id=str(event.message_id),
        reply_to=rendered.reply_to,
        kinds=rendered.kinds,
    )
    if event.user_id == event.self_id:
        if isinstance(event, PrivateMessageEvent):  # the account's own private message: its peer
            peer = getattr(event, "target_id", None)
            own_key = ("c2c", str(peer)) if peer else None
            message.chat = str(peer) if peer else key[1]
        else:
            own_key = key
        await twin.record_own(own_key, message)
        return None
    row = await twin.record(message)
    if await _look_up_names(bot, event, rendered.mentions):
        segments = _segments(event.original_message)
        rendered = render_segments(segments, _known_names(event))
        assert twin.store is not None
        await twin.store.update_text(row, rendered.text, rendered.kinds)
    ignored = twin.config.twin_ignore_users
    if is_ignored_sender(event.user_id, event.self_id, ignored=ignored, blocked=twin.blocked):
        return None
    return row, rendered


def _private_allowed(event: PrivateMessageEvent) -> bool:
    """Friends per the allow/deny lists; group temp chats and strangers only when allowed."""
    assert twin is not None
    config = twin.config
    if not answers_private(event.user_id, allow=config.twin_private_allow, deny=config.twin_private_deny):
        return False
    if event.user_id in config.twin_private_allow or event.sub_type == "friend":
        return True
    if event.sub_type == "group":
        return config.twin_answer_group_temp
    return config.twin_answer_strangers


@chat.handle()
async def handle_private(bot: Bot, event: PrivateMessageEvent) -> None:
    if twin is None:
        return
    stored = await _store_first(bot, event)
    if stored is None or not _private_allowed(event):
        return
    key = chat_key(event)
    await twin.answer(
        key, stored[0], _sender(bot, key), self_id=str(event.self_id), sender=str(event.user_id)
    )


@chat.handle()
async def handle_group(bot: Bot, event: GroupMessageEvent) -> None:
    if twin is None:
        return
    stored = await _store_first(bot, event)
    if stored is None:
        return
    row, rendered = stored
    config = twin.config
    assert twin.store is not None
    quoted_twin = rendered.reply_to is not None and await twin.store.is_twin_message(
        rendered.reply_to, *chat_key(event)
    )
    addressed = event.to_me or quoted_twin or str(event.self_id) in rendered.mentions
    if not answers_group(
        event.group_id,
        to_me=addressed,
        text=rendered.text,
        nicknames=twin.nicknames,
        allow=config.twin_group_allow,
        probability=twin.probability,
    ):
        return
    key = chat_key(event)
    await twin.answer(key, row, _sender(bot, key), self_id=str(event.self_id), sender=str(event.user_id))


@owner_sent.handle()
async def handle_message_sent(event: MessageSentEvent) -> None:
    """Store what the owner typed elsewhere (the retraining signal); never answer it. The QQ
    side's echo of a twin bubble is recognised, whenever it comes, and not stored again."""
    if twin is None or twin.store is None:
        return
    rendered = render_segments(_segments(event.message))
    if not rendered.text:
        return
    key = event.chat_key
    stored = await twin.record_own(
        key,
        StoredMessage(
            chat_type=key[0] if key else ("group" if event.message_type == "group" else "c2c"),
            chat=key[1] if key else str(event.group_id or event.target_id or event.user_id),
            sender=str(event.self_id),
            origin="owner",
            text=rendered.text,
            time=int(event.time),
            msg_id=str(event.message_id),
            reply_to=rendered.reply_to,
            kinds=rendered.kinds,
        ),
    )
    if stored is not None and key is not None:
        await twin.owner_spoke(key)


@recalled.handle()
async def handle_recall(event: FriendRecallNoticeEvent | GroupRecallNoticeEvent) -> None:
    """A recalled message is never trained on nor shown to the model again."""
    if twin is None or twin.store is None:
        return
    await twin.store.exclude(str(event.message_id), EXCLUDED_RECALLED)


# ------------------------------------------------------------------------------- admin

admin = on_command("twin", permission=SUPERUSER, priority=1, block=True)

ADMIN_ACK = "收到"  # all a group sees of an admin command: the answer goes to a private chat
ADMIN_HELP = (
    "/twin status | pause | resume | reset | prob <0..1> | model [version] | retrain"
    " | block <uin> | unblock <uin> | approve (quoting a twin reply)"
)


async def tell_superusers(text: str) -> None:
    """Report to every superuser in private chat, and to the log."""
    logger.info(f"qq-twin: {text}")
    for bot in get_bots().values():
        for user in driver.config.superusers:
            try:
                await bot.call_api("send_private_msg", user_id=int(user), message=text)
            except Exception as exc:
                logger.warning(f"could not tell superuser: {exc!r}")


async def scheduled_retrain() -> None:
    if twin is None:
        return
    if twin.paused:
        logger.info("qq-twin: scheduled retrain skipped (paused)")
        return
    answer = twin.start_retrain(tell_superusers)
    logger.info(f"qq-twin: scheduled retrain: {answer}")


async def run_admin(event: MessageEvent, words: list[str]) -> str:
    """Carry out one admin command; returns the answer to send."""
    assert twin is not None
    verb, rest = (words[0].lower(), words[1:]) if words else ("status", [])
    if verb == "status":
        return await twin.status_text()
    if verb in ("pause", "resume"):
        await twin.set_paused(verb == "pause")
        return "paused" if verb == "pause" else "resumed"
    if verb == "reset":
        await twin.reset(chat_key(event))
        return "memory of this chat cleared"
    if verb == "prob":
        try:
            probability = float(rest[0])
        except (IndexError, ValueError):
            return f"group probability: {twin.probability:g} (set with /twin prob <0..1>)"
        if not 0.0 <= probability <= 1.0:
            return "probability must be between 0 and 1"
        await twin.set_probability(probability)
        return f"group probability: {probability:g}"
    if verb == "model":
        if not rest:
            versions = ", ".join(twin.versions()) or "-"
            return f"serving {twin.backend.version}; versions: {versions}"
        try:
            await twin.switch_model(rest[0], by=f"chat:{event.user_id}")
        except Exception as exc:  # a version that does not load leaves the old one serving
            return f"cannot switch to {rest[0]}, still serving {twin.backend.version}: {exc}"
        return f"serving {rest[0]}"
    if verb == "retrain":
        return twin.start_retrain(tell_superusers)
    if verb in ("approve", "unapprove"):
        quoted = next((seg.data.get("id") for seg in event.original_message if seg.type == "reply"), None)
        if quoted is None:
            return f"quote one of the twin's replies with /twin {verb}"
        assert twin.store is not None
        changed = await twin.store.approve_sent(str(quoted), verb == "approve")
        return f"{verb}d for retraining" if changed else "that is not one of the twin's replies"
    if verb in ("block", "unblock"):
        if not rest or not rest[0].isdigit():
            return f"usage: /twin {verb} <uin>"
        await twin.set_blocked(int(rest[0]), verb == "block")
        return f"{verb}ed {rest[0]}"
    return ADMIN_HELP


@admin.handle()
async def handle_admin(bot: Bot, event: MessageEvent, args: Message = CommandArg()) -> None:
    """Answers go to the superuser's private chat; a group sees only an acknowledgement."""
    if twin is None:
        await admin.finish("qq-twin is not running")
    answer = await run_admin(event, args.extract_plain_text().split())
    if isinstance(event, GroupMessageEvent):
        try:
            await bot.send_private_msg(user_id=event.user_id, message=answer)
        except Exception as exc:  # no private chat with them: the group still learns nothing
            logger.warning(f"could not answer superuser {event.user_id} privately: {type(exc).__name__}")
        await admin.finish(ADMIN_ACK)
    await admin.finish(answer)

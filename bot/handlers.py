"""The plugin's matchers: OneBot events in, calls on the running `Twin`, replies out.

Imported by `bot/__init__.py` only when NoneBot loads the package as a plugin, because
matchers, `get_driver()` and `get_plugin_config()` need an initialised NoneBot.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Literal

from nonebot import get_bots, get_driver, get_plugin_config, logger, on_command, on_message, on_type, require
from nonebot.adapters.onebot.v11 import (
    Adapter,
    Bot,
    Event,
    GroupMessageEvent,
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

from bot.config import Config  # noqa: E402
from bot.runtime import ChatKey, SendBubble, Twin  # noqa: E402
from bot.segments import RenderedMessage, outgoing_parts, render_segments  # noqa: E402
from bot.store import StoredMessage  # noqa: E402
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
    event model and matched with `on_type`.
    """

    post_type: Literal["message_sent"]  # type: ignore[assignment]
    message_type: str
    sub_type: str = ""
    message_id: int
    user_id: int
    target_id: int | None = None
    group_id: int | None = None
    message: Message
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
    def chat_key(self) -> ChatKey:
        if self.message_type == "group" and self.group_id is not None:
            return ("group", str(self.group_id))
        return ("c2c", str(self.target_id or self.user_id))


Adapter.add_custom_model(MessageSentEvent)


# ------------------------------------------------------------------------------- lifecycle


def _exposed_without_token() -> bool:
    """Listening beyond loopback with no access token lets anyone on the network drive the account."""
    config = driver.config
    token = getattr(config, "onebot_access_token", None)
    try:
        loopback = ipaddress.ip_address(str(config.host)).is_loopback
    except ValueError:
        loopback = str(config.host) == "localhost"
    return not loopback and not token


def startup_problem() -> str | None:
    """What would stop the bot from serving, as one line for the operator (None when all is well)."""
    if _exposed_without_token():
        return "HOST is not loopback and ONEBOT_ACCESS_TOKEN is empty: refusing to start"
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
    twin = Twin(plugin_config, nicknames=sorted(driver.config.nickname))
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
        return (result or {}).get("message_id")

    return send


async def _names_for(bot: Bot, event: MessageEvent) -> dict[str, str]:
    """Display names for the @-targets of a message: cache, then the QQ side's member info."""
    assert twin is not None
    names = {str(event.self_id): (twin.nicknames[0] if twin.nicknames else twin.config.twin_persona)}
    for segment in event.original_message:
        target = str(segment.data.get("qq", "")) if segment.type == "at" else ""
        if not target or target == "all" or target in names:
            continue
        if target not in twin.names and isinstance(event, GroupMessageEvent):
            try:
                info = await asyncio.wait_for(
                    bot.get_group_member_info(group_id=event.group_id, user_id=int(target)), 5
                )
                twin.names[target] = info.get("card") or info.get("nickname") or ""
            except Exception as exc:  # the name is a nicety; the number will do
                logger.debug(f"get_group_member_info failed: {exc!r}")
                twin.names[target] = ""
        names[target] = twin.names.get(target, "")
    return names


async def _render(bot: Bot, event: MessageEvent) -> RenderedMessage:
    segments = [(segment.type, segment.data) for segment in event.original_message]
    return render_segments(segments, await _names_for(bot, event))


async def _is_twin_echo(key: ChatKey, text: str, message_id: int) -> bool:
    """NapCat reports the twin's own replies back as the account's messages: not the owner's words."""
    assert twin is not None and twin.store is not None
    return twin.is_own_echo(key, text) or await twin.store.is_twin_message(str(message_id))


async def _record_incoming(
    key: ChatKey, event: MessageEvent, rendered: RenderedMessage, sender_name: str
) -> int | None:
    """Store a chat message before anything else: its row id, or None when the twin must not answer it.

    The account's own messages are the owner's words unless they are NapCat's echo of a twin reply.
    Ignored and blocked senders are stored (the owner may want the context) but never answered.
    """
    assert twin is not None
    origin = "owner" if event.user_id == event.self_id else "incoming"
    if origin == "owner" and await _is_twin_echo(key, rendered.text, event.message_id):
        return None
    row = await twin.record(
        StoredMessage(
            chat_type=key[0],
            chat=key[1],
            sender=str(event.user_id),
            sender_name=sender_name,
            origin=origin,
            text=rendered.text,
            time=event.time,
            msg_id=str(event.message_id),
            reply_to=rendered.reply_to,
            kinds=rendered.kinds,
        )
    )
    ignored = twin.config.twin_ignore_users
    if is_ignored_sender(event.user_id, event.self_id, ignored=ignored, blocked=twin.blocked):
        return None
    return row


@chat.handle()
async def handle_private(bot: Bot, event: PrivateMessageEvent) -> None:
    if twin is None:
        return
    rendered = await _render(bot, event)
    if not rendered.text:
        return
    key: ChatKey = ("c2c", str(event.user_id))
    row = await _record_incoming(key, event, rendered, event.sender.nickname or "")
    if row is None:
        return
    config = twin.config
    if not answers_private(event.user_id, allow=config.twin_private_allow, deny=config.twin_private_deny):
        return
    await twin.answer(key, row, _sender(bot, key), self_id=str(event.self_id))


@chat.handle()
async def handle_group(bot: Bot, event: GroupMessageEvent) -> None:
    if twin is None:
        return
    rendered = await _render(bot, event)
    if not rendered.text:
        return
    key: ChatKey = ("group", str(event.group_id))
    name = event.sender.card or event.sender.nickname or ""
    row = await _record_incoming(key, event, rendered, name)
    if row is None:
        return
    config = twin.config
    quoted_twin = rendered.reply_to is not None and await twin.store.is_twin_message(rendered.reply_to)
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
    await twin.answer(key, row, _sender(bot, key), self_id=str(event.self_id))


@owner_sent.handle()
async def handle_message_sent(event: MessageSentEvent) -> None:
    """Store what the owner typed elsewhere (the retraining signal); never answer it."""
    if twin is None or twin.store is None:
        return
    rendered = render_segments([(segment.type, segment.data) for segment in event.message])
    key = event.chat_key
    if not rendered.text:
        return
    if await _is_twin_echo(key, rendered.text, event.message_id):
        return
    await twin.record(
        StoredMessage(
            chat_type=key[0],
            chat=key[1],
            sender=str(event.self_id),
            origin="owner",
            text=rendered.text,
            time=event.time,
            msg_id=str(event.message_id),
            reply_to=rendered.reply_to,
            kinds=rendered.kinds,
        )
    )
    await twin.owner_spoke(key)


# ------------------------------------------------------------------------------- admin

admin = on_command("twin", permission=SUPERUSER, priority=1, block=True)

ADMIN_HELP = (
    "/twin status | pause | resume | reset | prob <0..1> | model [version] | retrain"
    " | block <uin> | unblock <uin> | approve (quoting a twin reply)"
)


def _chat_of(event: MessageEvent) -> ChatKey:
    if isinstance(event, GroupMessageEvent):
        return ("group", str(event.group_id))
    return ("c2c", str(event.user_id))


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
        await twin.reset(_chat_of(event))
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
            await twin.switch_model(rest[0])
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
async def handle_admin(event: MessageEvent, args: Message = CommandArg()) -> None:
    if twin is None:
        await admin.finish("qq-twin is not running")
    await admin.finish(await run_admin(event, args.extract_plain_text().split()))

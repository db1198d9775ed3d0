"""The plugin's matchers: OneBot events in, calls on the connection's running `Twin`, replies out.

Imported by `bot/__init__.py` only when NoneBot loads the package as a plugin, because
matchers, `get_driver()` and `get_plugin_config()` need an initialised NoneBot.
"""

from __future__ import annotations

import asyncio
import logging
from collections import ChainMap
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
from nonebot.adapters.onebot.v11.config import Config as OneBotConfig
from nonebot.drivers import ASGIMixin
from nonebot.log import LoguruHandler
from nonebot.matcher import Matcher
from nonebot.params import CommandArg, Depends
from nonebot.permission import Permission
from nonebot.rule import Rule
from typing_extensions import override

require("nonebot_plugin_apscheduler")
from apscheduler.triggers.cron import CronTrigger  # noqa: E402
from nonebot_plugin_apscheduler import scheduler  # noqa: E402
from starlette.applications import Starlette  # noqa: E402

from bot import health, transport  # noqa: E402
from bot.accounts import Account, Accounts, start_accounts  # noqa: E402
from bot.admin import COMMAND, run_admin  # noqa: E402
from bot.config import Config, load_accounts  # noqa: E402
from bot.console import auth as console_auth  # noqa: E402
from bot.runtime import ChatKey, SendBubble, Twin, serving_adapter  # noqa: E402
from bot.segments import RenderedMessage, outgoing_parts, render_segments  # noqa: E402
from bot.stickers import Sticker, stickers_in  # noqa: E402
from bot.store import EXCLUDED_RECALLED, StoredMessage  # noqa: E402
from bot.triggers import answers_group, answers_private, is_ignored_sender  # noqa: E402
from pipeline import registry as model_registry  # noqa: E402
from pipeline.chatformat import GROUP, PRIVATE  # noqa: E402
from pipeline.errors import TwinError  # noqa: E402

plugin_config = get_plugin_config(Config)
driver = get_driver()
# The twins by QQ account, created on startup and closed on shutdown; handlers get the twin of
# the event's connection injected.
_accounts: Accounts | None = None

# The plugin's own modules log through stdlib logging (`getLogger(__name__)`, all under this
# package's logger); show them in NoneBot's (loguru) log.
_twin_log = logging.getLogger(__package__)
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


Adapter.add_custom_model(MessageSentEvent)


# ------------------------------------------------------------------------------- lifecycle


def account_settings() -> dict[str, Config]:
    """Each account's settings by where they come from: the files of `TWIN_ACCOUNTS` laid over
    the process's settings, or those alone. Raises TwinError naming a bad or clashing file."""
    if not plugin_config.twin_accounts:
        return {".env / environment": plugin_config}
    return {str(file): config for file, config in load_accounts(plugin_config).items()}


def startup_problem() -> str | None:
    """What would stop the bot from serving, as one line for the operator (None when all is well)."""
    problem = transport.startup_problem()  # no token, a weak one off loopback, HTTP POST unsigned
    if problem:
        return problem
    try:
        accounts = account_settings()
    except TwinError as exc:
        return str(exc)
    if plugin_config.twin_console:
        problem = console_auth.password_problem(plugin_config.twin_console_password)
        if problem:
            return problem
        if not isinstance(getattr(driver, "server_app", None), Starlette):
            return "TWIN_CONSOLE needs the FastAPI driver (DRIVER=~fastapi+~websockets)"
    for where, config in accounts.items():
        account = f"{where}: " if plugin_config.twin_accounts else ""  # which file, when there are several
        try:
            if config.twin_backend == "llama_cpp":
                if not config.twin_model:
                    return f"{account}TWIN_MODEL is not set: name a .gguf file, a model dir or a registry"
                model_registry.resolve_model(config.twin_model)
            elif config.twin_openai_lora:
                serving_adapter(config)
        except (FileNotFoundError, ValueError) as exc:
            return f"{account}TWIN_MODEL: {exc}"
    return None


@driver.on_startup
async def start_twin() -> None:
    global _accounts
    problem = startup_problem()
    if problem:
        raise RuntimeError(problem)
    accounts = await start_accounts(
        list(account_settings().values()),
        several=bool(plugin_config.twin_accounts),
        superusers=driver.config.superusers,
        nicknames=sorted(driver.config.nickname),
        command_prefixes=sorted(driver.config.command_start),
    )
    if plugin_config.twin_accounts and driver.config.nickname:
        logger.warning(
            "qq-twin: NICKNAME is process-wide: a group message starting with one is addressed to "
            "every account; with several accounts leave it empty and set TWIN_NICKNAMES per account file"
        )
    # The QQ side may not log in as a superuser; a QQ account no file names is told of once.
    transport.set_accounts(accounts.served(), accounts.superusers())
    _accounts = accounts
    for account in accounts:
        cron = account.twin.config.twin_retrain_cron
        if not cron:
            continue
        if account.twin.model_shared_with:
            note = account.twin.shared_registry_note()
            logger.warning(f"qq-twin: no scheduled retrain for {account.label}: {note}")
            continue
        scheduler.add_job(
            scheduled_retrain,
            CronTrigger.from_crontab(cron),
            args=[account],
            id=_retrain_job_id(account),
            replace_existing=True,
        )


def _access_token() -> str:
    return get_plugin_config(OneBotConfig).onebot_access_token or ""


# Liveness for anyone (says nothing), readiness with details for the holder of the access token.
if isinstance(driver, ASGIMixin):  # a forward-WebSocket-only driver serves no HTTP at all
    health.register(driver, lambda: _accounts, lambda: set(get_bots()), _access_token)


def _retrain_job_id(account: Account) -> str:
    return f"qq-twin-retrain-{account.self_id}" if account.self_id else "qq-twin-retrain"


def next_scheduled_retrain(account: Account) -> str | None:
    """When the schedule starts this account's next retrain (local time), None without one."""
    job = scheduler.get_job(_retrain_job_id(account))
    when = getattr(job, "next_run_time", None) if job is not None else None
    return when.strftime("%Y-%m-%d %H:%M %Z").strip() if when is not None else None


# The operator console (bot/console/), on the same server, behind its own password.
_console_password = plugin_config.twin_console_password
if (
    plugin_config.twin_console
    and console_auth.password_problem(_console_password) is None
    and isinstance(getattr(driver, "server_app", None), Starlette)
):
    from bot.console.app import mount as mount_console
    from bot.console.web import ConsoleSource

    mount_console(
        driver.server_app,  # type: ignore[attr-defined]
        ConsoleSource(
            accounts=lambda: _accounts,
            connected=lambda: set(get_bots()),
            report=lambda account: superuser_reporter(account),
            config=lambda: plugin_config,
            next_retrain=next_scheduled_retrain,
        ),
        _console_password,
        plugin_config.twin_console_session_hours,
    )


@driver.on_shutdown
async def stop_twin() -> None:
    global _accounts
    if _accounts is not None:
        await _accounts.close()  # messages arriving meanwhile are still stored while they can be
        _accounts = None


def _account(bot: Bot) -> Account | None:
    """The running account the connection belongs to (None before startup, after shutdown, or
    for a QQ account this process does not serve)."""
    account = _accounts.find(bot.self_id) if _accounts is not None else None
    return account if account is not None and account.twin.store is not None else None


def running_twin(bot: Bot, matcher: Matcher) -> Twin:
    """The connection's running twin, for `Depends`: without one the handler is skipped, so an
    event of an account this process does not serve is stored nowhere and never answered."""
    account = _account(bot)
    if account is None:
        matcher.skip()
    return account.twin


async def running_twin_or_say_so(bot: Bot, matcher: Matcher) -> Twin:
    """The running twin for an admin command, which otherwise learns that it is not running."""
    account = _account(bot)
    if account is None:
        await matcher.finish("qq-twin is not running")
    return account.twin


RunningTwin = Depends(running_twin)


# ------------------------------------------------------------------------------- chat


def _not_admin_command(event: MessageEvent) -> bool:
    """`/twin …` from anyone is a command attempt, never chat (and never stored)."""
    text = event.get_plaintext().lstrip()
    return not any(text.startswith(f"{start}{COMMAND}") for start in driver.config.command_start if start)


chat = on_message(rule=Rule(_not_admin_command), priority=99, block=False)
owner_sent = on_type(MessageSentEvent, priority=1, block=True)
recalled = on_type((FriendRecallNoticeEvent, GroupRecallNoticeEvent), priority=1, block=False)


def chat_key(event: MessageEvent | MessageSentEvent) -> ChatKey | None:
    """The chat a message belongs to: (PRIVATE, friend) or (GROUP, group). For the account's own
    messages, the peer; None when the QQ side did not say (an echo in any chat may match)."""
    if isinstance(event, MessageSentEvent):
        if event.message_type == "group":
            return (GROUP, str(event.group_id)) if event.group_id is not None else None
        return (PRIVATE, str(event.target_id)) if event.target_id is not None else None
    if isinstance(event, GroupMessageEvent):
        return (GROUP, str(event.group_id))
    if event.user_id == event.self_id:  # its own private message (some QQ sides report them)
        peer = getattr(event, "target_id", None)
        return (PRIVATE, str(peer)) if peer else None
    return (PRIVATE, str(event.user_id))


def _sender(bot: Bot, key: ChatKey, twin: Twin) -> SendBubble:
    chat_type, chat_id = key

    async def send(text: str) -> int | None:
        message = Message()
        stickers = twin.sendable_stickers()
        for kind, value in outgoing_parts(text, stickers):
            if kind == "sticker":  # the runtime sends a sticker as a bubble of its own
                message += MessageSegment("mface", stickers[value].segment_data())
            elif kind == "face":
                message += MessageSegment.face(int(value))
            else:
                message += MessageSegment.text(value)
        if not message:
            return None
        target = {"user_id": int(chat_id)} if chat_type == PRIVATE else {"group_id": int(chat_id)}
        result = await bot.send_msg(
            message_type="private" if chat_type == PRIVATE else "group", message=message, **target
        )
        return (result or {}).get("message_id") if isinstance(result, dict) else None

    return send


def _segments(message: Message) -> list[tuple[str, dict]]:
    return [(segment.type, segment.data if isinstance(segment.data, dict) else {}) for segment in message]


def _known_names(twin: Twin, event: MessageEvent) -> Mapping[str, str]:
    """Display names of @-targets known without asking the QQ side (the account's own, the cache),
    without copying the cache for every message."""
    own = twin.nicknames[0] if twin.nicknames else twin.config.twin_persona
    return ChainMap({str(event.self_id): own}, twin.names)


async def _look_up_names(twin: Twin, bot: Bot, event: MessageEvent, mentions: list[str]) -> bool:
    """Ask the QQ side for the names of unknown @-targets (groups only); True when one was learned."""
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


async def _store_first(twin: Twin, bot: Bot, event: MessageEvent) -> tuple[int, RenderedMessage] | None:
    """Store a chat message before anything that can fail or wait on the network, then enrich it.

    Returns its row id and rendering, or None when the twin must not answer it: nothing to show,
    the account's own message (the owner's words or the QQ side's echo of a twin bubble), or an
    ignored or blocked sender (stored for context all the same).
    """
    key = chat_key(event)
    rendered = render_segments(_segments(event.original_message), _known_names(twin, event))
    if not rendered.text:
        return None
    sender = event.sender
    name = (getattr(sender, "card", None) or sender.nickname or "") if sender is not None else ""
    chat_type, chat = key or (PRIVATE, str(event.user_id))
    message = StoredMessage(
        chat_type=chat_type,
        chat=chat,
        sender=str(event.user_id),
        sender_name=name,
        origin="incoming",
        text=rendered.text,
        time=int(event.time),
        msg_id=str(event.message_id),
        reply_to=rendered.reply_to,
        kinds=rendered.kinds,
    )
    stickers = stickers_in(_segments(event.original_message))
    if event.user_id == event.self_id:
        await _owner_wrote(twin, key, message, stickers)
        return None
    row = await twin.record(message, stickers)
    if await _look_up_names(twin, bot, event, rendered.mentions):
        segments = _segments(event.original_message)
        rendered = render_segments(segments, _known_names(twin, event))
        assert twin.store is not None
        await twin.store.update_text(row, rendered.text, rendered.kinds)
    ignored = twin.config.twin_ignore_users
    if is_ignored_sender(event.user_id, event.self_id, ignored=ignored, blocked=twin.blocked):
        return None
    return row, rendered


def _private_allowed(config: Config, event: PrivateMessageEvent) -> bool:
    """Friends per the allow/deny lists; group temp chats and strangers only when allowed."""
    if not answers_private(event.user_id, allow=config.twin_private_allow, deny=config.twin_private_deny):
        return False
    if event.user_id in config.twin_private_allow or event.sub_type == "friend":
        return True
    if event.sub_type == "group":
        return config.twin_answer_group_temp
    return config.twin_answer_strangers


@chat.handle()
async def handle_private(bot: Bot, event: PrivateMessageEvent, twin: Twin = RunningTwin) -> None:
    stored = await _store_first(twin, bot, event)
    if stored is None or not _private_allowed(twin.config, event):
        return
    key = chat_key(event)
    assert key is not None  # someone else's message
    await twin.answer(
        key, stored[0], _sender(bot, key, twin), self_id=str(event.self_id), sender=str(event.user_id)
    )


@chat.handle()
async def handle_group(bot: Bot, event: GroupMessageEvent, twin: Twin = RunningTwin) -> None:
    stored = await _store_first(twin, bot, event)
    if stored is None:
        return
    row, rendered = stored
    config = twin.config
    assert twin.store is not None
    key = chat_key(event)
    assert key is not None
    quoted_twin = rendered.reply_to is not None and await twin.store.is_twin_message(rendered.reply_to, *key)
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
    await twin.answer(
        key, row, _sender(bot, key, twin), self_id=str(event.self_id), sender=str(event.user_id)
    )


@owner_sent.handle()
async def handle_message_sent(event: MessageSentEvent, twin: Twin = RunningTwin) -> None:
    """Store what the owner typed elsewhere (the retraining signal); never answer it, and let the
    owner have that chat. The QQ side's echo of a twin bubble is recognised, whenever it comes,
    and is neither stored again nor a takeover."""
    segments = _segments(event.message)
    rendered = render_segments(segments)
    if not rendered.text:
        return
    key = chat_key(event)
    await _owner_wrote(
        twin,
        key,
        StoredMessage(
            chat_type=key[0] if key else (GROUP if event.message_type == "group" else PRIVATE),
            chat=key[1] if key else str(event.group_id or event.target_id or event.user_id),
            sender=str(event.self_id),
            origin="owner",
            text=rendered.text,
            time=int(event.time),
            msg_id=str(event.message_id),
            reply_to=rendered.reply_to,
            kinds=rendered.kinds,
        ),
        stickers_in(segments),
    )


async def _owner_wrote(
    twin: Twin, key: ChatKey | None, message: StoredMessage, stickers: Sequence[Sticker] = ()
) -> None:
    """Store the account's own message; unless it is the echo of a twin bubble or a command line,
    the owner is in that chat now and the twin steps aside there (bot/runtime.py: takeover)."""
    row = await twin.record_own(key, message, stickers)
    if row is not None and key is not None and not twin.is_command(message.text):
        await twin.owner_spoke(key)


@recalled.handle()
async def handle_recall(
    event: FriendRecallNoticeEvent | GroupRecallNoticeEvent, twin: Twin = RunningTwin
) -> None:
    """A recalled message is never trained on nor shown to the model again (a group's recall names
    its group; a friend's may come from either side of the chat, so it is not narrowed)."""
    chat = (GROUP, str(event.group_id)) if isinstance(event, GroupRecallNoticeEvent) else None
    await twin.exclude(str(event.message_id), EXCLUDED_RECALLED, chat)


# ------------------------------------------------------------------------------- admin


def _superusers_here(bot: Bot) -> frozenset[str]:
    """Who may command the account on this connection; before startup, NoneBot's SUPERUSERS (who
    learn that the twin is not running), for a connection no account serves, nobody."""
    if _accounts is None:
        return frozenset(user.removeprefix("onebot:") for user in driver.config.superusers)
    account = _accounts.find(bot.self_id)
    return account.superusers if account is not None else frozenset()


async def _is_account_superuser(bot: Bot, event: MessageEvent) -> bool:
    return event.get_user_id() in _superusers_here(bot)


# Not NoneBot's SUPERUSER, which is one list for every account: a superuser of one account
# must not command another.
ACCOUNT_SUPERUSER = Permission(_is_account_superuser)
admin = on_command(COMMAND, permission=ACCOUNT_SUPERUSER, priority=1, block=True)

ADMIN_ACK = "收到"  # all a group sees of an admin command: the answer goes to a private chat


def superuser_reporter(account: Account) -> Callable[[str], Awaitable[None]]:
    """What tells the account's superusers later (a retrain's outcome): a private message through
    that account's own connection, and the log."""

    async def tell(text: str) -> None:
        logger.info(f"qq-twin: {text}" if not account.self_id else f"qq-twin ({account.label}): {text}")
        bots = get_bots()
        connections = [bots[account.self_id]] if account.self_id in bots else []
        for bot in connections if account.self_id else bots.values():
            for user in sorted(account.superusers):
                try:
                    await bot.call_api("send_private_msg", user_id=int(user), message=text)
                except Exception as exc:
                    logger.warning(f"could not tell superuser: {exc!r}")

    return tell


async def scheduled_retrain(account: Account) -> None:
    if account.twin.store is None:  # stopped
        return
    if account.twin.paused:
        logger.info(f"qq-twin: scheduled retrain of {account.label} skipped (paused)")
        return
    answer = account.twin.start_retrain(superuser_reporter(account))
    logger.info(f"qq-twin: scheduled retrain of {account.label}: {answer}")


@admin.handle()
async def handle_admin(
    bot: Bot,
    event: MessageEvent,
    args: Message = CommandArg(),
    twin: Twin = Depends(running_twin_or_say_so),
) -> None:
    """Answers go to the superuser's private chat; a group sees only an acknowledgement."""
    quoted = next((seg.data.get("id") for seg in event.original_message if seg.type == "reply"), None)
    account = _account(bot)
    assert account is not None  # the twin was found for this connection
    answer = await run_admin(
        twin,
        args.extract_plain_text().split(),
        chat=chat_key(event),
        user=str(event.user_id),
        quoted=None if quoted is None else str(quoted),
        report=superuser_reporter(account),
        quoted_chat=chat_key(event),  # a reply in QQ quotes a message of its own chat
    )
    if isinstance(event, GroupMessageEvent):
        try:
            await bot.send_private_msg(user_id=event.user_id, message=answer)
        except Exception as exc:  # no private chat with them: the group still learns nothing
            logger.warning(f"could not answer superuser {event.user_id} privately: {type(exc).__name__}")
        await admin.finish(ADMIN_ACK)
    await admin.finish(answer)

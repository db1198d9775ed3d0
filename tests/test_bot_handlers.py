"""The plugin's matchers under nonebug: what reaches the twin, what is answered, who may command."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nonebot
import pytest
from nonebot.adapters.onebot.v11 import Adapter, Bot, Message, MessageSegment, PrivateMessageEvent
from nonebot.adapters.onebot.v11.event import GroupMessageEvent, Sender
from nonebug import App

from bot.config import Config
from tests.bot_helpers import ScriptedBackend

SELF = 10000
SUPERUSER = 42


@pytest.fixture(scope="module")
def handlers():
    """The plugin loaded the way NoneBot loads it (a test may have imported `bot.*` plainly first)."""
    driver = nonebot.get_driver()
    if "OneBot V11" not in driver._adapters:
        driver.register_adapter(Adapter)
    if nonebot.get_plugin("bot") is None:  # another test module may have loaded it already
        if "bot" in sys.modules and not hasattr(sys.modules["bot"], "__plugin__"):
            del sys.modules["bot"]  # its NoneBot-free submodules stay imported and shared
        nonebot.load_plugin("bot")
    import bot.handlers

    return bot.handlers


@pytest.fixture
async def twin(handlers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from bot.accounts import Account, Accounts
    from bot.runtime import Twin

    monkeypatch.setattr(nonebot.get_driver().config, "superusers", {str(SUPERUSER)})
    config = Config(
        twin_db=tmp_path / "bot.db",
        twin_burst_window=0,
        twin_typing_delay=0,
        twin_typing_per_char=0,
        twin_retrain_cron="",
    )
    instance = Twin(config, nicknames=["小明"], backend=ScriptedBackend())
    await instance.start()
    running = Accounts([Account("", instance, frozenset({str(SUPERUSER)}))], several=False)
    monkeypatch.setattr(handlers, "_accounts", running)  # what the plugin's startup does
    yield instance
    await instance.close()


def private(user_id: int, text: str, message_id: int = 1) -> PrivateMessageEvent:
    message = Message(MessageSegment.text(text))
    return PrivateMessageEvent(
        time=int(time.time()),
        self_id=SELF,
        post_type="message",
        sub_type="friend",
        user_id=user_id,
        message_type="private",
        message_id=message_id,
        message=message,
        original_message=message,
        raw_message=text,
        font=0,
        sender=Sender(user_id=user_id, nickname=f"user{user_id}"),
        to_me=True,
    )


def group(user_id: int, message: Message, *, to_me: bool = False, card: str = "") -> GroupMessageEvent:
    return GroupMessageEvent(
        time=int(time.time()),
        self_id=SELF,
        post_type="message",
        sub_type="normal",
        user_id=user_id,
        message_type="group",
        group_id=300,
        message_id=7,
        message=message,
        original_message=message,
        raw_message=str(message),
        font=0,
        sender=Sender(user_id=user_id, nickname="n", card=card),
        to_me=to_me,
    )


async def stored(twin) -> list[tuple[str, str]]:
    rows = await twin.store.recent("c2c", "20001", since=0, limit=50)
    rows += await twin.store.recent("group", "300", since=0, limit=50)
    return [(m.origin, m.text) for m in rows]


async def test_a_friend_is_answered_through_send_msg(app: App, handlers, twin) -> None:
    async with app.test_matcher(handlers.chat) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, private(20001, "在吗"))
        ctx.should_call_api(
            "send_msg",
            {
                "message_type": "private",
                "message": Message(MessageSegment.text("收到:在吗")),
                "user_id": 20001,
            },
            result={"message_id": 555},
        )
    assert await stored(twin) == [("incoming", "在吗"), ("twin", "收到:在吗")]
    assert await twin.store.is_twin_message("555")


async def test_a_group_message_not_addressed_to_the_twin_is_kept_but_not_answered(
    app: App, handlers, twin
) -> None:
    async with app.test_matcher(handlers.chat) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, group(30001, Message("大家好"), card="小王"))
    assert await stored(twin) == [("incoming", "大家好")]
    assert twin.backend.prompts == []


async def test_a_mention_in_a_group_is_answered_with_the_speaker_named(app: App, handlers, twin) -> None:
    message = Message([MessageSegment.text("小明 "), MessageSegment.face(14)])
    async with app.test_matcher(handlers.chat) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, group(30001, message, card="小王"))
        ctx.should_call_api(
            "send_msg",
            {
                "message_type": "group",
                "message": Message(MessageSegment.text("收到:小王：小明 ")) + MessageSegment.face(14),
                "group_id": 300,
            },
            result={"message_id": 556},
        )
    assert twin.backend.prompts[-1][-1] == {"role": "user", "content": "小王：小明 [微笑]"}


async def test_superusers_pause_and_the_pause_is_kept(app: App, handlers, twin) -> None:
    event = private(SUPERUSER, "/twin pause")
    async with app.test_matcher(handlers.admin) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, event)
        ctx.should_pass_permission(handlers.admin)
        ctx.should_call_send(event, "paused", result=None)
        ctx.should_finished(handlers.admin)
    assert twin.paused and await twin.store.get_state("paused") is True


async def test_anyone_else_gets_no_effect_and_no_answer(app: App, handlers, twin) -> None:
    async with app.test_matcher() as ctx:  # every matcher of every plugin
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, private(20001, "/twin pause"))
        ctx.should_not_pass_permission(handlers.admin)
        ctx.should_not_pass_rule(handlers.chat)
    assert not twin.paused
    assert await stored(twin) == []


async def test_status_shows_the_model_and_counts(app: App, handlers, twin) -> None:
    event = private(SUPERUSER, "/twin status")
    await twin.set_blocked(7, True)
    status = await twin.status_text()
    assert status.splitlines()[0] == "model: v-test (scripted)"
    assert "blocked: 1" in status and "last retrain: never" in status
    async with app.test_matcher(handlers.admin) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, event)
        ctx.should_call_send(event, status, result=None)
        ctx.should_finished(handlers.admin)


async def test_message_sent_is_the_owners_word_and_is_not_answered(app: App, handlers, twin) -> None:
    event = handlers.MessageSentEvent(
        time=int(time.time()),
        self_id=SELF,
        post_type="message_sent",
        message_type="private",
        sub_type="friend",
        message_id=900,
        user_id=SELF,
        target_id=20001,
        message=Message("我自己回"),
    )
    async with app.test_matcher(handlers.owner_sent) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, event)
    assert await stored(twin) == [("owner", "我自己回")]
    assert "我自己回" not in event.get_log_string()  # message text stays out of INFO logs


def sent_by_owner(handlers, text: str, message_id: int):
    return handlers.MessageSentEvent(
        time=int(time.time()),
        self_id=SELF,
        post_type="message_sent",
        message_type="private",
        sub_type="friend",
        message_id=message_id,
        user_id=SELF,
        target_id=20001,
        message=Message(text),
    )


async def test_the_owners_message_takes_the_chat_over_but_an_echo_or_a_command_does_not(
    app: App, handlers, twin
) -> None:
    async with app.test_matcher(handlers.chat) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, private(20001, "在吗"))
        ctx.should_call_api(
            "send_msg",
            {
                "message_type": "private",
                "message": Message(MessageSegment.text("收到:在吗")),
                "user_id": 20001,
            },
            result={"message_id": 555},
        )
    async with app.test_matcher(handlers.owner_sent) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, sent_by_owner(handlers, "收到:在吗", 555))  # the twin's own bubble
        ctx.receive_event(bot, sent_by_owner(handlers, "/help", 901))  # for another bot
    assert twin.taken_over(("c2c", "20001")) is None
    async with app.test_matcher(handlers.owner_sent) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, sent_by_owner(handlers, "我来", 902))
    assert twin.taken_over(("c2c", "20001")) is not None
    assert twin.taken_over(("c2c", "20002")) is None
    async with app.test_matcher(handlers.chat) as ctx:  # stored, not answered
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, private(20001, "好呀", message_id=2))
    assert (await stored(twin))[-2:] == [("owner", "我来"), ("incoming", "好呀")]


async def test_the_scheduled_retrain_is_skipped_while_paused(handlers, twin) -> None:
    (account,) = handlers._accounts
    await twin.set_paused(True)
    await handlers.scheduled_retrain(account)
    assert twin.retrain_task is None
    await twin.set_paused(False)
    await handlers.scheduled_retrain(account)  # no registry behind TWIN_MODEL here: nothing to retrain
    assert twin.retrain_task is None
    assert twin.start_retrain(handlers.superuser_reporter(account)).startswith("retrain needs TWIN_MODEL")


async def test_before_the_twin_runs_chat_is_left_alone_and_admins_are_told(
    app: App, handlers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nonebot.get_driver().config, "superusers", {str(SUPERUSER)})
    monkeypatch.setattr(handlers, "_accounts", None)
    async with app.test_matcher(handlers.chat) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, private(20001, "在吗"))  # no API call expected: nothing is sent
    event = private(SUPERUSER, "/twin status")
    async with app.test_matcher(handlers.admin) as ctx:
        bot = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot, event)
        # finished from the dependency: NoneBot unwraps its task group's FinishedException, nonebug
        # does not see it, so only the answer is checked
        ctx.should_call_send(event, "qq-twin is not running", result=None)


async def test_an_unknown_verb_answers_with_the_help_generated_from_the_verb_table(
    app: App, handlers, twin
) -> None:
    import bot
    from bot.admin import ADMIN_HELP, ADMIN_VERBS

    usage = bot.__plugin_meta__.usage
    for verb in ADMIN_VERBS:
        assert f" {verb.synopsis}" in ADMIN_HELP and f"/twin {verb.synopsis}: {verb.help}" in usage
    event = private(SUPERUSER, "/twin dance")
    async with app.test_matcher(handlers.admin) as ctx:
        bot_ = ctx.create_bot(base=Bot, self_id=str(SELF))
        ctx.receive_event(bot_, event)
        ctx.should_call_send(event, ADMIN_HELP, result=None)
        ctx.should_finished(handlers.admin)

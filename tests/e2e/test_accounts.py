"""Two QQ accounts in one `bot.py`, each its own twin: nothing crosses from one to the other.

Accounts A (10001, persona 小明, superuser 51) and B (10002, persona 小红, superuser 52) each
have an account file and a store (and nicknames); they name the same model, which is loaded once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from deploy.onebot_client import BotProcess, OneBotClient, OneBotRefused
from pipeline.chatformat import system_prompt
from tests.e2e.conftest import SUPERUSER, TOKEN, running_bot, wait_until
from tests.e2e.test_bot_openai import bot_settings, rows
from tests.fake_openai import FakeOpenAI

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

A, B, STRANGER = 10001, 10002, 10009  # the accounts' QQ numbers, and one no file names
A_ADMIN, B_ADMIN = 51, 52
FRIEND = 20001


@pytest.fixture(scope="module")
def bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    home = tmp_path_factory.mktemp("accounts")
    nicknames = {A: '["小明", "明哥"]', B: '["小红"]'}
    for qq, persona, admin in ((A, "小明", A_ADMIN), (B, "小红", B_ADMIN)):
        lines = [f"TWIN_ACCOUNT={qq}", f"TWIN_DB=data/{qq}.db", f"TWIN_PERSONA={persona}"]
        lines += [f"TWIN_NICKNAMES={nicknames[qq]}", f"TWIN_SUPERUSERS=[{admin}]"]
        (home / f"{qq}.env").write_text("\n".join(lines) + "\n")
    settings = bot_settings(
        fake,
        home / "data" / "process.db",
        TWIN_ACCOUNTS=json.dumps([f"{A}.env", f"{B}.env"]),
        NICKNAME='["阿福"]',  # process-wide: set here only to see the warning
    )
    yield from running_bot(settings, home)


def store(bot: BotProcess, qq: int) -> Path:
    return bot.cwd / "data" / f"{qq}.db"


def texts(bot: BotProcess, qq: int) -> list[str]:
    return [text for (text,) in rows(store(bot, qq), "SELECT text FROM messages ORDER BY id")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def qa(bot: BotProcess) -> OneBotClient:
    async with bot.client(self_id=A) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def qb(bot: BotProcess) -> OneBotClient:
    async with bot.client(self_id=B) as client:
        yield client


async def command(qq: OneBotClient, admin: int, line: str) -> str:
    before = len(qq.replies(user_id=admin))
    await qq.send_private(admin, line)
    (answer,) = await qq.wait_reply(user_id=admin, after=before, timeout=20)
    return answer.text


async def ready(bot: BotProcess) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bot.settings['PORT']}", timeout=10) as client:
        return await client.get("/twin/ready", headers={"Authorization": f"Bearer {TOKEN}"})


async def test_ready_lists_each_account_and_waits_for_both(bot: BotProcess) -> None:
    waiting = await ready(bot)
    assert waiting.status_code == 503
    async with bot.client(self_id=A):
        half = (await ready(bot)).json()
        async with bot.client(self_id=B):
            both = await ready(bot)
    assert [(a["account"], a["connected"], a["ready"]) for a in half["accounts"]] == [
        (str(A), True, True),
        (str(B), False, False),
    ]
    assert half["ready"] is False
    body = both.json()
    assert both.status_code == 200 and body["ready"] is True and body["onebot_connections"] == 2
    for entry, other in zip(body["accounts"], (B, A), strict=True):
        assert (
            entry["model"] == "fake-twin" and entry["store_writable"] is True and entry["connected"] is True
        )
        assert entry["model_shared_with"] == [str(other)]  # one model for both
    assert bot.log().count("model shared: account 10002 answers from account 10001's model") == 1


async def test_a_message_stays_with_its_account(
    qa: OneBotClient, qb: OneBotClient, bot: BotProcess, fake: FakeOpenAI
) -> None:
    await qa.send_private(FRIEND, "我的秘密是蓝色")
    assert [r.text for r in await qa.wait_reply(user_id=FRIEND, timeout=20)] == ["收到:我的秘密是蓝色"]
    assert await qb.wait_quiet(1.0, user_id=FRIEND) == []  # answered on A's connection only
    assert "我的秘密是蓝色" in texts(bot, A) and "我的秘密是蓝色" not in texts(bot, B)

    # The same friend talks to B: B's memory of that chat is its own, and so is its persona.
    await qb.send_private(FRIEND, "你记得什么")
    assert [r.text for r in await qb.wait_reply(user_id=FRIEND, timeout=20)] == ["收到:你记得什么"]
    (to_b,) = fake.requests_mentioning("你记得什么")
    assert not any("秘密" in m["content"] for m in to_b["messages"])
    assert to_b["messages"][0]["content"] == system_prompt("小红")
    (to_a,) = fake.requests_mentioning("我的秘密是蓝色")
    assert to_a["messages"][0]["content"] == system_prompt("小明")
    assert len(qa.replies(user_id=FRIEND)) == 1  # A was not asked to answer B's friend


async def test_a_superuser_commands_their_own_account_only(
    qa: OneBotClient, qb: OneBotClient, bot: BotProcess
) -> None:
    for stranger in (B_ADMIN, SUPERUSER):  # B's superuser, and SUPERUSERS (replaced by A's own list)
        await qa.send_private(stranger, "/twin pause")
        assert await qa.wait_quiet(1.5, user_id=stranger) == []  # no effect, no answer

    assert await command(qa, A_ADMIN, "/twin pause") == "paused"
    await qa.send_private(FRIEND, "A在吗")
    assert await qa.wait_quiet(1.5, user_id=FRIEND) == []
    await qb.send_private(FRIEND, "B在吗")
    assert [r.text for r in await qb.wait_reply(user_id=FRIEND, after=1, timeout=20)] == ["收到:B在吗"]

    a_status, b_status = (
        await command(qa, A_ADMIN, "/twin status"),
        await command(qb, B_ADMIN, "/twin status"),
    )
    assert "paused: yes" in a_status and a_status.endswith(f"account: {A}")
    assert "paused: no" in b_status and b_status.endswith(f"account: {B}")
    assert await command(qa, A_ADMIN, "/twin resume") == "resumed"
    assert not [text for qq in (A, B) for text in texts(bot, qq) if text.startswith("/twin")]


async def test_an_account_no_file_names_gets_nothing_and_nothing_is_stored(bot: BotProcess) -> None:
    before = {qq: len(texts(bot, qq)) for qq in (A, B)}
    async with bot.client(self_id=STRANGER) as stranger:
        await stranger.send_private(FRIEND, "有人吗")
        await stranger.send_private(A_ADMIN, "/twin status")
        await stranger.send_message_sent("我自己说的", target_id=FRIEND)
        assert await stranger.wait_quiet(2.0) == []
    assert {qq: len(texts(bot, qq)) for qq in (A, B)} == before
    warning = f"QQ account {STRANGER} connected, but no account file names it: ignored"
    assert await wait_until(lambda: bot.log().count(warning) == 1, 5)
    assert "有人吗" not in bot.log()  # no message text at INFO


async def test_an_accounts_superuser_may_not_connect_as_an_account(bot: BotProcess) -> None:
    with pytest.raises(OneBotRefused, match="403"):
        await bot.client(self_id=A_ADMIN).connect()
    assert "an account's TWIN_SUPERUSERS contains the bot's own account 51" in bot.log()


async def test_two_account_files_for_one_store_stop_the_bot_in_one_line(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    for name, qq in (("a.env", A), ("b.env", B)):
        (tmp_path / name).write_text(f"TWIN_ACCOUNT={qq}\nTWIN_DB=data/same.db\n")
    settings = bot_settings(fake, tmp_path / "bot.db", TWIN_ACCOUNTS='["a.env", "b.env"]')
    process = BotProcess(settings, cwd=tmp_path)
    with pytest.raises(RuntimeError, match="bot exited with 2"):
        process.start(timeout=60)
    assert "qq-twin: b.env: TWIN_DB data/same.db is a.env's too: each account needs its own" in process.log()
    assert not (tmp_path / "data" / "same.db").exists()


async def test_a_nickname_addresses_its_own_accounts_twin_only(
    qa: OneBotClient, qb: OneBotClient, bot: BotProcess
) -> None:
    """Both accounts are in group 300; each answers its own TWIN_NICKNAMES and not the other's."""
    member = 20077
    for qq in (qa, qb):
        await qq.send_group(300, member, "小红在吗", card="阿强")
    (answer,) = await qb.wait_reply(group_id=300, timeout=20)
    assert answer.text.endswith("小红在吗")
    assert await qa.wait_quiet(1.0, group_id=300) == []  # not A's name

    for qq in (qa, qb):
        await qq.send_group(300, member, "明哥晚上打球吗", card="阿强")
    (answer,) = await qa.wait_reply(group_id=300, timeout=20)
    assert answer.text.endswith("明哥晚上打球吗")
    assert await qb.wait_quiet(1.0, group_id=300) == []  # B answered only its own name
    assert "NICKNAME is process-wide" in bot.log()

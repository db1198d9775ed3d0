"""The console over several QQ accounts in one process: the switcher, every page per account, and
that nothing shown or done for one account reaches another's store, registry or switches."""

from __future__ import annotations

import html
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from bot.accounts import Account
from bot.config import Config, load_accounts, load_config
from bot.console.web import PREFIX
from bot.runtime import Twin
from bot.store import EXCLUDED_OPERATOR, StoredMessage
from pipeline import registry as model_registry
from tests.bot_helpers import ScriptedBackend
from tests.console_helpers import ORIGIN, QUIET, accounts_client, csrf, login
from tests.registry_helpers import registry_of_versions

pytestmark = pytest.mark.asyncio

NOW = int(time.time())
PAGES = ("/", "/conversations", "/learning", "/versions", "/settings")
A, B = "10001", "10002"


async def friend(twin: Twin, uin: str, text: str, msg_id: str | None = None, t: int = NOW) -> int:
    return await twin.record(
        StoredMessage("c2c", uin, uin, "incoming", text, t, sender_name=f"友{uin}", msg_id=msg_id)
    )


async def reply(twin: Twin, uin: str, text: str, msg_id: str) -> int:
    return await twin.record(
        StoredMessage(
            "c2c", uin, "10000", "twin", text, NOW, msg_id=msg_id, model_version="v1", send_state="sent"
        )
    )


async def secrets_in_each(a: Twin, b: Twin) -> None:
    """Distinctive rows in each store: a friend, a twin reply (approved), an excluded message."""
    await friend(a, "20001", "甲的秘密")
    await reply(a, "20001", "甲的回复", "same-id")
    await friend(a, "20001", "甲的排除", "a-x")
    await friend(b, "20002", "乙的秘密")
    await reply(b, "20002", "乙的回复", "same-id")  # one message id in both stores
    await friend(b, "20002", "乙的排除", "b-x")
    for twin, excluded in ((a, "a-x"), (b, "b-x")):
        assert twin.store is not None
        await twin.store.approve_sent("same-id")
        await twin.exclude(excluded, EXCLUDED_OPERATOR)


async def act(
    client: httpx.AsyncClient, path: str, params: dict[str, str] | None = None, **fields: str
) -> httpx.Response:
    """A form posted from a console page (the session's token, this origin)."""
    token = await csrf(client, f"/?account={A}")
    return await client.post(path, params=params, data={"csrf": token, **fields}, headers=ORIGIN)


async def flash(client: httpx.AsyncClient, answer: httpx.Response) -> str:
    """The page the action sent the browser back to, as text (with the action's one line)."""
    assert answer.status_code == 303, answer.text
    location = answer.headers["location"]
    assert location.startswith(PREFIX + "/")
    return html.unescape((await client.get(location[len(PREFIX) :])).text)


def twins(accounts: list[Account]) -> tuple[Twin, Twin]:
    a, b = (account.twin for account in accounts)
    return a, b


async def test_the_switcher_names_both_accounts_and_every_page_renders_for_each(tmp_path: Path) -> None:
    async with accounts_client(tmp_path, connected={A}) as (client, _):
        await login(client)
        for qq, other in ((A, B), (B, A)):
            for path in PAGES:
                page = await client.get(path, params={"account": qq})
                assert page.status_code == 200, (path, qq)
                # The switcher stays on the page (a chat or search of one account means nothing in another).
                here = PREFIX + path
                assert f'href="{here}?account={qq}" aria-current="true">{qq}</a>' in page.text
                assert f'href="{here}?account={other}">{other}</a>' in page.text
                assert f"<small>{path_name(path)}</small> · {qq}" in page.text  # the heading names it
                assert f'name="account" value="{other}"' not in page.text  # its forms act on it only
                if re.search(rf'method="post" action="{PREFIX}/(?!logout)', page.text):
                    assert f'name="account" value="{qq}"' in page.text
            # Menu links stay on the account.
            assert (
                f'href="{PREFIX}/conversations?account={qq}"'
                in (await client.get("/", params={"account": qq})).text
            )
        overview = (await client.get("/", params={"account": B})).text
        assert "已连接 connected" not in overview  # only A's QQ number is connected
        assert "已连接 connected" in (await client.get("/", params={"account": A})).text
        assert (await client.get("/")).text.count('aria-current="true"') == 1  # no account named: the first
        assert f'aria-current="true">{A}<' in (await client.get("/")).text


def path_name(path: str) -> str:
    return {"/": "Overview", "/conversations": "Conversations", "/learning": "Learning"}.get(
        path, path.strip("/").capitalize()
    )


async def test_conversations_search_and_learning_of_one_account_never_show_the_others(tmp_path: Path) -> None:
    async with accounts_client(tmp_path) as (client, accounts):
        a, b = twins(accounts)
        await secrets_in_each(a, b)
        await login(client)
        for qq, mine, theirs in ((A, "甲", "乙"), (B, "乙", "甲")):
            chats = (await client.get("/conversations", params={"account": qq})).text
            own_uin, other_uin = ("20001", "20002") if qq == A else ("20002", "20001")
            assert f"c2c%3A{own_uin}" in chats and other_uin not in chats
            # The other account's chat, asked for by name here: empty, not theirs.
            timeline = (
                await client.get("/conversations", params={"account": qq, "chat": f"c2c:{other_uin}"})
            ).text
            assert theirs not in timeline and f"{mine}的" not in timeline
            own = (await client.get("/conversations", params={"account": qq, "chat": f"c2c:{own_uin}"})).text
            assert f"{mine}的秘密" in own and theirs not in own
            found = (await client.get("/conversations", params={"account": qq, "q": "的"})).text
            assert f"{mine}的秘密" in found and f"{mine}的回复" in found and theirs not in found
            learning = (await client.get("/learning", params={"account": qq})).text
            assert f"{mine}的回复" in learning and f"{mine}的排除" in learning  # approved, excluded rows
            assert theirs not in learning
            assert 'id="next-approved">1<' in learning and 'id="next-excluded">1<' in learning


async def test_a_row_id_of_the_other_store_changes_nothing_and_says_so(tmp_path: Path) -> None:
    async with accounts_client(tmp_path) as (client, accounts):
        a, b = twins(accounts)
        await friend(a, "20001", "甲", "a1")
        for i in range(5):
            await friend(b, "20002", f"乙{i}", f"b{i}")
        only_b = await reply(b, "20002", "乙的回复", "b-reply")
        assert a.store is not None and b.store is not None
        assert await a.store.message(only_b) is None
        await login(client)
        back = f"{PREFIX}/conversations?account={A}"
        for verb in ("/approve", "/exclude"):
            page = await flash(client, await act(client, verb, account=A, message=str(only_b), back=back))
            assert f"{A}: no message #{only_b} in this account's store" in page
        row = await b.store.message(only_b)
        assert row is not None and not row.approved and row.excluded is None


async def test_one_message_id_in_both_stores_is_approved_and_excluded_only_in_the_named_account(
    tmp_path: Path,
) -> None:
    async with accounts_client(tmp_path) as (client, accounts):
        a, b = twins(accounts)
        in_a = await reply(a, "20001", "甲的回复", "same-id")
        in_b = await reply(b, "20002", "乙的回复", "same-id")
        assert a.store is not None and b.store is not None
        await login(client)
        page = await flash(client, await act(client, "/approve", account=A, message=str(in_a)))
        assert f"{A}: approved for retraining" in page
        await act(client, "/exclude", account=A, message=str(in_a))
        mine, theirs = await a.store.message(in_a), await b.store.message(in_b)
        assert mine is not None and mine.approved and mine.excluded == EXCLUDED_OPERATOR
        assert theirs is not None and not theirs.approved and theirs.excluded is None


async def test_block_pause_and_probability_of_one_account_leave_the_other_alone(tmp_path: Path) -> None:
    async with accounts_client(tmp_path) as (client, accounts):
        a, b = twins(accounts)
        await login(client)
        assert (await act(client, "/block", account=A, uin="20001")).status_code == 303
        assert (await act(client, "/pause", account=A)).status_code == 303
        assert (await act(client, "/probability", account=A, probability="0.5")).status_code == 303
        assert a.blocked == {20001} and a.paused and a.probability == 0.5
        assert b.blocked == set() and not b.paused and b.probability != 0.5
        assert b.store is not None and await b.store.get_state("blocked", []) == []
        assert not await b.store.get_state("paused", False)
        # And back, from B's side: B acts on B only.
        await act(client, "/pause", account=B)
        await act(client, "/unblock", account=B, uin="20001")
        assert a.paused and b.paused and a.blocked == {20001}


async def test_an_unknown_account_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with accounts_client(tmp_path) as (client, accounts):
        a, b = twins(accounts)
        await login(client)
        for fields, params in (
            ({"account": "99999"}, None),
            ({}, {"account": "99999"}),
            ({"account": "1e4"}, None),
        ):
            answer = await act(client, "/pause", params=params, **fields)
            assert answer.status_code == 404 and answer.text == "no such account"
        assert (await client.get("/", params={"account": "99999"})).status_code == 404
        assert not a.paused and not b.paused


async def test_an_action_must_name_its_account_once(tmp_path: Path) -> None:
    """One operator session acts on every account, so the CSRF token cannot tell them apart: the
    account acted on is the one the form names, and an address naming another is refused."""
    async with accounts_client(tmp_path) as (client, accounts):
        a, b = twins(accounts)
        await login(client)
        mismatch = await act(client, "/pause", params={"account": B}, account=A)
        assert mismatch.status_code == 400 and "different accounts" in mismatch.text
        unnamed = await act(client, "/pause")  # with several accounts "the first" is no answer
        assert unnamed.status_code == 400 and "names no account" in unnamed.text
        assert not a.paused and not b.paused
        # Named once, in either place, it acts on that account.
        assert (await act(client, "/pause", params={"account": B})).status_code == 303
        assert (await act(client, "/pause", params={"account": A}, account=A)).status_code == 303
        assert a.paused and b.paused
        # A token from another session is refused whatever account it names.
        token = await csrf(client)
        async with accounts_client(tmp_path / "other") as (stranger, _):
            await login(stranger)
            answer = await stranger.post("/resume", data={"csrf": token, "account": A}, headers=ORIGIN)
            assert answer.status_code == 403
        assert a.paused


def versioned(config: Config) -> ScriptedBackend:
    backend = ScriptedBackend()
    backend.version = model_registry.current_version(Path(config.twin_model)) or backend.version
    return backend


async def test_versions_and_promote_are_per_account(tmp_path: Path) -> None:
    reg_a = registry_of_versions(tmp_path / "a", 8, 16)
    reg_b = registry_of_versions(tmp_path / "b", 8, 16, 32)
    configs = [
        Config(
            twin_account=int(qq),
            twin_db=tmp_path / f"{qq}.db",
            twin_model=str(reg),
            twin_model_poll=3600,
            **QUIET,
        )
        for qq, reg in ((A, reg_a), (B, reg_b))
    ]
    async with accounts_client(tmp_path, configs, backend=versioned) as (client, accounts):
        a, b = twins(accounts)
        await login(client)
        page_a = (await client.get("/versions", params={"account": A})).text
        assert str(reg_a) in page_a and str(reg_b) not in page_a and "v0003" not in page_a
        assert "v0003" in (await client.get("/versions", params={"account": B})).text
        # A version only B has is no version of A's.
        answer = await flash(client, await act(client, "/promote", account=A, version="v0003"))
        assert f"{A}: no version v0003 in the registry" in answer
        await act(client, "/promote", account=A, version="v0001")
        assert model_registry.current_version(reg_a) == "v0001" == a.backend.version
        assert model_registry.current_version(reg_b) == "v0003" == b.backend.version


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty working directory and an environment without TWIN_* settings."""
    for name in list(os.environ):
        if name.upper().startswith("TWIN_") or name.upper() == "ENVIRONMENT":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, *lines: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def setting(page: str, name: str) -> tuple[str, str]:
    """(value, source) of one row of the settings table."""
    row = page.split(f"<code>{name}</code>")[1].split("</tr>")[0]
    cells = row.split("<td")[1:]
    value = cells[0].split(">", 1)[1].split("</td>")[0]
    source = cells[1].split(">", 1)[1].split("</td>")[0]
    return html.unescape(value), html.unescape(source)


async def test_settings_show_each_accounts_values_and_its_account_file(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(
        home / ".env",
        'TWIN_ACCOUNTS=["accounts/a.env", "accounts/b.env"]',
        "TWIN_PERSONA=全局",
        "TWIN_N_CTX=4096",
    )
    write(
        home / "accounts" / "a.env",
        f"TWIN_ACCOUNT={A}",
        "TWIN_DB=a.db",
        "TWIN_PERSONA=小明",
        "TWIN_OPENAI_API_KEY=sk-甲",
    )
    write(home / "accounts" / "b.env", f"TWIN_ACCOUNT={B}", "TWIN_DB=b.db", "TWIN_MAX_TOKENS=77")
    monkeypatch.setenv("TWIN_TEMPERATURE", "0.3")
    configs = list(load_accounts(load_config()).values())
    async with accounts_client(home, configs) as (client, _):
        await login(client)
        page_a = (await client.get("/settings", params={"account": A})).text
        page_b = (await client.get("/settings", params={"account": B})).text
    a_file, b_file = f"account file {Path('accounts/a.env')}", f"account file {Path('accounts/b.env')}"
    assert setting(page_a, "TWIN_ACCOUNT") == (A, a_file) and setting(page_b, "TWIN_ACCOUNT") == (B, b_file)
    assert setting(page_a, "TWIN_PERSONA") == ("小明", a_file)
    assert setting(page_b, "TWIN_PERSONA") == ("全局", ".env")
    assert setting(page_a, "TWIN_MAX_TOKENS")[1] == "default / 默认"
    assert setting(page_b, "TWIN_MAX_TOKENS") == ("77", b_file)
    assert setting(page_a, "TWIN_N_CTX") == ("4096", ".env") == setting(page_b, "TWIN_N_CTX")
    assert setting(page_a, "TWIN_TEMPERATURE") == ("0.3", "environment")
    assert setting(page_a, "TWIN_OPENAI_API_KEY") == ("•••••• (set / 已设置)", a_file)
    assert setting(page_b, "TWIN_OPENAI_API_KEY")[0] == "(empty / 未设置)"
    assert "sk-甲" not in page_a and "sk-甲" not in page_b
    # A list of paths is shown as the files it names (it once broke the page: not JSON).
    accounts_list = '["accounts/a.env", "accounts/b.env"]'
    assert setting(page_a, "TWIN_ACCOUNTS") == (accounts_list, ".env") == setting(page_b, "TWIN_ACCOUNTS")

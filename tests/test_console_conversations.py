"""The console's Conversations page: chats, a chat's timeline, search, and the per-message actions,
each going through the admin verb of the same name."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

import httpx

from bot.admin import run_admin
from bot.console.web import PREFIX
from bot.runtime import Twin
from bot.store import EXCLUDED_RECALLED, StoredMessage
from tests.console_helpers import ORIGIN, console_client, csrf, login

NOW = int(time.time())
FRIEND = ("c2c", "20001")
GROUP = ("group", "30001")


async def friend(
    twin: Twin, text: str, *, t: int = NOW, msg_id: str | None = None, name: str = "小王"
) -> int:
    return await twin.record(
        StoredMessage(*FRIEND, "20001", "incoming", text, t, sender_name=name, msg_id=msg_id)
    )


async def owner(twin: Twin, text: str, *, t: int = NOW, msg_id: str | None = None) -> int:
    return await twin.record(StoredMessage(*FRIEND, "10000", "owner", text, t, msg_id=msg_id))


async def twin_reply(
    twin: Twin, text: str, *, t: int = NOW, msg_id: str | None = "t1", state: str = "sent"
) -> int:
    return await twin.record(
        StoredMessage(
            *FRIEND, "10000", "twin", text, t, msg_id=msg_id, model_version="v0003", send_state=state
        )
    )


def item(page: str, row: int) -> str:
    """The <li> of one message in a page."""
    match = re.search(rf'<li id="msg-{row}" class="([^"]*)">(.*?)</li>', page, re.S)
    assert match, f"no message {row} in the page"
    return match.group(0)


async def signed_in(client: httpx.AsyncClient) -> str:
    """Log in; the session's CSRF token, read once: every page shows (and so takes) the answers
    of the actions so far, and a test reads several at once."""
    await login(client)
    return await csrf(client)


async def post(client: httpx.AsyncClient, token: str, path: str, **fields: str) -> httpx.Response:
    """A form posted from a console page: the session's token and the page's origin."""
    return await client.post(path, data={"csrf": token, **fields}, headers=ORIGIN)


def below_prefix(url: str) -> str:
    """A console link as the test client (based at the console) asks for it."""
    url = html.unescape(url)
    assert url.startswith(PREFIX + "/")
    return url[len(PREFIX) :]


async def noop_report(text: str) -> None:
    pass


async def test_the_chat_list_names_each_chat_with_its_counts(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        await friend(twin, "在吗", t=NOW - 100, name="老名字")
        await friend(twin, "吃了吗", t=NOW - 90)
        await twin_reply(twin, "吃了", t=NOW - 80)
        await twin.record(StoredMessage(*GROUP, "20002", "incoming", "开会", NOW - 500, sender_name="小李"))
        await signed_in(client)
        page = (await client.get("/conversations")).text
    table = page.split("<tbody>")[1].split("</tbody>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    assert len(rows) == 2 and "20001" in rows[0] and "30001" in rows[1]  # newest activity first
    assert "小王" in rows[0] and "老名字" not in rows[0]  # the friend's latest name
    assert 'href="/twin/console/conversations?chat=c2c%3A20001"' in rows[0]
    cells = [re.sub(r"<[^>]+>|\s+", "", c) for c in re.findall(r"<td>(.*?)</td>", rows[0], re.S)]
    assert cells[1] == time.strftime("%Y-%m-%d%H:%M", time.localtime(NOW - 80))
    assert cells[2:] == ["3", "1"]  # three messages, one twin reply awaiting review
    assert "小李" in rows[1]


async def test_a_timeline_shows_friend_owner_and_twin_rows(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        a = await friend(twin, "在吗", t=NOW - 3, msg_id="f1")
        b = await owner(twin, "在", t=NOW - 2, msg_id="o1")
        c = await twin_reply(twin, "怎么了", t=NOW - 1)
        d = await twin_reply(twin, "没发出去", msg_id=None, state="failed")
        await signed_in(client)
        page = (await client.get("/conversations", params={"chat": "c2c:20001"})).text
    timeline = page.split('<ol id="timeline"')[1].split("</ol>")[0]
    assert [int(r) for r in re.findall(r'id="msg-(\d+)"', timeline)] == [a, b, c, d]  # oldest first
    assert 'class="who-friend"' in item(page, a) and "小王" in item(page, a) and "20001" in item(page, a)
    assert 'class="who-owner"' in item(page, b) and "本人" in item(page, b)
    assert 'class="who-twin"' in item(page, c) and "v0003" in item(page, c)
    assert f'action="{PREFIX}/approve"' in item(page, c) and f'action="{PREFIX}/exclude"' in item(page, c)
    assert f'action="{PREFIX}/block"' in item(page, a) and 'name="uin" value="20001"' in item(page, a)
    failed = item(page, d)
    assert "failed" in failed and "/approve" not in failed and "/exclude" not in failed


async def test_the_timeline_pages_back_a_hundred_rows_at_a_time(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        rows = [await friend(twin, f"第{i}条", t=NOW - 200 + i) for i in range(105)]
        await signed_in(client)
        newest = (await client.get("/conversations", params={"chat": "c2c:20001"})).text
        older = re.search(r'href="([^"]*)" id="older"', newest)
        assert older
        first_page = [int(r) for r in re.findall(r'id="msg-(\d+)"', newest)]
        oldest = (await client.get(below_prefix(older.group(1)))).text
    assert first_page == rows[5:]
    assert [int(r) for r in re.findall(r'id="msg-(\d+)"', oldest)] == rows[:5]
    assert 'id="older"' not in oldest


async def test_search_finds_text_and_takes_percent_literally(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        hit = await friend(twin, "打折 50% 了")
        await friend(twin, "打折 500 了")
        group_hit = await twin.record(StoredMessage(*GROUP, "20002", "incoming", "全场 50%", NOW))
        await signed_in(client)
        found = (await client.get("/conversations", params={"q": "50%"})).text
        in_chat = (await client.get("/conversations", params={"q": "50%", "chat": "c2c:20001"})).text
        underscore = (await client.get("/conversations", params={"q": "_"})).text
    results = found.split('<ol id="results"')[1].split("</ol>")[0]
    assert sorted(int(r) for r in re.findall(r'id="msg-(\d+)"', results)) == [hit, group_hit]
    assert "chat=c2c%3A20001" in item(found, hit)  # each result links to its chat
    assert [int(r) for r in re.findall(r'id="msg-(\d+)"', in_chat)] == [hit]
    assert re.findall(r'id="msg-(\d+)"', underscore) == []


async def test_approve_marks_the_row_and_flashes_the_verbs_answer(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        reply = await twin_reply(twin, "好的")
        token = await signed_in(client)
        back = "/twin/console/conversations?chat=c2c:20001"
        response = await post(client, token, "/approve", message=str(reply), back=back)
        assert response.status_code == 303 and response.headers["location"] == back
        page = (await client.get(below_prefix(back))).text
        assert "approved for retraining" in page
        assert twin.store is not None
        assert (await twin.store.message(reply)).approved  # type: ignore[union-attr]
        assert "/unapprove" in item(page, reply) and "已批准" in item(page, reply)
        await post(client, token, "/unapprove", message=str(reply), back=back)
        assert not (await twin.store.message(reply)).approved  # type: ignore[union-attr]


async def test_exclude_and_include_round_trip_but_a_recall_stays_excluded(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        said = await owner(twin, "说错了", msg_id="o7")
        recalled = await friend(twin, "撤回的", msg_id="f8")
        assert twin.store is not None
        await twin.exclude("f8", EXCLUDED_RECALLED)
        token = await signed_in(client)
        await post(client, token, "/exclude", message=str(said))
        assert (await twin.store.message(said)).excluded == "operator"  # type: ignore[union-attr]
        page = (await client.get("/conversations", params={"chat": "c2c:20001"})).text
        assert "excluded from prompts and training" in page
        assert 'class="who-owner excluded"' in item(page, said) and "/include" in item(page, said)
        assert "/include" not in item(page, recalled)  # only an operator's exclusion is undone
        await post(client, token, "/include", message=str(said))
        assert (await twin.store.message(said)).excluded is None  # type: ignore[union-attr]
        await post(client, token, "/include", message=str(recalled))
        assert (await twin.store.message(recalled)).excluded == "recalled"  # type: ignore[union-attr]
        await post(client, token, "/exclude", message=str(recalled))
        assert (await twin.store.message(recalled)).excluded == "recalled"  # type: ignore[union-attr]
        page = (await client.get("/conversations")).text
    assert "stays excluded (recalled)" in page and "already excluded (recalled)" in page


async def test_block_and_unblock_change_the_twins_blocked_set(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        row = await friend(twin, "烦人")
        token = await signed_in(client)
        await post(client, token, "/block", uin="20001")
        assert 20001 in twin.blocked
        page = (await client.get("/conversations", params={"chat": "c2c:20001"})).text
        assert "blocked 20001" in page and "/unblock" in item(page, row) and "已屏蔽" in item(page, row)
        await post(client, token, "/unblock", uin="20001")
        assert 20001 not in twin.blocked


async def test_bad_values_are_answered_and_change_nothing(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        reply = await twin_reply(twin, "好的")
        unsent = await twin_reply(twin, "没发出去", msg_id=None, state="failed")
        token = await signed_in(client)
        for value in ("abc", "999999", "-1", "1e3", "１", "", str(unsent)):
            assert (await post(client, token, "/approve", message=value)).status_code == 303
            assert (await post(client, token, "/exclude", message=value)).status_code == 303
        for value in ("abc", "²", "", "1 2"):
            await post(client, token, "/block", uin=value)
        page = (await client.get("/conversations")).text
        assert "not a message id" in page and "no message #999999" in page and "has no QQ message id" in page
        assert "not a QQ number" in page
        assert twin.store is not None and twin.blocked == set()
        for row in (reply, unsent):
            kept = await twin.store.message(row)
            assert kept is not None and not kept.approved and kept.excluded is None
        for chat in ("../x", "c2c:abc", "group:", "c2c:1<script>"):
            response = await client.get("/conversations", params={"chat": chat})
            assert response.status_code == 200 and "not a chat" in response.text
            assert '<table id="chats">' in response.text and "<script>" not in response.text
        response = await client.get("/conversations", params={"q": "好", "chat": "c2c:x"})
        assert "not a chat" in response.text and 'id="results"' not in response.text
        response = await client.get("/conversations", params={"chat": "c2c:20001", "before": "x'"})
        assert response.status_code == 200 and "not a message position" in response.text


async def test_chat_text_is_shown_escaped(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        row = await friend(twin, "<script>alert(1)</script>", name="<b>名</b>")
        await signed_in(client)
        timeline = (await client.get("/conversations", params={"chat": "c2c:20001"})).text
        listed = (await client.get("/conversations")).text
        found = (await client.get("/conversations", params={"q": "<script>"})).text
    for page in (timeline, listed, found):
        assert "<script>" not in page and "<b>名" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in item(timeline, row)


async def test_exclude_and_include_work_from_chat_too(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (_, twin):
        row = await owner(twin, "说错了", msg_id="o9")
        await friend(twin, "/help", msg_id="c1")
        assert twin.store is not None
        await twin.exclude("c1", "command")

        async def admin(*words: str, quoted: str | None) -> str:
            return await run_admin(
                twin, list(words), chat=FRIEND, user="42", quoted=quoted, report=noop_report
            )

        assert "quote a message" in await admin("exclude", quoted=None)
        assert "quote a message" in await admin("include", quoted=None)
        assert await admin("exclude", quoted="o9") == "excluded from prompts and training"
        assert "already excluded (operator)" in await admin("exclude", quoted="o9")
        assert (await twin.store.message(row)).excluded == "operator"  # type: ignore[union-attr]
        assert await admin("include", quoted="o9") == "included again in prompts and training"
        assert await admin("include", quoted="o9") == "that message is not excluded"
        assert "stays excluded (command)" in await admin("include", quoted="c1")
        assert await admin("exclude", quoted="nope") == "that message is not in the store"
        assert await admin("include", quoted="nope") == "that message is not in the store"

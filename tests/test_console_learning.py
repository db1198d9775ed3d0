"""The console's Learning page over HTTP: the next retrain's preview, the running cycle, past cycles."""

from __future__ import annotations

import fcntl
import json
import re

from bot.store import StoredMessage, read_messages_since
from pipeline.chatformat import to_turns
from pipeline.registry import LOCK_FILE, read_status
from pipeline.registry_ops import append_cycle, write_status
from tests.console_helpers import console_client, login, post
from tests.registry_helpers import registry_of_versions

OWNER = "10000"
T0 = 1_700_000_000


def section(html: str, ident: str) -> str:
    match = re.search(rf'<section class="card" id="{ident}">(.*?)</section>', html, re.S)
    assert match, f"no #{ident} section"
    return match.group(1)


def count(html: str, ident: str) -> int:
    match = re.search(rf'id="{ident}">(\d+)<', html)
    assert match, f"no #{ident} count"
    return int(match.group(1))


def owner_turns(rows) -> int:
    """The account's turns as the dataset builder merges them, chat by chat."""
    chats = {(r.chat_type, r.chat) for r in rows}
    return sum(
        sum(t.turn.role == "assistant" for t in to_turns([r for r in rows if (r.chat_type, r.chat) == chat]))
        for chat in chats
    )


async def fill(store) -> dict[str, int]:
    """Every kind of row a preview must tell apart; returns the ids of the interesting ones."""

    async def add(origin, text, t, chat="30001", **extra) -> int:
        sender = OWNER if origin != "incoming" else chat
        return await store.add(
            StoredMessage(
                chat_type="c2c", chat=chat, sender=sender, origin=origin, text=text, time=t, **extra
            )
        )

    ids = {}
    await add("owner", "before the window", T0 - 10)
    await add("incoming", "在吗", T0)
    await add("owner", "在的", T0 + 5)
    await add("owner", "刚下班", T0 + 20)  # same burst as the line before: one turn
    await add("owner", "明天见", T0 + 1000)  # past the burst gap: a turn of its own
    await add("incoming", "群里见", T0 + 30, chat="30002")
    await add("owner", "好", T0 + 40, chat="30002")
    ids["approved"] = await add(
        "twin", "<b>好呀</b>", T0 + 50, approved=True, send_state="sent", msg_id="m-approved"
    )
    await add("twin", "没批准", T0 + 60, send_state="sent", msg_id="m-unreviewed")
    await add("twin", "发送失败", T0 + 70, approved=True, send_state="failed", msg_id="m-failed")
    ids["excluded"] = await add("owner", "/twin pause", T0 + 80, excluded="command")
    return ids


async def test_the_preview_counts_what_the_retrain_would_read(tmp_path):
    async with console_client(tmp_path) as (client, twin):
        ids = await fill(twin.store)
        await login(client)
        html = (await client.get("/learning")).text
        assert "needs a model registry" in html  # a plain .gguf: the preview counts the whole store
        rows = read_messages_since(twin.config.twin_db, 0, include_approved_twin=True)
        preview = section(html, "next-retrain")
        assert count(preview, "next-owner") == sum(r.origin == "owner" for r in rows) == 5
        assert count(preview, "next-incoming") == sum(r.origin == "incoming" for r in rows) == 2
        assert count(preview, "next-approved") == sum(r.origin == "twin" for r in rows) == 1
        assert count(preview, "next-excluded") == 1
        # 30001: [before], [在的 刚下班 + the approved reply] and [明天见]; 30002: [好]
        assert count(preview, "next-owner-turns") == owner_turns(rows) == 4
        assert f'id="approved-{ids["approved"]}"' in preview and "&lt;b&gt;好呀&lt;/b&gt;" in preview
        assert f'id="excluded-{ids["excluded"]}"' in preview and "command" in preview
        assert "没批准" not in preview and "发送失败" not in preview
        assert "will NOT be trained on" not in preview
        assert "20 <small>samples" in preview or "20 个样本" in preview


async def test_approving_a_twin_reply_puts_it_in_the_preview(tmp_path):
    async with console_client(tmp_path) as (client, twin):
        rowid = await twin.store.add(
            StoredMessage(
                chat_type="c2c",
                chat="30001",
                sender=OWNER,
                origin="twin",
                text="在的",
                time=T0,
                send_state="sent",
                msg_id="m1",
            )
        )
        await login(client)
        preview = section((await client.get("/learning")).text, "next-retrain")
        assert count(preview, "next-approved") == 0 and f'id="approved-{rowid}"' not in preview
        assert await twin.store.approve_sent("m1") == 1
        preview = section((await client.get("/learning")).text, "next-retrain")
        assert count(preview, "next-approved") == 1 and f'id="approved-{rowid}"' in preview


async def test_approved_replies_left_out_of_training_say_so(tmp_path):
    async with console_client(tmp_path, twin_retrain_include_approved=False) as (client, twin):
        await fill(twin.store)
        await login(client)
        preview = section((await client.get("/learning")).text, "next-retrain")
        rows = read_messages_since(twin.config.twin_db, 0, include_approved_twin=False)
        assert not any(r.origin == "twin" for r in rows)
        assert count(preview, "next-approved") == 1  # still listed, for the operator to see
        assert 'id="approved-off"' in preview and "will NOT be trained on" in preview
        assert count(preview, "next-owner") == 5


async def test_the_preview_starts_after_the_serving_versions_window(tmp_path):
    reg = registry_of_versions(tmp_path, 16)
    manifest = reg / "v0001" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["data_window"] = {"since": 0, "until": T0 + 500}
    manifest.write_text(json.dumps(data))
    async with console_client(tmp_path, twin_model=str(reg)) as (client, twin):
        await fill(twin.store)
        await login(client)
        html = (await client.get("/learning")).text
        assert "needs a model registry" not in html
        rows = read_messages_since(twin.config.twin_db, T0 + 501, include_approved_twin=True)
        assert count(html, "next-owner") == sum(r.origin == "owner" for r in rows) == 1
        assert count(html, "next-approved") == 0 and count(html, "next-excluded") == 0


async def test_a_running_cycle_shows_its_stage_and_a_live_loss_curve(tmp_path):
    reg = registry_of_versions(tmp_path, 16)
    write_status(
        reg,
        {
            "state": "running",
            "stage": "train",
            "progress": 0.25,
            "step": 30,
            "steps": 120,
            "loss": 1.9,
            "losses": [[10, 2.5], [20, 2.1], [30, 1.9], ["x", None]],
            "started": "2026-01-01T04:00:00+00:00",
        },
    )
    async with console_client(tmp_path, twin_model=str(reg)) as (client, _twin):
        await login(client)
        with open(reg / LOCK_FILE, "a+") as lock:  # what a cycle in another process holds
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            html = (await client.get("/learning")).text
            fcntl.flock(lock, fcntl.LOCK_UN)
        cycle = section(html, "cycle")
        assert '<meta http-equiv="refresh" content="3">' in html
        assert re.search(r'id="cycle-state">.*running', cycle)
        assert 'id="cycle-stage">train<' in cycle and "25%" in cycle and "30/120" in cycle
        assert re.search(r'<img id="loss-curve" class="plot" src="data:image/svg\+xml;base64,', cycle)
        # A stage that reports no progress (export) shows none, not a stuck 0%.
        write_status(reg, {**read_status(reg), "stage": "export", "progress": 0.0})
        with open(reg / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            cycle = section((await client.get("/learning")).text, "cycle")
            fcntl.flock(lock, fcntl.LOCK_UN)
        assert 'id="cycle-stage">export<' in cycle and 'id="cycle-progress">— · ' in cycle
        # The lock released: the cycle died unrecorded, no refresh, shown among past cycles.
        html = (await client.get("/learning")).text
        assert '<meta http-equiv="refresh"' not in html
        assert 'id="cycle-state">interrupted<' in html
        assert '<tr class="cycle cycle-interrupted">' in html


async def test_past_cycles_are_listed_from_the_cycle_log(tmp_path):
    reg = registry_of_versions(tmp_path, 16, 16)
    append_cycle(
        reg,
        {
            "state": "rejected",
            "started": "2026-01-01T04:00:00+00:00",
            "finished": "2026-01-01T05:00:00+00:00",
            "new_samples": 40,
            "reason": "perplexity worse <beyond> tolerance",
            "eval": {
                "candidate": {"perplexity": 12.5, "style_distance": 0.2},
                "serving": {"perplexity": 10.0, "style_distance": 0.1},
            },
            "loss": 1.234,
        },
    )
    append_cycle(
        reg,
        {
            "state": "promoted",
            "version": "v0002",
            "started": "2026-01-02T04:00:00+00:00",
            "new_samples": 55,
            "eval": {
                "candidate": {"perplexity": 9.0, "style_distance": 0.1},
                "serving": {"perplexity": 10.0, "style_distance": 0.1},
            },
        },
    )
    (reg / "retrain-cycles.jsonl").open("a").write("garbage\n")
    async with console_client(tmp_path, twin_model=str(reg)) as (client, _twin):
        await login(client)
        html = (await client.get("/learning")).text
        table = re.search(r'<table id="cycles">(.*?)</table>', html, re.S).group(1)
        rows = re.findall(r'<tr class="cycle cycle-(\w+)">', table)
        assert rows == ["promoted", "rejected"]  # newest first, the garbage line skipped
        assert "v0002" in table and "12.500 / 10.000" in table and "0.200 / 0.100" in table
        assert "1.234" in table and "perplexity worse &lt;beyond&gt; tolerance" in table
        assert '<img id="gate-trend" class="plot"' in html
        assert '<meta http-equiv="refresh"' not in html


async def test_retrain_now_without_a_registry_flashes_the_verbs_refusal(tmp_path):
    async with console_client(tmp_path) as (client, twin):
        await login(client)
        page = (await client.get("/learning")).text
        assert '<form method="post" action="/twin/console/retrain"' in section(page, "schedule")
        response = await post(client, "/retrain", back="/twin/console/learning")
        assert response.status_code == 303 and response.headers["location"] == "/twin/console/learning"
        html = (await client.get("/learning")).text
        assert "retrain needs TWIN_MODEL to be a model registry" in html
        assert twin.retrain_task is None

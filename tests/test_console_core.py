"""The console's own pages (Overview, Settings) over HTTP: what they show, that their buttons run
the chat's admin verbs, and that no secret reaches a page."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.console_helpers import PASSWORD, console_client, login, post

pytestmark = pytest.mark.asyncio


async def test_overview_shows_the_twin_and_its_buttons_run_the_admin_verbs(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, twin):
        await login(client)
        page = await client.get("/")
        assert page.status_code == 200
        assert 'id="serving-version">v-test<' in page.text
        assert "回复中 answering" in page.text and "已连接 connected" in page.text

        answer = await post(client, "/pause", back="/twin/console/")
        assert answer.status_code == 303 and answer.headers["location"] == "/twin/console/"
        assert twin.paused and "paused: yes" in await twin.status_text()
        page = await client.get("/")
        assert "已暂停 paused" in page.text and '<p class="flash" role="status">paused</p>' in page.text
        assert '<p class="flash"' not in (await client.get("/")).text  # shown once

        await post(client, "/resume")
        assert not twin.paused

        await post(client, "/probability", probability="0.25")
        assert twin.probability == 0.25
        await post(client, "/probability", probability="7")
        assert twin.probability == 0.25
        assert "probability must be between 0 and 1" in (await client.get("/")).text


async def test_an_action_goes_back_only_to_a_console_page(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, _):
        await login(client)
        for target in ("https://evil.example/", "//evil.example/x", "/elsewhere", "/twin/console/\\x"):
            answer = await post(client, "/pause", back=target)
            assert answer.headers["location"] == "/twin/console/"


async def test_settings_show_where_each_value_came_from_and_mask_every_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWIN_MAX_TOKENS", "77")
    secret_key, api_key = "store-key-very-secret", "sk-live-abcdefgh"
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("TWIN_TEMPERATURE=0.5\n", encoding="utf-8")
    async with console_client(
        tmp_path,
        twin_max_tokens=77,
        twin_temperature=0.5,
        twin_db_key=secret_key,
        twin_openai_api_key=api_key,
        twin_console_password=PASSWORD,
    ) as (client, _):
        await login(client)
        page = (await client.get("/settings")).text
        for secret in (secret_key, api_key, PASSWORD):
            assert secret not in page
        assert page.count("•••••• (set / 已设置)") >= 3
        row = page[page.index("TWIN_MAX_TOKENS") :]
        assert row.index("77") < row.index("environment") < row.index("</tr>")
        row = page[page.index("TWIN_TEMPERATURE") :]
        assert row.index("0.5") < row.index(".env") < row.index("</tr>")
        row = page[page.index("TWIN_TOP_P") :]
        assert row.index("default") < row.index("</tr>")


async def test_the_console_names_no_account_it_does_not_serve(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, _):
        await login(client)
        assert (await client.get("/", params={"account": "99999"})).status_code == 404


async def test_the_overview_buttons_post_to_the_console(tmp_path: Path) -> None:
    async with console_client(tmp_path) as (client, _):
        await login(client)
        page = (await client.get("/")).text
        assert 'action="/twin/console/pause"' in page and 'action="/twin/console/probability"' in page


async def test_settings_hide_the_credentials_in_a_server_url() -> None:
    from bot.console.pages.settings import shown

    assert shown("twin_openai_base_url", "http://user:hunter22@gpu:8000/v1") == "http://***@gpu:8000/v1"
    listed = shown("twin_openai_base_url", ["https://a:b@x/v1", "http://y/v1"])
    assert "a:b" not in listed and "https://***@x/v1" in listed and "http://y/v1" in listed
    assert shown("twin_persona", "mail me: me@example.com") == "mail me: me@example.com"

"""The operator console in a real browser: headless Chromium against a running `bot.py`.

Every page must render without a browser console error (the CSP forbids inline scripts and
styles, so a violation shows up here), and each is saved as a screenshot (`make
console-screenshots` refreshes docs/console/). Then what an operator does: approve a twin reply
and find it among what the next retrain learns, start a retrain and watch its stage move, promote
and roll back a version and see `/twin status` follow. Selenium blocks, so it runs in a thread:
the QQ client on this loop must keep answering the bot meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deploy.onebot_client import BotProcess, OneBotClient
from deploy.retrain import SETTLE_SECONDS
from tests.e2e import test_retrain_cycle as retrain_cycle
from tests.e2e.browser import PHONE, chromium, console_errors, screenshot
from tests.e2e.conftest import OWNER, bot_env, running_bot, twin_status, wait_until
from tests.fake_openai import FakeOpenAI
from tests.registry_helpers import registry_of_versions

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

world = retrain_cycle.world  # its fixture: the real small model, trained and registered as v0001
T = TypeVar("T")
PASSWORD = "browser-console-password"
FRIEND = 20001
CONSOLE = "/twin/console"


def console_settings(**extra: str) -> dict[str, str]:
    return bot_env(
        TWIN_CONSOLE="true",
        TWIN_CONSOLE_PASSWORD=PASSWORD,
        TWIN_RATE_PER_CHAT="100",
        TWIN_RATE_TOTAL="1000",
        TWIN_MODEL_POLL="0.2",
        **extra,
    )


@pytest.fixture(scope="module")
def bot(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    """A bot answering through the fake OpenAI server, one LoRA per registry version (v0002 serves)."""
    home = tmp_path_factory.mktemp("console-bot")
    registry = registry_of_versions(home, 16, 16)
    settings = console_settings(
        TWIN_BACKEND="openai",
        TWIN_OPENAI_BASE_URL=fake.base_url,
        TWIN_OPENAI_RETRIES="0",
        TWIN_OPENAI_TIMEOUT="10",
        TWIN_OPENAI_LORA="true",
        TWIN_VLLM_RUNTIME_LORA="true",
        TWIN_MODEL=str(registry),
        TWIN_DB=str(home / "data" / "bot.db"),
    )
    yield from running_bot(settings, home)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module (skips without Debian's chromium and chromium-driver)."""
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as browser:
        yield browser


async def in_browser(step: Callable[..., T], *args: object) -> T:
    """A blocking Selenium step, off the event loop (an action may wait on the QQ client)."""
    return await asyncio.to_thread(step, *args)


class Console:
    """The console of one bot as the browser sees it; every page load is checked for console errors."""

    def __init__(self, driver: Any, bot: BotProcess) -> None:
        self.driver = driver
        self.base = f"http://{bot.settings['HOST']}:{bot.settings['PORT']}{CONSOLE}"

    def open(self, path: str) -> str:
        """Go to `path` (below /twin/console); returns the page's heading."""
        self.driver.get(self.base + path)
        return self.checked()

    def checked(self, allowed: str | None = None) -> str:
        """The page's heading, once the browser logged no error (other than one mentioning `allowed`)."""
        errors = [e for e in console_errors(self.driver) if allowed is None or allowed not in e]
        assert not errors, f"browser console errors on {self.driver.current_url}: {errors}"
        return self.find("h1").text

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def submit(self, form_css: str, allowed: str | None = None) -> str:
        """Click the submit button of the form at `form_css`, wait for the next page; its heading."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.wait import WebDriverWait

        page = self.find("html")
        self.find(f"{form_css} button[type=submit], {form_css} button:not([type])").click()
        WebDriverWait(self.driver, 60).until(expected_conditions.staleness_of(page))
        WebDriverWait(self.driver, 60).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )
        return self.checked(allowed)

    def login(self, password: str = PASSWORD) -> str:
        self.driver.get(self.base + "/login")
        if not self.driver.current_url.endswith("/login"):
            return self.checked()  # still logged in
        self.checked()
        self.find("#password").send_keys(password)
        return self.submit(f"form[action='{CONSOLE}/login']", allowed="401")


@pytest.fixture(scope="module")
def console(driver: Any, bot: BotProcess) -> Console:
    return Console(driver, bot)


async def friend_talks(qq: OneBotClient, friend: int, text: str) -> None:
    before = len(qq.replies(user_id=friend))
    await qq.send_private(friend, text)
    await qq.wait_reply(user_id=friend, after=before, timeout=60)


async def serving(qq: OneBotClient, version: str, timeout: float = 30) -> str:
    """`/twin status` once it names `version` as served (polled), or the last answer."""
    seen: list[str] = []

    async def names_it() -> bool:
        seen.append(await twin_status(qq))
        return seen[-1].startswith(f"model: {version} ")

    await wait_until(names_it, timeout, interval=0.5)
    return seen[-1]


# ---------------------------------------------------------------- logging in, every page


async def test_login_refuses_a_wrong_password_then_lets_the_operator_in(
    console: Console, qq: OneBotClient
) -> None:
    def wrong_then_right() -> None:
        console.driver.get(console.base + "/")
        assert console.driver.current_url.endswith("/login"), "a page without a login must go to /login"
        assert "Log in" in console.checked()
        screenshot(console.driver, "login")
        console.find("#password").send_keys("not the password at all")
        # the refusal is a 401, which the browser logs as a failed load: that one is expected
        heading = console.submit(f"form[action='{CONSOLE}/login']", allowed="401")
        assert "Log in" in heading
        assert "wrong password" in console.find(".problem").text
        assert console.all("#password"), "still on the login form"
        assert "Overview" in console.login()
        assert console.find("#serving-version").text
        assert console.find("#paused").text

    await in_browser(wrong_then_right)


PAGES = [
    ("overview", "/", "Overview"),
    ("conversations", "/conversations", "Conversations"),
    ("learning", "/learning", "Learning"),
    ("versions", "/versions", "Versions"),
    ("settings", "/settings", "Settings"),
]


async def test_every_page_renders_without_console_errors_and_is_photographed(
    console: Console, qq: OneBotClient
) -> None:
    await friend_talks(qq, FRIEND, "在吗")  # a chat for the timeline

    def every_page() -> None:
        console.login()
        for name, path, heading in PAGES:
            assert heading in console.open(path), f"{path} lacks its heading"
            screenshot(console.driver, name)
        assert console.open(f"/conversations?chat=c2c:{FRIEND}"), "the timeline has no heading"
        screenshot(console.driver, "timeline")
        assert "Overview" in console.open("/")
        screenshot(console.driver, "overview-phone", PHONE)
        assert not console_errors(console.driver)

    await in_browser(every_page)


# ---------------------------------------------------------------- what an operator does


async def test_pause_and_resume_from_the_overview(console: Console, qq: OneBotClient) -> None:
    def pause() -> str:
        console.login()
        console.submit("form[action$='/pause']")
        return console.find("#paused").text

    assert "paused" in await in_browser(pause)
    assert "paused: yes" in await twin_status(qq)

    def resume() -> str:
        console.submit("form[action$='/resume']")
        return console.find("#paused").text

    assert "answering" in await in_browser(resume)
    assert "paused: no" in await twin_status(qq)


async def test_an_approved_twin_reply_is_in_what_the_next_retrain_would_learn(
    console: Console, qq: OneBotClient
) -> None:
    await friend_talks(qq, FRIEND + 1, "周末去哪")

    def approve() -> None:
        console.login()
        chats = console.open("/conversations")
        assert "Conversations" in chats
        chat = f"c2c:{FRIEND + 1}"
        link = f"table#chats a[href*='chat={chat}'], table#chats a[href*='chat={chat.replace(':', '%3A')}']"
        console.find(link).click()  # the query may be written with : or its URL escape
        console.checked()
        replies = console.all("ol#timeline li.who-twin")
        assert replies, "the twin's reply is not in the timeline"
        rowid = replies[-1].get_attribute("id").removeprefix("msg-")
        console.submit(f"li#msg-{rowid} form[action$='/approve']")
        console.open("/learning")
        assert console.all(f"#next-retrain li#approved-{rowid}"), "the approved reply is not listed"

    await in_browser(approve)


async def test_promote_and_rollback_change_what_the_bot_serves(console: Console, qq: OneBotClient) -> None:
    assert (await twin_status(qq)).startswith("model: v0002 ")

    def promote() -> None:
        console.login()
        assert "Versions" in console.open("/versions")
        console.submit("table#versions tr#version-v0001 form[action$='/promote']")

    await in_browser(promote)
    assert (await serving(qq, "v0001")).startswith("model: v0001 ")

    def roll_back() -> None:
        console.open("/versions")
        console.submit("form[action$='/rollback']")

    await in_browser(roll_back)
    assert (await serving(qq, "v0002")).startswith("model: v0002 ")


# ---------------------------------------------------------------- a real retrain cycle (slowest, last)


@pytest.fixture(scope="module")
def retrain_bot(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    """test_retrain_cycle.py's world: a tiny real model served by llama.cpp, retrained for real."""
    home = tmp_path_factory.mktemp("console-retrain-bot")
    settings = console_settings(
        TWIN_N_THREADS="1",
        TWIN_MAX_TOKENS="8",
        TWIN_SEED="7",
        TWIN_BLOCK_LINKS="false",
        TWIN_TAKEOVER_MINUTES="0",  # the owner answers by hand, the twin still answers next round
        **retrain_cycle.retrain_env(world, home / "data" / "bot.db"),
    )
    yield from running_bot(settings, home)


@pytest.mark.slow
async def test_a_retrain_started_in_the_console_moves_through_its_stages(
    driver: Any, retrain_bot: BotProcess
) -> None:
    async with retrain_bot.client(self_id=OWNER) as qq:
        for round_ in range(2):  # the owner's own answers: what the cycle learns
            for friend in (21001, 21002, 21003):
                await friend_talks(qq, friend, f"第{round_}轮 在吗")
                await qq.send_message_sent(f"在的 我自己回的{round_}", target_id=friend)
        await asyncio.sleep(SETTLE_SECONDS + 1)  # the newest messages wait for the next cycle
        console = Console(driver, retrain_bot)

        def start() -> int:
            console.login()  # the other bot's session cookie is for the same host: log in again
            assert "Learning" in console.open("/learning")
            cycles = len(console.all("table#cycles tbody tr"))
            console.submit("form[action$='/retrain']")
            return cycles

        cycles_before = await in_browser(start)

        stages: list[str] = []
        seen = {"finished": False, "state": ""}

        def watch() -> bool:
            console.open("/learning")
            stage = console.all("#cycle-stage")
            if stage and stage[0].text.strip() and stage[0].text.strip() not in stages:
                stages.append(stage[0].text.strip())
            state = console.all("#cycle-state")
            seen["state"] = state[0].text if state else ""
            seen["finished"] = len(console.all("table#cycles tbody tr")) > cycles_before
            return len(stages) >= 2 or seen["finished"]

        deadline = time.monotonic() + 400  # a busy machine starts torch slowly
        while not await in_browser(watch) and time.monotonic() < deadline:
            await asyncio.sleep(1.0)  # the QQ client keeps answering the bot meanwhile
        assert len(stages) >= 2 or seen["finished"], (
            f"the cycle's stage never moved: stages seen {stages}, state {seen['state']!r}"
        )

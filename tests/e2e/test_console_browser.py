"""The operator console in a real browser: headless Chromium against a running `bot.py`.

Every page must render without a browser console error (the CSP forbids inline scripts and
styles, so a violation shows up here), and each is saved as a screenshot (`make
console-screenshots` refreshes docs/console/). Then what an operator does: approve a twin reply
and find it among what the next retrain learns, promote and roll back a version and see `/twin
status` follow, start a retrain and follow it to a promoted version whose sample replies show on
Versions, then generate the older version's. Selenium blocks, so it runs in a thread:
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
from tests.e2e.browser import FULL_PAGE, PHONE, chromium, console_errors, screenshot
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


def left(page: Any) -> Callable[[Any], bool]:
    """A wait condition: the browser has left `page` (its old <html> is stale). Mid-navigation
    chromedriver may answer with some other error ("cannot find context…"), which the caller's
    wait ignores and asks again, where `expected_conditions.staleness_of` would fail the test."""
    from selenium.common.exceptions import StaleElementReferenceException

    def gone(_: Any) -> bool:
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        return False

    return gone


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
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.wait import WebDriverWait

        page = self.find("html")
        self.find(f"{form_css} button[type=submit], {form_css} button:not([type])").click()
        WebDriverWait(self.driver, 60, ignored_exceptions=(WebDriverException,)).until(left(page))
        WebDriverWait(self.driver, 60).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )
        return self.checked(allowed)

    def login(self, password: str = PASSWORD) -> str:
        console_errors(self.driver)  # drained: what an earlier test left unread is not this page's
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
        # conversations and timeline are photographed again once they hold more (below); overview,
        # learning and versions by the retrain test, with a real model, cycles and numbers
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
    await friend_talks(qq, FRIEND + 1, "要不要一起去爬山")
    await qq.send_message_sent("好啊 周六早上吧", target_id=FRIEND + 1)  # the owner answers by hand too
    await asyncio.sleep(0.5)  # stored just after it arrives

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
        assert console.all(f"li#msg-{rowid} form[action$='/unapprove']"), "the reply is not approved"
        screenshot(console.driver, "timeline")  # friend, owner and twin, one reply approved
        console.open("/learning")
        assert console.all(f"#next-retrain li#approved-{rowid}"), "the approved reply is not listed"
        console.open("/conversations")
        screenshot(console.driver, "conversations")

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
        # enough steps for the live loss curve to have a few points (polled once a second)
        **retrain_cycle.retrain_env(world, home / "data" / "bot.db", TWIN_RETRAIN_MAX_STEPS="12"),
    )
    yield from running_bot(settings, home)


LATE_STAGES = ("train", "evaluate", "export", "promote")  # a loss was reported by then or soon after
CYCLE_COLUMNS = ("started", "finished", "state", "version", "new", "ppl", "style", "loss", "reason")


def newest_cycle(console: Console) -> dict[str, str]:
    """The first row of Learning's past cycles (newest first) by column; {} without one."""
    from selenium.webdriver.common.by import By

    rows = console.all("table#cycles tbody tr.cycle")
    if not rows:
        return {}
    cells = [td.text.strip() for td in rows[0].find_elements(By.CSS_SELECTOR, "td")]
    return dict(zip(CYCLE_COLUMNS, cells, strict=False))


def sample_replies(console: Console, version: str) -> dict[str, tuple[str, str | None]]:
    """Per probe on the Versions page: the owner's real reply and `version`'s (None while "—", ""
    for a reply that is only blank lines: a tiny random model answers greedily so, and stays silent)."""
    from selenium.webdriver.common.by import By

    replies = {}
    for table in console.all("#samples table[id^='probe-']"):
        probe = table.get_attribute("id").removeprefix("probe-")
        owner = console.find(f"tr#owner-{probe} td").text.strip()
        cell = console.find(f"tr#reply-{probe}-{version} td")
        reply = "" if cell.find_elements(By.CSS_SELECTOR, ".silent") else cell.text.strip()
        replies[probe] = (owner, None if reply == "—" else reply)
    return replies


async def owner_answers(qq: OneBotClient, tag: str) -> None:
    """Three friends write twice and the owner answers each by hand: what the next cycle learns."""
    for round_ in range(2):
        for friend in (21001, 21002, 21003):
            await friend_talks(qq, friend, f"{tag}第{round_}轮 在吗")
            await qq.send_message_sent(f"在的 {tag}我自己回的{round_}", target_id=friend)
    await asyncio.sleep(SETTLE_SECONDS + 1)  # the newest messages wait for the next cycle


async def cycle_from_learning(console: Console, running_shot: str | None = None) -> dict[str, str]:
    """Press Retrain now on Learning and follow the cycle (bounded) until its row is among the past
    cycles and the page no longer says running; with `running_shot`, the page with its live loss
    curve is photographed meanwhile (the last such view is kept). Returns that row."""

    def start() -> int:
        assert "Learning" in console.open("/learning")
        cycles = len(console.all("table#cycles tbody tr.cycle"))
        console.submit("form[action$='/retrain']")
        return cycles

    cycles_before = await in_browser(start)
    stages: list[str] = []
    seen = {"finished": False, "state": "", "curve": False}

    def watch() -> bool:
        console.open("/learning")
        stage = console.all("#cycle-stage")
        now = stage[0].text.strip() if stage else ""
        if now and now not in stages:
            stages.append(now)
        state = console.all("#cycle-state")
        seen["state"] = state[0].text.strip() if state else ""
        if now in LATE_STAGES and console.all("img#loss-curve"):
            if running_shot:  # the stage and the live loss curve, retaken until it is the whole curve
                screenshot(console.driver, running_shot)
            seen["curve"] = True
        logged = len(console.all("table#cycles tbody tr.cycle")) > cycles_before
        # The bot's task reports to the superusers after the cycle is logged: until it ends the
        # page still says running.
        seen["finished"] = logged and "running" not in seen["state"]
        return seen["finished"]

    deadline = time.monotonic() + 480  # a busy machine starts torch slowly; then train, eval, export
    while not await in_browser(watch) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # the QQ client keeps answering the bot meanwhile
    assert seen["finished"], f"the cycle never finished: stages seen {stages}, state {seen['state']!r}"
    assert "train" in stages and len(stages) >= 2, f"the stage never showed training: {stages}"
    assert seen["curve"], f"no live loss curve while the cycle ran (stages seen {stages})"
    return await in_browser(newest_cycle, console)


@pytest.mark.slow
async def test_retrains_started_in_the_console_become_promoted_versions_with_sample_replies(
    driver: Any, retrain_bot: BotProcess
) -> None:
    from selenium.webdriver.common.by import By

    async with retrain_bot.client(self_id=OWNER) as qq:
        console = Console(driver, retrain_bot)
        await in_browser(console.login)  # the other bot's session cookie is for the same host
        await owner_answers(qq, "")
        cycle = await cycle_from_learning(console, running_shot="learning-running")
        assert cycle["state"] == "promoted" and cycle["version"] == "v0002", cycle
        for gate in ("ppl", "style"):  # candidate / serving, both evaluated
            assert "—" not in cycle[gate] and cycle[gate].count("/") == 1, cycle
        await serving(qq, "v0002", timeout=60)

        def numbers_and_replies(version: str) -> dict[str, tuple[str, str | None]]:
            console.open("/versions")
            row = console.find(f"table#versions tr#version-{version}")
            cells = [td.text.strip() for td in row.find_elements(By.CSS_SELECTOR, "td")]
            perplexity, style = cells[6], cells[7]  # after name, created, parent, window, messages, samples
            assert float(perplexity) > 0 and float(style) >= 0, f"{version} lacks its numbers: {cells}"
            assert console.all("img#ppl-plot") and console.all("img#style-plot")
            return sample_replies(console, version)

        # The cycle's sample hook answered the probes (from TWIN_RETRAIN_DATASET's val.jsonl).
        replies = await in_browser(numbers_and_replies, "v0002")
        assert replies, "no probes on the Versions page"
        for probe, (owner, reply) in replies.items():
            assert owner, f"probe {probe} lacks the owner's real reply"
            assert reply is not None, f"the retrained v0002 has no reply to probe {probe}"

        # A second cycle continues from v0002: two points on every plot, a trend on Learning.
        await owner_answers(qq, "又")
        cycle = await cycle_from_learning(console)
        assert cycle["version"] == "v0003" and cycle["state"] in ("promoted", "rejected"), cycle
        await in_browser(screenshot, console.driver, "learning", FULL_PAGE)
        assert await in_browser(console.all, "img#gate-trend"), "no gate trend after two cycles"
        assert (await in_browser(numbers_and_replies, "v0003")).keys() == replies.keys()

        def generate_samples() -> str:
            console.open("/versions")
            assert not any(r for _, r in sample_replies(console, "v0001").values()), "v0001 had samples"
            console.submit("form[action$='/samples']")
            return console.find(".flash").text if console.all(".flash") else ""

        flash = await in_browser(generate_samples)
        assert "generating sample replies" in flash, flash

        def v0001_answered() -> bool:
            console.open("/versions")
            answered = sample_replies(console, "v0001")
            return bool(answered) and all(reply is not None for _, reply in answered.values())

        # `twin models samples` loads each version lacking replies in a child at lower priority.
        deadline = time.monotonic() + 300
        while not await in_browser(v0001_answered) and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
        assert await in_browser(v0001_answered), "v0001's sample replies never appeared"
        await in_browser(screenshot, console.driver, "versions", FULL_PAGE)

        def overview() -> str:
            console.open("/")
            screenshot(console.driver, "overview")  # a real model, the last retrain, disk used
            return console.find("#serving-version").text

        assert "v000" in await in_browser(overview)

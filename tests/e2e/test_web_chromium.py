"""The chat page end to end: Debian's Chromium, driven by Playwright, against real servers.

Playwright's own browser download cannot work offline, so the test launches /usr/bin/chromium
(`apt-get install chromium`); it is skipped only where that binary is absent. A screenshot of each
run is saved under test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import expect, sync_playwright

from ..conftest import ROOT, Server, start_server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("web-fake")
    server = start_server(["--engine", "fake", "--api-key", "sekret"], tmp / "s.db", tmp / "server.log", 120)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("web-smol")
    server = start_server(["--model", str(smollm2_gguf), "--engine", "llamacpp"], tmp / "s.db", tmp / "server.log")
    yield server
    server.stop()


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@dataclass
class Opened:
    """A page, and what it did that it must not: requests to other origins, script errors."""

    page: Any
    outside: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def open_page(browser: Any, url: str) -> Opened:
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    opened = Opened(context.new_page())
    opened.page.on("request", lambda r: None if r.url.startswith(url) else opened.outside.append(r.url))
    opened.page.on("pageerror", lambda e: opened.errors.append(str(e)))
    opened.page.goto(url + "/")
    return opened


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_reply(page: Any, timeout: float = 300_000) -> None:
    """Wait until the reply has streamed in; if the page showed an error instead, fail with it."""
    try:
        page.wait_for_selector("#messages li.assistant:not(.streaming), #notice:not([hidden])", timeout=timeout)
    except Exception:
        screenshot(page, "web-chat-timeout")
        raise
    assert page.is_hidden("#notice"), page.inner_text("#notice")


QUESTION = "What is the capital of France? Describe it in four sentences."


def test_streamed_reply_sessions_and_reset_on_the_real_model(browser: Any, smol: Server) -> None:
    opened = open_page(browser, smol.url)
    page = opened.page
    page.wait_for_selector("#sessions li.active")
    first = page.eval_on_selector("#sessions li.active", "e => e.dataset.id")
    # The reply streams in: the page adds each event's text as it comes, and counts the events in the status
    # line. (Waiting to see a partial reply in the DOM raced: a short reply streamed over localhost can start
    # and end between two of Playwright's animation-frame polls; seen 2 runs in 5 on an AVX2 EPYC.)
    send(page, QUESTION)
    wait_reply(page)
    reply = page.inner_text("#messages li.assistant")
    stored = requests.get(f"{smol.url}/v1/sessions/{first}", timeout=30).json()
    assert stored["messages"][-1]["content"] == reply  # (sampled at the default temperature: any text)
    assert page.inner_text("#status-model") != "…"
    speed = re.match(r"(\d+) tokens, [\d.]+ tokens/s", page.inner_text("#status-speed"))
    assert speed is not None and int(speed.group(1)) > 1, page.inner_text("#status-speed")
    assert page.inner_text("#session-title").startswith("What is the capital")
    screenshot(page, "web-chat-smollm2")

    # A second session, then back to the first: each shows its own messages.
    page.click("#new-session")
    expect(page.locator("#sessions li.active")).not_to_have_attribute("data-id", first)
    expect(page.locator("#messages li")).to_have_count(0)
    send(page, "Say hello.")
    wait_reply(page)
    page.click(f"#sessions li[data-id={first!r}]")
    expect(page.locator("#sessions li.active")).to_have_attribute("data-id", first)
    expect(page.locator("#messages li")).to_have_count(2)
    assert page.inner_text("#messages li.user") == QUESTION

    # Reset clears the view and the server's history.
    page.click("#reset")
    expect(page.locator("#messages li")).to_have_count(0)
    assert requests.get(f"{smol.url}/v1/sessions/{first}", timeout=30).json()["messages"] == []
    assert opened.outside == [] and opened.errors == []


def test_the_session_read_again_while_a_reply_streams_keeps_the_reply(browser: Any, fake_server: Server) -> None:
    """The page re-reads its sessions while a reply is on its way (the key field's change event, which a
    blur after typing the key fires too): the view keeps the message and its reply instead of showing the
    stored session, which has neither yet. Seen once in CI as an empty view and a test timing out."""
    opened = open_page(browser, fake_server.url)
    page = opened.page
    page.wait_for_selector("#notice:not([hidden])")
    page.fill("#api-key", "sekret")
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#sessions li.active")
    held: list[Any] = []
    page.route("**/chat", lambda route: held.append(route))  # /chat waits until the session was read again
    send(page, "three four")
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the page did not send /chat"
    with page.expect_response(lambda r: "/v1/sessions/" in r.url and r.request.method == "GET"):
        page.dispatch_event("#api-key", "change")
    page.wait_for_timeout(300)  # what the re-read renders, it has rendered by now
    expect(page.locator("#messages li.user")).to_have_count(1)
    held[0].continue_()
    wait_reply(page)
    assert page.inner_text("#messages li.assistant") == "You said: three four"
    page.click("#delete")  # the next test starts with this key's sessions as they were
    expect(page.locator("#messages li")).to_have_count(0)
    assert opened.outside == [] and opened.errors == []


def test_the_key_is_asked_for_and_kept_in_the_browser(browser: Any, fake_server: Server) -> None:
    opened = open_page(browser, fake_server.url)
    page = opened.page
    page.wait_for_selector("#notice:not([hidden])")
    assert "API key" in page.inner_text("#notice")
    page.fill("#api-key", "sekret")
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#sessions li.active")
    send(page, "one two")
    wait_reply(page)
    assert page.inner_text("#messages li.assistant") == "You said: one two"
    page.reload()  # the key survives a reload
    page.wait_for_selector("#messages li.assistant")
    storage = page.context.storage_state()["origins"][0]["localStorage"]
    assert {"name": "pureapi.apiKey", "value": "sekret"} in storage
    page.click("#delete")
    expect(page.locator("#messages li")).to_have_count(0)
    assert opened.outside == [] and opened.errors == []
    screenshot(page, "web-chat-key")

"""Helpers for the web page's browser tests: Debian's Chromium through Playwright, a real `ember serve`.

The tests skip (with the reason) when Chromium, Playwright, the page's files or
the sessions API are missing; everything else is a real failure. Screenshots go
to .ember-test-data/screenshots/ (gitignored) for people to look at.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
PAGE_INDEX = REPO_ROOT / "ember" / "server" / "static" / "index.html"
SCREENSHOTS = REPO_ROOT / ".ember-test-data" / "screenshots"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 90_000  # a bound on waiting for a reply on a busy 2-core machine, never a speed check
# Short, varied replies keep the tests quick; each test that needs longer ones says so.
QUICK_SETTINGS = {"max_tokens": 24, "temperature": 0.8, "seed": 7}


def require_browser() -> None:
    """Skip (not fail) where the browser or the page's files are not installed."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's /usr/bin/chromium is not installed (make browser installs it)")
    pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    if not PAGE_INDEX.is_file():
        pytest.skip("the page's built files are missing from ember/server/static/")


def require_sessions_api(base_url: str) -> None:
    try:
        status = httpx.get(base_url + "/v1/sessions", timeout=10).status_code
    except httpx.HTTPError as error:
        pytest.skip(f"the server did not answer /v1/sessions: {error}")
    if status == 404:
        pytest.skip("the sessions API (ember/server/sessions_routes.py) is not part of this server yet")


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium; Playwright gives each launch a fresh temporary profile and removes it after."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class PageProblems:
    """What must never happen on the page: script errors, alert() calls, outside requests."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.outside_requests: list[str] = []

    def watch(self, page: Any) -> None:
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("dialog", self._dialog)
        page.on("request", self._request)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _request(self, request: Any) -> None:
        url = request.url
        if not (url.startswith(self.base_url) or url.startswith("data:") or url.startswith("ws://127.0.0.1")):
            self.outside_requests.append(url)

    def check(self) -> None:
        assert not self.errors, f"script errors on the page: {self.errors}"
        assert not self.dialogs, f"the page opened dialogs (script ran?): {self.dialogs}"
        assert not self.outside_requests, f"the page fetched from outside: {self.outside_requests}"


def open_page(
    browser: Any,
    base_url: str,
    *,
    color_scheme: str = "light",
    viewport: dict[str, int] | None = None,
    new_chat_settings: dict[str, Any] | None = None,
    context: Any = None,
    permissions: list[str] | None = None,
) -> tuple[Any, PageProblems]:
    """A page on the server in a new browser context (fresh storage) unless `context` is given."""
    if context is None:
        context = browser.new_context(
            viewport=viewport or DESKTOP, color_scheme=color_scheme, permissions=permissions or []
        )
        settings = QUICK_SETTINGS if new_chat_settings is None else new_chat_settings
        defaults = json.dumps({"system_prompt": None, "settings": settings})
        context.add_init_script(f"localStorage.setItem('ember.newChatSettings', {json.dumps(defaults)});")
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems = PageProblems(base_url)
    problems.watch(page)
    page.goto(base_url + "/")
    page.wait_for_selector("#session-list .session, #session-list .session-empty:not(.session-loading)")
    return page, problems


def send(page: Any, text: str) -> None:
    """Types `text` and presses Enter; returns once the page has taken it (drawn it or shown an error)."""
    before = page.locator(".message.user").count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function(
        """(before) => document.querySelector('.message.streaming, [data-message-id^="pending"], .error-card')
              || document.querySelectorAll('.message.user').length > before""",
        arg=before,
    )


def wait_until_idle(page: Any) -> None:
    """Until no reply is being written and the drawn conversation is the server's."""
    page.wait_for_function(
        """() => document.querySelector('#messages').getAttribute('aria-busy') === 'false'
              && !document.querySelector('.message.streaming')
              && !document.querySelector('[data-message-id^="pending"]')"""
    )


def assistant_texts(page: Any) -> list[str]:
    texts = page.locator(".message.assistant .message-body").all_inner_texts()
    return [" ".join(text.split()) for text in texts]


def message_texts(page: Any) -> list[str]:
    """Every drawn message's text, whitespace collapsed (layout decides trailing line breaks)."""
    return [" ".join(text.split()) for text in page.locator(".message .message-body").all_inner_texts()]


def current_session_id(page: Any) -> str:
    session_id = page.evaluate("localStorage.getItem('ember.lastSession')")
    assert session_id, "the page did not remember the open chat"
    return session_id


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path

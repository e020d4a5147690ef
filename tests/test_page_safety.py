"""The web page when things go wrong or get hostile, in a real browser against a real `ember serve`.

Script in messages, a message longer than the context, a dropped connection,
an API key, keyboard-only use; and the screenshots of the main states
(desktop and phone width, light and dark) for people to look at.
"""

from __future__ import annotations

import httpx
import pytest
from page_support import (
    DESKTOP,
    PHONE,
    assistant_texts,
    chromium,
    current_session_id,
    open_page,
    require_browser,
    require_sessions_api,
    screenshot,
    send,
    wait_until_idle,
)

pytestmark = pytest.mark.slow  # a model answers several replies and two servers start
server_harness = pytest.importorskip("server_harness", reason="tests/server_harness.py is not there yet")
from ember.sessions import SessionStore  # noqa: E402  (after the skip: the store is only needed then)

CONTEXT_LENGTH = 2048
# What a user (or a model) might write to break out of the text: each is shown as text and runs nothing.
HOSTILE = (
    "<script>window.pwned = 'script'</script> "
    "<img src=x onerror=\"window.pwned = 'img'; alert('img')\"> "
    "[click me](javascript:alert('link')) "
    "<a href=\"javascript:window.pwned='anchor'\">raw anchor</a>"
)
HOSTILE_REPLY = (
    "Here you go:\n\n"
    "<script>alert('reply')</script>\n\n"
    "<img src=x onerror=alert('reply-img')>\n\n"
    "- a [javascript link](javascript:alert('reply-link'))\n"
    "- a [vbscript link](vbscript:msgbox) and a [data link](data:text/html,<script>alert(1)</script>)\n"
    "- an ![image](http://198.51.100.7/tracker.png) that must not load\n"
    "- a safe [example](https://example.com/docs) link\n\n"
    '<iframe src="javascript:alert(1)"></iframe> <svg onload=alert(1)></svg>'
)
SHOWCASE_REPLY = """Reversing a list in Python takes one line. The **slice** form makes a copy:

```python
def reversed_copy(items: list) -> list:
    \"\"\"A new list, last item first.\"\"\"
    return items[::-1]

print(reversed_copy([1, 2, 3]))  # [3, 2, 1]
```

Three ways compared:

| way | copies? | note |
|---|---|---|
| `items[::-1]` | yes | shortest |
| `items.reverse()` | no | changes the list in place |
| `list(reversed(items))` | yes | reads well |

1. Use the slice when you need a *new* list.
2. Use `reverse()` to save memory.
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("page-safety-data")


@pytest.fixture(scope="module")
def server(data_dir):
    require_browser()
    args = ["--data-dir", str(data_dir), "--ctx", str(CONTEXT_LENGTH)]
    with server_harness.running_server(args=args) as running:
        require_sessions_api(running.base_url)
        yield running


@pytest.fixture(scope="module")
def browser(server):
    with chromium() as browser:
        yield browser


def stored_conversation(data_dir, session_id: str, exchanges: list[tuple[str, str]]) -> None:
    """Adds finished exchanges to a session in the server's own store (as `ember chat` would)."""
    with SessionStore(data_dir / "sessions.sqlite3") as store:
        for question, answer in exchanges:
            store.append_message(session_id, "user", question)
            store.append_message(session_id, "assistant", answer)


def test_script_in_messages_and_replies_is_shown_as_text_and_runs_nothing(server, browser, data_dir):
    page, problems = open_page(browser, server.base_url)
    send(page, HOSTILE)
    wait_until_idle(page)
    user_text = page.locator(".message.user .message-body").first.inner_text()
    assert user_text == HOSTILE

    # A reply holding the same tricks (written to the store, since no model reliably echoes them).
    session_id = current_session_id(page)
    stored_conversation(data_dir, session_id, [("Show me some tricks.", HOSTILE_REPLY)])
    page.reload()
    page.wait_for_selector(".message.assistant >> nth=1")
    reply = page.locator(".message.assistant").last.locator(".message-body")
    text = reply.inner_text()
    assert "<script>alert('reply')</script>" in text
    assert "<img src=x onerror=alert('reply-img')>" in text
    assert "<iframe" in text and "<svg onload=alert(1)></svg>" in text

    messages = page.locator("#messages")
    assert messages.locator("script, img, iframe, object, embed, form").count() == 0
    hrefs = messages.locator("a[href]").evaluate_all("links => links.map(link => link.getAttribute('href'))")
    assert hrefs == ["http://198.51.100.7/tracker.png", "https://example.com/docs"]
    for link in messages.locator("a[href]").all():
        assert link.get_attribute("rel") == "noopener noreferrer"
        assert link.get_attribute("target") == "_blank"
    assert messages.locator("[onerror], [onload], [onclick]").count() == 0
    assert page.evaluate("window.pwned") is None
    problems.check()  # no alert() ran, no script error, and nothing was fetched from outside
    page.context.close()


def test_a_message_longer_than_the_context_shows_a_readable_error_with_retry(server, browser):
    page, problems = open_page(browser, server.base_url)
    too_long = "word " * (CONTEXT_LENGTH + 200)
    send(page, too_long.strip())
    card = page.get_by_role("alert").filter(has_text="context")
    card.wait_for()
    assert "Too long for the model’s context" in card.inner_text()
    assert "tokens" in card.inner_text()  # the server's counts, in words
    screenshot(page, "desktop-light-context-error")
    # Nothing was stored, so the text is back in the box rather than lost.
    assert page.input_value("#prompt") == too_long.strip()
    session_id = current_session_id(page)
    stored = httpx.get(f"{server.base_url}/v1/sessions/{session_id}", timeout=30).json()
    assert stored["messages"] == []

    card.get_by_role("button", name="Retry", exact=True).click()
    page.get_by_role("alert").filter(has_text="context").wait_for()  # the same clear answer again
    page.get_by_role("button", name="Dismiss", exact=True).click()
    assert page.get_by_role("alert").filter(has_text="context").count() == 0
    problems.check()
    page.context.close()


def test_keyboard_only_tab_reaches_send_and_enter_sends(server, browser):
    page, problems = open_page(browser, server.base_url)
    # The box has the focus on arrival; Shift+Enter is a new line, not a send.
    page.keyboard.type("First line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("Second line")
    assert page.input_value("#prompt") == "First line\nSecond line"
    assert page.locator(".message.user").count() == 0

    def focused() -> str:
        return page.evaluate(
            "() => { const e = document.activeElement;"
            " return (e.getAttribute('aria-label') || e.innerText || e.id || e.tagName).trim(); }"
        )

    def tab_until(name: str, key: str) -> list[str]:
        seen = []
        for _ in range(80):
            page.keyboard.press(key)
            seen.append(focused())
            if seen[-1] == name:
                return seen
        raise AssertionError(f"{key} never reached {name}: {seen}")

    assert tab_until("Send", "Tab") == ["Send"]  # straight from the message box
    backwards = tab_until("New chat", "Shift+Tab")  # every control on the way is reachable
    assert "Settings" in backwards
    tab_until("Send", "Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "the focused Send button shows no focus ring"
    screenshot(page, "desktop-light-keyboard-focus")
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.user")
    wait_until_idle(page)
    assert page.locator(".message.user .message-body").inner_text() == "First line\nSecond line"
    assert assistant_texts(page)[-1]
    problems.check()
    page.context.close()


def test_a_lost_connection_shows_retry_and_the_page_recovers(server, browser):
    page, problems = open_page(browser, server.base_url)
    page.route("**/v1/sessions/*/messages", lambda route: route.abort("connectionrefused"))
    send(page, "Are you still there?")
    card = page.get_by_role("alert").filter(has_text="connection")
    card.wait_for()
    page.wait_for_selector("#banner", state="hidden")  # /health answers, so it reconnects by itself
    page.unroute("**/v1/sessions/*/messages")
    card.get_by_role("button", name="Retry", exact=True).click()
    page.wait_for_selector(".message.assistant")
    wait_until_idle(page)
    assert page.locator(".error-card").count() == 0
    assert page.locator(".message.user .message-body").all_inner_texts() == ["Are you still there?"]
    assert assistant_texts(page)[-1]
    problems.check()
    page.context.close()


def test_the_page_asks_for_the_api_key_once_and_keeps_it(browser, tmp_path):
    key = "page-test-key"
    args = ["--data-dir", str(tmp_path), "--api-key", key]
    with server_harness.running_server(model=server_harness.STORY_MODEL, args=args) as keyed:
        with httpx.Client(base_url=keyed.base_url, headers={"Authorization": f"Bearer {key}"}) as client:
            client.post("/v1/sessions", json={"title": "Behind the key"}).raise_for_status()
        context = browser.new_context(viewport=DESKTOP)
        page = context.new_page()
        page.goto(keyed.base_url + "/")
        dialog = page.get_by_role("dialog", name="API key needed")
        dialog.get_by_label("API key", exact=True).fill("wrong-key")
        dialog.get_by_role("button", name="Save key").click()
        dialog = page.get_by_role("dialog", name="API key needed")
        dialog.get_by_text("did not accept").wait_for()
        screenshot(page, "desktop-light-api-key")
        dialog.get_by_label("API key", exact=True).fill(key)
        dialog.get_by_role("button", name="Save key").click()
        page.wait_for_selector("#session-list .session:has-text('Behind the key')")
        assert page.evaluate("localStorage.getItem('ember.apiKey')") == key

        # A reload (or another tab) asks nothing: the browser kept the key.
        again = context.new_page()
        again.goto(keyed.base_url + "/")
        again.wait_for_selector("#session-list .session:has-text('Behind the key')")
        assert again.get_by_role("dialog").count() == 0
        context.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_screenshots_of_the_main_states(server, browser, data_dir, scheme):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for title in ("Trip ideas for the coast", "Bread without yeast"):
            client.post("/v1/sessions", json={"title": title}).raise_for_status()
        body = {"title": f"Reversing a list ({scheme})", "settings": {"max_tokens": 40, "seed": 11}}
        showcase = client.post("/v1/sessions", json=body).json()
    stored_conversation(data_dir, showcase["id"], [("How do I reverse a list in Python?", SHOWCASE_REPLY)])

    clipboard = ["clipboard-read", "clipboard-write"]
    page, problems = open_page(browser, server.base_url, color_scheme=scheme, permissions=clipboard)
    screenshot(page, f"desktop-{scheme}-empty")
    page.locator("#session-list .session-open", has_text=f"Reversing a list ({scheme})").click()
    page.wait_for_selector(".message.assistant .code-block")
    page.locator(".code-block").get_by_role("button", name="Copy", exact=True).click()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("def reversed_copy(items: list) -> list:") and "```" not in copied
    send(page, "And in JavaScript, briefly?")
    wait_until_idle(page)
    screenshot(page, f"desktop-{scheme}-conversation")

    page.set_viewport_size(PHONE)
    page.wait_for_timeout(300)  # the layout settles (no assertion waits on it)
    wide = page.evaluate("document.documentElement.scrollWidth > document.documentElement.clientWidth")
    assert not wide, "something sticks out sideways at phone width"
    assert page.locator("#sidebar").is_hidden()
    screenshot(page, f"phone-{scheme}-conversation")
    page.get_by_role("button", name="Open chats", exact=True).click()
    page.wait_for_selector("#sidebar", state="visible")
    page.wait_for_timeout(300)
    screenshot(page, f"phone-{scheme}-chats")
    page.keyboard.press("Escape")
    page.wait_for_selector("#sidebar", state="hidden")
    assert page.get_by_role("button", name="Send", exact=True).is_visible()
    problems.check()
    page.context.close()

"""The web page in a real browser against a real `ember serve` (SmolLM2): conversations and their branches.

Each test drives the page the way a person does (typing, Enter, buttons found
by their accessible names) and checks both what the page shows and, through
the sessions API, what the server stored.
"""

from __future__ import annotations

import httpx
import pytest
from page_support import (
    assistant_texts,
    chromium,
    current_session_id,
    message_texts,
    open_page,
    require_browser,
    require_sessions_api,
    screenshot,
    send,
    wait_until_idle,
)

pytestmark = pytest.mark.slow  # a model answers about a dozen replies on a 2-core machine
server_harness = pytest.importorskip("server_harness", reason="tests/server_harness.py is not there yet")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    data_dir = tmp_path_factory.mktemp("page-data")
    with server_harness.running_server(args=["--data-dir", str(data_dir), "--ctx", "2048"]) as running:
        require_sessions_api(running.base_url)
        yield running


@pytest.fixture(scope="module")
def browser(server):
    with chromium() as browser:
        yield browser


def api_session(server, session_id: str) -> dict:
    response = httpx.get(f"{server.base_url}/v1/sessions/{session_id}", timeout=30)
    response.raise_for_status()
    return response.json()


RECORD_LENGTHS = """() => {
  window.replyLengths = [];
  new MutationObserver(() => {
    const reply = document.querySelector('.message.assistant.streaming');
    if (reply) window.replyLengths.push([reply.dataset.messageId, reply.innerText.trim().length]);
  }).observe(document.querySelector('#messages'), { subtree: true, childList: true, characterData: true });
}"""


def test_a_reply_grows_on_the_page_while_it_streams(server, browser):
    page, problems = open_page(browser, server.base_url, new_chat_settings={"max_tokens": 40, "seed": 3})
    page.evaluate(RECORD_LENGTHS)
    send(page, "Tell me about the sea in three sentences.")
    page.wait_for_selector(".message.assistant.streaming")
    # The box stays usable: a message sent now waits, in the box, until this reply ends.
    page.fill("#prompt", "Thank you!")
    page.press("#prompt", "Enter")
    assert "Sends when this reply finishes" in page.locator("#hint").inner_text()
    assert page.input_value("#prompt") == "Thank you!"
    screenshot(page, "desktop-light-streaming")
    page.wait_for_function("() => document.querySelectorAll('.message.user').length === 2")
    wait_until_idle(page)
    first_reply = page.locator(".message.assistant").first.get_attribute("data-message-id")
    recorded = page.evaluate("window.replyLengths")
    lengths = sorted({length for message_id, length in recorded if message_id == first_reply and length})
    assert page.input_value("#prompt") == ""
    assert page.locator(".message.user .message-body").all_inner_texts() == [
        "Tell me about the sea in three sentences.",
        "Thank you!",
    ]

    assert len(lengths) >= 3, f"the reply did not grow in steps while streaming: {lengths}"
    final = assistant_texts(page)[0]
    assert final and len(final) >= lengths[-1] - 1
    # The chat is in the sidebar (titled after its first message) and on the server.
    assert page.locator("#session-list .session.current").inner_text().startswith("Tell me about the sea")
    stored = api_session(server, current_session_id(page))
    assert [message["role"] for message in stored["messages"]] == ["user", "assistant"] * 2
    assert stored["messages"][1]["status"] == "complete"
    # Shown quietly: the model, the context used, the last reply's speed.
    assert page.locator("#stat-model").inner_text() == "smollm2"
    assert "/ 2k context" in page.locator("#stat-context").inner_text()
    assert "tokens/s" in page.locator("#stat-speed").inner_text()
    problems.check()
    page.context.close()


STREAMING_LENGTH = """() => {
  const body = document.querySelector('.message.assistant.streaming .message-body');
  return body ? body.innerText.trim().length : -1;
}"""
AT_END = """() => {
  const view = document.querySelector('#conversation');
  return view.scrollHeight - view.scrollTop - view.clientHeight < 60;
}"""


def test_follow_unless_scrolled_up_then_stop_keeps_the_partial_reply_then_continue(server, browser):
    long_reply = {"max_tokens": 500, "ignore_eos": True, "seed": 5}
    short_window = {"width": 1280, "height": 420}  # a long reply fills it sooner
    page, problems = open_page(browser, server.base_url, new_chat_settings=long_reply, viewport=short_window)
    send(page, "Write a long story about a lighthouse keeper.")
    page.wait_for_function(
        "() => { const view = document.querySelector('#conversation');"
        " return document.querySelector('.message.streaming')"
        " && view.scrollHeight > view.clientHeight + 80; }"
    )
    assert page.evaluate(AT_END), "the view did not follow the growing reply"

    # Scrolled up, the view stays where the reader put it while the reply goes on growing.
    page.hover("#conversation")
    page.mouse.wheel(0, -5000)
    page.wait_for_function("() => document.querySelector('#conversation').scrollTop === 0")
    grown_from = page.evaluate(STREAMING_LENGTH)
    page.wait_for_function(f"() => ({STREAMING_LENGTH})() > {grown_from} + 20")
    assert page.evaluate("document.querySelector('#conversation').scrollTop") == 0
    jump = page.get_by_role("button", name="Jump to latest", exact=True)
    assert jump.is_visible()
    jump.click()
    page.wait_for_function(AT_END)

    # A reload in the middle finds the reply still growing (the server kept writing it).
    before_reload = page.evaluate(STREAMING_LENGTH)
    page.reload()
    page.wait_for_function(f"() => ({STREAMING_LENGTH})() > {before_reload} + 10")
    page.get_by_role("button", name="Stop", exact=True).click()
    wait_until_idle(page)
    reply = page.locator(".message.assistant").last
    assert reply.get_attribute("data-status") == "interrupted"
    partial = reply.locator(".message-body").inner_text()
    assert len(partial.strip()) > 40
    assert page.get_by_text("Stopped before the end of the reply.").is_visible()

    page.reload()
    page.wait_for_selector(".message.assistant")
    wait_until_idle(page)
    reloaded = page.locator(".message.assistant").last
    assert reloaded.get_attribute("data-status") == "interrupted"
    assert reloaded.locator(".message-body").inner_text().split() == partial.split()
    session_id = current_session_id(page)
    stored = api_session(server, session_id)["messages"][-1]
    assert stored["status"] == "interrupted" and stored["content"].strip()

    # Continue writes on in the same message, after what was kept.
    reloaded.get_by_role("button", name="Continue", exact=True).click()
    page.wait_for_function(f"() => ({STREAMING_LENGTH})() > {len(partial.strip())} + 20")
    page.get_by_role("button", name="Stop", exact=True).click()
    wait_until_idle(page)
    messages = api_session(server, session_id)["messages"]
    assert len(messages) == 2
    assert messages[-1]["content"].startswith(stored["content"])
    assert len(messages[-1]["content"]) > len(stored["content"]) + 20
    problems.check()
    page.context.close()


def test_regenerate_then_move_between_the_alternatives(server, browser):
    clipboard = ["clipboard-read", "clipboard-write"]
    page, problems = open_page(browser, server.base_url, permissions=clipboard)
    send(page, "Name a colour and say why you like it.")
    wait_until_idle(page)
    first = assistant_texts(page)[-1]
    page.locator(".message.assistant .message-actions").get_by_role("button", name="Copy", exact=True).click()
    stored = api_session(server, current_session_id(page))["messages"][-1]["content"]
    assert page.evaluate("navigator.clipboard.readText()") == stored
    page.locator(".message.assistant").last.get_by_role("button", name="Regenerate", exact=True).click()
    page.wait_for_selector(".message.assistant.streaming")
    wait_until_idle(page)

    reply = page.locator(".message.assistant").last
    assert reply.locator(".alternatives-count").inner_text() == "2 / 2"
    second = assistant_texts(page)[-1]
    reply.get_by_role("button", name="Previous version", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('.message.assistant .alternatives-count').textContent === '1 / 2'"
    )
    assert assistant_texts(page)[-1] == first
    page.locator(".message.assistant").last.get_by_role("button", name="Next version", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('.message.assistant .alternatives-count').textContent === '2 / 2'"
    )
    assert assistant_texts(page)[-1] == second
    assert len(page.locator(".message").all()) == 2  # alternatives, not extra messages

    page.reload()
    page.wait_for_selector(".message.assistant .alternatives-count")
    assert page.locator(".message.assistant .alternatives-count").inner_text() == "2 / 2"
    assert assistant_texts(page)[-1] == second
    problems.check()
    page.context.close()


def test_editing_a_message_makes_a_new_branch(server, browser):
    page, problems = open_page(browser, server.base_url)
    send(page, "Say hello to the moon.")
    wait_until_idle(page)
    original_reply = assistant_texts(page)[-1]
    page.locator(".message.user").last.get_by_role("button", name="Edit", exact=True).click()
    editor = page.get_by_role("textbox", name="Edit message")
    assert editor.input_value() == "Say hello to the moon."
    editor.fill("Say goodbye to the sun.")
    page.get_by_role("button", name="Save and send", exact=True).click()
    page.wait_for_selector(".message.assistant.streaming")
    wait_until_idle(page)

    user = page.locator(".message.user").last
    assert user.locator(".message-body").inner_text() == "Say goodbye to the sun."
    assert user.locator(".alternatives-count").inner_text() == "2 / 2"
    stored = api_session(server, current_session_id(page))["messages"]
    assert [message["content"] for message in stored][0] == "Say goodbye to the sun."
    assert stored[0]["alternatives"]["count"] == 2

    # The old branch is still there, with its own answer.
    user.get_by_role("button", name="Previous version", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('.message.user .alternatives-count').textContent === '1 / 2'"
    )
    assert page.locator(".message.user .message-body").inner_text() == "Say hello to the moon."
    assert assistant_texts(page)[-1] == original_reply
    problems.check()
    page.context.close()


def test_rename_search_and_delete_chats(server, browser):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        alpha = client.post("/v1/sessions", json={"title": "Alpha plans"}).json()
        beta = client.post("/v1/sessions", json={"title": "Beta notes"}).json()
    page, problems = open_page(browser, server.base_url)
    sidebar = page.locator("#session-list")
    row = sidebar.locator(".session", has_text="Alpha plans")
    row.hover()
    row.get_by_role("button", name="Rename", exact=True).click()
    title_box = page.get_by_role("textbox", name="Chat title")
    title_box.fill("Gamma ideas")
    title_box.press("Enter")
    page.wait_for_selector("#session-list .session:has-text('Gamma ideas')")
    assert api_session(server, alpha["id"])["title"] == "Gamma ideas"

    page.fill("#search", "gamma")
    page.wait_for_function("() => document.querySelectorAll('#session-list .session').length === 1")
    assert sidebar.locator(".session").inner_text() == "Gamma ideas"
    page.fill("#search", "")
    page.wait_for_selector("#session-list .session:has-text('Beta notes')")

    # Delete asks first; Cancel keeps the chat, Delete removes it here and on the server.
    beta_row = sidebar.locator(".session", has_text="Beta notes")
    beta_row.hover()
    beta_row.get_by_role("button", name="Delete", exact=True).click()
    dialog = page.get_by_role("dialog", name="Delete chat?")
    screenshot(page, "desktop-light-delete-confirmation")
    dialog.get_by_role("button", name="Cancel", exact=True).click()
    assert sidebar.locator(".session", has_text="Beta notes").count() == 1
    beta_row.hover()
    beta_row.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_role("dialog", name="Delete chat?").get_by_role("button", name="Delete", exact=True).click()
    page.wait_for_function(
        "() => ![...document.querySelectorAll('#session-list .session')]"
        ".some((row) => row.innerText.includes('Beta'))"
    )
    assert httpx.get(f"{server.base_url}/v1/sessions/{beta['id']}", timeout=30).status_code == 404
    problems.check()
    page.context.close()


def test_a_reload_and_a_second_browser_find_everything(server, browser):
    page, problems = open_page(browser, server.base_url)
    send(page, "List two fruits.")
    wait_until_idle(page)
    session_id = current_session_id(page)
    title = page.locator("#chat-title").inner_text()
    texts = message_texts(page)

    # Another tab of the same browser opens the same chat; a reload does too.
    second_tab = page.context.new_page()
    second_tab.goto(server.base_url + "/")
    second_tab.wait_for_selector(".message.assistant")
    assert message_texts(second_tab) == texts
    page.reload()
    page.wait_for_selector(".message.assistant")
    assert message_texts(page) == texts
    assert page.locator("#chat-title").inner_text() == title

    # A reply sent from one tab grows in the other one too (over the session's WebSocket).
    send(page, "And two vegetables?")
    second_tab.wait_for_selector(".message.assistant.streaming")
    wait_until_idle(page)
    wait_until_idle(second_tab)
    second_tab.wait_for_function("() => document.querySelectorAll('.message.assistant').length === 2")
    texts = message_texts(page)
    assert message_texts(second_tab) == texts

    # A different browser (no local storage): the chat is in the list, with the same messages.
    other, other_problems = open_page(browser, server.base_url)
    other.locator("#session-list .session-open", has_text=title).first.click()
    other.wait_for_selector(".message.assistant")
    assert message_texts(other) == texts
    assert current_session_id(other) == session_id
    problems.check()
    other_problems.check()
    page.context.close()
    other.context.close()


def test_settings_are_kept_with_the_chat(server, browser):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        session = client.post("/v1/sessions", json={"title": "Settings check"}).json()
    page, problems = open_page(browser, server.base_url)
    page.locator("#session-list .session-open", has_text="Settings check").click()
    page.wait_for_function("() => document.querySelector('#chat-title').textContent === 'Settings check'")
    page.get_by_role("button", name="Settings", exact=True).click()
    dialog = page.get_by_role("dialog", name="Settings")
    dialog.get_by_label("System prompt").fill("You are terse.")
    dialog.get_by_label("Max tokens").fill("33")
    dialog.get_by_label("Temperature").fill("0.3")
    dialog.get_by_label("Top-k").fill("-4")
    dialog.get_by_role("button", name="Save", exact=True).click()
    assert "Top-k must be a whole number between 0 and 1000" in dialog.get_by_role("alert").inner_text()
    dialog.get_by_label("Top-k").fill("12")
    screenshot(page, "desktop-light-settings")
    dialog.get_by_role("button", name="Save", exact=True).click()
    page.wait_for_selector("dialog", state="detached")

    stored = api_session(server, session["id"])
    assert stored["system_prompt"] == "You are terse."
    assert stored["settings"]["max_tokens"] == 33
    assert stored["settings"]["top_k"] == 12
    assert stored["settings"]["temperature"] == pytest.approx(0.3)
    page.reload()
    page.get_by_role("button", name="Settings", exact=True).click()
    dialog = page.get_by_role("dialog", name="Settings")
    assert dialog.get_by_label("Max tokens").input_value() == "33"
    with page.expect_download() as download:
        dialog.get_by_role("button", name="Markdown", exact=True).click()
    transcript = download.value.path().read_text(encoding="utf-8")
    assert transcript.startswith("# Settings check") and "You are terse." in transcript
    assert download.value.suggested_filename == "Settings-check.md"
    problems.check()
    page.context.close()

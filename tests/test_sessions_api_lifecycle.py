"""Sessions survive the server: shared with `ember chat`, kept through `kill -9` and SIGTERM mid-reply."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest
from server_harness import REPO_ROOT, STORY_MODEL, EmberServer
from sessions_support import LONG_REPLY, messages, new_session, say, sse_events, wait_until

from ember.sessions import SessionStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def server(data_dir):
    # --drain-timeout 0: SIGTERM cuts replies at once (a drain would let a long one finish first).
    # One sequence at a time and a short queue timeout: a second reply waits, then gets 503.
    arguments = [
        "--data-dir",
        str(data_dir),
        "--drain-timeout",
        "0",
        "--max-batch",
        "1",
        "--queue-timeout",
        "2",
    ]
    server = EmberServer(model="smollm2", args=arguments)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ember_chat(data_dir, *lines: str, title: str | None = None) -> str:
    """`ember chat` on the same data directory, typing `lines` (the tiny story model: the sessions matter)."""
    command = [sys.executable, "-m", "ember.cli.main", "chat", "--model", str(STORY_MODEL)]
    command += ["--data-dir", str(data_dir), *(["--title", title] if title else [])]
    result = subprocess.run(
        command,
        input="\n".join([*lines, "/quit"]) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_http_and_terminal_sessions_are_the_same_sessions(server, data_dir):
    with server.client() as client:
        session = new_session(client, title="made over HTTP")
        say(client, session["id"], "Hello!")
        listing = ember_chat(data_dir, "/sessions", "Once upon a time", title="made in the terminal")
        assert session["id"] in listing and "made over HTTP" in listing

        listed = client.get("/v1/sessions").json()["data"]
        terminal = next(s for s in listed if s["title"] == "made in the terminal")
        assert client.get(f"/v1/sessions/{terminal['id']}").status_code == 200
        assert next(s for s in listed if s["id"] == session["id"])["message_count"] == 2


def start_long_reply(client: httpx.Client, session_id: str, content: str, data_dir):
    """Post a message whose reply runs until stopped; returns once part of it is in the file."""
    stream = client.stream(
        "POST", f"/v1/sessions/{session_id}/messages", json={"content": content, "stream": True}
    )
    response = stream.__enter__()
    events = sse_events(response)
    start = next(events)
    assert start["type"] == "start" and next(events)["type"] == "delta"
    with SessionStore(data_dir / "sessions.sqlite3") as store:  # what a crash would leave

        def stored_partial() -> str | None:
            return store.get_message(start["message_id"]).content or None

        return stream, wait_until(stored_partial)


def test_a_reply_that_cannot_begin_in_time_is_a_503_and_the_message_is_kept(server, data_dir):
    with server.client() as client:
        busy = new_session(client, settings=LONG_REPLY)
        waiting = new_session(client, settings={"temperature": 0, "max_tokens": 8})
        stream, _ = start_long_reply(client, busy["id"], "Talk for a long time.", data_dir)
        try:
            response = client.post(f"/v1/sessions/{waiting['id']}/messages", json={"content": "Hi there"})
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "queue_timeout" and response.headers["retry-after"]
        finally:
            client.post(f"/v1/sessions/{busy['id']}/stop")
            stream.__exit__(None, None, None)
        wait_until(lambda: not client.get(f"/v1/sessions/{waiting['id']}").json()["replying"])
        stored = messages(client, waiting["id"])
        assert stored[0]["content"] == "Hi there"  # the user's message was on disk and stays
        assert all(message["status"] != "streaming" for message in stored)
        assert say(client, waiting["id"], "Hello again")["status"] == "complete"  # free again


def test_kill_9_mid_reply_keeps_both_messages_with_the_reply_interrupted(server, data_dir):
    with server.client() as client:
        session = new_session(client, title="crash", settings=LONG_REPLY)
        stream, partial = start_long_reply(client, session["id"], "Tell me a very long story.", data_dir)
        server.kill()
        try:
            stream.__exit__(None, None, None)
        except httpx.HTTPError:
            pass
    server.restart()
    with server.client() as client:
        stored = messages(client, session["id"])
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "complete"),
            ("assistant", "interrupted"),
        ]
        assert stored[0]["content"] == "Tell me a very long story."
        assert stored[1]["content"].startswith(partial)
        assert client.get(f"/v1/sessions/{session['id']}").json()["replying"] is False
        # The conversation goes on: another answer, the cut one kept as an alternative.
        client.patch(
            f"/v1/sessions/{session['id']}", json={"settings": {"max_tokens": 4, "ignore_eos": False}}
        )
        again = client.post(f"/v1/sessions/{session['id']}/regenerate").json()
        assert again["status"] == "complete" and again["alternatives"]["count"] == 2


def test_sigterm_mid_reply_stores_it_as_interrupted_before_exit(server, data_dir):
    with server.client() as client:
        session = new_session(client, title="stopping", settings=LONG_REPLY)
        stream, partial = start_long_reply(client, session["id"], "Count to a million.", data_dir)
        server.send_signal(signal.SIGTERM)
        try:
            stream.__exit__(None, None, None)
        except httpx.HTTPError:
            pass
        assert server.wait(timeout=60) == 0
    with SessionStore(data_dir / "sessions.sqlite3") as store:
        assert store.recovered_replies == 0  # the server stored it itself, nothing was left streaming
        stored = store.active_path(session["id"])
        assert [(m.role, m.status) for m in stored] == [("user", "complete"), ("assistant", "interrupted")]
        assert stored[1].content.startswith(partial)

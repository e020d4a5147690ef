"""The sessions API against a real `ember serve` (SmolLM2) with two API key users: turns, branches,
stop, one writer per session, WebSocket, users kept apart, and bad input that changes nothing."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from server_harness import running_server
from sessions_support import (
    GREEDY,
    LONG_REPLY,
    messages,
    new_session,
    receive,
    receive_until,
    say,
    sse_events,
    wait_until,
)
from websockets.sync.client import connect

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# two users\n{ALICE} alice\n{BOB} bob\n")
    data = tmp_path_factory.mktemp("data")
    # A 1024-token context, so a few long messages overflow it.
    arguments = ["--api-keys-file", str(keys), "--data-dir", str(data), "--ctx", "1024"]
    with running_server(model="smollm2", args=arguments) as server:
        yield server


@pytest.fixture
def alice(server):
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture
def bob(server):
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {BOB}"}, timeout=60
    ) as client:
        yield client


def ws_url(server, session_id: str, token: str | None = None) -> str:
    url = server.base_url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/ws"
    return url + (f"?token={token}" if token else "")


def test_create_list_update_delete(alice):
    first = new_session(
        alice, title="Trip to Lisbon", system_prompt="Be brief.", settings={"temperature": 0.3}
    )
    second = new_session(alice, title="Recipes")
    assert len(first["id"]) == 16 and first["id"] != second["id"]
    assert (first["system_prompt"], first["message_count"]) == ("Be brief.", 0)
    assert first["settings"]["temperature"] == 0.3 and first["settings"]["top_p"] == 0.95  # defaults kept

    listed = alice.get("/v1/sessions").json()["data"]
    assert [s["id"] for s in listed][:2] == [second["id"], first["id"]]  # newest first
    assert [s["id"] for s in alice.get("/v1/sessions", params={"q": "lisbon"}).json()["data"]] == [
        first["id"]
    ]

    changed = alice.patch(
        f"/v1/sessions/{first['id']}", json={"title": "Porto", "settings": {"top_k": 5, "temperature": None}}
    ).json()
    assert (changed["title"], changed["system_prompt"]) == ("Porto", "Be brief.")
    assert (changed["settings"]["top_k"], changed["settings"]["temperature"]) == (5, 0.8)  # null: the default
    assert (
        alice.patch(f"/v1/sessions/{first['id']}", json={"system_prompt": None}).json()["system_prompt"]
        is None
    )

    assert alice.delete(f"/v1/sessions/{first['id']}").status_code == 204
    assert alice.get(f"/v1/sessions/{first['id']}").status_code == 404
    assert alice.delete(f"/v1/sessions/{first['id']}").status_code == 404
    exported = alice.get(f"/v1/sessions/{second['id']}/export", params={"format": "json"})
    assert exported.status_code == 200 and exported.json()["title"] == "Recipes"
    assert alice.get(f"/v1/sessions/{second['id']}/export").text.startswith("# Recipes")


def test_streamed_turn_then_turn_two_prefills_only_new_tokens(alice):
    session = new_session(alice, title="cache")
    with alice.stream(
        "POST", f"/v1/sessions/{session['id']}/messages", json={"content": "Name a color.", "stream": True}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    start, deltas, done = events[0], events[1:-1], events[-1]
    assert start["type"] == "start" and start["user_message"]["content"] == "Name a color."
    assert deltas and all(event["type"] == "delta" for event in deltas)
    assert done["type"] == "done" and done["message"]["id"] == start["message_id"]
    assert "".join(event["text"] for event in deltas) == done["message"]["content"]
    assert done["message"]["status"] == "complete"
    first_usage = done["usage"]
    assert first_usage["completion_tokens"] > 0
    assert first_usage["tokens_per_second"] > 0 and first_usage["finish_reason"] in ("stop", "length")

    second = say(alice, session["id"], "And another one?")
    usage = second["usage"]
    assert usage["prompt_tokens"] > first_usage["prompt_tokens"] + first_usage["completion_tokens"]
    # Turn 1's prompt and answer come from the cache; only the new message (and its template) is computed.
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first_usage["prompt_tokens"]
    assert (
        usage["prefilled_tokens"] == usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    )
    assert usage["prefilled_tokens"] < 20
    stored = messages(alice, session["id"])
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[-1]["content"] == second["content"] and stored[-1]["status"] == "complete"


def test_regenerate_select_edit_undo_continue(alice):
    session = new_session(alice, settings={"temperature": 1.0, "seed": 7, "max_tokens": 8})
    first_answer = say(alice, session["id"], "Say something about the sea.")
    second_answer = alice.post(f"/v1/sessions/{session['id']}/regenerate").json()
    assert second_answer["id"] != first_answer["id"]
    assert second_answer["parent_id"] == first_answer["parent_id"]
    assert second_answer["alternatives"] == {
        "index": 1,
        "count": 2,
        "ids": [first_answer["id"], second_answer["id"]],
    }

    selected = alice.post(f"/v1/sessions/{session['id']}/messages/{first_answer['id']}/select").json()
    assert selected["messages"][-1]["id"] == first_answer["id"]
    assert selected["messages"][-1]["alternatives"]["index"] == 0

    say(alice, session["id"], "Shorter, please.")
    question = messages(alice, session["id"])[0]
    edited = alice.post(
        f"/v1/sessions/{session['id']}/messages/{question['id']}/edit",
        json={"content": "Say something about mountains."},
    ).json()
    path = messages(alice, session["id"])
    assert [m["content"] for m in path][0] == "Say something about mountains."
    assert len(path) == 2 and path[1]["id"] == edited["id"]
    assert path[0]["alternatives"]["count"] == 2 and path[0]["alternatives"]["ids"][0] == question["id"]

    # A user message of the branch left behind can be edited too: a third version.
    third = alice.post(
        f"/v1/sessions/{session['id']}/messages/{question['id']}/edit", json={"content": "About rivers?"}
    )
    assert third.status_code == 200, third.text
    path = messages(alice, session["id"])
    assert path[0]["content"] == "About rivers?" and path[0]["alternatives"]["count"] == 3

    # The old branch (with its second exchange) is still there.
    back = alice.post(f"/v1/sessions/{session['id']}/messages/{first_answer['id']}/select").json()["messages"]
    assert [m["id"] for m in back][:2] == [question["id"], first_answer["id"]]
    assert back[2]["content"] == "Shorter, please." and len(back) == 4

    undone = alice.post(f"/v1/sessions/{session['id']}/undo").json()
    assert len(undone["messages"]) == 2 and undone["message_count"] == 2

    before = messages(alice, session["id"])[-1]
    continued = alice.post(f"/v1/sessions/{session['id']}/continue", json={"stream": False}).json()
    assert continued["id"] == before["id"] and continued["content"].startswith(before["content"])
    assert len(continued["content"]) > len(before["content"])


def test_stop_mid_reply_keeps_the_text_and_a_second_post_gets_409(alice):
    session = new_session(alice, settings=LONG_REPLY)
    url = f"/v1/sessions/{session['id']}/messages"
    with alice.stream("POST", url, json={"content": "Tell me a long story.", "stream": True}) as response:
        events = sse_events(response)
        start = next(events)
        assert start["type"] == "start"
        received = [next(events) for _ in range(3)]
        assert all(event["type"] == "delta" for event in received)

        conflict = alice.post(url, json={"content": "Me too!"})
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "reply_in_progress"
        assert alice.post(f"/v1/sessions/{session['id']}/undo").status_code == 409
        assert alice.post(f"/v1/sessions/{session['id']}/regenerate").status_code == 409
        live = alice.get(f"/v1/sessions/{session['id']}").json()
        assert live["replying"] is True and live["messages"][-1]["status"] == "streaming"
        # Another tab's GET sees the reply as far as it has been written, not the last store write.
        assert live["messages"][-1]["content"].startswith("".join(event["text"] for event in received))

        stopped = alice.post(f"/v1/sessions/{session['id']}/stop").json()
        assert stopped["stopped"] is True and stopped["message"]["status"] == "interrupted"
        rest = list(events)
    done = rest[-1]
    assert done["type"] == "done" and done["message"]["status"] == "interrupted"
    text = "".join(event["text"] for event in received + rest[:-1])
    assert done["message"]["content"] == text == stopped["message"]["content"] and text
    assert done["usage"]["finish_reason"] == "interrupted"
    stored = messages(alice, session["id"])
    assert [(m["role"], m["status"]) for m in stored] == [("user", "complete"), ("assistant", "interrupted")]
    assert stored[-1]["content"] == text
    assert alice.post(f"/v1/sessions/{session['id']}/stop").json() == {"stopped": False, "message": None}
    assert alice.get(f"/v1/sessions/{session['id']}").json()["message_count"] == 2  # nothing interleaved


def test_websocket_streams_to_both_tabs_and_honours_stop(server, alice):
    session = new_session(alice, settings=GREEDY)
    with (
        connect(ws_url(server, session["id"], ALICE), open_timeout=10) as tab,
        connect(ws_url(server, session["id"]), open_timeout=10) as other_tab,
    ):
        other_tab.send(json.dumps({"type": "auth", "token": ALICE}))  # browsers: the key as the first message
        assert receive(tab)["type"] == "ready" and receive(other_tab)["type"] == "ready"
        tab.send('{"type": "message", "content": "Hello there!"}')
        events = receive_until(tab, "done")
        assert events[0]["type"] == "start" and events[0]["user_message"]["content"] == "Hello there!"
        text = "".join(event["text"] for event in events if event["type"] == "delta")
        assert text and events[-1]["message"]["content"] == text
        seen = receive_until(other_tab, "done")  # the other tab saw the same reply
        assert seen[-1]["message"] == events[-1]["message"]

        alice.patch(f"/v1/sessions/{session['id']}", json={"settings": LONG_REPLY})
        tab.send('{"type": "regenerate"}')
        assert receive(tab)["type"] == "start"
        assert receive(tab)["type"] == "delta"
        tab.send('{"type": "message", "content": "while replying"}')  # refused: one writer
        tab.send('{"type": "stop"}')
        events = receive_until_done_ignoring_errors(tab)
        errors = [event for event in events if event["type"] == "error"]
        assert errors and all(event["status"] == 409 for event in errors)
        final = events[-1]["message"]
        assert final["status"] == "interrupted" and final["alternatives"]["count"] == 2
        tab.send("not json")
        assert receive(tab)["status"] == 400
    assert [m["status"] for m in messages(alice, session["id"])] == ["complete", "interrupted"]


def receive_until_done_ignoring_errors(socket):
    events = []
    while True:
        event = receive(socket)
        events.append(event)
        if event["type"] == "done":
            return events


def test_users_are_kept_apart(server, alice, bob):
    mine = new_session(alice, title="alice's secret")
    say(alice, mine["id"], "Hi")
    assert all(s["id"] != mine["id"] for s in bob.get("/v1/sessions").json()["data"])
    assert mine["id"] in [s["id"] for s in alice.get("/v1/sessions").json()["data"]]
    for method, path, body in [
        ("GET", "", None),
        ("PATCH", "", {"title": "mine now"}),
        ("POST", "/messages", {"content": "hello"}),
        ("POST", "/regenerate", None),
        ("POST", "/undo", None),
        ("POST", "/stop", None),
        ("GET", "/export", None),
        ("DELETE", "", None),
    ]:
        response = bob.request(method, f"/v1/sessions/{mine['id']}{path}", json=body)
        assert response.status_code == 404, (method, path, response.text)
    assert httpx.get(f"{server.base_url}/v1/sessions").status_code == 401
    assert (
        httpx.get(f"{server.base_url}/v1/sessions", headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    with connect(ws_url(server, mine["id"], BOB), open_timeout=10) as socket:
        assert receive(socket)["status"] == 404
    with connect(ws_url(server, mine["id"], "wrong-key"), open_timeout=10) as socket:
        assert receive(socket)["status"] == 401
    assert alice.get(f"/v1/sessions/{mine['id']}").json()["title"] == "alice's secret"
    assert len(messages(alice, mine["id"])) == 2


def test_bad_input_is_refused_and_changes_nothing(alice):
    session = new_session(alice)
    say(alice, session["id"], "Hello")
    other = new_session(alice)
    say(alice, other["id"], "Elsewhere")
    sid = session["id"]
    path = messages(alice, sid)
    user_id, answer_id = path[0]["id"], path[1]["id"]
    before = alice.get(f"/v1/sessions/{sid}").json()
    foreign_id = messages(alice, other["id"])[0]["id"]

    cases = [
        ("POST", f"/v1/sessions/{sid}/messages", {"content": ""}, 400),
        ("POST", f"/v1/sessions/{sid}/messages", {"content": "   \n"}, 400),
        ("POST", f"/v1/sessions/{sid}/messages", {"content": "x" * 200_001}, 400),
        ("POST", f"/v1/sessions/{sid}/messages", {"content": "hello " * 1500}, 400),  # over the context
        ("POST", f"/v1/sessions/{sid}/messages", {"content": "hi", "colour": "red"}, 400),
        ("POST", f"/v1/sessions/{sid}/messages", {"content": 5}, 400),
        ("POST", f"/v1/sessions/{sid}/messages", {}, 400),
        ("POST", f"/v1/sessions/{sid}/messages/{answer_id}/edit", {"content": "new"}, 400),
        ("POST", f"/v1/sessions/{sid}/messages/{foreign_id}/edit", {"content": "new"}, 404),
        ("POST", f"/v1/sessions/{sid}/messages/{user_id}/edit", {"content": ""}, 400),
        ("POST", f"/v1/sessions/{sid}/messages/{user_id}/edit", {"content": "hello " * 1500}, 400),
        ("POST", f"/v1/sessions/{sid}/messages/ffffffffffffffff/select", None, 404),
        ("POST", f"/v1/sessions/{sid}/messages/{foreign_id}/select", None, 404),
        ("PATCH", f"/v1/sessions/{sid}", {"settings": {"temperature": 5}}, 400),
        ("PATCH", f"/v1/sessions/{sid}", {"settings": {"warmth": 1}}, 400),
        ("PATCH", f"/v1/sessions/{sid}", {"owner": "bob"}, 400),
        ("POST", "/v1/sessions", {"settings": {"top_p": 0}}, 400),
        ("POST", "/v1/sessions", {"title": 3}, 400),
        ("GET", f"/v1/sessions/{sid}/export?format=pdf", None, 400),
        ("GET", f"/v1/sessions/{sid[:6]}", None, 404),  # prefixes are for the terminal only
        ("GET", "/v1/sessions/not-an-id", None, 404),
        ("GET", "/v1/sessions/%00%27%22;--", None, 404),
        ("GET", "/v1/sessions/" + "a" * 5000, None, 404),
        ("POST", "/v1/sessions/zzzz/messages", {"content": "hi"}, 404),
        ("POST", "/v1/sessions/zzzz/undo", None, 404),
        ("DELETE", "/v1/sessions/zzzz", None, 404),
    ]
    for method, url, body, status in cases:
        response = alice.request(method, url, json=body)
        assert response.status_code == status, (method, url, response.text[:300])
        error = response.json()["error"]
        assert error["message"] and "\n" not in error["message"]
    overflow = alice.post(f"/v1/sessions/{sid}/messages", json={"content": "hello " * 1500}).json()["error"]
    assert overflow["code"] == "context_length_exceeded" and overflow["n_prompt_tokens"] > overflow["n_ctx"]
    assert alice.get(f"/v1/sessions/{sid}").json() == before

    fresh = new_session(alice)
    for method, tail in [("POST", "/regenerate"), ("POST", "/continue"), ("POST", "/undo")]:
        assert alice.request(method, f"/v1/sessions/{fresh['id']}{tail}").status_code == 400
    assert messages(alice, fresh["id"]) == []


def decoded_in_batches(client: httpx.Client) -> float:
    """Tokens /metrics counts as decoded alongside other sequences (batch size above 1)."""
    counts = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("ember_decode_batch_size_bucket") or line.startswith(
            "ember_decode_batch_size_count"
        ):
            name, value = line.rsplit(" ", 1)
            counts[name] = float(value)
    return counts["ember_decode_batch_size_count"] - counts['ember_decode_batch_size_bucket{le="1.0"}']


def test_many_sessions_reply_at_once_in_shared_batches(alice):
    sessions = [
        new_session(alice, settings={"temperature": 0, "max_tokens": 40, "ignore_eos": True})
        for _ in range(4)
    ]
    batched_before = decoded_in_batches(alice)
    results: dict[str, dict] = {}

    def ask(session_id: str) -> None:
        with httpx.Client(base_url=str(alice.base_url), headers=alice.headers, timeout=120) as client:
            results[session_id] = say(client, session_id, "Count to five.")

    threads = [threading.Thread(target=ask, args=(s["id"],)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == sorted(s["id"] for s in sessions)
    assert all(result["status"] == "complete" and result["content"] for result in results.values())
    assert all(result["usage"]["completion_tokens"] == 40 for result in results.values())
    assert decoded_in_batches(alice) > batched_before
    wait_until(lambda: all(not s["replying"] for s in alice.get("/v1/sessions").json()["data"]))


def test_a_conversation_longer_than_the_context_drops_its_oldest_turns_from_the_prompt_only(alice):
    session = new_session(
        alice, system_prompt="You are terse.", settings={"temperature": 0, "max_tokens": 24}
    )
    long_message = "Here is some text to think about: " + "the quick brown fox jumps. " * 50
    dropped = []
    for number in range(5):
        reply = say(alice, session["id"], f"{number}. {long_message}")
        assert reply["status"] == "complete"
        dropped.append(reply["usage"]["dropped_messages"])
        assert reply["usage"]["prompt_tokens"] + 24 <= 1024
    assert dropped[0] == 0 and dropped[-1] > 0  # told, not silent
    stored = messages(alice, session["id"])
    assert len(stored) == 10 and stored[0]["content"].startswith("0. ")  # the text is all kept

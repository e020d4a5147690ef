"""Helpers for the sessions API tests: SSE reading, session shortcuts, WebSocket events."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

GREEDY = {"temperature": 0, "max_tokens": 24}
LONG_REPLY = {"temperature": 0, "max_tokens": 3000, "ignore_eos": True}  # runs until stopped


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON events of an SSE response, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def new_session(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    fields.setdefault("settings", GREEDY)
    response = client.post("/v1/sessions", json=fields)
    assert response.status_code == 201, response.text
    return response.json()


def say(client: httpx.Client, session_id: str, content: str) -> dict[str, Any]:
    """Post a message without streaming; the finished reply (with usage)."""
    response = client.post(f"/v1/sessions/{session_id}/messages", json={"content": content})
    assert response.status_code == 200, response.text
    return response.json()


def messages(client: httpx.Client, session_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()["messages"]


def wait_until(condition, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll `condition()` until it returns something true (bounded); returns that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def receive(socket, timeout: float = 30.0) -> dict[str, Any]:
    return json.loads(socket.recv(timeout=timeout))


def receive_until(socket, event_type: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Events up to and including the first of `event_type` (an `error` raises)."""
    events = []
    deadline = time.monotonic() + timeout
    while True:
        event = receive(socket, timeout=max(0.1, deadline - time.monotonic()))
        events.append(event)
        if event["type"] == event_type:
            return events
        if event["type"] == "error":
            raise AssertionError(f"error event: {event}")

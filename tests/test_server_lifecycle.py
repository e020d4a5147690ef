"""Starting and stopping `ember serve`: loading state, startup lines, draining on SIGTERM, exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest
from server_harness import REPO_ROOT, STORY_MODEL, EmberServer

pytestmark = pytest.mark.timeout(180)


def stream_lines(server: EmberServer, body: dict, into: list, started: threading.Event) -> None:
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=120) as response:
        into.append(response.status_code)
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                into.append(payload if payload == "[DONE]" else json.loads(payload))
                started.set()


def finish_reasons(events: list) -> list:
    return [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict) and e["choices"]]


def test_startup_lines_then_sigterm_lets_a_running_stream_finish_and_exits_0():
    server = EmberServer(model=STORY_MODEL, args=["--drain-timeout", "60"]).start()
    try:
        output = server.output()  # the startup lines: model, address, loading progress
        assert f"model story, listening on {server.base_url}" in output
        assert "loading story: layer 2/2" in output
        assert "ready: story" in output and f"open {server.base_url}" in output
        events: list = []
        started = threading.Event()
        body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
        reader = threading.Thread(target=stream_lines, args=(server, body, events, started))
        reader.start()
        assert started.wait(60)
        server.send_signal(signal.SIGTERM)
        reader.join(timeout=120)
        assert events[0] == 200 and events[-1] == "[DONE]"
        assert finish_reasons(events)[-1] == "length"  # finished, not cut
        assert server.wait(60) == 0
        assert "stopped" in server.output()
    finally:
        server.stop()


def test_sigterm_cuts_replies_past_the_drain_timeout_with_abort():
    server = EmberServer(model="smollm2", args=["--drain-timeout", "0.5"]).start()
    try:
        events: list = []
        started = threading.Event()
        body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        reader = threading.Thread(target=stream_lines, args=(server, body, events, started))
        reader.start()
        assert started.wait(60)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        refused = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert refused.status_code == 503  # draining: no new requests
        reader.join(timeout=60)
        assert finish_reasons(events)[-1] == "abort" and events[-1] == "[DONE]"
        assert server.wait(60) == 0
    finally:
        server.stop()


def test_a_model_that_fails_to_load_is_503_with_the_reason(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)
    server = EmberServer(model=str(broken))
    server.process = None
    # start() waits for 200, which never comes: drive the process by hand.

    process = subprocess.Popen(
        server.command(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        answer = None
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(server.base_url + "/health", timeout=2)
                if "failed to load" in answer.text:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert answer is not None and answer.status_code == 503
        assert answer.json()["error"]["type"] == "unavailable_error"
        chat = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": []})
        assert chat.status_code in (400, 503)
        models = httpx.get(server.base_url + "/v1/models")
        assert models.status_code == 503 and "failed to load" in models.json()["error"]["message"]
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C stops it like SIGTERM, with exit status 0
        assert process.wait(timeout=30) == 0
        process.stdout.close()


def test_health_is_503_while_loading_then_200():
    """In process: a load that waits for a signal shows the loading state for as long as it lasts."""
    from starlette.testclient import TestClient

    import ember
    from ember.server.app import create_app
    from ember.server.engine_service import EngineService
    from ember.server.settings import ServerSettings

    release = threading.Event()

    def slow_load(progress):
        assert release.wait(60)
        return ember.load(STORY_MODEL, on_layer_built=progress)

    service = EngineService(slow_load, model_name="story")
    with TestClient(create_app(ServerSettings(model_name="story"), service)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["error"]["message"] == "Loading model"
        refused = client.post("/v1/completions", json={"prompt": "Once"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        release.set()
        assert service.loaded.wait(60)
        assert client.get("/health").json() == {"status": "ok"}
        reply = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3

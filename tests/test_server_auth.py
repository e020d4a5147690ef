"""API keys, CORS and logging of `ember serve`: keys from flags, a file and the environment."""

from __future__ import annotations

import httpx
import pytest
from server_harness import STORY_MODEL, running_server

pytestmark = pytest.mark.timeout(120)

ORIGIN = "http://page.example"
SECRET_TEXT = "purple-elephant-4711"  # a message whose text must never reach the log


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("# team keys\nkey-of-alice alice\nkey-without-name\n")
    with running_server(
        model=STORY_MODEL,
        args=["--api-key", "flag-key", "--api-keys-file", str(keys_file), "--cors-origin", ORIGIN],
        env={"EMBER_API_KEY": "env-key"},
    ) as server:
        yield server


def test_every_route_but_health_needs_a_key(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/metrics"),
        ("POST", "/tokenize"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/route"),
    ]:
        response = httpx.request(method, server.base_url + path, json={"prompt": "x"})
        assert response.status_code == 401, path
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer flag-keyX"})
    assert wrong.status_code == 401
    not_bearer = httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Basic flag-key"})
    assert not_bearer.status_code == 401


@pytest.mark.parametrize("key", ["flag-key", "key-of-alice", "key-without-name", "env-key"])
def test_each_configured_key_works(server, key):
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(server.base_url + "/v1/models", headers=headers).status_code == 200
    reply = httpx.post(
        server.base_url + "/v1/completions", headers=headers, json={"prompt": "Once", "max_tokens": 2}
    )
    assert reply.status_code == 200


def test_openai_client_with_key(server):
    server.api_key = "key-of-alice"
    try:
        reply = server.openai().completions.create(model="story", prompt="Once upon", max_tokens=3)
        assert reply.choices[0].text is not None
    finally:
        server.api_key = None


def test_cors_only_for_the_given_origin(server):
    preflight = httpx.options(
        server.base_url + "/v1/chat/completions",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        server.base_url + "/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_logs_hold_neither_keys_nor_message_text(server):
    headers = {"Authorization": "Bearer flag-key"}
    httpx.post(
        server.base_url + "/v1/chat/completions",
        headers=headers,
        json={"messages": [{"role": "user", "content": SECRET_TEXT}], "max_tokens": 2},
    )
    httpx.post(server.base_url + "/v1/completions", headers=headers, json={"prompt": SECRET_TEXT, "n": 0})
    output = server.output()
    assert "listening on http://127.0.0.1:" in output and "API key on" in output
    for secret in ("flag-key", "key-of-alice", "env-key", "key-without-name", SECRET_TEXT):
        assert secret not in output

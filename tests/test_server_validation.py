"""Bad input to `ember serve`: each answered with its status in OpenAI's error shape, the server unharmed."""

from __future__ import annotations

import httpx
import pytest
from server_harness import STORY_MODEL, running_server

pytestmark = pytest.mark.timeout(180)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server():
    # The story model: fast, and a context of 256 tokens makes overflow cheap to provoke.
    with running_server(model=STORY_MODEL, args=["--max-body-mib", "0.5", "--ctx", "256"]) as server:
        yield server


def chat(**fields):
    return {"messages": MESSAGES, **fields}


BAD_BODIES = [
    (CHAT, chat(n=0), 400, "n"),
    (CHAT, chat(n="2"), 400, "n"),
    (CHAT, chat(temperature=2.5), 400, "temperature"),
    (CHAT, chat(temperature=-0.1), 400, "temperature"),
    (CHAT, chat(top_p=0), 400, "top_p"),
    (CHAT, chat(top_p=1.5), 400, "top_p"),
    (CHAT, chat(presence_penalty=2.5), 400, "presence_penalty"),
    (CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty"),
    (CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    (CHAT, chat(max_tokens=0), 400, "max_tokens"),
    (CHAT, chat(max_tokens=100000), 400, "max_tokens"),
    (CHAT, chat(max_completion_tokens=-1), 400, "max_completion_tokens"),
    (CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    (CHAT, chat(stream=True, stream_options={"include_usage": True}, n=0), 400, "n"),
    (CHAT, chat(stop=""), 400, "stop"),
    (CHAT, chat(stop=5), 400, "stop"),
    (CHAT, chat(seed="x"), 400, "seed"),
    (CHAT, chat(stream="yes"), 400, "stream"),
    (CHAT, chat(model="no-such-model"), 404, "model"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": "hello"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": [999999]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [-1]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": 12}, 400, "prompt"),
    (COMPLETIONS, {}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (COMPLETIONS, {"prompt": "x", "min_p": 1.0}, 400, "min_p"),
    ("/detokenize", {"tokens": [999999]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_BODIES)
def test_bad_body_is_answered_in_openai_shape(server, path, body, status, param):
    response = httpx.post(server.base_url + path, json=body, timeout=60)
    expected = status if isinstance(status, tuple) else (status,)
    assert response.status_code in expected, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert error["message"]
        if param is not None:
            assert error["param"] == param
            assert param.split(".")[0] in error["message"]


def test_prompt_longer_than_the_context_gives_the_counts(server):
    long_text = "the cat sat on the mat " * 200
    response = httpx.post(server.base_url + COMPLETIONS, json={"prompt": long_text}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["n_ctx"] == 256 and error["n_prompt_tokens"] > 256
    assert str(error["n_prompt_tokens"]) in error["message"]


def test_transport_level_bad_input(server):
    url = server.base_url + CHAT
    malformed = httpx.post(url, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    not_object = httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert not_object.status_code == 400 and "object" in not_object.json()["error"]["message"]
    wrong_type = httpx.post(url, content=b'{"messages": []}', headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 400 and "Content-Type" in wrong_type.json()["error"]["message"]
    too_large = httpx.post(url, json={"messages": [{"role": "user", "content": "x" * 600_000}]})
    assert too_large.status_code == 413 and too_large.json()["error"]["message"]
    for response in (
        httpx.get(server.base_url + "/no/such/route"),
        httpx.get(url),
        httpx.delete(server.base_url + "/v1/models"),
    ):
        assert response.status_code in (404, 405)
        assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    assert httpx.get(server.base_url + "/v1/models/no-such-model").status_code == 404


def test_unknown_fields_are_ignored(server):
    response = httpx.post(
        server.base_url + COMPLETIONS,
        json={
            "prompt": "Once",
            "max_tokens": 2,
            "some_future_field": {"x": 1},
            "user": "u1",
            "logit_bias": {},
        },
    )
    assert response.status_code == 200 and response.json()["choices"][0]["text"] is not None


def test_server_is_healthy_after_all_of_it(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    response = httpx.post(server.base_url + COMPLETIONS, json={"prompt": "Once upon a time", "max_tokens": 3})
    assert response.status_code == 200
    assert "Traceback" not in server.output()

"""Requests the engine ends with "error": 4xx when the request caused it, 500 only for ember's own faults.

The real failure used here: a regex the story model's vocabulary can begin but not finish
(it has no token for "€"), so the engine finds no allowed token after the first one.
"""

from __future__ import annotations

import json

import httpx
import pytest
from server_harness import STORY_MODEL, running_server

from ember.engine.sequence import FailureKind
from ember.server.errors import engine_failure

pytestmark = pytest.mark.timeout(120)
pytest.importorskip("ember.server.structured")

COMPLETIONS = "/v1/completions"
UNFINISHABLE = {"prompt": "Once", "max_tokens": 8, "guided_regex": "a€", "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with running_server(model=STORY_MODEL) as server:
        yield server


def test_a_reply_the_request_made_impossible_is_a_400_naming_the_field(server):
    response = httpx.post(server.base_url + COMPLETIONS, json=UNFINISHABLE, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "constraint_failed"
    assert error["param"] == "guided_regex"
    assert "allows no token" in error["message"]


def test_inside_a_stream_it_is_an_error_event_in_openai_shape_then_done(server):
    body = {**UNFINISHABLE, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.base_url + COMPLETIONS, json=body, timeout=60) as response:
        if response.status_code == 400:  # the constraint saw the dead end before the first token
            error = json.loads(response.read())["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "constraint_failed"
            return
        assert response.status_code == 200  # the first token was out before the failure
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    texts = [choice["text"] for chunk in chunks for choice in chunk.get("choices") or []]
    assert texts and texts[0] == "a"
    errors = [chunk["error"] for chunk in chunks if "error" in chunk]
    assert len(errors) == 1
    assert set(errors[0]) >= {"message", "type", "param", "code"}
    assert errors[0]["type"] == "invalid_request_error" and errors[0]["code"] == "constraint_failed"
    # The failed choice has no finish chunk; the usage chunk still closes the stream.
    assert not [c for chunk in chunks for c in chunk.get("choices") or [] if c["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


def test_the_server_stays_healthy_and_logs_no_traceback(server):
    response = httpx.post(server.base_url + COMPLETIONS, json={"prompt": "Once", "max_tokens": 3}, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert "Traceback" not in server.output()


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (FailureKind.CONSTRAINT, 400),
        (FailureKind.SAMPLING, 400),
        (FailureKind.CACHE_BUDGET, 400),
        (FailureKind.CACHE_BUSY, 409),
        (FailureKind.ENGINE, 500),
        (None, 500),
    ],
)
def test_engine_failures_map_to_who_caused_them(kind, status):
    error = engine_failure("the engine's message", kind, param="guided_regex")
    code = "engine_error" if status == 500 else str(kind)
    assert (error.status_code, error.code) == (status, code)
    types = {400: "invalid_request_error", 409: "conflict_error", 500: "server_error"}
    assert error.error_type == types[status]
    assert error.param == ("guided_regex" if kind is FailureKind.CONSTRAINT else None)
    assert error.message == "generation failed: the engine's message"

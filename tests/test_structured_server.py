"""Structured output and tool calls through a real `ember serve` (SmolLM2) and the official `openai` client.

Skipped when the server or its structured-output hook is not there yet.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from constraint_support import JSON_PROMPTS

pytestmark = pytest.mark.slow

server_harness = pytest.importorskip("server_harness")
openai = pytest.importorskip("openai")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, ADD)}

BOOK_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1500, "maximum": 2025},
        "genre": {"type": "string", "enum": ["novel", "poetry", "science", "history"]},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "authors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 30}},
                "required": ["name"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 2,
        },
    },
    "required": ["title", "year", "genre", "rating", "authors"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("ember.server.structured_hook")  # the server's one call into ember.server.structured
    with server_harness.running_server(model="smollm2", args=["--max-batch", "8"]) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return server.openai(timeout=300.0)


def _chat(client, text: str, **options):
    return client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": text}], temperature=0.8, **options
    )


def test_json_mode_replies_parse_for_ten_varied_prompts(client):
    """Each reply is a JSON object; one the model would not end is closed within max_tokens ("length")."""
    for seed, prompt in enumerate(JSON_PROMPTS):
        reply = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": prompt}],
            temperature=0.8,
            response_format={"type": "json_object"},
            max_tokens=100,
            seed=seed,
        )
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length")
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        if choice.finish_reason == "length":
            assert reply.usage.completion_tokens == 100


def test_strict_json_schema_validates_for_ten_varied_prompts(client):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "book", "schema": BOOK_SCHEMA, "strict": True},
    }

    def ask(seed: int):
        return _chat(client, JSON_PROMPTS[seed], response_format=response_format, max_tokens=200, seed=seed)

    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(ask, range(len(JSON_PROMPTS))))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), BOOK_SCHEMA)


def test_guided_regex_and_choice_are_honoured(client):
    reply = _chat(
        client, "When were you born?", max_tokens=20, extra_body={"guided_regex": r"[0-9]{4}-[0-9]{2}"}
    )
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}", reply.choices[0].message.content)
    reply = _chat(client, "Is the sky blue?", max_tokens=10, extra_body={"guided_choice": ["yes", "no"]})
    assert reply.choices[0].message.content in ("yes", "no")
    completion = client.completions.create(
        model="smollm2",
        prompt="The answer is",
        max_tokens=10,
        extra_body={"guided_choice": ["left", "right"]},
    )
    assert completion.choices[0].text in ("left", "right")


def test_max_tokens_cut_reports_length(client):
    reply = _chat(client, "Write a long story.", max_tokens=5, extra_body={"guided_regex": "[a-z ]{300}"})
    assert reply.choices[0].finish_reason == "length"


def test_json_mode_cut_by_max_tokens_still_parses_and_says_length(client):
    """A JSON-mode reply closed by its budget is complete JSON and honest about the cut."""
    reasons = set()
    for seed in range(3):
        reply = _chat(
            client,
            "Describe the whole history of Rome in JSON.",
            max_tokens=10,
            seed=seed,
            response_format={"type": "json_object"},
        )
        choice = reply.choices[0]
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        assert choice.finish_reason == "stop" or reply.usage.completion_tokens == 10
        reasons.add(choice.finish_reason)
    assert "length" in reasons
    completion = client.completions.create(  # no max_tokens: completions' default budget, 16
        model="smollm2",
        prompt="A JSON object describing a cat:",
        temperature=0.8,
        seed=1,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 16
    assert isinstance(json.loads(completion.choices[0].text), dict)


def _check_calls(calls, only: str | None = None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        if only:
            assert call.function.name == only
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_tool_choice_give_valid_tool_calls(client):
    question = "What is the weather in Oslo?"
    reply = _chat(client, question, tools=[WEATHER, ADD], tool_choice="required", max_tokens=100, seed=1)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls)
    named = {"type": "function", "function": {"name": "add"}}
    reply = _chat(client, "2 plus 3?", tools=[WEATHER, ADD], tool_choice=named, max_tokens=60, seed=2)
    assert reply.choices[0].finish_reason == "tool_calls"
    _check_calls(reply.choices[0].message.tool_calls, only="add")


def test_streamed_tool_calls_assemble_into_valid_calls(client):
    stream = _chat(
        client,
        "Weather in Rome?",
        tools=[WEATHER, ADD],
        tool_choice="required",
        max_tokens=100,
        seed=4,
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            entry = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id:
                entry["id"] = piece.id
            if piece.function and piece.function.name:
                entry["name"] = piece.function.name
            if piece.function and piece.function.arguments:
                entry["arguments"] += piece.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls
    for entry in calls.values():
        assert entry["id"] and entry["name"] in SCHEMAS
        jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS[entry["name"]])


def test_tool_results_render_and_the_conversation_continues(client):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": -3}'},
    ]
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=20, temperature=0
    )
    assert reply.choices[0].message.content
    assert not reply.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "options, param",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                }
            },
            "response_format",
        ),
        ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
        ({"extra_body": {"guided_grammar": "start: nowhere"}}, "guided_grammar"),
        ({"extra_body": {"grammar": 'root ::= "a" | undefined-rule'}}, "grammar"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice"),
        ({"extra_body": {"guided_regex": "[0-9]+", "guided_choice": ["a"]}}, "guided_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
    ],
)
def test_bad_schemas_and_grammars_are_400s_and_the_server_stays_healthy(server, client, options, param):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, "hi", max_tokens=5, **options)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert "\n" not in caught.value.body["message"]
    with server.client() as http:
        assert http.get("/health").status_code == 200
    reply = _chat(client, "Is it raining?", max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert reply.choices[0].message.content in ("yes", "no")  # and still serves constrained requests


EIGHT_SCHEMAS = [
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 9}},
        "required": ["n"],
    },
    {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}}, "required": ["colour"]},
    {
        "type": "object",
        "properties": {
            "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3}
        },
        "required": ["flags"],
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -99, "maximum": 99},
                    "y": {"type": "integer", "minimum": -99, "maximum": 99},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "required": ["point"],
    },
    {
        "type": "object",
        "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["p"],
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["code"],
    },
    {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}},
        "required": ["v"],
    },
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name"],
    },
]


def test_eight_concurrent_requests_with_eight_schemas_all_validate(server, client):
    """Eight different schemas decode in one batch, with bad requests arriving among them."""
    schemas = [dict(schema, additionalProperties=False) for schema in EIGHT_SCHEMAS]

    def ask(index: int):
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": f"s{index}", "schema": schemas[index]},
        }
        return _chat(client, "Answer in JSON.", response_format=response_format, max_tokens=60, seed=index)

    def ask_badly(index: int):
        with pytest.raises(openai.BadRequestError):
            _chat(client, "hi", max_tokens=5, extra_body={"guided_regex": f"[{index}-"})

    with ThreadPoolExecutor(10) as pool:
        replies = pool.map(ask, range(8))
        failures = [pool.submit(ask_badly, index) for index in range(2)]
        replies = list(replies)
        for failure in failures:
            failure.result()
    for reply, schema in zip(replies, schemas):
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    with server.client() as http:
        assert http.get("/health").status_code == 200

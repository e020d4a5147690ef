"""Constrained decoding on SmolLM2 through the engine: JSON mode, a strict nested schema, forced tool calls.

Each test runs its prompts as one batch (so different constraints share steps)
at temperature 0.8: a small model asked for JSON often writes prose around it,
and the constraint is what makes every reply parse and validate.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from constraint_support import JSON_PROMPTS, chat_prompt, run_batch

import ember
from ember.constraints import constraint_from_options
from ember.constraints.tool_calls import tool_plan
from ember.constraints.tool_prompt import prepare_tool_messages
from ember.engine.sequence import GenerationRequest
from ember.sampling import SamplingParams

pytestmark = pytest.mark.slow


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"type": "string", "enum": ["student", "teacher", "engineer", "artist"]},
        "skills": {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "minItems": 1,
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 25},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "height_m", "role", "skills", "address", "active"],
    "additionalProperties": False,
}

WEATHER_TOOLS = [
    {
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
    },
    {
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
    },
]


@pytest.fixture(scope="module")
def smollm2():
    return ember.load("smollm2")


def _params(seed: int, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, seed=seed, max_tokens=max_tokens)


def test_json_mode_parses_for_ten_varied_prompts(smollm2):
    """Every reply is a JSON object, also those a 135M model would go on with forever.

    With these seeds some replies repeat a key or a phrase until the budget runs out; the
    constraint knows the budget and closes the object on the last token ("length").
    """
    max_tokens = 128
    requests = [
        GenerationRequest(
            chat_prompt(smollm2, prompt, system="You answer with one short JSON object."),
            _params(seed, max_tokens),
            constraint=constraint_from_options(smollm2.tokenizer, json_object=True, max_tokens=max_tokens),
        )
        for seed, prompt in enumerate(JSON_PROMPTS)
    ]
    results = run_batch(smollm2.engine, requests)
    for request in requests:
        result = results[request.request_id]
        assert isinstance(json.loads(result.text), dict), result.text
        assert result.finish_reason in ("stop", "length")
        if result.finish_reason == "length":
            assert len(result.token_ids) == max_tokens


def test_json_mode_closes_within_small_budgets(smollm2):
    requests = [
        GenerationRequest(
            chat_prompt(smollm2, prompt),
            _params(seed, budget),
            constraint=constraint_from_options(smollm2.tokenizer, json_object=True, max_tokens=budget),
        )
        for seed, (prompt, budget) in enumerate(zip(JSON_PROMPTS, [4, 6, 8, 10, 12, 16, 20, 24, 32, 40]))
    ]
    results = run_batch(smollm2.engine, requests)
    reasons = set()
    for request in requests:
        result = results[request.request_id]
        assert isinstance(json.loads(result.text), dict), result.text
        assert len(result.token_ids) <= request.sampling_params.max_tokens
        reasons.add(result.finish_reason)
    assert "length" in reasons  # some were cut, and say so


def test_strict_nested_schema_validates_for_every_prompt(smollm2):
    prompts = ["Invent a person.", "Describe a teacher from Lyon.", "A young artist.", "Who built this?"]
    requests = [
        GenerationRequest(
            chat_prompt(smollm2, prompt),
            _params(seed, 200),
            constraint=constraint_from_options(smollm2.tokenizer, json_schema=PERSON_SCHEMA),
        )
        for seed, prompt in enumerate(prompts)
    ]
    results = run_batch(smollm2.engine, requests)
    for request in requests:
        result = results[request.request_id]
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), PERSON_SCHEMA)


def test_eight_schemas_at_once_each_validate(smollm2):
    schemas = [
        {
            "type": "object",
            "properties": {f"field_{index}": {"type": "integer", "minimum": index, "maximum": index + 10}},
            "required": [f"field_{index}"],
            "additionalProperties": False,
        }
        for index in range(8)
    ]
    requests = [
        GenerationRequest(
            chat_prompt(smollm2, "Give me a number."),
            _params(index, 40),
            constraint=constraint_from_options(smollm2.tokenizer, json_schema=schema),
        )
        for index, schema in enumerate(schemas)
    ]
    results = run_batch(smollm2.engine, requests)
    for request, schema in zip(requests, schemas):
        jsonschema.validate(json.loads(results[request.request_id].text), schema)


@pytest.mark.parametrize(
    "tool_choice, parallel",
    [("required", True), ({"type": "function", "function": {"name": "add"}}, False)],
)
def test_forced_tool_calls_parse_and_their_arguments_validate(smollm2, tool_choice, parallel):
    plan = tool_plan(WEATHER_TOOLS, tool_choice, parallel, chat_template=smollm2.tokenizer.chat_template)
    messages, variables = prepare_tool_messages(
        [{"role": "user", "content": "What is the weather in Oslo, and what is 2 plus 3?"}],
        plan,
        native=False,
    )
    from ember.chat_template import ChatTemplate

    prompt = smollm2.encode(ChatTemplate.for_tokenizer(smollm2.tokenizer).render(messages, **variables))
    kind, value = plan.forced_grammar()
    requests = [
        GenerationRequest(
            prompt, _params(seed, 120), constraint=constraint_from_options(smollm2.tokenizer, **{kind: value})
        )
        for seed in range(3)
    ]
    results = run_batch(smollm2.engine, requests)
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in WEATHER_TOOLS}
    for request in requests:
        result = results[request.request_id]
        assert result.finish_reason == "stop", result.text
        content, calls = plan.parse(result.text)
        assert calls and content is None
        for call in calls:
            assert call["type"] == "function" and call["id"].startswith("call_")
            if plan.forced_name:
                assert call["function"]["name"] == plan.forced_name
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])

"""The issue's checks through the Python API (`ember.load(...).generate/stream(..., json_schema=...)`).

On the story model (a tiny Llama whose 2,048-token vocabulary has no `{`: JSON
objects are refused with a clear error, other schemas validate) and on a tiny
RWKV model (byte-level vocabulary: everything, JSON objects included), each at
temperature 0.8 over several seeds.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from conftest import STORY_MODEL, TINY_RWKV

import ember
from ember.constraints import constraint_from_options
from ember.engine.sequence import GenerationRequest
from ember.errors import InvalidRequestError
from ember.sampling import SamplingParams

RECORD_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tag": {"type": "string", "enum": ["red", "green", "blue"]},
        "items": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["id", "tag", "items", "note"],
    "additionalProperties": False,
}
STORY_SCHEMA = {"type": "string", "minLength": 3, "maxLength": 12, "pattern": "^[a-z ]+$"}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe later"]
SEEDS = range(3)


@pytest.fixture(scope="module")
def story():
    return ember.load(STORY_MODEL)


@pytest.fixture(scope="module")
def rwkv():
    if not TINY_RWKV.exists():
        pytest.skip("no tiny RWKV models")
    return ember.load(TINY_RWKV / "tiny-rwkv-6v0-3m-Q5_0.bin")


def _text(model, prompt: str, seed: int, **options) -> str:
    return "".join(model.generate(prompt, temperature=0.8, seed=seed, max_tokens=60, **options))


def _finish(model, prompt: str, seed: int, max_tokens: int, **options) -> tuple[str, str | None]:
    outputs = list(model.stream(prompt, temperature=0.8, seed=seed, max_tokens=max_tokens, **options))
    return "".join(output.text for output in outputs), outputs[-1].finish_reason


@pytest.mark.parametrize("name", ["story", "rwkv"])
def test_regex_and_choice_are_honoured(request, name):
    model = request.getfixturevalue(name)
    for seed in SEEDS:
        assert re.fullmatch(REGEX, _text(model, "Once upon a time", seed, regex=REGEX))
        assert _text(model, "The answer is", seed, choice=CHOICES) in CHOICES


def test_story_model_follows_a_schema_it_can_spell_and_refuses_json_objects(story):
    for seed in SEEDS:
        jsonschema.validate(json.loads(_text(story, "Lily", seed, json_schema=STORY_SCHEMA)), STORY_SCHEMA)
    with pytest.raises(InvalidRequestError, match="cannot produce that JSON object"):
        story.generate("Lily", json=True)  # checked at the call, before anything is queued
    with pytest.raises(InvalidRequestError, match="cannot produce that JSON schema"):
        story.generate("Lily", json_schema=RECORD_SCHEMA)


def test_rwkv_follows_a_nested_schema(rwkv):
    for seed in SEEDS:
        text, reason = _finish(rwkv, "Hello", seed, 200, json_schema=RECORD_SCHEMA)
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), RECORD_SCHEMA)


def test_rwkv_json_mode_gives_objects(rwkv):
    """A reply that ends by itself is an object. (A cut one parses too once `ModelHandle.stream`
    passes its max_tokens to the constraint, as the server does; until then it may not.)"""
    ended = 0
    for seed in range(6):
        text, reason = _finish(rwkv, "Hello", seed, 80, json=True)
        assert reason in ("stop", "length")
        if reason == "stop":
            ended += 1
            assert isinstance(json.loads(text), dict), text
    assert ended


def test_rwkv_json_mode_with_its_budget_always_parses(rwkv):
    """With max_tokens known to the constraint (what the server passes), every reply parses."""
    for seed in range(6):
        constraint = constraint_from_options(rwkv.tokenizer, json_object=True, max_tokens=40)
        params = SamplingParams(temperature=0.8, seed=seed, max_tokens=40)
        request = GenerationRequest(rwkv.encode("Hello"), params, constraint=constraint)
        outputs = list(rwkv.engine.generate(request))
        text = "".join(output.text for output in outputs)
        assert isinstance(json.loads(text), dict), text
        assert outputs[-1].finish_reason in ("stop", "length")


def test_bad_constraints_are_one_line_errors_at_the_call(story):
    with pytest.raises(InvalidRequestError, match="invalid regex"):
        story.generate("Lily", regex="[a-")
    with pytest.raises(InvalidRequestError, match="at most one output constraint"):
        story.generate("Lily", regex="[a-z]+", choice=["a"])

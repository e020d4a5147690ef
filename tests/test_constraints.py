"""Constrained decoding through the engine on the story model, and the constraint objects themselves.

The story model's 2,048-token vocabulary has no `{` or `[`, so JSON objects are
refused up front for it; strings, numbers, regexes, grammars and choices work.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from conftest import STORY_MODEL, TINY_RWKV
from constraint_support import run_batch

import ember
from ember.constraints import (
    ConstraintViolationError,
    clear_compile_cache,
    compile_cache_size,
    constraint_from_options,
)
from ember.engine.sequence import GenerationRequest
from ember.errors import InvalidRequestError
from ember.sampling import SamplingParams

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to", "One day, a bird"]


@pytest.fixture(scope="module")
def story():
    return ember.load(STORY_MODEL)


def _request(story, prompt: str, constraint, **sampling) -> GenerationRequest:
    params = SamplingParams(**{"temperature": 0.8, "max_tokens": 40, **sampling})
    return GenerationRequest(story.encode(prompt), params, constraint=constraint)


def test_regex_is_matched_in_full_at_temperature(story):
    pattern = r"[0-9]{3}-[0-9]{2}( [a-z]{1,8})?"
    requests = [
        _request(story, prompt, constraint_from_options(story.tokenizer, regex=pattern), seed=seed)
        for seed, prompt in enumerate(PROMPTS)
    ]
    for result in run_batch(story.engine, requests).values():
        assert re.fullmatch(pattern, result.text), result.text
        assert result.finish_reason == "stop"


def test_choice_gives_exactly_one_of_the_options(story):
    options = ["happy", "sad", "a little sleepy"]
    requests = [
        _request(story, prompt, constraint_from_options(story.tokenizer, choice=options), seed=seed)
        for seed, prompt in enumerate(PROMPTS * 2)
    ]
    for result in run_batch(story.engine, requests).values():
        assert result.text in options
        assert result.finish_reason == "stop"


def test_schemas_the_vocabulary_can_spell_validate(story):
    schemas = [
        {"type": "string", "enum": ["red", "green", "blue"]},
        {"type": "integer", "minimum": 10, "maximum": 99},
        {"type": "string", "minLength": 3, "maxLength": 12, "pattern": "^[a-z ]+$"},
        {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
    ]
    requests = [
        _request(
            story,
            PROMPTS[index % 4],
            constraint_from_options(story.tokenizer, json_schema=schema),
            seed=index,
        )
        for index, schema in enumerate(schemas)
    ]
    results = run_batch(story.engine, requests)
    for request, schema in zip(requests, schemas):
        value = json.loads(results[request.request_id].text)
        jsonschema.validate(value, schema)


def test_batched_sequences_keep_their_own_constraints_beside_free_text(story):
    """Different constraints (and none) in one batch: each sequence obeys only its own."""
    kinds = [
        ("regex", r"[a-z]{2,6}!"),
        ("choice", ["one", "two"]),
        ("grammar", 'start: "The " NAME " ran."\nNAME: /[A-Z][a-z]+/'),
        ("json_schema", {"type": "integer", "minimum": 0, "maximum": 5}),
        (None, None),
    ]
    requests = []
    for index, (kind, value) in enumerate(kinds):
        constraint = constraint_from_options(story.tokenizer, **{kind: value}) if kind else None
        requests.append(_request(story, PROMPTS[index % 4], constraint, seed=index, max_tokens=30))
    finished = run_batch(story.engine, requests)
    results = [finished[r.request_id] for r in requests]
    assert re.fullmatch(r"[a-z]{2,6}!", results[0].text)
    assert results[1].text in ("one", "two")
    assert re.fullmatch(r"The [A-Z][a-z]+ ran\.", results[2].text)
    assert 0 <= json.loads(results[3].text) <= 5
    free = results[4]
    assert free.text and not re.fullmatch(r"[a-z]{2,6}!", free.text)


def test_greedy_and_penalties_work_with_a_constraint(story):
    pattern = r"(yes|no), [a-z]{1,10} [a-z]{1,10}\."
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "repetition_penalty": 1.3, "top_k": 5}):
        request = _request(
            story, PROMPTS[0], constraint_from_options(story.tokenizer, regex=pattern), **sampling
        )
        result = run_batch(story.engine, [request])[request.request_id]
        assert re.fullmatch(pattern, result.text), (sampling, result.text)
        assert result.finish_reason == "stop"


def test_max_tokens_cuts_a_constrained_reply_with_length(story):
    constraint = constraint_from_options(story.tokenizer, regex=r"[a-z ]{200}")
    request = _request(story, PROMPTS[1], constraint, max_tokens=6)
    result = run_batch(story.engine, [request])[request.request_id]
    assert result.finish_reason == "length"
    assert result.final.num_generated_tokens == 6
    assert re.fullmatch(r"[a-z ]+", result.text)


def test_stop_strings_still_stop_a_constrained_reply(story):
    constraint = constraint_from_options(story.tokenizer, regex=r"[a-z]{1,8}(, [a-z]{1,8}){8}")
    request = _request(story, PROMPTS[2], constraint, stop=[","], max_tokens=60)
    result = run_batch(story.engine, [request])[request.request_id]
    assert result.finish_reason == "stop"
    assert re.fullmatch(r"[a-z]{1,8}", result.text)


def test_a_grammar_the_vocabulary_cannot_begin_is_refused_up_front(story):
    with pytest.raises(InvalidRequestError, match="cannot produce that JSON object"):
        constraint_from_options(story.tokenizer, json_object=True)  # no "{" in this vocabulary


@pytest.mark.parametrize(
    "options, message",
    [
        ({"json_schema": {"type": "strin"}}, "invalid JSON schema: .*strin"),
        ({"json_schema": "{not json"}, "invalid JSON schema: not JSON"),
        ({"json_schema": {"type": "string", "format": "no-such-format"}}, "invalid JSON schema"),
        ({"json_schema": ["not", "an", "object"]}, "expected an object"),
        ({"regex": "[a-"}, "invalid regex: .*unclosed"),
        ({"regex": ""}, "regex must be a non-empty string"),
        ({"grammar": "start: missing_rule"}, "invalid grammar: .*missing_rule"),
        ({"grammar": "root ::= [unclosed"}, "invalid grammar"),
        ({"choice": []}, "choice must be a non-empty list"),
        ({"choice": ["a", 3]}, "non-empty strings"),
        ({"regex": "a", "choice": ["b"]}, "at most one output constraint"),
    ],
)
def test_bad_options_are_one_line_invalid_request_errors(story, options, message):
    size = compile_cache_size()
    with pytest.raises(InvalidRequestError, match=message) as caught:
        constraint_from_options(story.tokenizer, **options)
    assert "\n" not in str(caught.value)
    assert compile_cache_size() == size  # nothing bad is cached


def test_no_option_is_no_constraint(story):
    assert constraint_from_options(story.tokenizer) is None


def test_non_strict_schemas_ignore_keywords_the_engine_lacks(story):
    schema = {"type": "string", "format": "no-such-format", "maxLength": 8}
    assert constraint_from_options(story.tokenizer, json_schema=schema, strict=False) is not None


def test_each_distinct_grammar_is_compiled_once(story):
    clear_compile_cache()
    schema = {"type": "integer", "minimum": 1, "maximum": 9}
    first = constraint_from_options(story.tokenizer, json_schema=schema)
    again = constraint_from_options(story.tokenizer, json_schema=json.dumps(schema, indent=2))
    assert compile_cache_size() == 1
    assert first is not again  # each sequence gets its own state
    constraint_from_options(story.tokenizer, regex="[0-9]+")
    assert compile_cache_size() == 2


def test_mask_covers_padding_rows_and_follows_accepted_tokens(story):
    tokenizer = story.tokenizer
    constraint = constraint_from_options(tokenizer, choice=["yes", "no"])
    padded = tokenizer.vocab_size + 13  # a model may have more logit rows than tokens
    mask = constraint.allowed_token_mask(padded)
    assert mask.dtype == torch.bool and mask.shape == (padded,)
    assert not mask[tokenizer.vocab_size :].any()
    allowed_text = {tokenizer.decode([int(i)]) for i in torch.nonzero(mask)[:, 0]}
    assert allowed_text and all("yes".startswith(t) or "no".startswith(t) for t in allowed_text)
    no = next(int(i) for i in torch.nonzero(mask)[:, 0] if tokenizer.decode([int(i)]) == "no")
    assert not constraint.is_complete
    constraint.accept_token(no)
    assert constraint.is_accepting
    end = constraint.allowed_token_mask(padded)
    assert set(torch.nonzero(end)[:, 0].tolist()) <= set(tokenizer.eos_token_ids)


def test_a_batch_prepared_mask_is_the_mask_each_row_computes_alone(story):
    """`prepare_masks` (one llguidance call for the batch) changes no row's mask, at every position
    of different constraints; a row in error still raises its own error, and the others go on."""
    from ember.constraints.grammar_constraint import GrammarConstraint

    tokenizer = story.tokenizer
    padded = tokenizer.vocab_size + 5
    options = [{"regex": "[0-9]{2,6}"}, {"choice": ["happy", "a little sleepy"]}, {"regex": "[a-z ]{3,12}"}]
    alone = [constraint_from_options(tokenizer, **option) for option in options]
    batched = [constraint_from_options(tokenizer, **option) for option in options]
    generator = torch.Generator().manual_seed(0)
    compared = 0
    for _ in range(16):
        live = [row for row in range(len(options)) if not alone[row].is_complete]
        if not live:
            break
        GrammarConstraint.prepare_masks([batched[row] for row in live])
        for row in live:
            expected = alone[row].allowed_token_mask(padded)
            assert torch.equal(batched[row].allowed_token_mask(padded), expected)
            assert not expected[tokenizer.vocab_size :].any()
            allowed = torch.nonzero(expected)[:, 0]
            token_id = int(allowed[torch.randint(len(allowed), (1,), generator=generator)])
            alone[row].accept_token(token_id)
            batched[row].accept_token(token_id)
            compared += 1
    assert compared >= 3 * 3

    broken, fine = (constraint_from_options(tokenizer, regex="[0-9]+") for _ in range(2))
    letter = tokenizer.encode("hello", add_special_tokens=False)[0]
    with pytest.raises(ConstraintViolationError):
        broken.accept_token(letter)
    GrammarConstraint.prepare_masks([broken, fine])
    with pytest.raises(ConstraintViolationError, match="the regex constraint failed"):
        broken.allowed_token_mask(padded)
    digit = tokenizer.encode("7", add_special_tokens=False)[-1]
    assert fine.allowed_token_mask(padded)[digit]


def test_a_token_outside_the_mask_is_refused(story):
    constraint = constraint_from_options(story.tokenizer, regex="[0-9]+")
    letter = story.tokenizer.encode("hello", add_special_tokens=False)[0]
    assert not constraint.allowed_token_mask(story.tokenizer.vocab_size)[letter]
    with pytest.raises(ConstraintViolationError, match="breaks the regex constraint"):
        constraint.accept_token(letter)


def test_json_mode_numbers_are_bounded_like_llama_cpp_json_grammar():
    """JSON mode allows any object but not a 17-digit integer part (a small model's endless digits)."""
    from ember.loader import read_checkpoint, resolve_model_path

    tokenizer = read_checkpoint(resolve_model_path("smollm2")).tokenizer
    for text, allowed in [
        ('{"a": [1, -2.5e3, {"b": null}], "c": "x\\"y", "d": true}', True),
        ('{"n": 12345678901234567}', False),
    ]:
        constraint = constraint_from_options(tokenizer, json_object=True)
        try:
            for token_id in tokenizer.encode(text, add_special_tokens=False):
                constraint.accept_token(token_id)
            accepted = constraint.is_complete
        except ConstraintViolationError:
            accepted = False
        assert accepted == allowed, text
        if allowed:
            json.loads(text)


@pytest.mark.skipif(not TINY_RWKV.exists(), reason="no tiny RWKV models")
def test_rwkv_byte_vocabulary_follows_regex_choice_and_schema():
    rwkv = ember.load(TINY_RWKV / "tiny-rwkv-6v0-3m-Q5_0.bin")
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 99},
            "b": {"type": "string", "maxLength": 5},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    options = [{"regex": r"[0-9]{3}-[a-z]{2}"}, {"choice": ["alpha", "beta"]}, {"json_schema": schema}]
    requests = [
        GenerationRequest(
            rwkv.encode("Hello"),
            SamplingParams(temperature=0.8, seed=index, max_tokens=60),
            constraint=constraint_from_options(rwkv.tokenizer, **option),
        )
        for index, option in enumerate(options)
    ]
    finished = run_batch(rwkv.engine, requests)
    results = [finished[r.request_id] for r in requests]
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", results[0].text)
    assert results[1].text in ("alpha", "beta")
    jsonschema.validate(json.loads(results[2].text), schema)

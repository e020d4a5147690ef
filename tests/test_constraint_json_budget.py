"""JSON mode closes within max_tokens: the tracker's closing length, and random walks that must end parsed.

No model runs here: a seeded "sampler" draws uniformly among the tokens the
constraint allows (far wilder than any model), on SmolLM2's real tokenizer.
"""

from __future__ import annotations

import codecs
import json
import random

import numpy as np
import pytest

from ember.constraints import constraint_from_options
from ember.constraints.json_budget import DONE, LOST, START, advance, closing_length


def _valid_utf8_prefix(data: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data)
        return True
    except UnicodeDecodeError:
        return False


def _shortest_close(state, prefix: bytes) -> bytes:
    """Close greedily, one byte at a time, each byte lowering the closing length by one."""
    tail = b""
    while closing_length(state):
        length = closing_length(state)
        for byte in range(256):
            after = advance(state, byte)
            if (
                after[1] != LOST
                and closing_length(after) == length - 1
                and _valid_utf8_prefix(prefix + tail + bytes([byte]))
            ):
                state, tail = after, tail + bytes([byte])
                break
        else:
            raise AssertionError(f"no byte closes {prefix + tail!r}")
    assert state[1] == DONE
    return tail


def _random_value(rng: random.Random, depth: int):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([0, -1.5e3, 12, 3.25, 7e-2])
    if kind == 1:
        return rng.choice(["x", "é☃😀", 'a"b\\c\n', "\u0001z", ""])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return "s"
    if kind in (4, 5):
        return {f"k{index}é": _random_value(rng, depth + 1) for index in range(rng.randrange(3))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]


def test_closing_length_is_the_shortest_way_to_valid_json_from_every_prefix():
    rng = random.Random(7)
    for _ in range(60):
        value = {f"k{index}": _random_value(rng, 1) for index in range(rng.randrange(4))}
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()  # ", " and ": " as in JSON mode
        state = START
        for index, byte in enumerate(text):
            tail = _shortest_close(state, text[:index])
            assert len(tail) == closing_length(state)
            json.loads(text[:index] + tail)
            state = advance(state, byte)
        assert state[1] == DONE and closing_length(state) == 0


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from ember.loader import read_checkpoint, resolve_model_path

    return read_checkpoint(resolve_model_path("smollm2")).tokenizer


def _random_walk(tokenizer, max_tokens: int, seed: int) -> tuple[bytes, bool, int]:
    """Draw allowed tokens at random until the constraint completes or the budget is spent."""
    rng = np.random.default_rng(seed)
    constraint = constraint_from_options(tokenizer, json_object=True, max_tokens=max_tokens)
    token_ids: list[int] = []
    while len(token_ids) < max_tokens and not constraint._matcher.is_stopped():
        allowed = np.flatnonzero(constraint.allowed_token_mask(tokenizer.vocab_size).numpy())
        token_id = int(rng.choice(allowed))
        constraint.accept_token(token_id)
        token_ids.append(token_id)
    return tokenizer.decode(token_ids).encode(), constraint.is_complete, len(token_ids)


@pytest.mark.parametrize("max_tokens", [2, 3, 5, 9, 17, 40])
def test_random_json_mode_walks_close_exactly_within_their_budget(smollm2_tokenizer, max_tokens):
    for seed in range(4):
        text, complete, used = _random_walk(smollm2_tokenizer, max_tokens, seed)
        assert isinstance(json.loads(text), dict), text
        # Either it closed by itself (a "stop"), or the budget closed it on the last token,
        # and then it is not complete to the engine, which reports "length".
        assert complete == (used < max_tokens) or (complete and used == max_tokens), (text, used)


def test_a_one_token_budget_cannot_close_and_is_simply_cut(smollm2_tokenizer):
    text, complete, used = _random_walk(smollm2_tokenizer, 1, 0)
    assert used == 1 and not complete


def test_without_a_budget_json_mode_is_unchanged(smollm2_tokenizer):
    free = constraint_from_options(smollm2_tokenizer, json_object=True)
    bounded = constraint_from_options(smollm2_tokenizer, json_object=True, max_tokens=10_000)
    vocab = smollm2_tokenizer.vocab_size
    for token_id in smollm2_tokenizer.encode('{"a": [1, "xy', add_special_tokens=False):
        assert bool((free.allowed_token_mask(vocab) == bounded.allowed_token_mask(vocab)).all())
        free.accept_token(token_id)
        bounded.accept_token(token_id)

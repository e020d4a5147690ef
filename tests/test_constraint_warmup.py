"""warm_up: the once-per-model work of constrained decoding is done at load, and never breaks a load."""

from __future__ import annotations

from conftest import STORY_MODEL

from ember.constraints import (
    compile_cache_size,
    constraint_from_options,
    llguidance_tokenizer,
    tokenizer_bridge,
    warm_up,
)
from ember.constraints.json_budget import vocabulary_tables


def _tokenizer(path):
    from ember.loader import read_checkpoint, resolve_model_path

    return read_checkpoint(resolve_model_path(path)).tokenizer


def test_warm_up_builds_the_vocabulary_view_and_tables_a_first_request_reuses():
    tokenizer = _tokenizer("smollm2")
    assert tokenizer not in tokenizer_bridge._cache
    assert isinstance(warm_up(tokenizer), float)
    ll_tokenizer = tokenizer_bridge._cache[tokenizer]
    assert llguidance_tokenizer(tokenizer) is ll_tokenizer
    tables = vocabulary_tables(ll_tokenizer)
    assert vocabulary_tables(ll_tokenizer) is tables
    assert compile_cache_size() >= 1
    assert constraint_from_options(tokenizer, json_object=True, max_tokens=10) is not None


def test_warm_up_on_a_vocabulary_without_braces_still_succeeds():
    assert isinstance(warm_up(_tokenizer(STORY_MODEL)), float)  # JSON is refused per request instead


def test_warm_up_on_a_tokenizer_it_cannot_use_returns_none():
    class Opaque:
        eos_token_ids = [0]

    assert warm_up(Opaque()) is None

"""Phi-3 (fused q/k/v and gate/up weights, LongRoPE) against transformers float32."""

from __future__ import annotations

import pytest
import torch

import ember
from tests.models_support import (
    check_against_transformers,
    make_tiny_model,
    prefill_then_decode_logits,
    random_tokens,
    reference_logits,
    reference_model,
)

HEAD_DIM = 16  # hidden 64 / 4 heads


def _longrope(original: int) -> dict:
    generator = torch.Generator().manual_seed(5)
    short = (1.0 + torch.rand(HEAD_DIM // 2, generator=generator)).tolist()
    long = (1.0 + 4 * torch.rand(HEAD_DIM // 2, generator=generator)).tolist()
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long}


def _longrope_model(tmp_path, original: int, max_positions: int):
    """A tiny Phi-3 with LongRoPE: pretrained for `original` positions, stretched to `max_positions`."""
    return make_tiny_model(
        tmp_path,
        "Phi3Config",
        max_position_embeddings=max_positions,
        original_max_position_embeddings=original,
        rope_parameters=_longrope(original),
    )


def test_phi3_matches_transformers(tmp_path):
    folder = make_tiny_model(tmp_path, "Phi3Config")
    handle = ember.load(folder)
    assert handle.config.architecture == "phi3"
    check_against_transformers(folder, handle)


def test_phi3_sliding_window_matches_transformers(tmp_path):
    folder = make_tiny_model(tmp_path, "Phi3Config", sliding_window=8)
    handle = ember.load(folder)
    assert handle.config.sliding_window == 8
    check_against_transformers(folder, handle)


def test_phi3_longrope_short_context_matches_transformers(tmp_path):
    """Within the pretrained length: short factors and the attention factor, prefill and cached decode."""
    folder = _longrope_model(tmp_path, original=64, max_positions=256)
    handle = ember.load(folder)
    assert handle.config.rope_scaling["rope_type"] == "longrope"
    check_against_transformers(folder, handle)


@pytest.mark.parametrize("length", [24, 40])
def test_phi3_longrope_long_factors_past_the_original_length(tmp_path, length):
    """A forward call whose sequence passes `original_max_position_embeddings` (16) uses the long factors."""
    folder = _longrope_model(tmp_path, original=16, max_positions=128)
    tokens = random_tokens(length, seed=6)
    expected = reference_logits(reference_model(folder), tokens)
    ours = ember.load(folder).logits(tokens)
    assert (ours - expected).abs().max().item() < 1e-4


def _cached_reference_logits(reference, token_ids: list[int], prefill: int) -> torch.Tensor:
    """transformers' logits with its own cache: the prompt in one call, then one call per token
    (each call picks its LongRoPE factors from its own length, as `generate` does)."""
    with torch.no_grad():
        output = reference(torch.tensor([token_ids[:prefill]]), use_cache=True)
        rows, past = [output.logits[0]], output.past_key_values
        for position in range(prefill, len(token_ids)):
            output = reference(torch.tensor([[token_ids[position]]]), cache=past, use_cache=True)
            rows.append(output.logits[0])
            past = output.past_key_values
    return torch.cat(rows)


def test_phi3_longrope_cached_decode_across_the_original_length(tmp_path):
    """A prompt within `original_max_position_embeddings` (16), then cached decode to 40: the keys
    already in the cache keep their short-factor rotations, the calls past 16 rotate with the long
    factors, exactly as transformers' own cached decode does."""
    folder = _longrope_model(tmp_path, original=16, max_positions=128)
    tokens = random_tokens(40, seed=7)
    reference = reference_model(folder)
    expected = _cached_reference_logits(reference, tokens, prefill=10)
    uncached = reference_logits(reference, tokens)
    assert (expected[20:] - uncached[20:]).abs().max().item() > 1e-3  # the boundary changes the answer
    ours = prefill_then_decode_logits(ember.load(folder), tokens, prefill=10)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-4

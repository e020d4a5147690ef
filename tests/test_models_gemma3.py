"""Gemma 3 (text) with random weights against transformers float32: local and global layers with their own
rotary bases, (1 + w) pre/post norms, q/k norms, the query scale, scaled embedding, GELU gating,
soft-capping."""

from __future__ import annotations

import pytest

import ember
from tests.models_support import check_against_transformers, make_tiny_model

GEMMA = dict(
    head_dim=16,
    num_hidden_layers=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
    sliding_window=6,  # shorter than the test sequences
    query_pre_attn_scalar=24,  # not head_dim: the query scale matters
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    final_logit_softcapping=3.0,  # low enough to bend the random model's logits
)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gemma3_matches_transformers(tmp_path, tied):
    folder = make_tiny_model(tmp_path, "Gemma3TextConfig", tie_word_embeddings=tied, **GEMMA)
    handle = ember.load(folder)
    config = handle.config
    assert config.architecture == "gemma3"
    assert [config.is_sliding_layer(index) for index in range(4)] == [True, False, True, True]
    assert config.rope_local_theta == 10_000.0 and config.rope_scaling["factor"] == 2.0
    check_against_transformers(folder, handle)


def test_gemma3_default_pattern_and_no_softcap(tmp_path):
    """Layer types from the default pattern (every sixth layer global), no soft-capping, scalar = head_dim."""
    settings = dict(GEMMA, num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=16)
    settings.pop("final_logit_softcapping")
    folder = make_tiny_model(tmp_path, "Gemma3TextConfig", tie_word_embeddings=True, **settings)
    handle = ember.load(folder)
    assert [handle.config.is_sliding_layer(index) for index in range(6)] == [True] * 5 + [False]
    check_against_transformers(folder, handle)


def test_gemma3_native_decode_equals_the_pytorch_path(tmp_path):
    """Decode steps through the native fused operators give the PyTorch path's logits."""
    from tests.models_support import prefill_then_decode_logits, random_tokens

    folder = make_tiny_model(tmp_path, "Gemma3TextConfig", tie_word_embeddings=True, **GEMMA)
    handle = ember.load(folder)
    if handle.model._native_ops is None:
        pytest.skip("the native operators do not build here")
    tokens = random_tokens(30, seed=7)
    native = prefill_then_decode_logits(handle, tokens, prefill=10)
    handle.model._native_ops = None
    plain = prefill_then_decode_logits(handle, tokens, prefill=10)
    assert (native - plain).abs().max().item() < 1e-4  # float32 rounding (1.2e-5 with oneDNN for all rows)
    assert (native[:1] == plain[:1]).all()  # the prefill row takes the same path both times

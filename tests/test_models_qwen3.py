"""Qwen3 (q/k norms, no bias) against transformers float32: safetensors, tied and untied."""

from __future__ import annotations

import pytest
import torch

import ember
from tests.models_support import (
    check_against_transformers,
    make_tiny_model,
    prefill_then_decode_logits,
    random_tokens,
)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen3_matches_transformers(tmp_path, tied):
    # head_dim 32 with hidden 64 and 4 heads: Qwen3 sets head_dim apart from hidden / heads.
    folder = make_tiny_model(tmp_path, "Qwen3Config", head_dim=32, tie_word_embeddings=tied)
    handle = ember.load(folder)
    assert handle.config.architecture == "qwen3" and handle.config.head_dim == 32
    check_against_transformers(folder, handle)  # the one-call native decode too, where it builds


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_qwen3_one_native_call_norms_the_heads_like_the_per_layer_loop(tmp_path, quant):
    """The one-call native decode runs Qwen3's q/k norms in C (its projections' kernels are called
    from C, past the Python wrapper): its cached-decode logits equal the per-layer loop's, which
    runs the wrapper, within float32 rounding."""
    folder = make_tiny_model(tmp_path, "Qwen3Config", head_dim=32)
    handle = ember.load(folder, quant=quant)
    if handle.model.native_layers is None:
        pytest.skip("no native kernel for these projections here")
    tokens = random_tokens(30, seed=5)
    one_call = prefill_then_decode_logits(handle, tokens, prefill=6)
    handle.model.native_layers = None
    per_layer = prefill_then_decode_logits(handle, tokens, prefill=6)
    assert per_layer.std() > 0.1
    assert (one_call - per_layer).abs().max().item() < 1e-5


def test_qwen3_norms_matter(tmp_path):
    """The q/k norms really run: scaling their weights changes the logits."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_model(tmp_path, "Qwen3Config", head_dim=32)
    tokens = random_tokens(12, seed=3)
    before = ember.load(folder).logits(tokens)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.self_attn.q_norm.weight"] *= 2.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    after = ember.load(folder).logits(tokens)
    assert (before - after).abs().max() > 1e-3


def test_qwen3_missing_norm_is_a_load_error(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = make_tiny_model(tmp_path, "Qwen3Config", head_dim=32)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.k_norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ember.errors.ModelLoadError, match="k_norm"):
        ember.load(folder)


def test_qwen3_logits_through_the_public_api(tmp_path):
    folder = make_tiny_model(tmp_path, "Qwen3Config", head_dim=32)
    tokens = random_tokens(20, seed=4)
    from tests.models_support import reference_logits, reference_model

    expected = reference_logits(reference_model(folder), tokens)
    assert torch.allclose(ember.load(folder).logits(tokens), expected, atol=1e-4)

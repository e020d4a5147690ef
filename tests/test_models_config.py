"""ModelConfig for the architectures beyond Llama: what each config.json turns into, and one-line errors for
the variants ember does not run."""

from __future__ import annotations

import pytest

from ember.config import ModelConfig
from ember.errors import ModelLoadError, UnsupportedArchitectureError

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)


def test_qwen3_drops_its_disabled_sliding_window():
    config = ModelConfig.from_hf_dict(
        dict(BASE, model_type="qwen3", head_dim=32, sliding_window=4096, use_sliding_window=False)
    )
    assert (config.architecture, config.head_dim, config.sliding_window) == ("qwen3", 32, None)


def test_gemma3_text_fields():
    config = ModelConfig.from_hf_dict(
        dict(
            BASE,
            model_type="gemma3_text",
            num_hidden_layers=7,
            sliding_window=512,
            rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            query_pre_attn_scalar=256,
        )
    )
    assert config.architecture == "gemma3" and config.tie_word_embeddings
    assert [config.is_sliding_layer(index) for index in range(7)] == [True] * 5 + [False, True]
    assert (config.rope_theta, config.rope_local_theta) == (1_000_000.0, 10_000.0)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0}


def test_qwen3_moe_fields():
    config = ModelConfig.from_hf_dict(
        dict(
            BASE,
            model_type="qwen3_moe",
            num_hidden_layers=4,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
        )
    )
    assert [config.is_moe_layer(index) for index in range(4)] == [False, True, False, False]


@pytest.mark.parametrize(
    "raw, error, message",
    [
        (dict(model_type="gemma3", text_config={}), UnsupportedArchitectureError, "multimodal"),
        (
            dict(model_type="llama", rope_scaling={"rope_type": "longrope", "short_factor": [1.0]}),
            ModelLoadError,
            "longrope.*llama",
        ),
        (dict(model_type="phi3", partial_rotary_factor=0.75), ModelLoadError, "partial rotary"),
        (dict(model_type="gemma3_text", attn_logit_softcapping=50.0), ModelLoadError, "soft-capping"),
        (dict(model_type="gemma3_text", hidden_activation="relu"), ModelLoadError, "activation"),
        (dict(model_type="gemma3_text", layer_types=["full_attention"]), ModelLoadError, "layer_types"),
        (
            dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=0, moe_intermediate_size=8),
            ModelLoadError,
            "num_experts_per_tok",
        ),
        (
            dict(model_type="phi3", rope_scaling={"type": "su", "short_factor": [1.0]}),
            ModelLoadError,
            "long_factor",
        ),
    ],
    ids=[
        "gemma3-multimodal",
        "longrope-llama",
        "partial-rotary",
        "attn-softcap",
        "activation",
        "layer-types",
        "top-k",
        "longrope-factors",
    ],
)
def test_unsupported_variants_are_one_line_errors(raw, error, message):
    with pytest.raises(error, match=message) as caught:
        ModelConfig.from_hf_dict(dict(BASE, **raw))
    assert "\n" not in str(caught.value)

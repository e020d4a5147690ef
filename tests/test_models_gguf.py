"""Qwen3, Phi-3, Qwen3-MoE and Gemma 3 from GGUF files (llama.cpp's names and layouts, float32 weights)
against transformers float32 on the safetensors checkpoint they were written from."""

from __future__ import annotations

import pytest
import torch

import ember
from tests.models_gguf_support import write_gguf
from tests.models_support import check_against_transformers, make_tiny_model
from tests.test_models_gemma3 import GEMMA
from tests.test_models_phi3 import _longrope
from tests.test_models_qwen3_moe import MOE

CASES = {
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "phi3": ("Phi3Config", dict(sliding_window=8)),
    "qwen3moe": ("Qwen3MoeConfig", dict(MOE, norm_topk_prob=True)),  # llama.cpp always renormalizes
    # llama.cpp's fixed Gemma 3 rules: every sixth layer global, query scale 1/sqrt(head_dim), local base 1e4
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            GEMMA,
            num_hidden_layers=6,
            layer_types=None,
            query_pre_attn_scalar=16,
            final_logit_softcapping=None,
        ),
    ),
}


@pytest.mark.parametrize("architecture", list(CASES))
def test_gguf_matches_transformers(tmp_path, architecture):
    config_class, settings = CASES[architecture]
    folder = make_tiny_model(tmp_path / "hf", config_class, **settings)
    path = write_gguf(folder, architecture, tmp_path / f"{architecture}.gguf")
    handle = ember.load(path)
    assert handle.info.format == "gguf" and handle.info.quant == "none"
    check_against_transformers(folder, handle)


def test_phi3_longrope_gguf_matches_transformers(tmp_path):
    """LongRoPE as llama.cpp stores it: rope_factors_short/long tensors and the original context length."""
    rope = _longrope(64)
    folder = make_tiny_model(
        tmp_path / "hf",
        "Phi3Config",
        max_position_embeddings=256,
        original_max_position_embeddings=64,
        rope_parameters=rope,
    )
    factors = {
        "rope_factors_short.weight": torch.tensor(rope["short_factor"]),
        "rope_factors_long.weight": torch.tensor(rope["long_factor"]),
    }
    path = write_gguf(
        folder,
        "phi3",
        tmp_path / "phi3.gguf",
        extra_metadata={"phi3.rope.scaling.original_context_length": 64},
        extra_tensors=factors,
    )
    handle = ember.load(path)
    assert handle.config.rope_scaling["rope_type"] == "longrope"
    check_against_transformers(folder, handle)

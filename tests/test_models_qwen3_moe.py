"""Qwen3-MoE (router top-k over expert MLPs, dense layers between) against transformers float32."""

from __future__ import annotations

import pytest

import ember
from tests.models_support import check_against_transformers, make_tiny_model

MOE = dict(
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    intermediate_size=96,
    num_hidden_layers=3,
)


@pytest.mark.parametrize(
    "settings",
    [
        dict(norm_topk_prob=True),
        # the middle layer dense, top-k weights left unnormalized, tied output
        dict(norm_topk_prob=False, mlp_only_layers=[1], tie_word_embeddings=True),
    ],
    ids=["normalized", "dense-layer"],
)
def test_qwen3_moe_matches_transformers(tmp_path, settings):
    folder = make_tiny_model(tmp_path, "Qwen3MoeConfig", **{**MOE, **settings})
    handle = ember.load(folder)
    assert handle.config.architecture == "qwen3_moe" and handle.config.num_experts == 8
    dense = [index for index in range(3) if not handle.config.is_moe_layer(index)]
    assert dense == settings.get("mlp_only_layers", [])
    check_against_transformers(folder, handle)


def test_qwen3_moe_bad_top_k_is_a_load_error(tmp_path):
    folder = make_tiny_model(tmp_path, "Qwen3MoeConfig", **MOE)
    config = (
        (folder / "config.json").read_text().replace('"num_experts_per_tok": 2', '"num_experts_per_tok": 9')
    )
    (folder / "config.json").write_text(config)
    with pytest.raises(ember.errors.ModelLoadError, match="num_experts_per_tok"):
        ember.load(folder)

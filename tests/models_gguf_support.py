"""Tiny GGUF files written from tiny HF checkpoints the way llama.cpp's converter names and lays them out.

`write_gguf` reads a folder from `models_support.make_tiny_model` and writes the
same weights (float32) under llama.cpp's tensor names and metadata keys for
qwen3, phi3, qwen3moe and gemma3, with a plain SentencePiece-style vocabulary
of the same size, so ember's GGUF path can be compared with transformers on
the safetensors original.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

_COMMON = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_OVERRIDES = {
    "gemma3": {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    },
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
    "qwen3moe": {"mlp.gate": "ffn_gate_inp"},
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def _stack_experts(weights: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Per-expert HF tensors -> llama.cpp's stacked (experts, out, in) `ffn_{gate,up,down}_exps`."""
    stacked = {}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        names = sorted({name for name in weights if name.startswith(prefix)})
        if not names:
            continue
        count = 1 + max(int(name[len(prefix) :].split(".")[0]) for name in names)
        for part in ("gate", "up", "down"):
            experts = [weights.pop(f"{prefix}{expert}.{part}_proj.weight") for expert in range(count)]
            stacked[f"blk.{layer}.ffn_{part}_exps.weight"] = torch.stack(experts)
    return stacked


def write_gguf(
    folder: Path,
    architecture: str,
    path: Path,
    extra_metadata: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """`folder`'s weights as a GGUF of llama.cpp `architecture` (qwen3, phi3, qwen3moe, gemma3) at `path`."""
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    num_layers = config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if architecture == "qwen3moe":
        writer.add_expert_count(config["num_local_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    for key, value in (extra_metadata or {}).items():
        writer.add_uint32(key, value)

    vocab = config["vocab_size"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{index}" for index in range(3, vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    tensors = {**(extra_tensors or {}), **_stack_experts(weights, num_layers)}
    names = {**_COMMON, **_OVERRIDES.get(architecture, {})}
    for name, value in weights.items():
        if architecture == "gemma3" and name.endswith("norm.weight"):
            value = value + 1.0  # llama.cpp stores Gemma's (1 + w)
        if name in _TOP:
            tensors[_TOP[name]] = value
        elif name == "lm_head.weight":
            tensors["output.weight"] = value
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            tensors[f"blk.{layer}.{names[module]}.{kind}"] = value
    for name, value in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(value.float().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

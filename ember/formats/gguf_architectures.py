"""What differs per architecture between a GGUF file and the HF layout the models read.

`gguf.py` reads every file the same way; this file holds the per-architecture
parts: llama.cpp's architecture names, the tensor names that mean something
else in one family (Gemma's `ffn_norm` is the pre-feedforward norm), the
config fields only some metadata carries (experts, layer kinds, LongRoPE),
and the tensor transformations llama.cpp's converter applied (Gemma's norms
stored as 1 + w, experts stacked into 3-D tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ember.errors import ModelLoadError
from ember.quant.ggml_blocks import BlockQuantizedTensor

# llama.cpp's `general.architecture` -> ember's architecture name.
GGUF_ARCHITECTURES = {
    "llama": "llama",  # llama.cpp writes Mistral and SmolLM files as "llama"
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "phi3": "phi3",
    "gemma3": "gemma3",
}

# Per-layer tensor roles every architecture shares.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# ... and the roles one family names differently, or only it has.
LAYER_NAME_OVERRIDES = {
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # fused, as in HF's Phi-3
    "qwen3moe": {
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_exps": "mlp.experts.gate_proj",  # (experts, width, hidden): split per expert below
        "ffn_up_exps": "mlp.experts.up_proj",
        "ffn_down_exps": "mlp.experts.down_proj",
    },
}
# Tensors outside the layers that are settings rather than weights: read into the config.
PHI3_ROPE_FACTORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}


def layer_names(architecture: str) -> dict[str, str]:
    return {**LAYER_NAMES, **LAYER_NAME_OVERRIDES.get(architecture, {})}


def architecture_fields(
    architecture: str,
    optional: Callable[[str, Any], Any],
    settings: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """ModelConfig fields only this architecture's metadata carries; `optional(key, default)` reads
    `{architecture}.{key}`, `settings` are the setting tensors (Phi-3's rope factors). A "rope_scaling"
    returned here replaces the one read from the generic rope keys."""
    if architecture == "qwen3moe":
        return {
            "num_experts": optional("expert_count", 0),
            "num_experts_per_token": optional("expert_used_count", 0),
            "moe_intermediate_size": optional("expert_feed_forward_length", None),
            "normalize_top_k": True,  # llama.cpp always renormalizes Qwen3-MoE's top-k weights
        }
    if architecture == "gemma3":
        num_layers, head_dim = optional("block_count", 0), optional("attention.key_length", None)
        pattern = optional("attention.sliding_window_pattern", 6)  # llama.cpp's fixed Gemma 3 pattern
        if isinstance(pattern, list):  # newer files list each layer: True where it slides
            layer_types = ["sliding_attention" if sliding else "full_attention" for sliding in pattern]
        else:
            kinds = ("full_attention", "sliding_attention")
            layer_types = [kinds[bool((index + 1) % pattern)] for index in range(num_layers)]
        # llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B (62 layers), which scales by hidden / heads
        scalar = head_dim
        if num_layers == 62:
            scalar = optional("embedding_length", 0) // optional("attention.head_count", 1)
        return {
            "layer_types": layer_types,
            "rope_local_theta": 10_000.0,  # llama.cpp's fixed local base for Gemma 3
            "query_pre_attn_scalar": float(scalar) if scalar else None,
            "final_logit_softcapping": optional("final_logit_softcapping", None),
        }
    if architecture == "phi3" and settings:
        if set(settings) != set(PHI3_ROPE_FACTORS.values()):
            raise ModelLoadError("a Phi-3 GGUF file needs both rope_factors_short and rope_factors_long")
        scaling = {
            "rope_type": "longrope",
            **{name: values.float().reshape(-1).tolist() for name, values in settings.items()},
            "original_max_position_embeddings": optional("rope.scaling.original_context_length", None)
            or optional("context_length", 4096),
        }
        attention_factor = optional("rope.scaling.attn_factor", None)
        if attention_factor is not None:
            scaling["attention_factor"] = float(str(np.float32(attention_factor)))
        return {"rope_scaling": scaling}
    return {}


def transform_tensors(architecture: str, tensors: dict[str, Any], num_experts: int) -> dict[str, Any]:
    """Undo the converter's changes so tensors hold HF's values: Gemma norms were stored as 1 + w,
    Qwen3-MoE experts stacked as (experts, out, in)."""
    if architecture == "gemma3":
        for name in list(tensors):
            if name.endswith("norm.weight"):
                tensors[name] = tensors[name].float() - 1.0
    if architecture == "qwen3moe":
        for name in [name for name in tensors if ".mlp.experts." in name]:
            stacked = tensors.pop(name)
            if len(stacked.shape) != 3 or stacked.shape[0] != num_experts:
                shape = tuple(stacked.shape)
                raise ModelLoadError(f"tensor {name} has shape {shape}; expected {num_experts} experts")
            prefix, part = name.rsplit(".experts.", 1)
            for expert, weight in enumerate(_per_expert(stacked)):
                tensors[f"{prefix}.experts.{expert}.{part}"] = weight
    return tensors


def _per_expert(stacked: Any) -> list[Any]:
    """A 3-D (experts, out, in) float or block tensor as one 2-D weight per expert (views, no copy)."""
    if isinstance(stacked, torch.Tensor):
        return list(stacked.unbind(0))
    experts, rows, columns = stacked.shape
    return [
        BlockQuantizedTensor(
            name=f"{stacked.name}[{expert}]",
            quant_type=stacked.quant_type,
            shape=(rows, columns),
            data=stacked.data[expert * rows : (expert + 1) * rows],
        )
        for expert in range(experts)
    ]

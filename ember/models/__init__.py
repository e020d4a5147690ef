"""Model architectures, found by the config's architecture name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ember.errors import UnsupportedArchitectureError
from ember.formats.checkpoint import Checkpoint
from ember.models.gemma3 import Gemma3Model
from ember.models.llama import LlamaModel
from ember.models.phi3 import Phi3Model
from ember.models.qwen3 import Qwen3Model
from ember.models.qwen3_moe import Qwen3MoeModel
from ember.models.rwkv import RWKVModel

# architecture -> model class; RWKV joins here as "rwkv".
MODEL_CLASSES: dict[str, type] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
    "qwen3": Qwen3Model,
    "phi3": Phi3Model,
    "qwen3_moe": Qwen3MoeModel,
    "gemma3": Gemma3Model,
    "rwkv": RWKVModel,
}


def build_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    quant: str,
    device: torch.device,
    on_layer_built: Callable[[int, int], None] | None = None,
    decode_graphs: bool = True,
) -> Any:
    from ember.native_build import cpu_multiplies_bfloat16
    from ember.quant.linear import make_linear

    model_class = MODEL_CLASSES.get(checkpoint.config.architecture)
    if model_class is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {checkpoint.config.architecture!r}; "
            f"ember supports: {', '.join(MODEL_CLASSES)}"
        )

    # Low-bit layers expand their weight for many-row products (prefill); bfloat16 halves that
    # traffic and doubles oneDNN's speed where the CPU multiplies bfloat16 itself, and their decode
    # kernels round activations at least as coarsely. Without bfloat16 hardware float32 is both
    # faster and exact. Exact float weights ("none") keep the model dtype.
    expand_dtype = dtype
    if quant != "none" and device.type == "cpu" and cpu_multiplies_bfloat16():
        expand_dtype = torch.bfloat16

    # a family whose quantized files are held to a reference made without 8-bit activations says so
    rounded = None if getattr(model_class, "rounds_activations", True) else False

    def linear_factory(weights: list[Any], biases: list[torch.Tensor] | None) -> Any:
        return make_linear(
            weights, biases, quant=quant, dtype=expand_dtype, device=device, rounded_activations=rounded
        )

    return model_class(
        checkpoint.config,
        checkpoint.tensors,
        linear_factory,
        dtype=dtype,
        device=device,
        on_layer_built=on_layer_built,
        decode_graphs=decode_graphs,
    )

"""Phi-3: the Llama decoder with fused q/k/v and gate/up weights in the file, and LongRoPE scaling.

The math of a layer is Llama's, so `Phi3Model` is a `LlamaModel` that splits
the checkpoint's `qkv_proj` and `gate_up_proj` into Llama's names (rows of
float or block-quantized weights; the Llama build fuses them again) and, for
LongRoPE, overrides how rotations are made:

- inverse frequencies divided per pair by `short_factor` while a forward call's
  longest sequence is within `original_max_position_embeddings`, by
  `long_factor` beyond it (as transformers decides, per call);
- cos and sin multiplied by the attention factor sqrt(1 + ln(factor) /
  ln(original)), which scales both q and k.

The native decode paths take the rotations as given (cos, sin), so they stay
on; the CUDA graph path computes its own unscaled rotations and is turned off
for LongRoPE models.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ember import ops
from ember.config import ModelConfig
from ember.errors import ModelLoadError
from ember.models.batch import ForwardBatch
from ember.models.llama import LinearFactory, LlamaModel, Weight

# The fused names in Phi-3 checkpoints -> Llama's, with each part's share of the rows.
_FUSED = {"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")}


def split_rows(weight: Weight, sizes: list[int]) -> list[Weight]:
    """Consecutive row ranges of a float or block-quantized (out, in) weight; blocks run along rows."""
    if sum(sizes) != weight.shape[0]:
        raise ModelLoadError(f"cannot split {weight.shape[0]} rows into {sizes}")
    if isinstance(weight, torch.Tensor):
        return list(weight.split(sizes, dim=0))
    parts, start = [], 0
    for size in sizes:
        data = weight.data[start : start + size]
        parts.append(dataclasses.replace(weight, data=data, shape=(size, *weight.shape[1:])))
        start += size
    return parts


def unfuse_phi3_tensors(config: ModelConfig, tensors: dict[str, Weight]) -> dict[str, Weight]:
    """Phi-3's fused `qkv_proj` / `gate_up_proj` as Llama's separate q, k, v, gate and up weights."""
    query, key_value = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    sizes = {
        "self_attn.qkv_proj": [query, key_value, key_value],
        "mlp.gate_up_proj": [config.intermediate_size] * 2,
    }
    renamed = dict(tensors)
    for index in range(config.num_layers):
        prefix = f"model.layers.{index}."
        for fused, parts in _FUSED.items():
            name = prefix + fused + ".weight"
            if name not in renamed:
                raise ModelLoadError(f"the checkpoint lacks tensor {name}")
            weight = renamed.pop(name)
            if tuple(weight.shape) != (sum(sizes[fused]), config.hidden_size):
                raise ModelLoadError(
                    f"tensor {name} has shape {tuple(weight.shape)}; "
                    f"the config implies ({sum(sizes[fused])}, {config.hidden_size})"
                )
            module = fused.split(".")[0]
            for part, piece in zip(parts, split_rows(weight, sizes[fused])):
                renamed[f"{prefix}{module}.{part}_proj.weight"] = piece
    return renamed


class Phi3Model(LlamaModel):
    """`LlamaModel` over Phi-3's unfused weights, with LongRoPE rotations when the config asks."""

    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, Weight],
        linear_factory: LinearFactory,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        on_layer_built: Callable[[int, int], None] | None = None,
        decode_graphs: bool = True,
    ):
        scaling = config.rope_scaling or {}
        self._longrope = scaling.get("rope_type") == "longrope"
        tensors = unfuse_phi3_tensors(config, tensors)
        # CUDA graphs compute plain rotations from `inverse_frequencies`: not LongRoPE's.
        super().__init__(
            config,
            tensors,
            linear_factory,
            dtype,
            device,
            on_layer_built,
            decode_graphs and not self._longrope,
        )
        if self._longrope:
            self._original_length = int(scaling["original_max_position_embeddings"])
            self._short_frequencies = self._scaled_frequencies(scaling["short_factor"], "short_factor")
            self._long_frequencies = self._scaled_frequencies(scaling["long_factor"], "long_factor")
            factor = scaling.get("factor") or config.max_position_embeddings / self._original_length
            attention_factor = scaling.get("attention_factor")
            if attention_factor is None:
                attention_factor = (
                    1.0
                    if factor <= 1.0
                    else math.sqrt(1 + math.log(factor) / math.log(self._original_length))
                )
            self._attention_factor = float(attention_factor)

    def _scaled_frequencies(self, factors: list[float], name: str) -> torch.Tensor:
        head_dim = self.config.head_dim
        if len(factors) != head_dim // 2:
            raise ModelLoadError(
                f"longrope {name} has {len(factors)} values; head_dim {head_dim} needs {head_dim // 2}"
            )
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inverse = 1.0 / (torch.tensor(factors, dtype=torch.float32) * self.config.rope_theta**exponents)
        return inverse.to(self.device)  # (head_dim / 2,)

    def _rope_rotations(self, batch: ForwardBatch) -> torch.Tensor:
        if not self._longrope:
            return super()._rope_rotations(batch)
        long = batch.num_keys > self._original_length  # transformers: max(position_ids) + 1 of the call
        frequencies = self._long_frequencies if long else self._short_frequencies
        return ops.rope_rotations(frequencies, batch.positions) * self._attention_factor

"""Linear layers over float, 8-bit and 4-bit weights, all called as `layer(x)`.

Every layer maps `x (..., in_features)` to `(..., out_features)` in x's dtype and
exposes `in_features`, `out_features`, `nbytes` (resident weight bytes) and
`dequantized_weight()` (float32, for tests). Which kernel runs depends on the
number of rows (tokens) in x, because the best one differs (measured on Zen 5
cores with PyTorch 2.13):

- few rows (decode): memory-bound; low-bit kernels read 2-8x fewer bytes than
  bfloat16. 8-bit: the native AVX-512 VNNI kernel (`native_int8`, GGUF's Q8_0
  layout). 4-bit: the native AVX-512 kernel (`native_int4`) when it builds, else
  PyTorch's `_weight_int4pack_mm_for_cpu`, which is only fast with bfloat16
  activations (float32 takes a scalar path 40x slower).
- many rows (prefill): compute-bound; the weight is dequantized to `dtype`
  for one oneDNN matrix product, 2-3x faster than the int kernels (the model
  factory asks for bfloat16 only where the CPU multiplies it in hardware:
  emulated, it is ~90x slower than float32 and rounds every output).
  Float32 products go through oneDNN too: MKL's sgemm takes a slow path on
  AMD CPUs (half of oneDNN's speed here).
- no AVX-512 (the tile kernels do not build): Q8_0 and Q4_x blocks, and float
  weights asked to be int8 or int4 (rounded to Q8_0 or Q4_1 blocks), run on
  the GGML block kernels (AVX2 or portable), as small as the tiles would be.

GGUF Q8_0, Q4_0 and Q4_1 blocks repack straight into these layouts (no float
pass, no rounding); Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1 run from their own bytes on
the GGML block kernels (`GGMLLinear`); only types without a kernel are
dequantized first (`BlockQuantizedTensor.dequantize`). `make_linear` holds the
policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from ember.errors import ModelLoadError
from ember.quant import native_int4, native_int8
from ember.quant.float_linear import FloatLinear, Linear
from ember.quant.ggml_blocks import BlockQuantizedTensor
from ember.quant.ggml_linear import GGML_KERNEL_TYPES, ConcatLinear, GGMLLinear
from ember.quant.int4_linear import (
    NATIVE_BATCH_ROWS,
    SMALL_BATCH_ROWS,
    Int4Linear,
    _block_fields,
    q4_1_blocks,
)
from ember.quant.q8_linear import NATIVE_INT8_BATCH_ROWS, Q8Linear, _q8_0_fields, q8_0_blocks

QUANT_MODES = ("none", "int8", "int4")

WeightSource = torch.Tensor | BlockQuantizedTensor

__all__ = [
    "NATIVE_BATCH_ROWS",
    "NATIVE_INT8_BATCH_ROWS",
    "QUANT_MODES",
    "SMALL_BATCH_ROWS",
    "FloatLinear",
    "Int4Linear",
    "Linear",
    "Q8Linear",
    "_block_fields",
    "concat_linear_weights",
    "make_linear",
]


def concat_linear_weights(weights: Sequence[WeightSource]) -> WeightSource:
    """Stack weights along out_features (fused q/k/v, gate/up).

    Block tensors of one type concatenate their rows of blocks exactly; mixed
    types or mixed float/blocks are dequantized to float32 first.
    """
    if len(weights) == 1:
        return weights[0]
    in_features = {weight.shape[1] for weight in weights}
    if len(in_features) != 1:
        raise ModelLoadError(f"cannot fuse weights with different in_features: {sorted(in_features)}")
    if all(isinstance(weight, BlockQuantizedTensor) for weight in weights):
        types = {weight.quant_type for weight in weights}
        if len(types) == 1:
            return BlockQuantizedTensor(
                name="+".join(weight.name for weight in weights),
                quant_type=types.pop(),
                shape=(sum(weight.shape[0] for weight in weights), weights[0].shape[1]),
                data=np.concatenate([np.asarray(weight.data) for weight in weights], axis=0),
            )
    floats = [
        weight.dequantize() if isinstance(weight, BlockQuantizedTensor) else weight.float()
        for weight in weights
    ]
    return torch.cat(floats, dim=0)


def _concat_biases(biases: Sequence[torch.Tensor | None], sizes: Sequence[int]) -> torch.Tensor | None:
    if all(bias is None for bias in biases):
        return None
    return torch.cat(
        [torch.zeros(size) if bias is None else bias.float() for bias, size in zip(biases, sizes)]
    )


def make_linear(
    weight: WeightSource | Sequence[WeightSource],
    bias: torch.Tensor | None | Sequence[torch.Tensor | None] = None,
    quant: str = "none",
    dtype: torch.dtype = torch.float32,
    group_size: int = 32,
    device: torch.device | str = "cpu",
    rounded_activations: bool | None = None,
) -> Linear:
    """Build the layer for a weight (or a list of weights, fused along out_features).

    `rounded_activations`: for GGML block layers, whether decode products may round the activations to
    8 bits (None: where that is the fast form, on AVX2; False: float32 activations; see GGMLLinear).

    quant "none" keeps the exact (dequantized) float weight in `dtype`; "int8" and
    "int4" keep low-bit weights and use `dtype` for the dequantized weight that
    serves many rows at once. Block tensors never lose precision they have:

    | weight                         | "none"       | "int8"             | "int4"            |
    |--------------------------------|--------------|--------------------|-------------------|
    | GGUF Q8_0 blocks               | float, exact | Q8Linear, exact    | Q8Linear, exact   |
    | GGUF Q4_0 / Q4_1 blocks        | float, exact | Int4Linear, exact  | Int4Linear, exact |
    | either, no AVX-512 tile kernel | float, exact | GGMLLinear, exact  | GGMLLinear, exact |
    | GGUF Q4_K/Q5_K/Q6_K/Q5_0/Q5_1  | float, exact | GGMLLinear, exact  | GGMLLinear, exact |
    | float, or other block types    | float        | Q8Linear (rounded) | Int4Linear (rounded) |

    Q8_0 under "int4" stays 8-bit: 4-bit rounding of an 8-bit weight moved
    SmolLM2's logits by ~9%. Q4 under "int8" stays 4-bit: its values are exact
    in the 4-bit layout, so 8 bits would double the bytes read for nothing.
    """
    if quant not in QUANT_MODES:
        raise ModelLoadError(f"unknown quantization {quant!r}; expected one of {', '.join(QUANT_MODES)}")
    device = torch.device(device)
    if isinstance(weight, (list, tuple)) and quant != "none" and _mixed_block_types(weight, device):
        # parts of different GGML types (Gemma 3's Q5_0 q and k, Q8_0 v): each kept as stored, side by side
        biases = bias if isinstance(bias, (list, tuple)) else [bias] + [None] * (len(weight) - 1)
        parts = [
            make_linear(part, None, quant, dtype, group_size, device, rounded_activations) for part in weight
        ]
        return ConcatLinear(parts, _concat_biases(biases, [part.shape[0] for part in weight]))
    if isinstance(weight, (list, tuple)):
        sizes = [part.shape[0] for part in weight]
        biases = bias if isinstance(bias, (list, tuple)) else [bias] + [None] * (len(weight) - 1)
        weight, bias = concat_linear_weights(weight), _concat_biases(biases, sizes)
    if bias is not None:
        bias = bias.to(device)
    if len(weight.shape) != 2:
        raise ModelLoadError(f"a linear weight must be 2-D, got shape {tuple(weight.shape)}")
    if quant != "none" and isinstance(weight, BlockQuantizedTensor):
        stored = _stored_form(weight, bias, dtype, device, rounded_activations)
        if stored is not None:
            return stored
    float_weight = weight.dequantize() if isinstance(weight, BlockQuantizedTensor) else weight
    float_weight = float_weight.to(device)
    blocks = _as_ggml_blocks(float_weight, quant, group_size)
    if blocks is not None:
        return GGMLLinear(blocks, bias, dtype, rounded_activations=rounded_activations)
    if quant == "int4":
        return Int4Linear.quantize(float_weight, bias, group_size, dtype)
    if quant == "int8":
        return Q8Linear.quantize(float_weight, bias, dtype)
    return FloatLinear(float_weight.to(dtype), bias)


def _stored_form(
    weight: BlockQuantizedTensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    rounded_activations: bool | None = None,
) -> Linear | None:
    """The layer that runs a GGML tensor from its own values (None: no kernel for its type or device).

    The blocks' own groups are kept whatever group_size asks: regrouping would round. Q8_0 and
    Q4_0 / Q4_1 repack exactly into the AVX-512 tile kernels where those build; every other type
    (and those, on CPUs the tile kernels do not serve) runs on the GGML block kernels as stored.
    """
    if weight.quant_type == "Q8_0" and _tiles_serve(native_int8, device):
        codes, scales = _q8_0_fields(weight)
        return Q8Linear(codes.to(device), scales.to(device), bias, dtype)
    if weight.quant_type in ("Q4_0", "Q4_1") and _tiles_serve(native_int4, device):
        codes, scales, minimums = _block_fields(weight)
        return Int4Linear(codes.to(device), scales.to(device), minimums.to(device), bias, 32, dtype)
    if weight.quant_type in GGML_KERNEL_TYPES and device.type == "cpu":
        return GGMLLinear(weight, bias, dtype, rounded_activations=rounded_activations)
    return None


def _as_ggml_blocks(weight: torch.Tensor, quant: str, group_size: int) -> BlockQuantizedTensor | None:
    """On a CPU the tile kernels do not serve (no AVX-512), a float weight asked to be int8 or int4 (groups of
    32) becomes GGUF Q8_0 or Q4_1 blocks for the GGML block kernels: the bytes the tiles would hold,
    instead of a float copy for PyTorch. None where the tiles run, on another device, or for other groups."""
    if quant == "int8" and not _tiles_serve(native_int8, weight.device):
        return q8_0_blocks(weight)
    if quant == "int4" and group_size == 32 and not _tiles_serve(native_int4, weight.device):
        return q4_1_blocks(weight)
    return None


def _tiles_serve(kernel: ModuleType, device: torch.device) -> bool:
    """Whether the tile layer of `kernel` (native_int8 or native_int4) takes weights on `device`: on other
    devices it always does (its PyTorch forms); on the CPU only where its AVX-512 kernel builds."""
    return device.type != "cpu" or kernel.load() is not None


def _mixed_block_types(weights: Sequence[WeightSource], device: torch.device) -> bool:
    """Whether fused parts are GGML tensors of more than one type that each run as stored."""
    if device.type != "cpu" or not all(isinstance(weight, BlockQuantizedTensor) for weight in weights):
        return False
    types = {weight.quant_type for weight in weights}
    return len(types) > 1 and types <= set(GGML_KERNEL_TYPES)

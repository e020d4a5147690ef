"""Linear layers over float, int8 and 4-bit weights, all called as `layer(x)`.

Every layer maps `x (..., in_features)` to `(..., out_features)` in x's dtype and
exposes `in_features`, `out_features`, `nbytes` (resident weight bytes) and
`dequantized_weight()` (float32, for tests). Which kernel runs depends on the
number of rows (tokens) in x, because the best one differs (measured on Zen 5
cores with PyTorch 2.13):

- few rows (decode): memory-bound; low-bit kernels read 4-8x fewer bytes.
  4-bit: the native AVX-512 kernel (`native_int4`) when it builds, else
  PyTorch's `_weight_int4pack_mm_for_cpu`, which is only fast with bfloat16
  activations (float32 takes a scalar path 40x slower); int8 likewise.
- many rows (prefill): compute-bound; the weight is dequantized to `dtype`
  (bfloat16 by default) for one oneDNN matrix product, 2-3x faster than the int
  kernels. Float32 products go through oneDNN too: MKL's sgemm takes a slow path
  on AMD CPUs (half of oneDNN's speed here).

GGUF Q4_0 / Q4_1 blocks repack straight into the 4-bit layouts (no float pass);
other block types are dequantized first (`BlockQuantizedTensor.dequantize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ember.errors import ModelLoadError
from ember.quant import native_int4
from ember.quant.ggml_blocks import BlockQuantizedTensor

# Rows at or below which the low-bit kernels beat dequantize-then-matmul: measured crossovers
# 16-32 rows for PyTorch's int8 / int4 kernels, 40-64 for the native one.
SMALL_BATCH_ROWS = 16
NATIVE_BATCH_ROWS = 32
_TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
QUANT_MODES = ("none", "int8", "int4")

WeightSource = torch.Tensor | BlockQuantizedTensor


class Linear(Protocol):
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def dequantized_weight(self) -> torch.Tensor: ...


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x (..., in_features) as a contiguous (rows, in_features) matrix."""
    if x.shape[-1] != in_features:  # a bug in the caller, not user input: the kernels must never overrun
        raise ValueError(f"expected inputs of size {in_features}, got shape {tuple(x.shape)}")
    return x.reshape(-1, in_features).contiguous()


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(rows, out) -> x's leading shape and dtype, the bias added in x's dtype."""
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight reordered for oneDNN's inner product, or None where oneDNN is unavailable."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 512)
    except (RuntimeError, AttributeError):
        return None


def _matmul_transposed(rows: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """rows (M, in) times weight_t (in, out); float32 through oneDNN, which is 2x MKL's sgemm here."""
    if rows.dtype == torch.float32 and rows.device.type == "cpu" and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(rows, weight_t.T, None, "none", [], "")
    return rows @ weight_t


class FloatLinear:
    """A plain float weight (out_features, in_features) in its own dtype, with an optional bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = None if bias is None else bias.to(weight.device, weight.dtype)
        self._packed = _onednn_pack(weight)
        self.weight = None if self._packed is not None else weight.contiguous()

    @property
    def nbytes(self) -> int:
        bias_bytes = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.out_features * self.in_features * self.dtype.itemsize + bias_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.in_features).to(self.dtype)  # (rows, in)
        if self._packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(rows, self._packed, self.bias, "none", [], "")
        else:
            y = F.linear(rows, self.weight, self.bias)  # (rows, out)
        return _finish(y, x, None)

    def dequantized_weight(self) -> torch.Tensor:
        weight = self._packed.to_dense() if self._packed is not None else self.weight
        return weight.float()


class Int8Linear:
    """Per-output-channel symmetric int8: weight[n, k] = scales[n] * quantized[n, k]."""

    def __init__(
        self,
        quantized: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        self.out_features, self.in_features = quantized.shape
        self.quantized = quantized.contiguous()  # (out, in) int8
        self.scales = scales.float().contiguous()  # (out,)
        self.dtype = dtype  # of the dequantized weight used for many rows
        self.bias = None if bias is None else bias.float()
        # the int8 kernel is vectorized only for bfloat16 activations and scales
        self._kernel_scales = self.scales.to(torch.bfloat16)

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16
    ) -> Int8Linear:
        """Round a float weight to int8 with one scale per output row (max |w| maps to 127)."""
        weight = weight.float()
        scales = weight.abs().amax(dim=1) / 127.0  # (out,)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        quantized = torch.round(weight / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(quantized, scales, bias, dtype)

    @property
    def nbytes(self) -> int:
        bias_bytes = 0 if self.bias is None else self.bias.numel() * 4
        return self.quantized.numel() + self.scales.numel() * 4 + self._kernel_scales.numel() * 2 + bias_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.in_features)
        if rows.shape[0] <= SMALL_BATCH_ROWS and rows.device.type == "cpu":
            y = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.quantized, self._kernel_scales)
        else:
            weight = self.quantized.to(self.dtype) * self.scales.to(self.dtype)[:, None]  # (out, in)
            y = F.linear(rows.to(self.dtype), weight)
        return _finish(y, x, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized.float() * self.scales[:, None]


class Int4Linear:
    """Group-wise asymmetric 4-bit: weight[n, k] = scales[n, g] * codes[n, k] + minimums[n, g].

    g = k // group_size.

    Codes are 0..15. Stored in one of three forms, chosen at construction:
    - "native": the AVX-512 tile kernel (group 32): float16 scales and minimums,
      so GGUF Q4_0 / Q4_1 weights are kept exactly;
    - "tinygemm": PyTorch's int4 kernel; it rounds scales to bfloat16, so weights
      are within bfloat16 rounding of the scales; a nibble copy serves many rows;
    - "plain": nibbles and float32 scales, dequantized on every call (any device).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        minimums: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 32,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ):
        self.out_features, self.in_features = codes.shape
        if self.in_features % group_size != 0:
            raise ModelLoadError(
                f"in_features {self.in_features} is not a multiple of group size {group_size}"
            )
        self.group_size = group_size
        self.dtype = dtype  # of the dequantized weight used for many rows
        self.bias = None if bias is None else bias.float()
        self.backend = backend or self._choose_backend(codes.device)
        self._library = native_int4.load() if self.backend == "native" else None
        if self.backend == "native":
            self.tiles = native_int4.pack_tiles(codes, scales, minimums)  # (tiles, blocks, 320) uint8
        else:
            self._store_plain(codes, scales, minimums)
            if self.backend == "tinygemm":
                self._store_tinygemm(codes, scales, minimums)

    def _choose_backend(self, device: torch.device) -> str:
        if device.type != "cpu":
            return "plain"
        if self.group_size == 32 and native_int4.load() is not None:
            return "native"
        if self.group_size in _TINYGEMM_GROUP_SIZES and self.out_features % 16 == 0:
            return "tinygemm"
        return "plain"

    def _store_plain(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> None:
        codes = codes.to(torch.uint8)
        self.nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # (out, in / 2)
        self.scales = scales.float().contiguous()  # (out, groups)
        self.minimums = minimums.float().contiguous()  # (out, groups)

    def _store_tinygemm(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> None:
        # the kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale
        chunks = [
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[start : start + 4096].to(torch.int32), 2)
            for start in range(0, self.out_features, 4096)  # 4096: a multiple of every kernel row block
        ]
        self.packed = torch.cat(chunks)
        zeros = minimums.float() + 8.0 * scales.float()
        scales_and_zeros = torch.stack((scales.float(), zeros), dim=-1)  # (out, groups, 2)
        self.scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 32,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ) -> Int4Linear:
        """Round a float weight to 4 bits: per group, minimum -> code 0 and maximum -> code 15."""
        out_features, in_features = weight.shape
        if in_features % group_size != 0:
            raise ModelLoadError(f"in_features {in_features} is not a multiple of group size {group_size}")
        groups = weight.float().reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, groups)
        # float16 scales and minimums, as GGUF stores them, so every form holds them exactly
        scales = ((high - low) / 15.0).to(torch.float16).float()
        minimums = low.to(torch.float16).float()
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round((groups - minimums[..., None]) / safe[..., None]).clamp_(0, 15)
        codes = codes.to(torch.uint8).reshape(out_features, in_features)
        return cls(codes, scales, minimums, bias, group_size, dtype, backend)

    @property
    def nbytes(self) -> int:
        bias_bytes = 0 if self.bias is None else self.bias.numel() * 4
        if self.backend == "native":
            return self.tiles.numel() + bias_bytes
        plain = self.nibbles.numel() + (self.scales.numel() + self.minimums.numel()) * 4
        if self.backend == "tinygemm":
            plain += self.packed.numel() + self.scales_and_zeros.numel() * 2
        return plain + bias_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.backend == "native"
            and x.dim() == 2
            and x.shape[0] <= NATIVE_BATCH_ROWS
            and x.shape[1] == self.in_features
            and x.dtype == torch.float32
            and self.bias is None
            and x.is_contiguous()
        ):  # the decode step's common case, without reshapes or casts (~3 us of a ~10 us call)
            return native_int4.matmul(self._library, x, self.tiles, self.out_features)
        rows = _rows(x, self.in_features)  # (rows, in)
        if self.backend == "native":
            if rows.shape[0] <= NATIVE_BATCH_ROWS:
                y = native_int4.matmul(self._library, rows.float(), self.tiles, self.out_features)
            else:
                weight_t = native_int4.dequantize_transposed(
                    self._library, self.tiles, self.out_features, self.in_features, self.dtype
                )  # (in, out)
                y = _matmul_transposed(rows.to(self.dtype), weight_t)
        elif self.backend == "tinygemm" and rows.shape[0] <= SMALL_BATCH_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
            )
        else:
            y = F.linear(rows.to(self.dtype), self._plain_weight(self.dtype))
        return _finish(y, x, self.bias)

    def _plain_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) from the nibble copy, in `dtype`."""
        codes = torch.stack((self.nibbles & 0x0F, self.nibbles >> 4), dim=-1).view(
            self.out_features, -1, self.group_size
        )
        scales, minimums = self.scales.to(dtype), self.minimums.to(dtype)
        weight = codes.to(dtype) * scales[..., None] + minimums[..., None]  # (out, groups, group)
        return weight.view(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        if self.backend == "native":
            weight_t = native_int4.dequantize_transposed(
                self._library, self.tiles, self.out_features, self.in_features, torch.float32
            )
            return weight_t.T.contiguous()
        if self.backend == "tinygemm":  # what the kernel computes: bfloat16 scale and zero
            scales_and_zeros = self.scales_and_zeros.float().transpose(0, 1)  # (out, groups, 2)
            codes = torch.stack((self.nibbles & 0x0F, self.nibbles >> 4), dim=-1).view(
                self.out_features, -1, self.group_size
            )
            weight = (codes.float() - 8.0) * scales_and_zeros[..., :1] + scales_and_zeros[..., 1:]
            return weight.reshape(self.out_features, self.in_features)
        return self._plain_weight(torch.float32)


def _block_fields(tensor: BlockQuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 blocks -> codes (out, in) uint8, scales and minimums (out, groups) float32, exactly."""
    out_features, in_features = tensor.shape
    block_bytes = 18 if tensor.quant_type == "Q4_0" else 20
    groups = in_features // 32
    blocks = torch.from_numpy(np.ascontiguousarray(tensor.data)).view(out_features, groups, block_bytes)
    scales = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()  # (out, groups)
    if tensor.quant_type == "Q4_0":  # value = d * (q - 8) = d * q + (-8 d)
        minimums = -8.0 * scales
        nibbles = blocks[..., 2:]
    else:  # value = d * q + m
        minimums = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        nibbles = blocks[..., 4:]
    # element j of a block: low nibble of byte j (j < 16), high nibble of byte j - 16 (j >= 16)
    codes = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).reshape(out_features, in_features)
    return codes, scales, minimums


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
) -> Linear:
    """Build the layer for a weight (or a list of weights, fused along out_features).

    quant "none" keeps the exact (dequantized) float weight in `dtype`; "int8" and
    "int4" keep low-bit weights and use `dtype` for the dequantized weight that
    serves many rows at once. Q4_0 / Q4_1 blocks become int4 without rounding.
    """
    if quant not in QUANT_MODES:
        raise ModelLoadError(f"unknown quantization {quant!r}; expected one of {', '.join(QUANT_MODES)}")
    device = torch.device(device)
    if isinstance(weight, (list, tuple)):
        sizes = [part.shape[0] for part in weight]
        biases = bias if isinstance(bias, (list, tuple)) else [bias] + [None] * (len(weight) - 1)
        weight, bias = concat_linear_weights(weight), _concat_biases(biases, sizes)
    if bias is not None:
        bias = bias.to(device)
    if len(weight.shape) != 2:
        raise ModelLoadError(f"a linear weight must be 2-D, got shape {tuple(weight.shape)}")
    if quant == "int4" and isinstance(weight, BlockQuantizedTensor) and weight.quant_type in ("Q4_0", "Q4_1"):
        # the blocks' own groups of 32 are kept whatever group_size asks: regrouping would round
        codes, scales, minimums = _block_fields(weight)
        return Int4Linear(codes.to(device), scales.to(device), minimums.to(device), bias, 32, dtype)
    float_weight = weight.dequantize() if isinstance(weight, BlockQuantizedTensor) else weight
    float_weight = float_weight.to(device)
    if quant == "int4":
        return Int4Linear.quantize(float_weight, bias, group_size, dtype)
    if quant == "int8":
        return Int8Linear.quantize(float_weight, bias, dtype)
    return FloatLinear(float_weight.to(dtype), bias)

"""The layer protocol, the float layer, and helpers every layer shares (row handling, oneDNN products).

Float32 products of many rows go through oneDNN: MKL's sgemm takes a slow path
on AMD CPUs (half of oneDNN's speed here). Float32 products of few rows
(decode) go to the native kernel in `native_float` where it builds; the weight
then stays in its plain layout, which oneDNN also takes for many rows.
Elsewhere (bfloat16, no kernel) the weight is reordered once for oneDNN.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ember.native_decode import function_address
from ember.quant import native_float


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


def _plain_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows (M, in) times a plain weight (out, in), transposed: oneDNN for float32 on CPU (2x MKL's sgemm
    here; it reorders the weight per call, a small cost next to a many-row product), PyTorch elsewhere."""
    if rows.dtype == torch.float32 and rows.device.type == "cpu" and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return F.linear(rows, weight, bias)


def _matmul_transposed(rows: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """rows (M, in) times weight_t (in, out), as `_plain_linear` of its transpose."""
    return _plain_linear(rows, weight_t.T, None)


class FloatLinear:
    """A plain float weight (out_features, in_features) in its own dtype, with an optional bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = None if bias is None else bias.to(weight.device, weight.dtype)
        self._native = None
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            self._native = native_float.load()
        self._packed = _onednn_pack(weight) if self._native is None else None
        self.weight = None if self._packed is not None else weight.contiguous()

    @property
    def nbytes(self) -> int:
        bias_bytes = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.out_features * self.in_features * self.dtype.itemsize + bias_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.in_features).to(self.dtype)  # (rows, in)
        if self._native is not None and rows.shape[0] <= native_float.NATIVE_FLOAT_ROWS:
            y = native_float.matmul(self._native, rows, self.weight)
            return _finish(y, x, self.bias)
        if self._packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(rows, self._packed, self.bias, "none", [], "")
        else:
            y = _plain_linear(rows, self.weight, self.bias)  # (rows, out)
        return _finish(y, x, None)

    def native_kernel(self) -> tuple[int, torch.Tensor, int] | None:
        """(kernel address, weight, most rows) for `ember.native_decode`, where this layer has one."""
        if self._native is None or self.bias is not None:
            return None
        return function_address(self._native.ember_float_matmul), self.weight, native_float.NATIVE_FLOAT_ROWS

    def dequantized_weight(self) -> torch.Tensor:
        weight = self._packed.to_dense() if self._packed is not None else self.weight
        return weight.float()

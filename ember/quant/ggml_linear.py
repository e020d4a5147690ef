"""A linear layer over a GGUF tensor's own blocks (Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, ...), never re-rounded.

The weight stays the bytes the file stores (Q4_K: 4.5 bits a value), so the
products are those of `gguf.quants.dequantize`'s values and a model's answers
do not drift from the file's. Which kernel runs depends on the rows of x:

- few rows (decode, up to `NATIVE_GGML_ROWS`): the native kernel
  (`native_ggml`), memory-bound, reading each block once per call and
  multiplying float32 activations by the expanded float32 weights;
- many rows (prefill): compute-bound, so the weight is expanded a chunk of
  output rows at a time (about 4 MiB of float32) and each chunk goes to
  oneDNN's matrix product in `dtype`; a full float copy never exists.

On a CPU whose products are AVX2 (no AVX-512), Q4_0, Q4_1 and Q4_K rows are
held in the 4-bit lane layout of `nibble_lanes.py` instead: the same codes and
exact scales rearranged, about twice as fast to multiply one row at a time.
Their decode products, and those of Q8_0, Q5_0 (widened to Q8_0 blocks of the
same values, `widened_blocks.py`) and Q6_K blocks, then round the activations
to 8 bits per 32 values and multiply integers, as llama.cpp does for these
types (a Q4_1 row 1.5-1.8x faster again; the rounding is at most 1/254 of each
group's largest activation). Set EMBER_EXACT_ACTIVATIONS=1 to keep float32
activations (products as exact as the other kernels'); the weights are the
file's values either way.

`ConcatLinear` fuses projections whose tensors differ in type (Gemma 3's
Q5_0 q and k with a Q8_0 v) without converting any of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ember.errors import ModelLoadError
from ember.quant import native_ggml, nibble_lanes, widened_blocks
from ember.quant.describe import describe_layer
from ember.quant.float_linear import _finish, _plain_linear, _rows
from ember.quant.ggml_blocks import BlockQuantizedTensor
from ember.quant.ggml_dequant import BLOCK_SIZES, dequantize

# Rows at or below which the native kernel runs; above, expanded chunks go to oneDNN's GEMM.
NATIVE_GGML_ROWS = 32
_CHUNK_FLOATS = 1 << 20  # float32 values of weight expanded at a time for many rows (4 MiB)
GGML_KERNEL_TYPES = tuple(native_ggml.KERNEL_TYPES)
EXACT_ACTIVATIONS_VARIABLE = "EMBER_EXACT_ACTIVATIONS"  # "1": AVX2 decode products keep float32 activations


def check_blocks(quant_type: str, shape: Sequence[int], num_bytes: int, name: str = "") -> None:
    """Raise ModelLoadError unless `num_bytes` of `quant_type` blocks hold a 2-D weight of `shape`."""
    label = f"tensor {name!r}" if name else "weight"
    if quant_type not in GGML_KERNEL_TYPES:
        raise ModelLoadError(f"{label}: no GGML block kernel for type {quant_type}")
    if len(shape) != 2:
        raise ModelLoadError(f"{label}: a {quant_type} linear weight must be 2-D, got shape {tuple(shape)}")
    out_features, in_features = shape
    values, block_bytes = BLOCK_SIZES[quant_type]
    if in_features <= 0 or out_features <= 0 or in_features % values:
        raise ModelLoadError(
            f"{label}: {quant_type} rows of {in_features} values are not whole {values}-value blocks"
        )
    expected = out_features * (in_features // values) * block_bytes
    if num_bytes != expected:
        raise ModelLoadError(
            f"{label}: {quant_type} of shape {tuple(shape)} needs {expected} bytes, got {num_bytes}"
        )


class GGMLLinear:
    """weight (out_features, in_features) as GGML blocks of one type; y = x @ weight^T (+ bias)."""

    def __init__(
        self,
        tensor: BlockQuantizedTensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        lanes: bool | None = None,
        rounded_activations: bool | None = None,
    ):
        """`lanes`: hold the rows in the 4-bit lane layout (None: where it is the faster form here).
        `rounded_activations`: decode products round the activations to 8 bits per 32 values and multiply
        integers, for the lane layout, Q8_0, Q5_0 and Q6_K (None: on AVX2, unless
        $EMBER_EXACT_ACTIVATIONS is 1; False: float32 activations, exact)."""
        check_blocks(tensor.quant_type, tensor.shape, tensor.nbytes, tensor.name)
        self.quant_type = tensor.quant_type
        self.out_features, self.in_features = (int(size) for size in tensor.shape)
        self.dtype = dtype  # of the expanded chunks that serve many rows
        self.bias = None if bias is None else bias.float()
        self._library = native_ggml.load()
        self.backend = "native" if self._library is not None else "portable"
        lanes_fit = self.backend == "native" and nibble_lanes.fits(self.quant_type, self.in_features)
        if lanes is None:
            lanes = lanes_fit and native_ggml.instruction_set() == "avx2"
        elif lanes and not lanes_fit:
            raise ValueError(f"no lane layout for {self.quant_type} rows of {self.in_features} values here")
        rounded_fit = lanes or (
            self.backend == "native" and self.quant_type in native_ggml.ROUNDED_BLOCK_KERNELS
        )
        if rounded_activations and not rounded_fit:
            raise ValueError(f"no kernel with rounded activations for {self.quant_type} rows here")
        if rounded_activations is None:
            rounded_activations = (
                rounded_fit
                and native_ggml.instruction_set() == "avx2"
                and os.environ.get(EXACT_ACTIVATIONS_VARIABLE, "") != "1"
            )
        # (out, bytes per row), out of the file's mapping so that the file can close
        file_rows = np.asarray(tensor.data, dtype=np.uint8).reshape(self.out_features, -1)
        # the kernel: the name native_ggml calls it by
        self.kernel, data = self._stored_rows(file_rows, lanes, rounded_activations)
        self.blocks = torch.from_numpy(data)

    def _stored_rows(self, file_rows: np.ndarray, lanes: bool, rounded: bool) -> tuple[str, np.ndarray]:
        """The kernel's name and the rows it reads: the file's blocks copied, or the same codes in the lane
        layout, in compact records where every field is exactly a float16 and the activations are
        rounded (those products read the rows at memory speed, so the bytes saved are time saved);
        with rounded activations Q5_0 is widened to Q8_0 blocks of the same values (`widened_blocks`)."""
        if not lanes and rounded and self.quant_type == "Q5_0":
            return native_ggml.ROUNDED_BLOCK_KERNELS["Q5_0"], widened_blocks.q5_0_as_q8_0(file_rows)
        if not lanes:
            kernel = native_ggml.ROUNDED_BLOCK_KERNELS[self.quant_type] if rounded else self.quant_type
            return kernel, np.array(file_rows, copy=True)
        if rounded:
            compact = nibble_lanes.lane_rows(self.quant_type, file_rows, self.in_features, half_fields=True)
            if compact is not None:
                return native_ggml.LANES4_HALF_Q8, compact
        kernel = native_ggml.LANES4_Q8 if rounded else native_ggml.LANES4
        return kernel, nibble_lanes.lane_rows(self.quant_type, file_rows, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() + (0 if self.bias is None else self.bias.numel() * 4)

    @property
    def kernel_name(self) -> str:
        """Which kernel serves decode, for `ember info`: "q4_k native (avx512)"."""
        stem = native_ggml.KERNEL_TYPES[self.quant_type]
        if self.backend != "native":
            return f"{stem} portable (torch)"
        if self.quant_type == "Q5_0" and self.kernel == native_ggml.ROUNDED_BLOCK_KERNELS["Q5_0"]:
            return f"{stem} native ({native_ggml.instruction_set()}, as 8-bit codes, 8-bit activations)"
        layout = {
            native_ggml.LANES4: ", 4-bit lanes",
            native_ggml.LANES4_Q8: ", 4-bit lanes, 8-bit activations",
            native_ggml.LANES4_HALF_Q8: ", 4-bit lanes with float16 fields, 8-bit activations",
            **{kernel: ", 8-bit activations" for kernel in native_ggml.ROUNDED_BLOCK_KERNELS.values()},
        }.get(self.kernel, "")
        return f"{stem} native ({native_ggml.instruction_set()}{layout})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.in_features)  # (rows, in)
        if self.backend == "native" and rows.shape[0] <= NATIVE_GGML_ROWS:
            y = native_ggml.matmul(self.kernel, rows.float(), self.blocks, self.out_features)
        else:
            y = self._chunked_product(rows.to(self.dtype))
        return _finish(y, x, self.bias)

    def _chunked_product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, in) in self.dtype -> (M, out) float32, a chunk of expanded weight rows at a time."""
        chunk = max(16, _CHUNK_FLOATS // self.in_features)
        if chunk >= self.out_features:
            return _plain_linear(rows, self._expand(0, self.out_features).to(self.dtype), None).float()
        y = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        for first in range(0, self.out_features, chunk):
            count = min(chunk, self.out_features - first)
            weight = self._expand(first, count).to(self.dtype)  # (count, in)
            y[:, first : first + count] = _plain_linear(rows, weight, None)
        return y

    def _expand(self, first: int, count: int) -> torch.Tensor:
        """Rows first..first+count of the weight as float32 (count, in)."""
        if self.backend == "native":
            return native_ggml.expand_rows(self.kernel, self.blocks, self.in_features, first, count)
        part = self.blocks[first : first + count].numpy()
        return dequantize(self.quant_type, part, (count, self.in_features))

    def native_kernel(self) -> tuple[int, torch.Tensor, int] | None:
        """(kernel address, blocks, most rows) for `ember.native_decode`, where this layer has one."""
        if self.backend != "native" or self.bias is not None:
            return None
        return native_ggml.matmul_address(self.kernel), self.blocks, NATIVE_GGML_ROWS

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows `token_ids` (any shape) of the weight as float32 (*token_ids.shape, in_features): a tied
        embedding reads the output layer's blocks. ValueError for an id outside 0..out_features-1."""
        flat_ids = token_ids.reshape(-1).to(torch.int64)
        if flat_ids.numel() and not (0 <= flat_ids.min() and flat_ids.max() < self.out_features):
            raise ValueError(f"row ids must lie in 0..{self.out_features - 1}")
        if self.backend == "native":
            found = native_ggml.expand_rows(self.kernel, self.blocks, self.in_features, ids=flat_ids)
        else:
            part = self.blocks[flat_ids].numpy()
            found = dequantize(self.quant_type, part, (flat_ids.numel(), self.in_features))
        return found.view(*token_ids.shape, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self._expand(0, self.out_features)


class ConcatLinear:
    """Layers stacked along out_features, each kept in its own form; y = the parts' outputs side by side."""

    def __init__(self, parts: Sequence[object], bias: torch.Tensor | None = None):
        in_features = {part.in_features for part in parts}
        if len(in_features) != 1:
            raise ModelLoadError(f"cannot fuse weights with different in_features: {sorted(in_features)}")
        self.parts = list(parts)
        self.in_features = in_features.pop()
        self.out_features = sum(part.out_features for part in parts)
        self.bias = None if bias is None else bias.float()
        self._table: torch.Tensor | None = None  # int64 [count, (kernel, weight, out) per part] for C

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts) + (0 if self.bias is None else self.bias.numel() * 4)

    @property
    def kernel_name(self) -> str:
        return " + ".join(describe_layer(part) for part in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        native = self.native_kernel() if x.device.type == "cpu" else None
        if native is not None and x.numel() // self.in_features <= native[2]:
            # few rows (decode): the parts' own kernels in one C call, writing their columns in place
            rows = _rows(x, self.in_features).float()
            return _finish(native_ggml.concat_matmul(rows, native[1], self.out_features), x, None)
        y = torch.cat([part(x) for part in self.parts], dim=-1)  # (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def native_kernel(self) -> tuple[int, torch.Tensor, int] | None:
        """The C concatenation over the parts' own kernels, where every part has one and the library built."""
        if self.bias is not None or native_ggml.load() is None:
            return None
        natives = [getattr(part, "native_kernel", lambda: None)() for part in self.parts]
        if any(native is None for native in natives):
            return None
        if self._table is None:
            entries = [len(self.parts)]
            for part, (kernel, weight, _) in zip(self.parts, natives):
                entries += [kernel, weight.data_ptr(), part.out_features]
            self._table = torch.tensor(entries, dtype=torch.int64)
        return native_ggml.concat_address(), self._table, min(rows for _, _, rows in natives)

    def dequantized_weight(self) -> torch.Tensor:
        return torch.cat([part.dequantized_weight() for part in self.parts], dim=0)

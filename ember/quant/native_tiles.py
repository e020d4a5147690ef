"""What the int4 and int8 tile kernels share on the Python side: their C entry points' signatures and
wrappers (their shared C++ is `tile_kernel_common.h`).

Both libraries export `<prefix>_matmul(x, rows, columns, tiles, out_features, y, threads)`
and `<prefix>_dequantize_transposed(tiles, out_features, in_features, out, bfloat16, threads)`,
called with raw addresses and ints: a decode step makes ~120 such calls, so
ctypes conversions of tensors would count.
"""

from __future__ import annotations

import ctypes

import torch


def declare_tile_kernels(library: ctypes.CDLL, prefix: str) -> None:
    i64, pointer, integer = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    matmul = getattr(library, f"{prefix}_matmul")
    matmul.argtypes = [pointer, i64, i64, pointer, i64, pointer, integer]
    matmul.restype = None
    dequantize = getattr(library, f"{prefix}_dequantize_transposed")
    dequantize.argtypes = [pointer, i64, i64, pointer, integer, integer]
    dequantize.restype = None


def tile_matmul(
    kernel: ctypes._CFuncPtr, x: torch.Tensor, tiles: torch.Tensor, out_features: int
) -> torch.Tensor:
    """x (M, K) float32 contiguous -> (M, out_features) float32."""
    rows, columns = x.shape
    y = torch.empty(rows, out_features, dtype=torch.float32)
    kernel(x.data_ptr(), rows, columns, tiles.data_ptr(), out_features, y.data_ptr(), torch.get_num_threads())
    return y


def tile_dequantize_transposed(
    kernel: ctypes._CFuncPtr, tiles: torch.Tensor, out_features: int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """The weight as (in_features, out_features) float32 or bfloat16: W transposed, ready for x @ W^T."""
    if dtype not in (torch.float32, torch.bfloat16):
        return tile_dequantize_transposed(kernel, tiles, out_features, in_features, torch.float32).to(dtype)
    out = torch.empty(in_features, out_features, dtype=dtype)
    kernel(
        tiles.data_ptr(), out_features, in_features, out.data_ptr(), int(dtype == torch.bfloat16),
        torch.get_num_threads(),
    )  # fmt: skip
    return out

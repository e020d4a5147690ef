"""What the int4 and int8 tile kernels share: their C entry points' signatures and Python wrappers.

Both libraries export `<prefix>_matmul(x, rows, columns, tiles, out_features, y, threads)`
and `<prefix>_dequantize_transposed(tiles, out_features, in_features, out, bfloat16, threads)`,
called with raw addresses and ints: a decode step makes ~120 such calls, so
ctypes conversions of tensors would count.
"""

from __future__ import annotations

import ctypes

import torch

# C++ both tile kernels compile in: the headers, the lane order that splits interleaved word lanes,
# and the write-out of a staged band (see the dequantize kernels' comments).
TILE_KERNEL_COMMON = r"""
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// word lanes are (row, e) interleaved; gather the e = 0 lanes first, then the e = 1 lanes
alignas(64) static const uint16_t kDeinterleaveOrder[32] = {
    0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
    1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};

// Copies `rows` staged rows (each `stride` floats, `columns` of them used) into out (K, N) at rows
// first_row.. and columns first_column..: float32, or bfloat16 when out_bf16.
static inline void write_staged_block(const float* staged, int64_t stride, int rows, int64_t columns,
                                      void* out, int64_t first_row, int64_t N, int64_t first_column,
                                      int out_bf16) {
    for (int k = 0; k < rows; k++) {
        const float* source = staged + k * stride;
        const int64_t offset = (first_row + k) * N + first_column;
        if (out_bf16) {
            uint16_t* dst = (uint16_t*)out + offset;
            int64_t c = 0;
            for (; c + 16 <= columns; c += 16) {
                __m256i values = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(source + c));
                _mm256_storeu_si256((__m256i*)(dst + c), values);
            }
            if (c < columns) {  // the last, partial tile: masked stores are slow on AMD, so only here
                const __mmask16 mask = (__mmask16)((1u << (columns - c)) - 1u);
                __m256i values = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(source + c));
                _mm256_mask_storeu_epi16(dst + c, mask, values);
            }
        } else {
            std::memcpy((float*)out + offset, source, columns * sizeof(float));
        }
    }
}
"""


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

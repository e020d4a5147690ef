"""A float32 matrix kernel for few rows (decode) over a plain (N, K) weight, AVX-512, built on first use.

A float32 decode step is a stream of weight reads: SmolLM2 reads 540 MB per
token. oneDNN's float32 inner product reached ~35 GB/s of that stream at one
row on this project's 2-core Zen 5 machine; this kernel reaches ~40 (8-15 %
more, measured interleaved with oneDNN over SmolLM2's 121 matrices at 1, 4 and
8 rows) by reading four weight rows as four sequential streams, prefetching
8 KiB ahead of each, and taking the activation rows four at a time while a
group of weight rows stays in L1, so the weight is read from memory once per
call. Up to 16 rows it is at least as fast as oneDNN reading the same plain
weight (which reorders it per call); past that the work turns compute-bound
and oneDNN's blocked GEMM wins, so `FloatLinear` routes those rows there.

The weight stays in its plain layout, so the same tensor also serves oneDNN
(which reorders a plain weight per call at little cost for many rows) and
exact `dequantized_weight()`.
"""

from __future__ import annotations

import ctypes

import torch

from ember.native_build import NativeLibrary

NATIVE_FLOAT_ROWS = 16  # at most this many rows per call go to the kernel
_REQUIRED_CPU_FLAGS = ("avx512f", "fma")

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int kGroupRows = 4;           // weight rows read together: four sequential streams
constexpr int kPrefetchFloats = 2048;   // 8 KiB ahead of each stream (Zen 5: 0, 1, 4 KiB were slower)

// y[m * N + r] = dot(x row m, w row r) for R weight rows and M activation rows, all in registers.
template <int R, int M>
inline void product(const float* x, int64_t K, const float* w, float* y, int64_t N) {
    __m512 acc[R][M];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        for (int r = 0; r < R; r++) _mm_prefetch((const char*)(w + r * K + k + kPrefetchFloats), _MM_HINT_T0);
        __m512 xs[M];
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) xs[m] = _mm512_loadu_ps(x + m * K + k);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m512 weights = _mm512_loadu_ps(w + r * K + k);
#pragma GCC unroll 4
            for (int m = 0; m < M; m++) acc[r][m] = _mm512_fmadd_ps(weights, xs[m], acc[r][m]);
        }
    }
    if (k < K) {  // the last, partial chunk of 16 inputs
        const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1u);
        __m512 xs[M];
        for (int m = 0; m < M; m++) xs[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
        for (int r = 0; r < R; r++) {
            const __m512 weights = _mm512_maskz_loadu_ps(mask, w + r * K + k);
            for (int m = 0; m < M; m++) acc[r][m] = _mm512_fmadd_ps(weights, xs[m], acc[r][m]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) y[m * N + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// R weight rows times all M activation rows, four at a time: the R rows stay in L1 after the first pass.
template <int R>
inline void weight_rows(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        switch (std::min<int64_t>(4, M - m0)) {
            case 1: product<R, 1>(xm, K, w, ym, N); break;
            case 2: product<R, 2>(xm, K, w, ym, N); break;
            case 3: product<R, 3>(xm, K, w, ym, N); break;
            default: product<R, 4>(xm, K, w, ym, N); break;
        }
    }
}

}  // namespace

extern "C" int ember_float_abi_version() { return 1; }

// y (M, N) float32 = x (M, K) float32 times w (N, K) float32, transposed. Each thread takes a contiguous
// range of weight rows (whole groups of four), so the threads read disjoint parts of the weight.
extern "C" void ember_float_matmul(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y,
                                   int nthreads) {
    const int64_t groups = (N + kGroupRows - 1) / kGroupRows;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && groups > 1)
    {
        const int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
        const int64_t first = std::min(N, groups * thread / threads * kGroupRows);
        const int64_t last = std::min(N, groups * (thread + 1) / threads * kGroupRows);
        int64_t n = first;
        for (; n + kGroupRows <= last; n += kGroupRows) weight_rows<kGroupRows>(x, M, K, w + n * K, y + n, N);
        for (; n < last; n++) weight_rows<1>(x, M, K, w + n * K, y + n, N);
    }
}
"""


def _declare(library: ctypes.CDLL) -> None:
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    library.ember_float_matmul.argtypes = [pointer, i64, i64, pointer, i64, pointer, ctypes.c_int]
    library.ember_float_matmul.restype = None


LIBRARY = NativeLibrary("ember_float", SOURCE, _REQUIRED_CPU_FLAGS, _declare)


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where this machine cannot build or run it."""
    return LIBRARY.load()


def matmul(library: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 contiguous times weight (N, K) float32 contiguous, transposed -> (M, N) float32."""
    rows, columns = x.shape
    out_features = weight.shape[0]
    y = torch.empty(rows, out_features, dtype=torch.float32)
    library.ember_float_matmul(
        x.data_ptr(), rows, columns, weight.data_ptr(), out_features, y.data_ptr(), torch.get_num_threads()
    )
    return y

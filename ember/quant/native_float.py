"""A float32 matrix kernel for few rows (decode) over a plain (N, K) weight (AVX-512 or AVX2), built on use.

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

With AVX2 only (8 lanes, 16 registers) it takes three activation rows per
pass instead of four. On a 2-core Zen 3 it beat oneDNN on the plain weight at
4 to 16 rows (3072 x 768 at 8 rows: 0.57 against 0.75 ms) and matched it at
one. oneDNN's packed weight was faster from 8 rows (0.46 ms), but it is a
second copy of every weight: beside a memory-mapped fp32 RWKV file, which the
model reads in place, it took resident memory from 1.0 to 1.5 GB.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ember.native_build import NativeLibrary, read_source

NATIVE_FLOAT_ROWS = 16  # at most this many rows per call go to the kernel
_REQUIRED_CPU_FLAGS = ("avx2", "fma")

_SOURCE_FILE = Path(__file__).with_name("float_kernel.cpp")


def _declare(library: ctypes.CDLL) -> None:
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    library.ember_float_matmul.argtypes = [pointer, i64, i64, pointer, i64, pointer, ctypes.c_int]
    library.ember_float_matmul.restype = None


LIBRARY = NativeLibrary("ember_float", read_source(_SOURCE_FILE), _REQUIRED_CPU_FLAGS, _declare)


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

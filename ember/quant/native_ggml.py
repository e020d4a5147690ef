"""The GGML block kernels of `ggml_kernels.cpp`: products and row expansion straight from a file's blocks.

One library serves every block type ember runs from its own bytes. Per type
it exports `ember_ggml_<type>_matmul(x, rows, columns, weight, out_features,
y, threads)` (the tile kernels' signature, so `native_decode` can call it) and
`ember_ggml_<type>_expand_rows(weight, columns, first_row, count, ids, out,
threads)`, which writes rows of the weight as float32 (a prefill chunk, or the
looked-up rows of a tied embedding). It needs no particular CPU: the source
picks AVX-512, AVX2 or portable C++ for whatever `-march=native` targets, and
`vector_bits()` says which it got.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ember.native_build import NativeLibrary
from ember.native_decode import function_address

# GGML type name -> the kernels' name stem
KERNEL_TYPES: dict[str, str] = {
    "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k", "Q5_0": "q5_0", "Q5_1": "q5_1",
    "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1",
}  # fmt: skip

# The 4-bit lane layout (`nibble_lanes.py`): Q4_0, Q4_1 and Q4_K rows rearranged at load, one kernel for all
# with float32 activations (exact) and one that rounds the activations to 8 bits per 32 values (integer dots)
LANES4 = "LANES4"
LANES4_Q8 = "LANES4_Q8"
LANES4_HALF_Q8 = "LANES4_HALF_Q8"  # compact records (float16 fields), with 8-bit activations
# Q8_0 and Q6_K blocks as stored (Q5_0 widened to Q8_0 at load: `widened_blocks`), multiplied with
# activations rounded to 8 bits (integer dots)
ROUNDED_BLOCK_KERNELS: dict[str, str] = {"Q8_0": "Q8_0_Q8", "Q5_0": "Q8_0_Q8", "Q6_K": "Q6_K_Q8"}
_STEMS: dict[str, str] = {
    **KERNEL_TYPES, LANES4: "lanes4", LANES4_Q8: "lanes4_q8", LANES4_HALF_Q8: "lanes4h_q8",
    "Q8_0_Q8": "q8_0_q8", "Q6_K_Q8": "q6_k_q8",
}  # fmt: skip

_SOURCE_FILE = Path(__file__).with_name("ggml_kernels.cpp")


def _declare(library: ctypes.CDLL) -> None:
    i64, pointer, integer = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    matmul_arguments = [pointer, i64, i64, pointer, i64, pointer, integer]
    for stem in _STEMS.values():
        matmul = getattr(library, f"ember_ggml_{stem}_matmul")
        matmul.argtypes, matmul.restype = matmul_arguments, None
        expand = getattr(library, f"ember_ggml_{stem}_expand_rows")
        expand.argtypes, expand.restype = [pointer, i64, i64, i64, pointer, pointer, integer], None
    concat = library.ember_ggml_concat_matmul
    concat.argtypes, concat.restype = matmul_arguments, None
    library.ember_ggml_vector_bits.argtypes, library.ember_ggml_vector_bits.restype = [], integer


LIBRARY = NativeLibrary("ember_ggml", _SOURCE_FILE.read_text(), declare=_declare)


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where this machine cannot build it (no compiler, not Linux)."""
    return LIBRARY.load()


def instruction_set() -> str:
    """ "avx512", "avx2" or "portable": what the built products use ("unavailable" if it did not build)."""
    library = load()
    if library is None:
        return "unavailable"
    return {512: "avx512", 256: "avx2"}.get(library.ember_ggml_vector_bits(), "portable")


def matmul_address(kernel: str) -> int:
    """The address of a kernel's matmul (a name `matmul` takes), for the C side's tables."""
    return function_address(getattr(load(), f"ember_ggml_{_STEMS[kernel]}_matmul"))


def concat_address() -> int:
    return function_address(load().ember_ggml_concat_matmul)


def matmul(kernel_name: str, x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (M, K) float32 contiguous times the (out_features, K) weight in `blocks` -> (M, out_features).
    `kernel_name` is the GGML type of the blocks, LANES4 / LANES4_Q8 / LANES4_HALF_Q8 for rows in the
    lane layout, or a ROUNDED_BLOCK_KERNELS value for blocks multiplied with 8-bit activations."""
    rows, columns = x.shape
    y = torch.empty(rows, out_features, dtype=torch.float32)
    kernel = getattr(load(), f"ember_ggml_{_STEMS[kernel_name]}_matmul")
    threads = torch.get_num_threads()
    kernel(x.data_ptr(), rows, columns, blocks.data_ptr(), out_features, y.data_ptr(), threads)
    return y


def concat_matmul(x: torch.Tensor, table: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (M, K) float32 contiguous times projections side by side, each on its own kernel: `table` is
    ConcatLinear's [count, (kernel, weight, out) per part] -> (M, out_features)."""
    rows, columns = x.shape
    y = torch.empty(rows, out_features, dtype=torch.float32)
    load().ember_ggml_concat_matmul(
        x.data_ptr(), rows, columns, table.data_ptr(), out_features, y.data_ptr(), torch.get_num_threads()
    )
    return y


def expand_rows(
    kernel_name: str,
    blocks: torch.Tensor,
    columns: int,
    first_row: int = 0,
    count: int | None = None,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows first_row..first_row+count of the weight, or rows `ids` (int64, checked by the caller), as
    float32 (count, columns)."""
    if ids is not None:
        ids = ids.to(torch.int64).contiguous()
        count = ids.numel()
    out = torch.empty(count, columns, dtype=torch.float32)
    kernel = getattr(load(), f"ember_ggml_{_STEMS[kernel_name]}_expand_rows")
    kernel(
        blocks.data_ptr(), columns, first_row, count, None if ids is None else ids.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out

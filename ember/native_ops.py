"""Fused float32 operators for the decode step (one new token per sequence), built on first use.

At batch 1 a small model's decode step is dominated by the ~25 small PyTorch
operators per layer, each costing a few microseconds of dispatch for well
under a microsecond of arithmetic. Three native operators replace them:

- `add_rms_norm`: the residual add and the next RMS norm in one pass;
- `DecodeAttention`: rotary embedding of q and k, the K/V cache store at
  each sequence's position in its cache blocks, and single-query grouped-query attention
  over that sequence's cached keys (causal, optional sliding window), one
  OpenMP task per (sequence, kv head) once a step has enough keys to pay;
- `silu_mul`: the MLP gating silu(gate) * up on the fused gate/up output.

Rows of one sequence at consecutive positions (a short prompt chunk, see
`CHUNK_ROWS`) attend together: each block of cached keys serves all of them
while it is in L1, so the chunk reads its keys once per kv head, not per row.

They keep float32 semantics (the same formulas as `ember.ops`; only summation
order differs, within ~1e-6). The source is compiled like the matrix kernels
(`ember.native_build`) and called through ctypes with raw addresses, so a
call costs about a microsecond. Where it cannot be built, `load()` returns None
and the model keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch

from ember import native_decode
from ember.native_build import NativeLibrary

SOURCE_FILE = Path(__file__).with_name("native_ops.cpp")

# Keys times kv heads below which decode attention stays on one thread: measured on 2 Zen 5 cores, an
# OpenMP region costs a few microseconds, about what ~500 keys of 64 dimensions take.
PARALLEL_MIN_KEYS = 512
# A prompt chunk of one sequence of at most this many tokens runs as rows of a decode step (the fused
# operators, the cached keys read in place). PyTorch's layer loop gathers the cached keys into a copy per
# layer and pays ~25 operator dispatches per layer: on 2 Zen 3 cores an 8-token chunk of SmolLM2 took
# 44 ms with no cached keys and 61 ms after 2,500. Past 32 rows its GEMMs and flash attention win.
CHUNK_ROWS = 32


def _declare(library: ctypes.CDLL) -> None:
    """ctypes signatures: raw addresses and ints, so a call costs no tensor conversions."""
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    library.ember_add_rms_norm.argtypes = [pointer, pointer, pointer, i64, i64, ctypes.c_float, pointer]
    library.ember_add_rms_norm.restype = None
    library.ember_silu_mul.argtypes = [pointer, i64, i64, pointer]
    library.ember_silu_mul.restype = None
    library.ember_decode_attention.argtypes = [pointer] * 4
    library.ember_decode_attention.restype = None
    native_decode.declare(library)


LIBRARY = NativeLibrary(
    "ember_ops", SOURCE_FILE.read_text() + native_decode.LAYERS_SOURCE_FILE.read_text(), (), _declare
)


def load() -> ctypes.CDLL | None:
    """The compiled operator library, or None where this machine cannot build or run it."""
    return LIBRARY.load()


# The wrappers take contiguous float32 CPU tensors (int64 for slots and positions) and check
# nothing: the caller (the model's decode step) owns the shapes.


def add_rms_norm(
    library: ctypes.CDLL,
    hidden: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """hidden (rows, dim) += delta (in place, when given); returns out = rms_norm(hidden) * weight."""
    rows, dim = hidden.shape
    library.ember_add_rms_norm(
        hidden.data_ptr(),
        None if delta is None else delta.data_ptr(),
        weight.data_ptr(),
        rows,
        dim,
        eps,
        out.data_ptr(),
    )
    return out


def silu_mul(library: ctypes.CDLL, gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """gate_up (rows, 2 * inner) -> out (rows, inner) = silu(gate) * up."""
    rows, inner = out.shape
    library.ember_silu_mul(gate_up.data_ptr(), rows, inner, out.data_ptr())
    return out


class DecodeAttention:
    """Rotary embedding, K/V cache store and attention for one new token per sequence, layer by layer.

    Built once per forward call with what its layers share; each layer then
    passes three addresses (a dozen fewer ctypes conversions per layer).
    rotations (batch, head_dim / 2, 2) hold cos and sin at each sequence's
    position; block_table (batch, width) int64 names the cache blocks of each
    sequence (`KVCache.block_table`), positions (batch,) int64; the pools are
    the cache's (blocks, block_size, kv_heads, head_dim) tensors.
    """

    def __init__(
        self,
        library: ctypes.CDLL,
        rotations: torch.Tensor,
        block_table: torch.Tensor,
        positions: torch.Tensor,
        num_heads: int,
        kv_cache: Any,
        sliding_window: int | None,
    ):
        rotations, block_table, positions = (
            rotations.contiguous(),
            block_table.contiguous(),
            positions.contiguous(),
        )
        batch_size, table_width = block_table.shape
        head_dim = kv_cache.head_dim
        self.out = torch.empty(batch_size, num_heads * head_dim)  # (batch, heads * head_dim)
        self._tensors = (rotations, block_table, positions)  # kept alive: the library holds their addresses
        self._arguments = torch.tensor(
            [
                rotations.data_ptr(),
                block_table.data_ptr(),
                positions.data_ptr(),
                self.out.data_ptr(),
                batch_size,
                num_heads,
                kv_cache.num_kv_heads,
                head_dim,
                kv_cache.block_size,
                table_width,
                sliding_window or 0,
                torch.get_num_threads(),
                PARALLEL_MIN_KEYS,
            ],
            dtype=torch.int64,
        )  # the C struct DecodeArguments
        self.address = self._arguments.data_ptr()  # of the C struct, for `native_decode`
        self._function = library.ember_decode_attention

    def __call__(self, qkv: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor) -> torch.Tensor:
        """qkv (batch, (heads + 2 * kv_heads) * head_dim) -> out (batch, heads * head_dim), caches updated.

        q and k are in the pairwise rotary layout (`ops.interleave_rope_rows`).
        """
        self._function(self.address, qkv.data_ptr(), key_pool.data_ptr(), value_pool.data_ptr())
        return self.out

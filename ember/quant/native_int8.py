"""A group-wise int8 (GGUF Q8_0) matrix kernel for AVX-512 VNNI CPUs, built on first use.

Weights are Q8_0: 32 int8 codes per group with one float16 scale, value = d * q,
kept bit-exact (a GGUF Q8_0 tensor repacks without rounding). The activations
are quantized per group of 32 to int16 codes with a float32 step (error at most
1/65534 of the group's largest |x|), so that one `vpdpwssd` multiplies 16 output
rows by two inputs in exact integer arithmetic; each group's int32 sum is scaled
in float32. On SmolLM2's output layer and real final hidden states the logits
are within 2.6e-5 (relative norm) of float64 math, against 2.2e-3 for bfloat16
activations and 7e-3 for int8 ones (llama.cpp's choice). A prototype with int8
activations (`vpdpbusd`) was as fast at 1-4 rows (memory-bound) and only 1.3-1.5x
faster at 8-32; bfloat16 would need two dot products per weight (an int8 code
does not fit bfloat16's 8-bit significand with the 128 offset trick).

The tiles are read once per call for all rows (rows go innermost, 8 at a time),
so batches of up to ~32 rows cost little more than one in memory traffic.
Building, caching and the no-compiler fallback are shared with `native_int4`.

Tile layout, one tile = 16 output rows, one block = 32 inputs, 544 bytes (as many
as the 16 rows' Q8_0 blocks in the file):
  bytes 0..511    16 chunks c of 32 bytes; byte 2r + e of chunk c is the int8 code
                  of row r, input 2c + e
  bytes 512..543  16 float16 scales d (one per row)
Tiles are stored (tiles, blocks, 544): each tile's blocks are contiguous.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ember.native_build import NativeLibrary, read_source
from ember.quant.native_tiles import (
    declare_tile_kernels,
    tile_dequantize_transposed,
    tile_matmul,
)

TILE_ROWS = 16
BLOCK = 32
TILE_BLOCK_BYTES = 544
_CODE_BYTES = 512
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "f16c", "fma")

_SOURCE_FILE = Path(__file__).with_name("int8_kernel.cpp")


def _declare(library: ctypes.CDLL) -> None:
    declare_tile_kernels(library, "ember_int8")
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    library.ember_int8_rows.argtypes = [pointer, i64, i64, pointer, i64, pointer]
    library.ember_int8_rows.restype = ctypes.c_int


LIBRARY = NativeLibrary("ember_int8", read_source(_SOURCE_FILE), _REQUIRED_CPU_FLAGS, _declare)


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where this machine cannot build or run it."""
    return LIBRARY.load()


_PACK_TILES_PER_STEP = 256


def pack_tiles(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) int8, or (N, K/32, 32) with any strides, scales (N, K/32) -> tiles (ceil(N/16), K/32,
    544) uint8.

    Scales are stored as float16 (exact for GGUF Q8_0). Rows are padded to a
    multiple of 16 with zero codes and zero scales.
    """
    rows = codes.shape[0]
    blocks = codes[0].numel() // BLOCK
    tiles = -(-rows // TILE_ROWS)
    padding = tiles * TILE_ROWS - rows
    codes = codes.view(torch.uint8).reshape(rows, blocks, BLOCK)  # a view where codes allow one
    scales = scales.to(torch.float16)
    if padding:
        codes = torch.cat((codes, codes.new_zeros(padding, blocks, BLOCK)))
        scales = torch.cat((scales, scales.new_zeros(padding, blocks)))
    out = torch.empty(tiles, blocks, TILE_BLOCK_BYTES, dtype=torch.uint8)
    # input k = 32 b + 2 c + e; byte (c, r, e) of a tile's block
    grid = codes.unflatten(0, (tiles, TILE_ROWS)).unflatten(-1, (16, 2))  # (tile, r, b, c, e)
    per_tile = scales.view(torch.uint8).view(tiles, TILE_ROWS, blocks, 2)  # (tile, r, b, 2 bytes)
    # In slices of tiles, so the permuted copy never costs a second whole matrix of memory.
    for start in range(0, tiles, _PACK_TILES_PER_STEP):
        part = slice(start, start + _PACK_TILES_PER_STEP)
        out[part, :, :_CODE_BYTES] = grid[part].permute(0, 2, 3, 1, 4).reshape(-1, blocks, _CODE_BYTES)
        out[part, :, _CODE_BYTES:] = per_tile[part].transpose(1, 2).reshape(-1, blocks, 2 * TILE_ROWS)
    return out


def matmul(library: ctypes.CDLL, x: torch.Tensor, tiles: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (M, K) float32 contiguous -> (M, out_features) float32."""
    return tile_matmul(library.ember_int8_matmul, x, tiles, out_features)


def dequantize_transposed(
    library: ctypes.CDLL, tiles: torch.Tensor, out_features: int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """The weight as (in_features, out_features) float32 or bfloat16: W transposed, ready for x @ W^T."""
    return tile_dequantize_transposed(
        library.ember_int8_dequantize_transposed, tiles, out_features, in_features, dtype
    )


def gather_rows(
    library: ctypes.CDLL, tiles: torch.Tensor, out_features: int, in_features: int, ids: torch.Tensor
) -> torch.Tensor:
    """Rows `ids` (count,) int64 of the weight -> (count, in_features) float32, exactly d * q.

    Raises ValueError for an id outside 0..out_features-1 (the kernel checks before reading).
    """
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty(ids.numel(), in_features, dtype=torch.float32)
    status = library.ember_int8_rows(
        tiles.data_ptr(), out_features, in_features, ids.data_ptr(), ids.numel(), out.data_ptr()
    )
    if status != 0:
        raise ValueError(f"row ids must lie in 0..{out_features - 1}")
    return out

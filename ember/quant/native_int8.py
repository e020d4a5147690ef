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

import torch

from ember.native_build import NativeLibrary
from ember.quant.native_tiles import (
    TILE_KERNEL_COMMON,
    declare_tile_kernels,
    tile_dequantize_transposed,
    tile_matmul,
)

TILE_ROWS = 16
BLOCK = 32
TILE_BLOCK_BYTES = 544
_CODE_BYTES = 512
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "f16c", "fma")

SOURCE = (
    TILE_KERNEL_COMMON
    + r"""

namespace {

constexpr int kRows = 16, kBlock = 32, kTileBlockBytes = 544, kScaleOffset = 512;
constexpr int kRowChunk = 8;  // activation rows per pass over a tile: 8 int32 and 8 float32 accumulators

// x (count_blocks, 32) -> int16 codes and float32 steps, x ~ step * code.
void quantize_activations(const float* x, int64_t count_blocks, int16_t* codes, float* steps) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t i = 0; i < count_blocks; i++) {
        const __m512 low = _mm512_loadu_ps(x + i * kBlock), high = _mm512_loadu_ps(x + i * kBlock + 16);
        const float largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
        // NaN where x holds a NaN or an infinity (which max would drop), so it reaches the outputs
        const float poison =
            _mm512_reduce_add_ps(_mm512_add_ps(_mm512_mul_ps(low, zero), _mm512_mul_ps(high, zero)));
        const __m512 inverse = _mm512_set1_ps(largest > 0.0f ? 32767.0f / largest : 0.0f);
        // round to nearest; |x * inverse| <= 32767 (plus a rounding), the saturating narrow keeps it there
        const __m512i low_codes = _mm512_cvtps_epi32(_mm512_mul_ps(low, inverse));
        const __m512i high_codes = _mm512_cvtps_epi32(_mm512_mul_ps(high, inverse));
        _mm256_storeu_si256((__m256i*)(codes + i * kBlock), _mm512_cvtsepi32_epi16(low_codes));
        _mm256_storeu_si256((__m256i*)(codes + i * kBlock + 16), _mm512_cvtsepi32_epi16(high_codes));
        steps[i] = largest / 32767.0f + poison;
    }
}

// One tile (16 rows) times M activation rows; out[m * stride + r]. CHAINS independent int32 sums per row
// hide the latency of vpdpwssd when M is small.
template <int M>
inline void tile_product(const uint8_t* tile, int64_t blocks, const int16_t* codes, const float* steps,
                         int64_t K, float* out, int64_t stride) {
    constexpr int CHAINS = M >= 8 ? 1 : 8 / M;
    __m512 acc[M];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t* blk = tile + b * kTileBlockBytes;
        // the next tile's block: without this, 16+ rows over a weight in DRAM ran at half speed (the hardware
        // prefetcher loses the stream while a tile is reread from L1); past the last tile it is a no-op hint
        for (int line = 0; line < kTileBlockBytes; line += 64)
            _mm_prefetch((const char*)(blk + blocks * kTileBlockBytes + line), _MM_HINT_T0);
        __m512i dot[M][CHAINS];
        for (int m = 0; m < M; m++)
            for (int c = 0; c < CHAINS; c++) dot[m][c] = _mm512_setzero_si512();
#pragma GCC unroll 16
        for (int c = 0; c < 16; c++) {
            // lane r: the codes of row r for inputs 2c and 2c + 1, as two int16
            const __m512i weights = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(blk + 32 * c)));
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                int32_t pair;
                std::memcpy(&pair, codes + m * K + b * kBlock + 2 * c, 4);
                __m512i& sum = dot[m][c % CHAINS];
                sum = _mm512_dpwssd_epi32(sum, weights, _mm512_set1_epi32(pair));
            }
        }
        // |sum| <= 32 * 128 * 32768 < 2^31: exact in int32
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + kScaleOffset)));
        for (int m = 0; m < M; m++) {
            __m512i sum = dot[m][0];
            for (int c = 1; c < CHAINS; c++) sum = _mm512_add_epi32(sum, dot[m][c]);
            const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(steps[m * blocks + b]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), step, acc[m]);
        }
    }
    for (int m = 0; m < M; m++) _mm512_storeu_ps(out + m * stride, acc[m]);
}

void tile_rows(int64_t count, const uint8_t* tile, int64_t blocks, const int16_t* codes, const float* steps,
               int64_t K, float* out, int64_t stride) {
    switch (count) {
        case 1: tile_product<1>(tile, blocks, codes, steps, K, out, stride); break;
        case 2: tile_product<2>(tile, blocks, codes, steps, K, out, stride); break;
        case 3: tile_product<3>(tile, blocks, codes, steps, K, out, stride); break;
        case 4: tile_product<4>(tile, blocks, codes, steps, K, out, stride); break;
        case 5: tile_product<5>(tile, blocks, codes, steps, K, out, stride); break;
        case 6: tile_product<6>(tile, blocks, codes, steps, K, out, stride); break;
        case 7: tile_product<7>(tile, blocks, codes, steps, K, out, stride); break;
        default: tile_product<8>(tile, blocks, codes, steps, K, out, stride); break;
    }
}

// Tiles per unit of work: at most 8 (outputs staged and written in runs of up to 512 bytes per row; rows
// N floats apart written 64 bytes at a time hit the same few L1 sets); bands a multiple of the threads.
int64_t band_tiles(int64_t tiles, int nthreads) {
    const int64_t per_thread = (tiles + 8 * nthreads - 1) / (8 * nthreads);
    const int64_t bands = std::max<int64_t>(1, per_thread * nthreads);
    return std::max<int64_t>(1, (tiles + bands - 1) / bands);
}

}  // namespace

extern "C" int ember_int8_abi_version() { return 1; }

// y (M, N) float32 = x (M, K) float32 times the packed (N, K) weight, transposed.
extern "C" void ember_int8_matmul(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N,
                                  float* y, int nthreads) {
    const int64_t blocks = K / kBlock, tiles = (N + kRows - 1) / kRows;
    std::vector<int16_t> codes(M * K);
    std::vector<float> steps(M * blocks);
    quantize_activations(x, M * blocks, codes.data(), steps.data());
    const int64_t band = band_tiles(tiles, nthreads), bands = (tiles + band - 1) / band;
    const int64_t stride = band * kRows;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && bands > 1)
    {
        std::vector<float> staged(M * stride);  // (M, band * 16)
#pragma omp for schedule(static)
        for (int64_t first = 0; first < bands; first++) {
            const int64_t first_tile = first * band, count = std::min<int64_t>(band, tiles - first_tile);
            for (int64_t u = 0; u < count; u++) {
                const uint8_t* tile = packed + (first_tile + u) * blocks * kTileBlockBytes;
                for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {  // the tile stays in L1 for all rows
                    tile_rows(std::min<int64_t>(kRowChunk, M - m0), tile, blocks, codes.data() + m0 * K,
                              steps.data() + m0 * blocks, K, staged.data() + m0 * stride + u * kRows, stride);
                }
            }
            const int64_t columns = std::min<int64_t>(count * kRows, N - first_tile * kRows);
            for (int64_t m = 0; m < M; m++) {
                float* destination = y + m * N + first_tile * kRows;
                std::memcpy(destination, staged.data() + m * stride, columns * sizeof(float));
            }
        }
    }
}

// out (K, N), float32 (out_bf16 == 0) or bfloat16: the weight transposed, d * q (exact in float32).
extern "C" void ember_int8_dequantize_transposed(const uint8_t* packed, int64_t N, int64_t K, void* out,
                                                 int out_bf16, int nthreads) {
    const int64_t blocks = K / kBlock, tiles = (N + kRows - 1) / kRows;
    const __m512i deinterleave = _mm512_load_si512((const void*)kDeinterleaveOrder);
    // Blocks outermost, then bands of 8 tiles staged, so that out is written in 512-byte runs per row.
    constexpr int kBand = 8;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        alignas(64) float staged[kBlock][kBand * kRows];
        for (int64_t band = 0; band < tiles; band += kBand) {
            const int64_t band_count = std::min<int64_t>(kBand, tiles - band);
            for (int64_t u = 0; u < band_count; u++) {
                const uint8_t* blk = packed + ((band + u) * blocks + b) * kTileBlockBytes;
                const __m256i half_scales = _mm256_loadu_si256((const __m256i*)(blk + kScaleOffset));
                const __m512 scale = _mm512_cvtph_ps(half_scales);
                for (int c = 0; c < 16; c++) {
                    const __m256i bytes = _mm256_loadu_si256((const __m256i*)(blk + 32 * c));
                    const __m512i q = _mm512_permutexvar_epi16(deinterleave, _mm512_cvtepi8_epi16(bytes));
                    for (int e = 0; e < 2; e++) {
                        const __m256i half = e == 0 ? _mm512_castsi512_si256(q)
                                                    : _mm512_extracti64x4_epi64(q, 1);
                        const __m512 code = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(half));
                        _mm512_store_ps(&staged[2 * c + e][u * kRows], _mm512_mul_ps(code, scale));
                    }
                }
            }
            const int64_t columns = std::min<int64_t>(band_count * kRows, N - band * kRows);
            write_staged_block(&staged[0][0], kBand * kRows, kBlock, columns, out, b * kBlock, N,
                               band * kRows, out_bf16);
        }
    }
}

// out (count, K) float32: rows ids[i] of the weight, d * q exactly. Returns 0, or 1 (writing nothing)
// when an id is outside 0..N-1.
extern "C" int ember_int8_rows(const uint8_t* packed, int64_t N, int64_t K, const int64_t* ids, int64_t count,
                               float* out) {
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= N) return 1;
    const int64_t blocks = K / kBlock;
    for (int64_t i = 0; i < count; i++) {
        const int64_t tile = ids[i] / kRows, r = ids[i] % kRows;
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t* blk = packed + (tile * blocks + b) * kTileBlockBytes;
            uint16_t half;
            std::memcpy(&half, blk + kScaleOffset + 2 * r, 2);
            const float scale = _cvtsh_ss(half);
            float* dst = out + i * K + b * kBlock;
            for (int c = 0; c < 16; c++)
                for (int e = 0; e < 2; e++) dst[2 * c + e] = (float)(int8_t)blk[32 * c + 2 * r + e] * scale;
        }
    }
    return 0;
}
"""
)


def _declare(library: ctypes.CDLL) -> None:
    declare_tile_kernels(library, "ember_int8")
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    library.ember_int8_rows.argtypes = [pointer, i64, i64, pointer, i64, pointer]
    library.ember_int8_rows.restype = ctypes.c_int


LIBRARY = NativeLibrary("ember_int8", SOURCE, _REQUIRED_CPU_FLAGS, _declare)


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

// What the int4 and int8 tile kernels share: headers, the lane order that splits interleaved word
// lanes, and the write-out of a staged band (see the dequantize kernels' comments).
#pragma once
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

// out (K, N), float32 (out_bf16 == 0) or bfloat16: a tiled weight dequantized and transposed. Blocks
// outermost, then bands of 8 tiles staged in a small buffer, so that out is written in 256- or 512-byte
// runs per row: 16-value pieces N apart (N = 3072 or 49152) hit the same few L1 sets and TLB entries,
// 5-30x slower. expand(block bytes, staged, u) writes the 32 inputs x 16 rows of one tile's block into
// staged[input][u * 16 + row].
template <int kTileBlockBytes, typename Expand>
inline void dequantize_transposed_tiles(const uint8_t* packed, int64_t N, int64_t K, void* out, int out_bf16,
                                        int nthreads, Expand expand) {
    constexpr int kRows = 16, kBlock = 32, kBand = 8;
    const int64_t blocks = K / kBlock, tiles = (N + kRows - 1) / kRows;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        alignas(64) float staged[kBlock][kBand * kRows];
        for (int64_t band = 0; band < tiles; band += kBand) {
            const int64_t band_tiles = std::min<int64_t>(kBand, tiles - band);
            for (int64_t u = 0; u < band_tiles; u++)
                expand(packed + ((band + u) * blocks + b) * kTileBlockBytes, staged, u);
            const int64_t columns = std::min<int64_t>(band_tiles * kRows, N - band * kRows);
            write_staged_block(&staged[0][0], kBand * kRows, kBlock, columns, out, b * kBlock, N,
                               band * kRows, out_bf16);
        }
    }
}

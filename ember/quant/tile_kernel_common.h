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

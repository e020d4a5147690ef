#include "tile_kernel_common.h"

namespace {

constexpr int kRows = 16, kBlock = 32, kTileBlockBytes = 320;

// Field s of each 16-bit word, OR-ed into the bits of bfloat16 128.0: the bfloat16 value 128 + q.
template <int S>
inline __m512i field_plus_128(__m512i words) {
    const __m512i low4 = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
    __m512i shifted = S == 0 ? words : _mm512_srli_epi16(words, 4 * S);
    return _mm512_ternarylogic_epi32(shifted, low4, bias, 0xEA);  // (shifted & low4) | bias
}

template <int S>
inline __m512i field(__m512i words) {
    __m512i shifted = S == 0 ? words : _mm512_srli_epi16(words, 4 * S);
    return _mm512_and_si512(shifted, _mm512_set1_epi16(0x000F));
}

// Independent partial sums per row that hide vdpbf16ps latency. The same for every batch size: a row's
// sum order, and so its rounding, must not depend on which rows share the call (greedy output alone
// equals greedy output in a batch). Two measured within this machine's noise (about 15 %) of the 4 chains
// one row had and the 1 that eight rows had.
constexpr int kChains = 2;

// One tile (16 rows) times M activation rows.
template <int M>
inline void tile_product(const uint8_t* tile, int64_t blocks, const uint16_t* xb, const float* xsum,
                         int64_t K, float out[][kRows]) {
    __m512 acc[M];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t* blk = tile + b * kTileBlockBytes;
        __m512 dot[M][kChains];
        for (int m = 0; m < M; m++)
            for (int c = 0; c < kChains; c++) dot[m][c] = _mm512_setzero_ps();
        for (int j = 0; j < 4; j++) {
            __m512i words = _mm512_loadu_si512((const void*)(blk + 64 * j));
            __m512i f[4] = {field_plus_128<0>(words), field_plus_128<1>(words),
                            field_plus_128<2>(words), field_plus_128<3>(words)};
            for (int s = 0; s < 4; s++) {
                const int64_t k = b * kBlock + 8 * j + 2 * s;
                for (int m = 0; m < M; m++) {
                    int32_t pair;
                    std::memcpy(&pair, xb + m * K + k, 4);
                    __m512 &d = dot[m][(4 * j + s) % kChains];
                    d = _mm512_dpbf16_ps(d, (__m512bh)f[s], (__m512bh)_mm512_set1_epi32(pair));
                }
            }
        }
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 256)));
        __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 288)));
        for (int m = 0; m < M; m++) {
            __m512 sum = dot[m][0];
            for (int c = 1; c < kChains; c++) sum = _mm512_add_ps(sum, dot[m][c]);
            __m512 xs = _mm512_set1_ps(xsum[m * blocks + b]);
            sum = _mm512_fnmadd_ps(xs, _mm512_set1_ps(128.0f), sum);  // sum(q * x) of this block
            acc[m] = _mm512_fmadd_ps(sum, scale, acc[m]);
            acc[m] = _mm512_fmadd_ps(minimum, xs, acc[m]);
        }
    }
    for (int m = 0; m < M; m++) _mm512_storeu_ps(out[m], acc[m]);
}

template <int M>
void product_rows(const uint8_t* packed, int64_t tiles, int64_t blocks, const uint16_t* xb, const float* xsum,
                  int64_t K, int64_t N, float* y, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && tiles > 1)
    for (int64_t t = 0; t < tiles; t++) {
        float out[M][kRows];
        tile_product<M>(packed + t * blocks * kTileBlockBytes, blocks, xb, xsum, K, out);
        const int64_t rows = std::min<int64_t>(kRows, N - t * kRows);
        for (int m = 0; m < M; m++) std::memcpy(y + m * N + t * kRows, out[m], rows * sizeof(float));
    }
}

}  // namespace

extern "C" int ember_int4_abi_version() { return 1; }

// y (M, N) float32 = x (M, K) float32 times the packed (N, K) weight, transposed.
extern "C" void ember_int4_matmul(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N,
                                  float* y, int nthreads) {
    const int64_t blocks = K / kBlock, tiles = (N + kRows - 1) / kRows;
    std::vector<uint16_t> xb(M * K);
    std::vector<float> xsum(M * blocks);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < blocks; b++) {
            const float* src = x + m * K + b * kBlock;
            __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
            _mm512_storeu_si512((void*)(xb.data() + m * K + b * kBlock), (__m512i)pairs);
            __m512i bits = (__m512i)pairs;  // the block sum of the rounded values, as the kernel sees them
            __m512 low = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
            __m512 high = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(0xFFFF0000)));
            xsum[m * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(low, high));
        }
    }
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t count = std::min<int64_t>(8, M - m0);
        const uint16_t* xm = xb.data() + m0 * K;
        const float* sm = xsum.data() + m0 * blocks;
        float* ym = y + m0 * N;
        switch (count) {
            case 1: product_rows<1>(packed, tiles, blocks, xm, sm, K, N, ym, nthreads); break;
            case 2: product_rows<2>(packed, tiles, blocks, xm, sm, K, N, ym, nthreads); break;
            case 3: product_rows<3>(packed, tiles, blocks, xm, sm, K, N, ym, nthreads); break;
            case 4: product_rows<4>(packed, tiles, blocks, xm, sm, K, N, ym, nthreads); break;
            case 5: product_rows<5>(packed, tiles, blocks, xm, sm, K, N, ym, nthreads); break;
            case 6: product_rows<6>(packed, tiles, blocks, xm, sm, K, N, ym, nthreads); break;
            case 7: product_rows<7>(packed, tiles, blocks, xm, sm, K, N, ym, nthreads); break;
            default: product_rows<8>(packed, tiles, blocks, xm, sm, K, N, ym, nthreads); break;
        }
    }
}

// out (K, N), float32 (out_bf16 == 0) or bfloat16: the dequantized weight, transposed, d * q + m
// computed as one fused multiply-add (exact for Q4_0 / Q4_1, whose d * q is exact in float32).
extern "C" void ember_int4_dequantize_transposed(const uint8_t* packed, int64_t N, int64_t K, void* out,
                                                 int out_bf16, int nthreads) {
    const __m512i deinterleave = _mm512_load_si512((const void*)kDeinterleaveOrder);
    dequantize_transposed_tiles<kTileBlockBytes>(
        packed, N, K, out, out_bf16, nthreads, [&](const uint8_t* blk, float (*staged)[8 * kRows], int64_t u) {
            __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 256)));
            __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 288)));
            for (int j = 0; j < 4; j++) {
                __m512i words = _mm512_loadu_si512((const void*)(blk + 64 * j));
                __m512i f[4] = {field<0>(words), field<1>(words), field<2>(words), field<3>(words)};
                for (int s = 0; s < 4; s++) {
                    __m512i q = _mm512_permutexvar_epi16(deinterleave, f[s]);
                    for (int e = 0; e < 2; e++) {
                        __m256i half = e == 0 ? _mm512_castsi512_si256(q) : _mm512_extracti64x4_epi64(q, 1);
                        __m512 code = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(half));
                        __m512 value = _mm512_fmadd_ps(code, scale, minimum);
                        _mm512_store_ps(&staged[8 * j + 2 * s + e][u * kRows], value);
                    }
                }
            }
        });
}

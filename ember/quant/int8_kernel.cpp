#include "tile_kernel_common.h"

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
    const __m512i deinterleave = _mm512_load_si512((const void*)kDeinterleaveOrder);
    dequantize_transposed_tiles<kTileBlockBytes>(
        packed, N, K, out, out_bf16, nthreads, [&](const uint8_t* blk, float (*staged)[8 * kRows], int64_t u) {
            const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + kScaleOffset)));
            for (int c = 0; c < 16; c++) {
                const __m256i bytes = _mm256_loadu_si256((const __m256i*)(blk + 32 * c));
                const __m512i q = _mm512_permutexvar_epi16(deinterleave, _mm512_cvtepi8_epi16(bytes));
                for (int e = 0; e < 2; e++) {
                    const __m256i half = e == 0 ? _mm512_castsi512_si256(q) : _mm512_extracti64x4_epi64(q, 1);
                    const __m512 code = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(half));
                    _mm512_store_ps(&staged[2 * c + e][u * kRows], _mm512_mul_ps(code, scale));
                }
            }
        });
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

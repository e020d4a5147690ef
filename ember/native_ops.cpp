// Fused float32 operators for the decode step; see native_ops.py for what each is for.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
// AVX2 paths where the CPU has AVX2 and FMA but not AVX-512 (the build's -march=native decides).
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define EMBER_OPS_AVX2 1
#endif

namespace {

#if defined(__AVX512F__)
// exp(x) for 16 floats within ~1 ulp (Cephes' expf polynomial); 0 below -104, clamped above 88.7.
inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);  // p * 2^n, underflowing to 0 as exp does
}
#endif

#if defined(EMBER_OPS_AVX2)
// exp16's polynomial on 8 floats; 0 below -87.3 (where exp leaves the normal floats), clamped above 88.
inline __m256 exp8(__m256 x) {
    const __m256 normal = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n from its exponent bits: n lies in [-126, 127] after the clamp
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(exponent)), normal);
}

inline float sum8(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

inline float max8(__m256 v) {
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
}
#endif

// x[i] = exp(x[i] - shift); returns the sum of the results.
inline float exp_shifted(float* x, int64_t n, float shift) {
    int64_t i = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 total = _mm512_setzero_ps();
    const __m512 s = _mm512_set1_ps(shift);
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), s));
        _mm512_storeu_ps(x + i, e);
        total = _mm512_add_ps(total, e);
    }
    sum = _mm512_reduce_add_ps(total);
#elif defined(EMBER_OPS_AVX2)
    __m256 total = _mm256_setzero_ps();
    const __m256 s = _mm256_set1_ps(shift);
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
        _mm256_storeu_ps(x + i, e);
        total = _mm256_add_ps(total, e);
    }
    sum = sum8(total);
#endif
    for (; i < n; i++) {
        x[i] = std::exp(x[i] - shift);
        sum += x[i];
    }
    return sum;
}

inline float dot(const float* a, const float* b, int64_t n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

// Pairs (2i, 2i+1) of x rotated by (cos, sin) pair i of rotation, into out (out may be x).
inline void rotate_pairs(const float* x, const float* rotation, int64_t dim, float* out) {
    for (int64_t i = 0; i < dim / 2; i++) {
        const float x0 = x[2 * i], x1 = x[2 * i + 1], c = rotation[2 * i], s = rotation[2 * i + 1];
        out[2 * i] = x0 * c - x1 * s;
        out[2 * i + 1] = x0 * s + x1 * c;
    }
}

// The largest of n floats.
inline float maximum_of(const float* x, int64_t n) {
    float maximum = -INFINITY;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 maxima = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) maxima = _mm512_max_ps(maxima, _mm512_loadu_ps(x + i));
    maximum = _mm512_reduce_max_ps(maxima);
#elif defined(EMBER_OPS_AVX2)
    __m256 maxima = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) maxima = _mm256_max_ps(maxima, _mm256_loadu_ps(x + i));
    maximum = max8(maxima);
#endif
    for (; i < n; i++) maximum = x[i] > maximum ? x[i] : maximum;
    return maximum;
}

// Which of the keys each query row sees: keys begins[g] .. ends[g] - 1 of the `length` a call attends
// over (a prompt chunk's rows: causal, maybe windowed). Null arrays: every row sees every key (decode).
struct RowLimits {
    const int64_t* begins;
    const int64_t* ends;
    int64_t begin(int64_t g) const { return begins != nullptr ? begins[g] : 0; }
    int64_t end(int64_t g, int64_t length) const { return ends != nullptr ? ends[g] : length; }
};

// scores (group, length) -> softmax of each row over the keys it sees, in place; the others weigh 0.
inline void softmax_rows(float* scores, int64_t group, int64_t length, RowLimits limits) {
    for (int64_t g = 0; g < group; g++) {
        float* score = scores + g * length;
        const int64_t begin = limits.begin(g), end = limits.end(g, length);
        std::fill(score, score + begin, 0.0f);
        std::fill(score + end, score + length, 0.0f);
        float* seen = score + begin;
        const float inverse_sum = 1.0f / exp_shifted(seen, end - begin, maximum_of(seen, end - begin));
#pragma omp simd
        for (int64_t j = 0; j < end - begin; j++) seen[j] *= inverse_sum;
    }
}

// A run of consecutive cached positions inside one block of the paged cache: key i of the run at
// keys + i * stride (its value likewise), for i < length. Rows of one kv head lie `stride` floats apart.
struct KeyRun {
    const float* keys;
    const float* values;
    int64_t length;
};

// Softmax attention of `group` queries (rotated, scaled) over the keys and values of `runs`, `length`
// keys in all, in order: out (group, dim). scores is scratch of group * length floats.
void attend_generic(const float* query, const KeyRun* runs, int64_t num_runs, int64_t length, int64_t stride,
                    int64_t group, int64_t dim, float* scores, float* out, RowLimits limits) {
    for (int64_t r = 0, j = 0; r < num_runs; r++)
        for (int64_t i = 0; i < runs[r].length; i++, j++)
            for (int64_t g = 0; g < group; g++)
                scores[g * length + j] = dot(query + g * dim, runs[r].keys + i * stride, dim);
    softmax_rows(scores, group, length, limits);
    std::memset(out, 0, group * dim * sizeof(float));
    for (int64_t r = 0, j = 0; r < num_runs; r++) {
        for (int64_t i = 0; i < runs[r].length; i++, j++) {
            const float* value = runs[r].values + i * stride;
            for (int64_t g = 0; g < group; g++) {
                if (j >= limits.end(g, length)) continue;
                const float weight = scores[g * length + j];
                float* o = out + g * dim;
#pragma omp simd
                for (int64_t k = 0; k < dim; k++) o[k] += weight * value[k];
            }
        }
    }
}

#if defined(__AVX512F__)
// Lane (4k + m) of the result is the sum of the 16 lanes of v[4m + k]: four rounds of pairing vectors,
// 45 instructions for 16 sums where 16 separate reductions take about 130.
inline __m512 lane_sums(const __m512 v[16]) {
    __m512 halves[8], quarters[4], eighths[2];
    for (int i = 0; i < 8; i++)  // 256-bit halves: [v(2i) 8 partial sums | v(2i+1) 8 partial sums]
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                                  _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)  // 128-bit quarters: 4 vectors of 4 partial sums each
        quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                    _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)  // pairs within each quarter
        eighths[i] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0x44),
                                   _mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88),
                         _mm512_shuffle_ps(eighths[0], eighths[1], 0xDD));
}

template <int D>
inline __m512 dot_lanes(const __m512 q[D], const float* key) {
    __m512 product = _mm512_mul_ps(q[0], _mm512_loadu_ps(key));
    for (int v = 1; v < D; v++) product = _mm512_fmadd_ps(q[v], _mm512_loadu_ps(key + 16 * v), product);
    return product;
}

// attend_generic for dim = 16 * D: queries and accumulators in registers, the dot products of 16 keys
// reduced together, each block of 16 keys serving every query head of the group while it is in L1.
template <int D>
void attend_avx512(const float* query, const KeyRun* runs, int64_t num_runs, int64_t length, int64_t stride,
                   int64_t group, float* scores, float* out, RowLimits limits) {
    constexpr int64_t dim = 16 * D;
    constexpr int64_t kBlock = 16;
    for (int64_t r = 0, offset = 0; r < num_runs; offset += runs[r].length, r++) {
        const float* keys = runs[r].keys;
        const int64_t n = runs[r].length;
        int64_t j = 0;
        for (; j + kBlock <= n; j += kBlock) {
            for (int64_t g = 0; g < group; g++) {
                __m512 q[D], products[kBlock];
                for (int v = 0; v < D; v++) q[v] = _mm512_loadu_ps(query + g * dim + 16 * v);
                for (int i = 0; i < kBlock; i++)  // key order 4 (i % 4) + i / 4: the order lane_sums undoes
                    products[i] = dot_lanes<D>(q, keys + (j + 4 * (i % 4) + i / 4) * stride);
                _mm512_storeu_ps(scores + g * length + offset + j, lane_sums(products));
            }
        }
        for (; j < n; j++) {
            for (int64_t g = 0; g < group; g++) {
                __m512 q[D];
                for (int v = 0; v < D; v++) q[v] = _mm512_loadu_ps(query + g * dim + 16 * v);
                scores[g * length + offset + j] = _mm512_reduce_add_ps(dot_lanes<D>(q, keys + j * stride));
            }
        }
    }
    softmax_rows(scores, group, length, limits);
    for (int64_t g = 0; g < group; g++) {
        const float* weights = scores + g * length;
        const int64_t end = limits.end(g, length);
        __m512 accumulator[2][D];  // even and odd keys: two dependency chains
        for (int v = 0; v < D; v++) accumulator[0][v] = accumulator[1][v] = _mm512_setzero_ps();
        for (int64_t r = 0, offset = 0; r < num_runs; offset += runs[r].length, r++) {
            const float* values = runs[r].values;
            const int64_t n = std::min(runs[r].length, end - offset);  // keys past the row's end weigh 0
            for (int64_t k = 0; k < n; k += 2) {
                for (int e = 0; e < 2 && k + e < n; e++) {
                    const __m512 weight = _mm512_set1_ps(weights[offset + k + e]);
                    const float* value = values + (k + e) * stride;
                    for (int v = 0; v < D; v++) {
                        const __m512 row = _mm512_loadu_ps(value + 16 * v);
                        accumulator[e][v] = _mm512_fmadd_ps(weight, row, accumulator[e][v]);
                    }
                }
            }
        }
        for (int v = 0; v < D; v++)
            _mm512_storeu_ps(out + g * dim + 16 * v, _mm512_add_ps(accumulator[0][v], accumulator[1][v]));
    }
}
#endif

#if defined(EMBER_OPS_AVX2)
// Lane i of the result is the sum of the 8 lanes of the i-th argument.
inline __m128 lane_sums4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // [low halves | high]
    return _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
}

// Scores of M query rows (1 or 2, `dim` = 8 * D apart) against 4 keys (`stride` apart): each key vector
// loaded once for both rows, 8 accumulators, 6 loads per 8 FMAs.
template <int D, int M>
inline void score_block(const float* query, const float* keys, int64_t stride, float* scores, int64_t length) {
    __m256 acc[M][4];
    for (int m = 0; m < M; m++)
        for (int i = 0; i < 4; i++) acc[m][i] = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int v = 0; v < D; v++) {
        __m256 key[4];
        for (int i = 0; i < 4; i++) key[i] = _mm256_loadu_ps(keys + i * stride + 8 * v);
        for (int m = 0; m < M; m++) {
            const __m256 q = _mm256_loadu_ps(query + m * 8 * D + 8 * v);
            for (int i = 0; i < 4; i++) acc[m][i] = _mm256_fmadd_ps(q, key[i], acc[m][i]);
        }
    }
    for (int m = 0; m < M; m++)
        _mm_storeu_ps(scores + m * length, lane_sums4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
}

// out rows (M of 1 or 2) += their weights times the values of keys 0..n-1, for the W <= 4 vectors of
// the output starting at vector v0: each value vector loaded once for both rows.
template <int M, int W>
inline void weigh_values(const float* weights, int64_t length, const float* values, int64_t n, int64_t stride,
                         int v0, __m256 acc[M][4]) {
    for (int64_t k = 0; k < n; k++) {
        const float* value = values + k * stride + 8 * v0;
        __m256 weight[M];
        for (int m = 0; m < M; m++) weight[m] = _mm256_set1_ps(weights[m * length + k]);
        for (int v = 0; v < W; v++) {
            const __m256 row = _mm256_loadu_ps(value + 8 * v);
            for (int m = 0; m < M; m++) acc[m][v] = _mm256_fmadd_ps(weight[m], row, acc[m][v]);
        }
    }
}

// Rows g.. (M of 1 or 2) of the output: softmax weights times values, 4 output vectors at a time (8
// accumulators). Weights past a row's end are 0 (softmax_rows), so both rows run to the later end.
template <int D, int M>
inline void value_rows(const float* weights, int64_t length, const KeyRun* runs, int64_t num_runs,
                       int64_t stride, int64_t end, float* out) {
#pragma GCC unroll 4
    for (int v0 = 0; v0 < D; v0 += 4) {
        __m256 acc[M][4];
        for (int m = 0; m < M; m++)
            for (int v = 0; v < 4; v++) acc[m][v] = _mm256_setzero_ps();
        for (int64_t r = 0, offset = 0; r < num_runs && offset < end; offset += runs[r].length, r++) {
            const int64_t n = std::min(runs[r].length, end - offset);
            if (D - v0 >= 4)
                weigh_values<M, 4>(weights + offset, length, runs[r].values, n, stride, v0, acc);
            else
                weigh_values<M, 2>(weights + offset, length, runs[r].values, n, stride, v0, acc);
        }
        for (int m = 0; m < M; m++)
            for (int v = 0; v < std::min(4, D - v0); v++) _mm256_storeu_ps(out + m * 8 * D + 8 * (v0 + v), acc[m][v]);
    }
}

// attend_generic for dim = 8 * D on AVX2's 16 registers: query rows in pairs, keys in blocks of 4 (each
// key and value vector serving two rows while it is in a register), every block serving all the rows
// while it is in L1.
template <int D>
void attend_avx2(const float* query, const KeyRun* runs, int64_t num_runs, int64_t length, int64_t stride,
                 int64_t group, float* scores, float* out, RowLimits limits) {
    static_assert(D % 2 == 0, "the output is written 4 or 2 vectors at a time");
    constexpr int64_t dim = 8 * D;
    for (int64_t r = 0, offset = 0; r < num_runs; offset += runs[r].length, r++) {
        const float* keys = runs[r].keys;
        const int64_t n = runs[r].length;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            int64_t g = 0;
            for (; g + 2 <= group; g += 2)
                score_block<D, 2>(query + g * dim, keys + j * stride, stride, scores + g * length + offset + j, length);
            if (g < group)
                score_block<D, 1>(query + g * dim, keys + j * stride, stride, scores + g * length + offset + j, length);
        }
        for (; j < n; j++) {
            for (int64_t g = 0; g < group; g++) {
                const float* q = query + g * dim;
                const float* key = keys + j * stride;
                __m256 product = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(key));
                for (int v = 1; v < D; v++)
                    product = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v), _mm256_loadu_ps(key + 8 * v), product);
                scores[g * length + offset + j] = sum8(product);
            }
        }
    }
    softmax_rows(scores, group, length, limits);
    int64_t g = 0;
    for (; g + 2 <= group; g += 2) {
        const int64_t end = std::max(limits.end(g, length), limits.end(g + 1, length));
        value_rows<D, 2>(scores + g * length, length, runs, num_runs, stride, end, out + g * dim);
    }
    if (g < group)
        value_rows<D, 1>(scores + g * length, length, runs, num_runs, stride, limits.end(g, length), out + g * dim);
}
#endif

void attend(const float* query, const KeyRun* runs, int64_t num_runs, int64_t length, int64_t stride,
            int64_t group, int64_t dim, float* scores, float* out, RowLimits limits = {nullptr, nullptr}) {
#if defined(__AVX512F__)
    switch (dim) {
        case 32: return attend_avx512<2>(query, runs, num_runs, length, stride, group, scores, out, limits);
        case 64: return attend_avx512<4>(query, runs, num_runs, length, stride, group, scores, out, limits);
        case 80: return attend_avx512<5>(query, runs, num_runs, length, stride, group, scores, out, limits);
        case 96: return attend_avx512<6>(query, runs, num_runs, length, stride, group, scores, out, limits);
        case 128: return attend_avx512<8>(query, runs, num_runs, length, stride, group, scores, out, limits);
        case 256: return attend_avx512<16>(query, runs, num_runs, length, stride, group, scores, out, limits);
        default: break;
    }
#elif defined(EMBER_OPS_AVX2)
    switch (dim) {
        case 32: return attend_avx2<4>(query, runs, num_runs, length, stride, group, scores, out, limits);
        case 64: return attend_avx2<8>(query, runs, num_runs, length, stride, group, scores, out, limits);
        case 80: return attend_avx2<10>(query, runs, num_runs, length, stride, group, scores, out, limits);
        case 96: return attend_avx2<12>(query, runs, num_runs, length, stride, group, scores, out, limits);
        case 128: return attend_avx2<16>(query, runs, num_runs, length, stride, group, scores, out, limits);
        case 256: return attend_avx2<32>(query, runs, num_runs, length, stride, group, scores, out, limits);
        default: break;
    }
#endif
    attend_generic(query, runs, num_runs, length, stride, group, dim, scores, out, limits);
}

// The arguments one forward call's layers share, packed by `DecodeAttention` as 13 int64 values.
struct DecodeArguments {
    const float* rotations;  // (batch, dim / 2, 2): cos and sin of each pair's angle at the position
    const int64_t* block_table;  // (batch, table_width): the cache blocks holding each sequence's positions
    const int64_t* positions;  // (batch,)
    float* out;  // (batch, heads * dim)
    int64_t batch, heads, kv_heads, dim, block_size, table_width, window, nthreads, parallel_min_keys;
};
static_assert(sizeof(DecodeArguments) == 13 * sizeof(int64_t), "DecodeArguments is 13 int64 values");

struct DecodeStep {
    const DecodeArguments& arguments;
    const float* qkv;
    float* key_cache;
    float* value_cache;
};

// Where position p of kv head h lives for row b: pools are (blocks, block_size, kv_heads, dim).
inline int64_t pool_offset(const DecodeArguments& arguments, int64_t b, int64_t h, int64_t p) {
    const int64_t* blocks = arguments.block_table + b * arguments.table_width;
    const int64_t block_size = arguments.block_size;
    return ((blocks[p / block_size] * block_size + p % block_size) * arguments.kv_heads + h) * arguments.dim;
}

// Row b, kv head h: rotate and store its key, store its value.
void store_task(const DecodeStep& step, int64_t b, int64_t h) {
    const DecodeArguments& arguments = step.arguments;
    const int64_t dim = arguments.dim, heads = arguments.heads, kv_heads = arguments.kv_heads;
    const float* qkv = step.qkv + b * (heads + 2 * kv_heads) * dim;
    const int64_t own = pool_offset(arguments, b, h, arguments.positions[b]);
    rotate_pairs(qkv + (heads + h) * dim, arguments.rotations + b * dim, dim, step.key_cache + own);
    std::memcpy(step.value_cache + own, qkv + (heads + kv_heads + h) * dim, dim * sizeof(float));
}

// Rows per attention task when consecutive rows are one sequence (a prompt chunk riding in a decode
// step): a task reads its kv head's keys once for all its rows. Four keep two threads busy on a chunk of
// eight rows over three kv heads (6 tasks).
constexpr int64_t kTaskRows = 4;

// Rows first..first+rows-1 (one sequence at consecutive positions; one row for a decode step), kv head h:
// every query head of the group at every row attends together over the keys the last row sees, each row
// limited to its own (causal, maybe windowed). Each row's keys are stored by now, theirs included.
void attend_task(const DecodeStep& step, int64_t first_row, int64_t rows, int64_t h) {
    const DecodeArguments& arguments = step.arguments;
    const int64_t dim = arguments.dim, heads = arguments.heads, kv_heads = arguments.kv_heads;
    const int64_t group = heads / kv_heads, row_width = (heads + 2 * kv_heads) * dim, count = rows * group;
    const int64_t window = arguments.window, block_size = arguments.block_size, stride = kv_heads * dim;
    const int64_t start = arguments.positions[first_row], last = start + rows - 1;
    const int64_t first = window > 0 && start - window + 1 > 0 ? start - window + 1 : 0;
    const int64_t length = last + 1 - first;
    thread_local std::vector<KeyRun> runs;  // the visible keys, one run per block they touch
    runs.clear();
    for (int64_t p = first; p <= last;) {
        const int64_t n = std::min(block_size - p % block_size, last + 1 - p);
        const int64_t offset = pool_offset(arguments, first_row, h, p);
        runs.push_back({step.key_cache + offset, step.value_cache + offset, n});
        p += n;
    }
    const float scale = 1.0f / std::sqrt((float)dim);
    thread_local std::vector<float> scratch;  // grows to the longest sequence once, then no allocations
    if ((int64_t)scratch.size() < count * (2 * dim + length)) scratch.resize(count * (2 * dim + length));
    thread_local std::vector<int64_t> limits;  // each query row's first and end key, from `first`
    limits.resize(2 * count);
    float* query = scratch.data();  // (count, dim)
    float* scores = query + count * dim;  // (count, length)
    float* result = scores + count * length;  // (count, dim)
    for (int64_t t = 0; t < rows; t++) {
        const int64_t b = first_row + t, position = start + t;
        for (int64_t g = 0; g < group; g++) {
            float* q = query + (t * group + g) * dim;
            rotate_pairs(step.qkv + b * row_width + (h * group + g) * dim, arguments.rotations + b * dim, dim, q);
            for (int64_t i = 0; i < dim; i++) q[i] *= scale;
            const int64_t seen_from = window > 0 ? std::max(first, position - window + 1) : first;
            limits[t * group + g] = seen_from - first;
            limits[count + t * group + g] = position + 1 - first;
        }
    }
    attend(query, runs.data(), (int64_t)runs.size(), length, stride, count, dim, scores, result,
           {limits.data(), limits.data() + count});
    for (int64_t t = 0; t < rows; t++)
        std::memcpy(arguments.out + ((first_row + t) * heads + h * group) * dim, result + t * group * dim,
                    group * dim * sizeof(float));
}

// Whether row b continues row b - 1's sequence: the next position, the same cache blocks.
bool continues(const DecodeArguments& arguments, int64_t b) {
    const int64_t width = arguments.table_width;
    return arguments.positions[b] == arguments.positions[b - 1] + 1 &&
           std::equal(arguments.block_table + b * width, arguments.block_table + (b + 1) * width,
                      arguments.block_table + (b - 1) * width);
}

// The attention tasks of a step, (first row, rows, kv head): runs of rows of one sequence split into
// groups of kTaskRows, times the kv heads.
struct AttendTask {
    int64_t first_row, rows, h;
};

void attend_tasks(const DecodeArguments& arguments, std::vector<AttendTask>& tasks) {
    tasks.clear();
    for (int64_t b = 0; b < arguments.batch;) {
        int64_t end = b + 1;
        while (end < arguments.batch && end - b < kTaskRows && continues(arguments, end)) end++;
        for (int64_t h = 0; h < arguments.kv_heads; h++) tasks.push_back({b, end - b, h});
        b = end;
    }
}

}  // namespace

extern "C" int ember_ops_abi_version() { return 3; }

// hidden (rows, dim) += delta (when not null); out (rows, dim) = rms_norm(hidden) * weight.
extern "C" void ember_add_rms_norm(float* hidden, const float* delta, const float* weight, int64_t rows,
                                   int64_t dim, float eps, float* out) {
    for (int64_t r = 0; r < rows; r++) {
        float* h = hidden + r * dim;
        if (delta != nullptr) {
            const float* d = delta + r * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) h[i] += d[i];
        }
        const float inverse = 1.0f / std::sqrt(dot(h, h, dim) / (float)dim + eps);
        float* o = out + r * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) o[i] = h[i] * inverse * weight[i];
    }
}

// gate_up (rows, 2 * inner) -> out (rows, inner) = silu(gate) * up.
extern "C" void ember_silu_mul(const float* gate_up, int64_t rows, int64_t inner, float* out) {
    for (int64_t r = 0; r < rows; r++) {
        const float* gate = gate_up + r * 2 * inner;
        const float* up = gate + inner;
        float* o = out + r * inner;
        int64_t i = 0;
#if defined(__AVX512F__)
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= inner; i += 16) {
            const __m512 g = _mm512_loadu_ps(gate + i);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
            _mm512_storeu_ps(o + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
        }
#elif defined(EMBER_OPS_AVX2)
        const __m256 one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= inner; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
        }
#endif
        for (; i < inner; i++) o[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    }
}

// One decode step of attention for `batch` sequences, each adding one token, in one layer:
//   qkv (batch, (heads + 2 * kv_heads) * dim): q and k in the pairwise rotary layout, then v
//   key_cache, value_cache (blocks, block_size, kv_heads, dim): position p of sequence b lives in block
//     block_table[b, p / block_size] at row p % block_size; k and v of the new token are stored there
//   arguments->out (batch, heads * dim): softmax(q k^T / sqrt(dim)) v over keys max(0, p - window + 1) .. p
// Query head h reads kv head h / (heads / kv_heads). The blocks a step writes must not be shared with
// other sequences; several rows may be one sequence at consecutive positions (a prompt's tokens).
extern "C" void ember_decode_attention(const DecodeArguments* arguments, const float* qkv, float* key_cache,
                                       float* value_cache) {
    const DecodeStep step{*arguments, qkv, key_cache, value_cache};
    const int64_t kv_heads = arguments->kv_heads, stores = arguments->batch * kv_heads;
    thread_local std::vector<AttendTask> task_list;  // this thread's: the workers read it through `tasks`
    attend_tasks(*arguments, task_list);
    const AttendTask* tasks = task_list.data();
    const int64_t count = (int64_t)task_list.size();
    int64_t total_keys = 0;
    for (int64_t b = 0; b < arguments->batch; b++) total_keys += arguments->positions[b] + 1;
    // Every row's key is stored before any row attends: rows of one sequence read each other's.
    if (arguments->nthreads > 1 && count > 1 && total_keys * kv_heads >= arguments->parallel_min_keys) {
#pragma omp parallel num_threads(arguments->nthreads)
        {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < stores; task++) store_task(step, task / kv_heads, task % kv_heads);
#pragma omp for schedule(dynamic, 1)  // a prompt chunk's tasks outweigh decode rows' many times
            for (int64_t task = 0; task < count; task++)
                attend_task(step, tasks[task].first_row, tasks[task].rows, tasks[task].h);
        }
    } else {  // no OpenMP region at all: even an inactive one costs about a microsecond
        for (int64_t task = 0; task < stores; task++) store_task(step, task / kv_heads, task % kv_heads);
        for (int64_t task = 0; task < count; task++)
            attend_task(step, tasks[task].first_row, tasks[task].rows, tasks[task].h);
    }
}


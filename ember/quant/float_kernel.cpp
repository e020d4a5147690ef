#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int kGroupRows = 4;           // weight rows read together: four sequential streams
constexpr int kPrefetchFloats = 2048;   // 8 KiB ahead of each stream (Zen 5: 0, 1, 4 KiB were slower)

// The vector the products run on: 16 floats with AVX-512, 8 with AVX2 (the build's -march=native decides).
#if defined(__AVX512F__)
using Vector = __m512;
constexpr int kLanes = 16;
constexpr int kActivationRows = 4;  // activation rows per pass: 4 x 4 accumulators fit 32 registers
inline Vector zero() { return _mm512_setzero_ps(); }
inline Vector load(const float* p) { return _mm512_loadu_ps(p); }
inline Vector load_first(const float* p, int64_t count) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1u), p);
}
inline Vector fma(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum(Vector v) { return _mm512_reduce_add_ps(v); }
#else
using Vector = __m256;
constexpr int kLanes = 8;
constexpr int kActivationRows = 3;  // 4 x 3 accumulators, 3 inputs and a weight: 16 registers
inline Vector zero() { return _mm256_setzero_ps(); }
inline Vector load(const float* p) { return _mm256_loadu_ps(p); }
inline Vector load_first(const float* p, int64_t count) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), lanes));
}
inline Vector fma(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum(Vector v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
#endif

// y[m * N + r] = dot(x row m, w row r) for R weight rows and M activation rows, all in registers.
template <int R, int M>
inline void product(const float* x, int64_t K, const float* w, float* y, int64_t N) {
    Vector acc[R][M];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = zero();
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
        for (int r = 0; r < R; r++) _mm_prefetch((const char*)(w + r * K + k + kPrefetchFloats), _MM_HINT_T0);
        Vector xs[M];
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) xs[m] = load(x + m * K + k);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const Vector weights = load(w + r * K + k);
#pragma GCC unroll 4
            for (int m = 0; m < M; m++) acc[r][m] = fma(weights, xs[m], acc[r][m]);
        }
    }
    if (k < K) {  // the last, partial chunk of inputs
        Vector xs[M];
        for (int m = 0; m < M; m++) xs[m] = load_first(x + m * K + k, K - k);
        for (int r = 0; r < R; r++) {
            const Vector weights = load_first(w + r * K + k, K - k);
            for (int m = 0; m < M; m++) acc[r][m] = fma(weights, xs[m], acc[r][m]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) y[m * N + r] = sum(acc[r][m]);
}

// R weight rows times all M activation rows, kActivationRows at a time: the R rows stay in L1 after the
// first pass.
template <int R>
inline void weight_rows(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
    for (int64_t m0 = 0; m0 < M; m0 += kActivationRows) {
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        switch (std::min<int64_t>(kActivationRows, M - m0)) {
            case 1: product<R, 1>(xm, K, w, ym, N); break;
            case 2: product<R, 2>(xm, K, w, ym, N); break;
            case 3: product<R, 3>(xm, K, w, ym, N); break;
#if defined(__AVX512F__)
            default: product<R, 4>(xm, K, w, ym, N); break;
#endif
        }
    }
}

}  // namespace

extern "C" int ember_float_abi_version() { return 1; }

// y (M, N) float32 = x (M, K) float32 times w (N, K) float32, transposed. Each thread takes a contiguous
// range of weight rows (whole groups of four), so the threads read disjoint parts of the weight.
extern "C" void ember_float_matmul(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y,
                                   int nthreads) {
    const int64_t groups = (N + kGroupRows - 1) / kGroupRows;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && groups > 1)
    {
        const int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
        const int64_t first = std::min(N, groups * thread / threads * kGroupRows);
        const int64_t last = std::min(N, groups * (thread + 1) / threads * kGroupRows);
        int64_t n = first;
        for (; n + kGroupRows <= last; n += kGroupRows) weight_rows<kGroupRows>(x, M, K, w + n * K, y + n, N);
        for (; n < last; n++) weight_rows<1>(x, M, K, w + n * K, y + n, N);
    }
}

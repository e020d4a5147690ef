#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int kGroupRows = 4;           // weight rows read together: four sequential streams
constexpr int kPrefetchFloats = 2048;   // 8 KiB ahead of each stream (Zen 5: 0, 1, 4 KiB were slower)

// y[m * N + r] = dot(x row m, w row r) for R weight rows and M activation rows, all in registers.
template <int R, int M>
inline void product(const float* x, int64_t K, const float* w, float* y, int64_t N) {
    __m512 acc[R][M];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        for (int r = 0; r < R; r++) _mm_prefetch((const char*)(w + r * K + k + kPrefetchFloats), _MM_HINT_T0);
        __m512 xs[M];
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) xs[m] = _mm512_loadu_ps(x + m * K + k);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m512 weights = _mm512_loadu_ps(w + r * K + k);
#pragma GCC unroll 4
            for (int m = 0; m < M; m++) acc[r][m] = _mm512_fmadd_ps(weights, xs[m], acc[r][m]);
        }
    }
    if (k < K) {  // the last, partial chunk of 16 inputs
        const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1u);
        __m512 xs[M];
        for (int m = 0; m < M; m++) xs[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
        for (int r = 0; r < R; r++) {
            const __m512 weights = _mm512_maskz_loadu_ps(mask, w + r * K + k);
            for (int m = 0; m < M; m++) acc[r][m] = _mm512_fmadd_ps(weights, xs[m], acc[r][m]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) y[m * N + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// R weight rows times all M activation rows, four at a time: the R rows stay in L1 after the first pass.
template <int R>
inline void weight_rows(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        switch (std::min<int64_t>(4, M - m0)) {
            case 1: product<R, 1>(xm, K, w, ym, N); break;
            case 2: product<R, 2>(xm, K, w, ym, N); break;
            case 3: product<R, 3>(xm, K, w, ym, N); break;
            default: product<R, 4>(xm, K, w, ym, N); break;
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

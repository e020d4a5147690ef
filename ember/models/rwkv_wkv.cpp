// RWKV recurrences stepped through a chunk in one call: v4 WKV, v5/v6 multi-head WKV, v7's delta rule.
// Float32, row-major contiguous inputs; the state is updated in place. Parallel over (sequence, head)
// (v5-v7) or (sequence, channel block) (v4). Built by ember/native_build.py; see ember/models/rwkv_native.py.
#include <cmath>
#include <cstdint>

extern "C" {

// k, v, out: (B, T, C); decay, bonus: (C,); aa, bb, pp: (B, C)
void rwkv_wkv4(int64_t B, int64_t T, int64_t C, const float* decay, const float* bonus, const float* k,
               const float* v, float* aa, float* bb, float* pp, float* out) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = 0; c < C; ++c) {
            float a = aa[b * C + c], bsum = bb[b * C + c], p = pp[b * C + c];
            const float w = decay[c], u = bonus[c];
            for (int64_t t = 0; t < T; ++t) {
                const int64_t i = (b * T + t) * C + c;
                const float kt = k[i], vt = v[i];
                float ww = u + kt;
                float q = std::fmax(p, ww);
                float e1 = std::exp(p - q), e2 = std::exp(ww - q);
                out[i] = (e1 * a + e2 * vt) / (e1 * bsum + e2);
                ww = w + p;
                q = std::fmax(ww, kt);
                e1 = std::exp(ww - q);
                e2 = std::exp(kt - q);
                a = e1 * a + e2 * vt;
                bsum = e1 * bsum + e2;
                p = q;
            }
            aa[b * C + c] = a;
            bb[b * C + c] = bsum;
            pp[b * C + c] = p;
        }
    }
}

// r, k, v, out: (B, T, H, N); decay: (H, N) when decay_per_token == 0, else (B, T, H, N); bonus: (H, N);
// state: (B, H, N_key, N_value).  out = r (bonus k v^T + S);  S <- k v^T + decay * S
void rwkv_wkv5(int64_t B, int64_t T, int64_t H, int64_t N, const float* r, const float* k, const float* v,
               const float* decay, int64_t decay_per_token, const float* bonus, float* state, float* out) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
            float* S = state + (b * H + h) * N * N;
            const float* u = bonus + h * N;
            for (int64_t t = 0; t < T; ++t) {
                const int64_t base = ((b * T + t) * H + h) * N;
                const float* rt = r + base;
                const float* kt = k + base;
                const float* vt = v + base;
                const float* wt = decay_per_token ? decay + base : decay + h * N;
                float* y = out + base;
                float ruk = 0.f;
                for (int64_t i = 0; i < N; ++i) ruk += rt[i] * u[i] * kt[i];
                for (int64_t j = 0; j < N; ++j) y[j] = ruk * vt[j];
                for (int64_t i = 0; i < N; ++i) {
                    float* row = S + i * N;
                    const float ri = rt[i], ki = kt[i], wi = wt[i];
                    for (int64_t j = 0; j < N; ++j) {
                        y[j] += ri * row[j];
                        row[j] = ki * vt[j] + wi * row[j];
                    }
                }
            }
        }
    }
}

// r, w, k, v, a (removal), bb (replacement), out: (B, T, H, N); state: (B, H, N_value, N_key).
// S <- S diag(w) + (S a) bb^T + v k^T;  out = S r
void rwkv_wkv7(int64_t B, int64_t T, int64_t H, int64_t N, const float* r, const float* w, const float* k,
               const float* v, const float* a, const float* bb, float* state, float* out) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
            float* S = state + (b * H + h) * N * N;
            for (int64_t t = 0; t < T; ++t) {
                const int64_t base = ((b * T + t) * H + h) * N;
                const float *rt = r + base, *wt = w + base, *kt = k + base, *vt = v + base;
                const float *at = a + base, *bt = bb + base;
                float* y = out + base;
                for (int64_t i = 0; i < N; ++i) {
                    float* row = S + i * N;
                    float sa = 0.f;
                    for (int64_t j = 0; j < N; ++j) sa += row[j] * at[j];
                    const float vi = vt[i];
                    float yi = 0.f;
                    for (int64_t j = 0; j < N; ++j) {
                        row[j] = row[j] * wt[j] + sa * bt[j] + vi * kt[j];
                        yi += row[j] * rt[j];
                    }
                    y[i] = yi;
                }
            }
        }
    }
}

}  // extern "C"

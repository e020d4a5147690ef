// GGML block-quantized weights multiplied straight from their own bytes (see ggml_linear.py).
//
// y (rows, out) float32 = x (rows, columns) float32 times W (out, columns) transposed, where W is the
// tensor's blocks exactly as the GGUF file stores them: row n is columns / QK blocks of BYTES bytes.
// Each thread takes tiles of kTile output rows, expands the tile's blocks once into a float32 scratch
// row (L1/L2 sized) and multiplies it with every activation row, so the weight is read once per call
// however many rows x has; products are float32 fused multiply-adds. The expansion follows ggml's
// dequantize_row_* (and gguf.quants) value for value; a multiply-subtract may fuse into one rounding.
//
// AVX-512 where the compiler targets it (-march=native), AVX2 where that is all there is (the
// expansions and the products), portable C++ otherwise.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

enum BlockType {
    kQ4_K = 0, kQ5_K = 1, kQ6_K = 2, kQ5_0 = 3, kQ5_1 = 4, kQ8_0 = 5, kQ4_0 = 6, kQ4_1 = 7, kLanes4 = 8, kLanes4Q8 = 9,
    kQ8_0Q8 = 10,  // Q8_0 blocks (and Q5_0 widened to them at load), multiplied with 8-bit activations
    kLanes4HalfQ8 = 11,  // lane records with float16 fields, multiplied with 8-bit activations
    kQ6_KQ8 = 12  // Q6_K blocks, multiplied with 8-bit activations
};

inline float half_to_float(const uint8_t* bytes) {
    uint16_t h;
    std::memcpy(&h, bytes, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400)) {
                mantissa <<= 1;
                exponent--;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7F800000 | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
#endif
}

// The 6-bit scale and minimum j (0..7) of a Q4_K / Q5_K block's 12 scale bytes (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, float* scale, float* minimum) {
    if (j < 4) {
        *scale = (float)(q[j] & 63);
        *minimum = (float)(q[j + 4] & 63);
    } else {
        *scale = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *minimum = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// Byte codes -> float32 values, one interface over AVX-512 and AVX2 (EMBER_BYTE_VECTORS: either is
// there). The integer work on the codes is AVX2's in both; only the widening and the stores differ.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define EMBER_BYTE_VECTORS 1
// 32 unsigned codes -> y[0..31] = scale * q - minimum
inline void store_32(float* y, __m256i codes, float scale, float minimum) {
    const __m512 d = _mm512_set1_ps(scale), m = _mm512_set1_ps(minimum);
    const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(codes)));
    const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(codes, 1)));
    _mm512_storeu_ps(y, _mm512_fmsub_ps(low, d, m));
    _mm512_storeu_ps(y + 16, _mm512_fmsub_ps(high, d, m));
}
// 16 signed codes -> y[0..15] = scale * q
inline void store_16_signed(float* y, __m128i codes, float scale) {
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes))));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define EMBER_BYTE_VECTORS 1
inline __m256 unsigned_8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }
inline __m256 signed_8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)); }
inline void store_32(float* y, __m256i codes, float scale, float minimum) {
    const __m256 d = _mm256_set1_ps(scale), m = _mm256_set1_ps(minimum);
    const __m128i low = _mm256_castsi256_si128(codes), high = _mm256_extracti128_si256(codes, 1);
    _mm256_storeu_ps(y, _mm256_fmsub_ps(unsigned_8(low), d, m));
    _mm256_storeu_ps(y + 8, _mm256_fmsub_ps(unsigned_8(_mm_srli_si128(low, 8)), d, m));
    _mm256_storeu_ps(y + 16, _mm256_fmsub_ps(unsigned_8(high), d, m));
    _mm256_storeu_ps(y + 24, _mm256_fmsub_ps(unsigned_8(_mm_srli_si128(high, 8)), d, m));
}
inline void store_16_signed(float* y, __m128i codes, float scale) {
    const __m256 d = _mm256_set1_ps(scale);
    _mm256_storeu_ps(y, _mm256_mul_ps(d, signed_8(codes)));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(d, signed_8(_mm_srli_si128(codes, 8))));
}
#endif

// ---- one block -> float32 values ----

// Q4_K and Q5_K: fp16 d, fp16 dmin, 12 scale bytes, then (Q5_K only) 32 bytes of fifth bits, then 128
// bytes of nibbles; 8 groups of 32 values, value = d * scale_j * q - dmin * min_j. Bytes 32i..32i+31
// hold groups 2i (low nibbles) and 2i+1 (high); bit g of fifth-bit byte l is the high bit of value l
// of group g. `high` is null for Q4_K (inlined with a constant, so the branch folds away).
inline void expand_k_groups(const uint8_t* block, const uint8_t* high, const uint8_t* q, float* y) {
    const float d = half_to_float(block), dmin = half_to_float(block + 2);
    const uint8_t* scales = block + 4;
    for (int i = 0; i < 4; i++, q += 32, y += 64) {
        float s1, m1, s2, m2;
        scale_min_k4(2 * i, scales, &s1, &m1);
        scale_min_k4(2 * i + 1, scales, &s2, &m2);
        const float d1 = d * s1, d2 = d * s2, o1 = dmin * m1, o2 = dmin * m2;
#if defined(EMBER_BYTE_VECTORS)
        const __m256i bytes = _mm256_loadu_si256((const __m256i*)q), low4 = _mm256_set1_epi8(0x0F);
        __m256i first = _mm256_and_si256(bytes, low4);
        __m256i second = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
        if (high != nullptr) {
            const __m256i bits = _mm256_loadu_si256((const __m256i*)high), one = _mm256_set1_epi8(1);
            first = _mm256_or_si256(first, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, 2 * i), one), 4));
            second = _mm256_or_si256(
                second, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, 2 * i + 1), one), 4));
        }
        store_32(y, first, d1, o1);
        store_32(y + 32, second, d2, o2);
#else
        for (int l = 0; l < 32; l++) {
            int first = q[l] & 0xF, second = q[l] >> 4;
            if (high != nullptr) {
                first |= ((high[l] >> (2 * i)) & 1) << 4;
                second |= ((high[l] >> (2 * i + 1)) & 1) << 4;
            }
            y[l] = d1 * (float)first - o1;
            y[32 + l] = d2 * (float)second - o2;
        }
#endif
    }
}

// Q4_K, 144 bytes
inline void expand_q4_k(const uint8_t* block, float* y) { expand_k_groups(block, nullptr, block + 16, y); }

// Q5_K, 176 bytes
inline void expand_q5_k(const uint8_t* block, float* y) { expand_k_groups(block, block + 16, block + 48, y); }

// Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit pairs, 16 int8 scales, fp16 d;
// value = d * scale_(k / 16) * (q - 32), q six bits.
inline void expand_q6_k(const uint8_t* block, float* y) {
    const uint8_t* ql = block;
    const uint8_t* qh = block + 128;
    const int8_t* scales = (const int8_t*)(block + 192);
    const float d = half_to_float(block + 208);
    for (int half = 0; half < 2; half++, ql += 64, qh += 32, scales += 8, y += 128) {
#if defined(EMBER_BYTE_VECTORS)
        const __m256i a = _mm256_loadu_si256((const __m256i*)ql), b = _mm256_loadu_si256((const __m256i*)(ql + 32));
        const __m256i h = _mm256_loadu_si256((const __m256i*)qh);
        const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
        const __m256i nibbles[4] = {_mm256_and_si256(a, low4), _mm256_and_si256(b, low4),
                                    _mm256_and_si256(_mm256_srli_epi16(a, 4), low4),
                                    _mm256_and_si256(_mm256_srli_epi16(b, 4), low4)};
        for (int c = 0; c < 4; c++) {
            const __m256i top = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * c), two), 4);
            const __m256i codes = _mm256_sub_epi8(_mm256_or_si256(nibbles[c], top), bias);  // -32..31
            store_16_signed(y + 32 * c, _mm256_castsi256_si128(codes), d * (float)scales[2 * c]);
            store_16_signed(y + 32 * c + 16, _mm256_extracti128_si256(codes, 1), d * (float)scales[2 * c + 1]);
        }
#else
        for (int l = 0; l < 32; l++) {
            const int s = l / 16;
            const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * (float)scales[s] * (float)q1;
            y[l + 32] = d * (float)scales[s + 2] * (float)q2;
            y[l + 64] = d * (float)scales[s + 4] * (float)q3;
            y[l + 96] = d * (float)scales[s + 6] * (float)q4;
        }
#endif
    }
}

// Q5_0 (22 bytes: fp16 d, 32 fifth bits, 16 bytes of nibbles; value = d * (q - 16)) and
// Q5_1 (24 bytes: fp16 d, fp16 m, fifth bits, nibbles; value = d * q + m). Value l < 16 is the low
// nibble of byte l, value 16 + l its high nibble; bit k of the 32 fifth bits belongs to value k.
template <bool kWithMinimum>
inline void expand_q5(const uint8_t* block, float* y) {
    const float d = half_to_float(block);
    const float m = kWithMinimum ? half_to_float(block + 2) : 0.0f;
    const uint8_t* qh_bytes = block + (kWithMinimum ? 4 : 2);
    const uint8_t* q = qh_bytes + 4;
    uint32_t qh;
    std::memcpy(&qh, qh_bytes, 4);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q), low4 = _mm_set1_epi8(0x0F);
    const __m512i sixteen = _mm512_set1_epi32(16);
    __m512i first = _mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4));
    __m512i second = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
    first = _mm512_mask_or_epi32(first, (__mmask16)(qh & 0xFFFF), first, sixteen);
    second = _mm512_mask_or_epi32(second, (__mmask16)(qh >> 16), second, sixteen);
    const __m512 scale = _mm512_set1_ps(d);
    if (kWithMinimum) {
        const __m512 minimum = _mm512_set1_ps(m);
        _mm512_storeu_ps(y, _mm512_fmadd_ps(_mm512_cvtepi32_ps(first), scale, minimum));
        _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(second), scale, minimum));
    } else {
        _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(first, sixteen)), scale));
        _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(second, sixteen)), scale));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    // Values 8c..8c+7: low nibbles of bytes 0..15 for c < 2, high nibbles for c >= 2; fifth bits from qh.
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q), low4 = _mm_set1_epi8(0x0F);
    const __m128i nibbles[2] = {_mm_and_si128(bytes, low4), _mm_and_si128(_mm_srli_epi16(bytes, 4), low4)};
    const __m128i eights[4] = {nibbles[0], _mm_srli_si128(nibbles[0], 8), nibbles[1], _mm_srli_si128(nibbles[1], 8)};
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), one = _mm256_set1_epi32(1);
    const __m256 scale = _mm256_set1_ps(d), minimum = _mm256_set1_ps(m), sixteen = _mm256_set1_ps(16.0f);
    for (int c = 0; c < 4; c++) {
        const __m256i fifth = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)(qh >> (8 * c))), lanes), one);
        const __m256i codes = _mm256_or_si256(_mm256_cvtepu8_epi32(eights[c]), _mm256_slli_epi32(fifth, 4));
        const __m256 value = _mm256_cvtepi32_ps(codes);
        _mm256_storeu_ps(y + 8 * c, kWithMinimum ? _mm256_fmadd_ps(value, scale, minimum)
                                                 : _mm256_mul_ps(_mm256_sub_ps(value, sixteen), scale));
    }
#else
    for (int l = 0; l < 16; l++) {
        const int q0 = (q[l] & 0xF) | (((qh >> l) & 1) << 4);
        const int q1 = (q[l] >> 4) | (((qh >> (l + 16)) & 1) << 4);
        if (kWithMinimum) {
            y[l] = d * (float)q0 + m;
            y[l + 16] = d * (float)q1 + m;
        } else {
            y[l] = (float)(q0 - 16) * d;
            y[l + 16] = (float)(q1 - 16) * d;
        }
    }
#endif
}

// Q8_0 (34 bytes: fp16 d, 32 int8; value = d * q), Q4_0 (18: fp16 d, nibbles; d * (q - 8)) and
// Q4_1 (20: fp16 d, fp16 m, nibbles; d * q + m): the other kernels' formats, for CPUs they do not serve.
inline void expand_q8_0(const uint8_t* block, float* y) {
    const float d = half_to_float(block);
#if defined(EMBER_BYTE_VECTORS)
    const __m256i codes = _mm256_loadu_si256((const __m256i*)(block + 2));
    store_16_signed(y, _mm256_castsi256_si128(codes), d);
    store_16_signed(y + 16, _mm256_extracti128_si256(codes, 1), d);
#else
    const int8_t* q = (const int8_t*)(block + 2);
    for (int l = 0; l < 32; l++) y[l] = (float)q[l] * d;
#endif
}

template <bool kWithMinimum>
inline void expand_q4(const uint8_t* block, float* y) {
    const float d = half_to_float(block);
    const float m = kWithMinimum ? half_to_float(block + 2) : 0.0f;
    const uint8_t* q = block + (kWithMinimum ? 4 : 2);
#if defined(EMBER_BYTE_VECTORS)
    // d * q + m as d * q - (-m), and d * (q - 8) as d * q - 8d: d * q and 8d are exact in float32 (an
    // 11-bit half times a code of at most 4 bits), so the one rounding gives the scalar values.
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q), low4 = _mm_set1_epi8(0x0F);
    const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
    store_32(y, codes, d, kWithMinimum ? -m : 8.0f * d);  // values 0..15: low nibbles, 16..31: high
#else
    for (int l = 0; l < 16; l++) {
        if (kWithMinimum) {
            y[l] = d * (float)(q[l] & 0xF) + m;
            y[l + 16] = d * (float)(q[l] >> 4) + m;
        } else {
            y[l] = d * (float)((int)(q[l] & 0xF) - 8);
            y[l + 16] = d * (float)((int)(q[l] >> 4) - 8);
        }
    }
#endif
}

// ---- the 4-bit lane layout: Q4_0, Q4_1 and Q4_K codes rearranged at load (nibble_lanes.py) ----
//
// 64 values in a 48-byte record: float32 scale_a, offset_a, scale_b, offset_b, then 8 little-endian
// 32-bit words where nibble j of word l is the code of value 8j + l. Values 0..31 are scale_a * code -
// offset_a, values 32..63 the same with _b: a shift and a mask put 8 codes in 8 lanes, with no byte
// shuffles. Every source type's value is this one rounding of exact terms (Q4_0: d * q - 8d; Q4_1: d *
// q - (-m); Q4_K: (d * scale) * q - dmin * min), so the values equal the source blocks' expansions.
constexpr int kLaneRecordBytes = 48;
constexpr int kHalfLaneRecordBytes = 40;  // the same with the four fields as float16 (exact ones only)
// How far ahead of the record being read the 8-bit-activation products prefetch: the rows stream from memory
// once per call, and the hardware prefetchers alone left SmolLM2's layers at about 14 GB/s of weights
// (1,536-3,072 bytes ahead: 10-15 % less time over its 30 layers' products, in one process alternating).
constexpr int kPrefetchBytes = 2048;

#if defined(__AVX2__) && defined(__FMA__)
#define EMBER_LANES4_VECTORS 1
inline float horizontal_sum(__m256 v) {
    __m128 folded = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    folded = _mm_add_ps(folded, _mm_movehl_ps(folded, folded));
    folded = _mm_add_ss(folded, _mm_movehdup_ps(folded));
    return _mm_cvtss_f32(folded);
}

// The 8 values of slot J (values 8J..8J+7) of a record whose code words are `words`.
template <int J>
inline __m256 lane_values(__m256i words, __m256 scale, __m256 offset) {
    const __m256i codes = _mm256_and_si256(_mm256_srli_epi32(words, 4 * J), _mm256_set1_epi32(0x0F));
    return _mm256_fmsub_ps(_mm256_cvtepi32_ps(codes), scale, offset);
}
#endif

inline void expand_lanes4(const uint8_t* record, float* y) {
    float fields[4];
    std::memcpy(fields, record, sizeof(fields));
#if defined(EMBER_LANES4_VECTORS)
    const __m256i words = _mm256_loadu_si256((const __m256i*)(record + 16));
    const __m256 scale_a = _mm256_set1_ps(fields[0]), offset_a = _mm256_set1_ps(fields[1]);
    const __m256 scale_b = _mm256_set1_ps(fields[2]), offset_b = _mm256_set1_ps(fields[3]);
    _mm256_storeu_ps(y, lane_values<0>(words, scale_a, offset_a));
    _mm256_storeu_ps(y + 8, lane_values<1>(words, scale_a, offset_a));
    _mm256_storeu_ps(y + 16, lane_values<2>(words, scale_a, offset_a));
    _mm256_storeu_ps(y + 24, lane_values<3>(words, scale_a, offset_a));
    _mm256_storeu_ps(y + 32, lane_values<4>(words, scale_b, offset_b));
    _mm256_storeu_ps(y + 40, lane_values<5>(words, scale_b, offset_b));
    _mm256_storeu_ps(y + 48, lane_values<6>(words, scale_b, offset_b));
    _mm256_storeu_ps(y + 56, lane_values<7>(words, scale_b, offset_b));
#else
    uint32_t words[8];
    std::memcpy(words, record + 16, sizeof(words));
    for (int j = 0; j < 8; j++) {
        const float scale = fields[j < 4 ? 0 : 2], offset = fields[j < 4 ? 1 : 3];
        for (int l = 0; l < 8; l++) y[8 * j + l] = scale * (float)((words[l] >> (4 * j)) & 0x0F) - offset;
    }
#endif
}

// A compact record (float16 fields, then the same 8 words) expanded like a full one.
inline void expand_lanes4_half(const uint8_t* record, float* y) {
    uint8_t full[kLaneRecordBytes];
    float fields[4];
    for (int f = 0; f < 4; f++) fields[f] = half_to_float(record + 2 * f);
    std::memcpy(full, fields, sizeof(fields));
    std::memcpy(full + 16, record + 8, 32);
    expand_lanes4(full, y);
}

struct Format {
    int values, bytes;  // per block
    void (*expand)(const uint8_t*, float*);
};

constexpr Format kFormats[] = {
    {256, 144, expand_q4_k}, {256, 176, expand_q5_k}, {256, 210, expand_q6_k}, {32, 22, expand_q5<false>},
    {32, 24, expand_q5<true>}, {32, 34, expand_q8_0}, {32, 18, expand_q4<false>}, {32, 20, expand_q4<true>},
    {64, kLaneRecordBytes, expand_lanes4}, {64, kLaneRecordBytes, expand_lanes4}, {32, 34, expand_q8_0},
    {64, kHalfLaneRecordBytes, expand_lanes4_half}, {256, 210, expand_q6_k},
};

// Row n of W (columns values) into out.
template <int kType>
inline void expand_row(const uint8_t* weight, int64_t n, int64_t columns, float* out) {
    constexpr Format format = kFormats[kType];
    const int64_t blocks = columns / format.values;
    const uint8_t* row = weight + n * blocks * format.bytes;
    for (int64_t b = 0; b < blocks; b++) format.expand(row + b * format.bytes, out + b * format.values);
}

constexpr int kTile = 4;  // output rows expanded together: each activation load feeds kTile products

// The kTile dot products of w (kTile rows, stride columns) with one activation row x; columns % 32 == 0.
inline void tile_dots(const float* w, const float* x, int64_t columns, float* out) {
#if defined(__AVX512F__)
    __m512 acc[kTile][2];
    for (int r = 0; r < kTile; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < columns; k += 32) {
        const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        for (int r = 0; r < kTile; r++) {
            acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * columns + k), x0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * columns + k + 16), x1, acc[r][1]);
        }
    }
    for (int r = 0; r < kTile; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[kTile][2];
    for (int r = 0; r < kTile; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < columns; k += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        for (int r = 0; r < kTile; r++) {
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * columns + k), x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * columns + k + 8), x1, acc[r][1]);
        }
    }
    for (int r = 0; r < kTile; r++) {
        __m256 sum = _mm256_add_ps(acc[r][0], acc[r][1]);
        __m128 folded = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        folded = _mm_add_ps(folded, _mm_movehl_ps(folded, folded));
        folded = _mm_add_ss(folded, _mm_movehdup_ps(folded));
        out[r] = _mm_cvtss_f32(folded);
    }
#else
    for (int r = 0; r < kTile; r++) {
        float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t k = 0; k < columns; k += 8)
            for (int l = 0; l < 8; l++) lanes[l] += w[r * columns + k + l] * x[k + l];
        out[r] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
#endif
}

// ---- one activation row without expanding: the AVX2 machines' decode product ----
//
// For blocks of 32 whose value is d * c with an integer code c (Q8_0: c = q; Q5_0: q - 16; Q4_0: q - 8),
// the dot of a row with x is the sum over blocks of d * (sum of c * x): the codes become floats in
// registers and meet x there, with no float32 copy of the row written and read back. Where AVX-512 is
// there the expansion above stays (measured only on AVX2: Gemma 3's Q8_0 output layer 1.3-1.5x).
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define EMBER_FUSED_DOTS 1

template <int kType>
constexpr bool kFusedDot = kType == kQ8_0 || kType == kQ5_0 || kType == kQ4_0;
constexpr int64_t kFusedRows = 32;  // ggml_linear.NATIVE_GGML_ROWS: more rows take the expanded chunks

// The block's 32 codes as 4 x 8 floats (values 8c..8c+7 in codes[c]).
template <int kType>
inline void block_codes(const uint8_t* block, __m256 codes[4]) {
    if (kType == kQ8_0) {  // 8 bytes per load: each widens straight from memory, no shuffles between
        for (int c = 0; c < 4; c++)
            codes[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(block + 2 + 8 * c))));
        return;
    }
    const uint8_t* q = block + (kType == kQ5_0 ? 6 : 2);
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q), low4 = _mm_set1_epi8(0x0F);
    const __m128i nibbles[2] = {_mm_and_si128(bytes, low4), _mm_and_si128(_mm_srli_epi16(bytes, 4), low4)};
    const __m128i eights[4] = {nibbles[0], _mm_srli_si128(nibbles[0], 8), nibbles[1], _mm_srli_si128(nibbles[1], 8)};
    if (kType == kQ5_0) {
        uint32_t qh;
        std::memcpy(&qh, block + 2, 4);
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), one = _mm256_set1_epi32(1);
        const __m256i sixteen = _mm256_set1_epi32(16);
        for (int c = 0; c < 4; c++) {
            const __m256i fifth = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)(qh >> (8 * c))), lanes), one);
            const __m256i q5 = _mm256_or_si256(_mm256_cvtepu8_epi32(eights[c]), _mm256_slli_epi32(fifth, 4));
            codes[c] = _mm256_cvtepi32_ps(_mm256_sub_epi32(q5, sixteen));
        }
    } else {
        const __m256i eight = _mm256_set1_epi32(8);
        for (int c = 0; c < 4; c++) codes[c] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(eights[c]), eight));
    }
}

// The dots of rows first..first+count-1 (count <= kTile) with one activation row x: each x load feeds
// kTile rows, which pays where decoding the codes costs more than reading them (Q5_0, Q4_0).
template <int kType>
inline void fused_tile_dots(const uint8_t* weight, int64_t first, int count, const float* x, int64_t columns,
                            float* out) {
    constexpr Format format = kFormats[kType];
    const int64_t blocks = columns / 32, stride = blocks * format.bytes;
    __m256 total[kTile];
    for (int r = 0; r < kTile; r++) total[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const float* xb = x + 32 * b;
        const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
        const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
        for (int r = 0; r < count; r++) {
            const uint8_t* block = weight + (first + r) * stride + b * format.bytes;
            __m256 codes[4];
            block_codes<kType>(block, codes);
            __m256 sum = _mm256_mul_ps(codes[0], x0);
            sum = _mm256_fmadd_ps(codes[1], x1, sum);
            sum = _mm256_fmadd_ps(codes[2], x2, sum);
            sum = _mm256_fmadd_ps(codes[3], x3, sum);
            total[r] = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(block)), sum, total[r]);
        }
    }
    for (int r = 0; r < count; r++) out[r] = horizontal_sum(total[r]);
}

// The dot of one row of the blocks with the activation row x (x stays in L1 across rows; the row
// streams once, front to back). Two accumulators alternate so consecutive blocks do not wait on
// each other's fused multiply-add.
template <int kType>
inline float fused_row_dot(const uint8_t* row, const float* x, int64_t blocks) {
    constexpr Format format = kFormats[kType];
    __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t* block = row + b * format.bytes;
        const float* xb = x + 32 * b;
        __m256 codes[4];
        block_codes<kType>(block, codes);
        __m256 sum = _mm256_mul_ps(codes[0], _mm256_loadu_ps(xb));
        sum = _mm256_fmadd_ps(codes[1], _mm256_loadu_ps(xb + 8), sum);
        sum = _mm256_fmadd_ps(codes[2], _mm256_loadu_ps(xb + 16), sum);
        sum = _mm256_fmadd_ps(codes[3], _mm256_loadu_ps(xb + 24), sum);
        total[b & 1] = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(block)), sum, total[b & 1]);
    }
    return horizontal_sum(_mm256_add_ps(total[0], total[1]));
}

// One weight row's dots with R activation rows (stride columns), each row's sums in the order of the
// one-row kernel of its type (Q8_0: fused_row_dot's two alternating chains; Q5_0, Q4_0: the one chain
// of fused_tile_dots), so a row's product is the same alone and in a batch. The block's codes are made
// once per call and meet all R rows in registers; the expand-and-multiply path made a float32 copy of
// every row and read it back for each activation row.
template <int kType, int R>
inline void fused_rows_dots(const uint8_t* row, const float* x, int64_t columns, float* y, int64_t y_stride) {
    constexpr Format format = kFormats[kType];
    constexpr int kChains = kType == kQ8_0 ? 2 : 1;
    __m256 total[R][kChains];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < kChains; c++) total[r][c] = _mm256_setzero_ps();
    const int64_t blocks = columns / 32;
    // block b adds into chain b % kChains; the chain index is a constant in each unrolled step, so the
    // accumulators stay in registers
    auto add_block = [&](int64_t b, int chain) __attribute__((always_inline)) {
        const uint8_t* block = row + b * format.bytes;
        __m256 codes[4];
        block_codes<kType>(block, codes);
        const __m256 scale = _mm256_set1_ps(half_to_float(block));
        for (int r = 0; r < R; r++) {
            const float* xb = x + r * columns + 32 * b;
            __m256 sum = _mm256_mul_ps(codes[0], _mm256_loadu_ps(xb));
            sum = _mm256_fmadd_ps(codes[1], _mm256_loadu_ps(xb + 8), sum);
            sum = _mm256_fmadd_ps(codes[2], _mm256_loadu_ps(xb + 16), sum);
            sum = _mm256_fmadd_ps(codes[3], _mm256_loadu_ps(xb + 24), sum);
            total[r][chain] = _mm256_fmadd_ps(scale, sum, total[r][chain]);
        }
    };
    int64_t b = 0;
    for (; b + kChains <= blocks; b += kChains)
        for (int c = 0; c < kChains; c++) add_block(b + c, c);
    if (b < blocks) add_block(b, 0);
    for (int r = 0; r < R; r++)
        y[r * y_stride] = horizontal_sum(kChains == 2 ? _mm256_add_ps(total[r][0], total[r][1]) : total[r][0]);
}

// Few activation rows (2..32: a batch's decode step) times the blocks of a fused-dot type.
template <int kType>
void fused_rows_matmul(const float* x, int64_t rows, int64_t columns, const uint8_t* weight, int64_t out_features,
                       float* y, int nthreads) {
    const int64_t stride = columns / 32 * kFormats[kType].bytes;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && out_features > 1)
    for (int64_t n = 0; n < out_features; n++) {
        const uint8_t* row = weight + n * stride;
        int64_t m = 0;
        for (; m + 4 <= rows; m += 4)
            fused_rows_dots<kType, 4>(row, x + m * columns, columns, y + m * out_features + n, out_features);
        const float* rest = x + m * columns;
        float* rest_y = y + m * out_features + n;
        if (rows - m == 3) fused_rows_dots<kType, 3>(row, rest, columns, rest_y, out_features);
        if (rows - m == 2) fused_rows_dots<kType, 2>(row, rest, columns, rest_y, out_features);
        if (rows - m == 1) fused_rows_dots<kType, 1>(row, rest, columns, rest_y, out_features);
    }
}
#endif

#if defined(EMBER_LANES4_VECTORS)
// The products of R activation rows (stride columns) with one lane-layout weight row: each slot's 8
// values are made once in a register and meet every activation row there. Each row alternates two
// accumulators (even and odd slots), so that consecutive slots do not wait on each other's fused
// multiply-add; the order of the sums is the same whatever R, so a row's product does not depend on
// how many rows share the call (a greedy reply is the same alone and in a batch).
template <int R>
inline void lanes4_dots(const uint8_t* row, const float* x, int64_t columns, float* y, int64_t y_stride) {
    constexpr int kChains = 2;
    __m256 total[R][kChains];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < kChains; c++) total[r][c] = _mm256_setzero_ps();
    const int64_t records = columns / 64;
    for (int64_t b = 0; b < records; b++) {
        const uint8_t* record = row + b * kLaneRecordBytes;
        const float* xb = x + 64 * b;
        float fields[4];
        std::memcpy(fields, record, sizeof(fields));
        const __m256i words = _mm256_loadu_si256((const __m256i*)(record + 16));
        __m256 scale = _mm256_set1_ps(fields[0]), offset = _mm256_set1_ps(fields[1]);
#define EMBER_LANE_SLOT(J)                                                                     \
    {                                                                                          \
        if (J == 4) scale = _mm256_set1_ps(fields[2]), offset = _mm256_set1_ps(fields[3]);    \
        const __m256 w = lane_values<J>(words, scale, offset);                                 \
        for (int r = 0; r < R; r++) {                                                          \
            __m256& chain = total[r][J % kChains];                                             \
            chain = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + r * columns + 8 * J), chain);      \
        }                                                                                      \
    }
        EMBER_LANE_SLOT(0) EMBER_LANE_SLOT(1) EMBER_LANE_SLOT(2) EMBER_LANE_SLOT(3)
        EMBER_LANE_SLOT(4) EMBER_LANE_SLOT(5) EMBER_LANE_SLOT(6) EMBER_LANE_SLOT(7)
#undef EMBER_LANE_SLOT
    }
    for (int r = 0; r < R; r++) {
        __m256 sum = total[r][0];
        for (int c = 1; c < kChains; c++) sum = _mm256_add_ps(sum, total[r][c]);
        y[r * y_stride] = horizontal_sum(sum);
    }
}

// Few activation rows times the lane layout (decode): each weight row streams once per call, in groups
// of 4 activation rows (their 8 accumulators, the slot's values and an x load fit the 16 registers).
void lanes4_matmul(const float* x, int64_t rows, int64_t columns, const uint8_t* weight, int64_t out_features,
                   float* y, int nthreads) {
    const int64_t stride = columns / 64 * kLaneRecordBytes;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && out_features > 1)
    for (int64_t n = 0; n < out_features; n++) {
        const uint8_t* row = weight + n * stride;
        int64_t m = 0;
        for (; m + 4 <= rows; m += 4)
            lanes4_dots<4>(row, x + m * columns, columns, y + m * out_features + n, out_features);
        const float* rest = x + m * columns;
        float* rest_y = y + m * out_features + n;
        if (rows - m == 3) lanes4_dots<3>(row, rest, columns, rest_y, out_features);
        if (rows - m == 2) lanes4_dots<2>(row, rest, columns, rest_y, out_features);
        if (rows - m == 1) lanes4_dots<1>(row, rest, columns, rest_y, out_features);
    }
}
#endif

// ---- the lane layout times 8-bit activations (the AVX2 machines' decode product) ----
//
// Each activation row is rounded once per call to 8-bit codes, one scale per 32 values (max |x| / 127,
// ggml's Q8 activations for these weight types), and the 4-bit weight codes meet them as integers:
// _mm256_maddubs_epi16 multiplies the unsigned weight codes by the signed activation codes and adds
// pairs, exactly, and only each 32-value group's integer sum becomes a float. A group's dot is then
// scale * dx * sum(code * q) - offset * sum(x), with sum(x) over the unrounded activations. About a
// third of the instructions of turning every code into a float lane (lanes4_dots); the price is the
// activations' rounding, about 1/254 of each group's largest value, as in llama.cpp.
//
// The activation codes are stored in the order the lane words hold the weight codes: in the words
// masked to their low nibbles, byte k of word l is value 16k + l; in the words shifted by 4, 16k + 8 + l.
// Bytes 0-1 of a word are group a (values 0..31), bytes 2-3 group b, so after the pairwise adds the low
// 16 bits of each 32-bit lane sum group a and the high 16 bits group b (at most 4 * 15 * 127: no overflow).

struct LaneActivations {
    const int8_t* codes;  // per row: records * 64, in lane order
    const float* fields;  // per row: records * 4: dx_a, sum x_a, dx_b, sum x_b
    int64_t records;
};

// 32 activations rounded to 8-bit codes q (scale = max |x| / 127, to nearest, ties to even); also their sum.
inline void round_group(const float* x, int8_t* q, float* scale, float* sum) {
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 v[4] = {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8), _mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)};
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 magnitude = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                           _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 folded = _mm_max_ps(_mm256_castps256_ps128(magnitude), _mm256_extractf128_ps(magnitude, 1));
    folded = _mm_max_ps(folded, _mm_movehl_ps(folded, folded));
    folded = _mm_max_ss(folded, _mm_movehdup_ps(folded));
    const float largest = _mm_cvtss_f32(folded);
    *sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    const __m256 inverse = _mm256_set1_ps(largest > 0.0f ? 127.0f / largest : 0.0f);
    __m256i codes[4];
    for (int i = 0; i < 4; i++) codes[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));  // MXCSR: to nearest
    // the packs interleave 128-bit lanes: 4-byte pieces come out as 0 2 4 6 1 3 5 7
    const __m256i bytes =
        _mm256_packs_epi16(_mm256_packs_epi32(codes[0], codes[1]), _mm256_packs_epi32(codes[2], codes[3]));
    _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
    float largest = 0.0f, total = 0.0f;
    for (int i = 0; i < 32; i++) {
        largest = std::max(largest, std::fabs(x[i]));
        total += x[i];
    }
    *sum = total;
    const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
    for (int i = 0; i < 32; i++) q[i] = (int8_t)std::nearbyint(x[i] * inverse);
#endif
    *scale = largest / 127.0f;
}

// One activation row (records * 64 values) rounded to lane-ordered codes and its groups' fields.
inline void round_lane_row(const float* x, int64_t records, int8_t* codes, float* fields) {
    for (int64_t b = 0; b < records; b++) {
        int8_t q[64];
        round_group(x + 64 * b, q, fields + 4 * b, fields + 4 * b + 1);
        round_group(x + 64 * b + 32, q + 32, fields + 4 * b + 2, fields + 4 * b + 3);
        int8_t* out = codes + 64 * b;
        for (int l = 0; l < 8; l++)
            for (int k = 0; k < 4; k++) {
                out[4 * l + k] = q[16 * k + l];
                out[32 + 4 * l + k] = q[16 * k + 8 + l];
            }
    }
}

// A lane record's four fields (scale_a, offset_a, scale_b, offset_b) as float32.
template <bool kHalf>
inline void lane_fields(const uint8_t* record, float* fields) {
    if (kHalf) {
        for (int f = 0; f < 4; f++) fields[f] = half_to_float(record + 2 * f);
    } else {
        std::memcpy(fields, record, 16);
    }
}

// One lane-layout weight row's dots with R rounded activation rows, each row's sums in the same order
// whatever R (a row's product is the same alone and in a batch). kHalf: compact records (float16 fields).
template <bool kHalf, int R>
inline void lanes4_q8_dots(const uint8_t* row, const LaneActivations& x, int64_t first_row, float* y,
                           int64_t y_stride) {
    constexpr int kRecordBytes = kHalf ? kHalfLaneRecordBytes : kLaneRecordBytes, kWords = kHalf ? 8 : 16;
    const int64_t records = x.records;
    const int8_t* codes = x.codes + first_row * records * 64;
    const float* fields = x.fields + first_row * records * 4;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 total[R][2];
    __m128 offsets[R];
    for (int r = 0; r < R; r++) {
        total[r][0] = total[r][1] = _mm256_setzero_ps();
        offsets[r] = _mm_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i group_a = _mm256_set1_epi32(1), group_b = _mm256_set1_epi32(1 << 16);
    for (int64_t b = 0; b < records; b++) {
        const uint8_t* record = row + b * kRecordBytes;
        _mm_prefetch((const char*)record + kPrefetchBytes, _MM_HINT_T0);
        const __m256i words = _mm256_loadu_si256((const __m256i*)(record + kWords));
        const __m256i even = _mm256_and_si256(words, low4);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(words, 4), low4);
        __m128 weight_fields;  // scale_a, offset_a, scale_b, offset_b
#if defined(__F16C__)
        if (kHalf) weight_fields = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)record));
        else weight_fields = _mm_loadu_ps((const float*)record);
#else
        float unpacked[4];
        lane_fields<kHalf>(record, unpacked);
        weight_fields = _mm_loadu_ps(unpacked);
#endif
        for (int r = 0; r < R; r++) {
            const int8_t* q = codes + r * records * 64 + 64 * b;
            const __m256i pairs =
                _mm256_add_epi16(_mm256_maddubs_epi16(even, _mm256_loadu_si256((const __m256i*)q)),
                                 _mm256_maddubs_epi16(odd, _mm256_loadu_si256((const __m256i*)(q + 32))));
            const __m256 sum_a = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, group_a));
            const __m256 sum_b = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, group_b));
            // scale_a * dx_a, offset_a * sum x_a, scale_b * dx_b, offset_b * sum x_b
            const __m128 terms = _mm_mul_ps(weight_fields, _mm_loadu_ps(fields + r * records * 4 + 4 * b));
            total[r][0] = _mm256_fmadd_ps(sum_a, _mm256_broadcastss_ps(terms), total[r][0]);
            total[r][1] = _mm256_fmadd_ps(sum_b, _mm256_broadcastss_ps(_mm_movehl_ps(terms, terms)), total[r][1]);
            offsets[r] = _mm_add_ps(offsets[r], terms);
        }
    }
    for (int r = 0; r < R; r++) {
        float parts[4];
        _mm_storeu_ps(parts, offsets[r]);
        y[r * y_stride] = horizontal_sum(_mm256_add_ps(total[r][0], total[r][1])) - (parts[1] + parts[3]);
    }
#else
    for (int r = 0; r < R; r++) {
        float scaled = 0.0f, offset = 0.0f;
        for (int64_t b = 0; b < records; b++) {
            const uint8_t* record = row + b * kRecordBytes;
            float weight_fields[4];
            uint32_t words[8];
            lane_fields<kHalf>(record, weight_fields);
            std::memcpy(words, record + kWords, sizeof(words));
            const int8_t* q = codes + r * records * 64 + 64 * b;
            const float* xf = fields + r * records * 4 + 4 * b;
            int32_t sums[2] = {0, 0};
            for (int l = 0; l < 8; l++)
                for (int k = 0; k < 4; k++) {
                    const int even = (words[l] >> (8 * k)) & 0x0F, odd = (words[l] >> (8 * k + 4)) & 0x0F;
                    sums[k / 2] += even * q[4 * l + k] + odd * q[32 + 4 * l + k];
                }
            scaled += weight_fields[0] * xf[0] * (float)sums[0] + weight_fields[2] * xf[2] * (float)sums[1];
            offset += weight_fields[1] * xf[1] + weight_fields[3] * xf[3];
        }
        y[r * y_stride] = scaled - offset;
    }
#endif
}

// Few activation rows times the lane layout with 8-bit activations: the rows are rounded once, then
// each weight row streams once per call, meeting them two at a time (with four, the accumulators no longer
// fit the 16 registers: 3072 x 576 at 8 rows ran no faster than the float32 lanes).
template <bool kHalf>
void lanes4_q8_matmul(const float* x, int64_t rows, int64_t columns, const uint8_t* weight, int64_t out_features,
                      float* y, int nthreads) {
    const int64_t records = columns / 64, stride = records * (kHalf ? kHalfLaneRecordBytes : kLaneRecordBytes);
    thread_local std::vector<int8_t> code_buffer;
    thread_local std::vector<float> field_buffer;
    if ((int64_t)code_buffer.size() < rows * records * 64) code_buffer.resize(rows * records * 64);
    if ((int64_t)field_buffer.size() < rows * records * 4) field_buffer.resize(rows * records * 4);
    for (int64_t m = 0; m < rows; m++)
        round_lane_row(x + m * columns, records, code_buffer.data() + m * records * 64,
                       field_buffer.data() + m * records * 4);
    const LaneActivations activations{code_buffer.data(), field_buffer.data(), records};  // read by all threads
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && out_features > 1)
    for (int64_t n = 0; n < out_features; n++) {
        const uint8_t* row = weight + n * stride;
        int64_t m = 0;
        for (; m + 2 <= rows; m += 2)
            lanes4_q8_dots<kHalf, 2>(row, activations, m, y + m * out_features + n, out_features);
        if (m < rows) lanes4_q8_dots<kHalf, 1>(row, activations, m, y + m * out_features + n, out_features);
    }
}

// ---- Q8_0 blocks (Q5_0 too, widened at load: widened_blocks.py) times 8-bit activations ----
//
// The same rounding of the activations (per 32 values, in their own order here), and each block's codes
// c (value = d * c, -128..127) meet them as integers: |c| (unsigned) times q with
// c's sign (signed), pairs added by _mm256_maddubs_epi16 (at most 2 * 128 * 127: no saturation), then
// d * dx times the block's integer sum.

// One activation row rounded to codes (columns values, in order) and one scale per 32.
inline void round_row(const float* x, int64_t columns, int8_t* codes, float* scales) {
    for (int64_t b = 0; b < columns / 32; b++) {
        float sum;
        round_group(x + 32 * b, codes + 32 * b, scales + b, &sum);
    }
}

// A Q8_0 block's 32 codes as signed integers, in value order.
inline void block_integer_codes(const uint8_t* block, int8_t* codes) { std::memcpy(codes, block + 2, 32); }

#if defined(__AVX2__) && defined(__FMA__)
inline __m256i block_integer_codes(const uint8_t* block) { return _mm256_loadu_si256((const __m256i*)(block + 2)); }
#endif

// One weight row's dots with R rounded activation rows (codes stride columns, scales stride blocks);
// blocks alternate two chains, each row's sums in the same order whatever R.
template <int kType, int R>
inline void integer_block_dots(const uint8_t* row, const int8_t* codes, const float* scales, int64_t columns,
                               float* y, int64_t y_stride) {
    constexpr int kBytes = kFormats[kType].bytes;
    const int64_t blocks = columns / 32;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 total[R][2];
    for (int r = 0; r < R; r++) total[r][0] = total[r][1] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    auto add_block = [&](int64_t b, int chain) __attribute__((always_inline)) {
        const uint8_t* block = row + b * kBytes;
        _mm_prefetch((const char*)block + kPrefetchBytes, _MM_HINT_T0);
        const __m256i signed_codes = block_integer_codes(block);
        const __m256i magnitudes = _mm256_sign_epi8(signed_codes, signed_codes);
        const __m256 d = _mm256_set1_ps(half_to_float(block));
        for (int r = 0; r < R; r++) {
            const __m256i q = _mm256_loadu_si256((const __m256i*)(codes + r * columns + 32 * b));
            const __m256i pairs = _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(q, signed_codes));
            const __m256 sum = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)),
                                             _mm256_broadcast_ss(scales + r * blocks + b));  // times dx
            total[r][chain] = _mm256_fmadd_ps(sum, d, total[r][chain]);
        }
    };
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        add_block(b, 0);
        add_block(b + 1, 1);
    }
    if (b < blocks) add_block(b, 0);
    for (int r = 0; r < R; r++) y[r * y_stride] = horizontal_sum(_mm256_add_ps(total[r][0], total[r][1]));
#else
    for (int r = 0; r < R; r++) {
        float total[2] = {0.0f, 0.0f};
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t* block = row + b * kBytes;
            int8_t block_codes[32];
            block_integer_codes(block, block_codes);
            const int8_t* q = codes + r * columns + 32 * b;
            int32_t sum = 0;
            for (int i = 0; i < 32; i++) sum += block_codes[i] * q[i];
            total[b & 1] += (half_to_float(block) * scales[r * blocks + b]) * (float)sum;
        }
        y[r * y_stride] = total[0] + total[1];
    }
#endif
}

// Q6_K blocks (256 values: 16 groups of 16 with an 8-bit scale each, 6-bit codes c - 32, one fp16 d)
// times 8-bit activations: per 32 values, the codes' pair sums with q are weighted by their two 16-value
// groups' scales in the integer multiply-add (at most 2 * 32 * 127 per pair, 127 * that per lane: exact),
// so d * dx meets one integer sum per 32 values, as for Q8_0. Codes follow ggml's dequantize_row_q6_K: in
// each 128-value half, value 32k + l is the low (k < 2) or high nibble of ql[l + 32 (k % 2)], with bits
// 2k, 2k + 1 of qh[l] above it, less 32.
template <int R>
inline void q6_k_dots(const uint8_t* row, const int8_t* codes, const float* scales, int64_t columns, float* y,
                      int64_t y_stride) {
    const int64_t blocks = columns / 256, groups = columns / 32;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 total[R][2];
    for (int r = 0; r < R; r++) total[r][0] = total[r][1] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F), high2 = _mm256_set1_epi8(0x30), bias = _mm256_set1_epi8(32);
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t* block = row + b * 210;
        _mm_prefetch((const char*)block + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)block + kPrefetchBytes + 64, _MM_HINT_T0);
        _mm_prefetch((const char*)block + kPrefetchBytes + 128, _MM_HINT_T0);
        _mm_prefetch((const char*)block + kPrefetchBytes + 192, _MM_HINT_T0);
        const float d = half_to_float(block + 208);
        const int8_t* group_scales = (const int8_t*)(block + 192);
        for (int half = 0; half < 2; half++) {
            const uint8_t* ql = block + 64 * half;
            const __m256i a = _mm256_loadu_si256((const __m256i*)ql), c = _mm256_loadu_si256((const __m256i*)(ql + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i*)(block + 128 + 32 * half));
            const __m256i unsigned_codes[4] = {
                _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), high2)),
                _mm256_or_si256(_mm256_and_si256(c, low4), _mm256_and_si256(_mm256_slli_epi16(h, 2), high2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), _mm256_and_si256(h, high2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), low4),
                                _mm256_and_si256(_mm256_srli_epi16(h, 2), high2)),
            };
            for (int k = 0; k < 4; k++) {
                const int group = 8 * (int)b + 4 * half + k;  // of 32 values in the row
                const int8_t* pair = group_scales + 8 * half + 2 * k;
                const __m256i weights = _mm256_set_m128i(_mm_set1_epi16(pair[1]), _mm_set1_epi16(pair[0]));
                const __m256i signed_codes = _mm256_sub_epi8(unsigned_codes[k], bias);
                const __m256i magnitudes = _mm256_sign_epi8(signed_codes, signed_codes);
                for (int r = 0; r < R; r++) {
                    const __m256i q = _mm256_loadu_si256((const __m256i*)(codes + r * columns + 32 * group));
                    const __m256i pairs = _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(q, signed_codes));
                    const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, weights));
                    const __m256 scale = _mm256_set1_ps(d * scales[r * groups + group]);
                    total[r][k & 1] = _mm256_fmadd_ps(sum, scale, total[r][k & 1]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++) y[r * y_stride] = horizontal_sum(_mm256_add_ps(total[r][0], total[r][1]));
#else
    for (int r = 0; r < R; r++) {
        float total[2] = {0.0f, 0.0f};
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t* block = row + b * 210;
            const float d = half_to_float(block + 208);
            const int8_t* group_scales = (const int8_t*)(block + 192);
            for (int half = 0; half < 2; half++) {
                const uint8_t* ql = block + 64 * half;
                const uint8_t* qh = block + 128 + 32 * half;
                for (int k = 0; k < 4; k++) {
                    const int group = 8 * (int)b + 4 * half + k;
                    const int8_t* q = codes + r * columns + 32 * group;
                    int32_t sum = 0;
                    for (int l = 0; l < 32; l++) {
                        const int nibble = (k < 2 ? ql[l + 32 * (k & 1)] & 0x0F : ql[l + 32 * (k & 1)] >> 4);
                        const int code = (nibble | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
                        sum += group_scales[8 * half + 2 * k + l / 16] * code * q[l];
                    }
                    total[k & 1] += (d * scales[r * groups + group]) * (float)sum;
                }
            }
        }
        y[r * y_stride] = total[0] + total[1];
    }
#endif
}

// Few activation rows times Q8_0 or Q6_K blocks with 8-bit activations, up to four rows at a time.
template <int kType>
void integer_blocks_matmul(const float* x, int64_t rows, int64_t columns, const uint8_t* weight,
                           int64_t out_features, float* y, int nthreads) {
    const int64_t blocks = columns / 32, stride = columns / kFormats[kType].values * kFormats[kType].bytes;
    thread_local std::vector<int8_t> code_buffer;
    thread_local std::vector<float> scale_buffer;
    if ((int64_t)code_buffer.size() < rows * columns) code_buffer.resize(rows * columns);
    if ((int64_t)scale_buffer.size() < rows * blocks) scale_buffer.resize(rows * blocks);
    for (int64_t m = 0; m < rows; m++)
        round_row(x + m * columns, columns, code_buffer.data() + m * columns, scale_buffer.data() + m * blocks);
    const int8_t* codes = code_buffer.data();  // read by all threads
    const float* scales = scale_buffer.data();
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && out_features > 1)
    for (int64_t n = 0; n < out_features; n++) {
        const uint8_t* row = weight + n * stride;
        int64_t m = 0;
        auto dots = [&](auto group) __attribute__((always_inline)) {
            constexpr int kRows = decltype(group)::value;
            if constexpr (kType == kQ6_KQ8)
                q6_k_dots<kRows>(row, codes + m * columns, scales + m * blocks, columns, y + m * out_features + n,
                                 out_features);
            else
                integer_block_dots<kType, kRows>(row, codes + m * columns, scales + m * blocks, columns,
                                                 y + m * out_features + n, out_features);
            m += decltype(group)::value;
        };
        while (m + 4 <= rows) dots(std::integral_constant<int, 4>());
        if (rows - m == 3) dots(std::integral_constant<int, 3>());
        if (rows - m == 2) dots(std::integral_constant<int, 2>());
        if (rows - m == 1) dots(std::integral_constant<int, 1>());
    }
}

inline float* scratch(int64_t floats) {
    thread_local std::vector<float> buffer;
    if ((int64_t)buffer.size() < floats) buffer.resize(floats);
    return buffer.data();
}

template <int kType>
void matmul(const float* x, int64_t rows, int64_t columns, const void* weight, int64_t out_features, float* y,
            int nthreads) {
    const uint8_t* blocks = (const uint8_t*)weight;
    const int64_t tiles = (out_features + kTile - 1) / kTile;
    if (kType == kLanes4Q8 || kType == kLanes4HalfQ8) {
        lanes4_q8_matmul<kType == kLanes4HalfQ8>(x, rows, columns, blocks, out_features, y, nthreads);
        return;
    }
    if (kType == kQ8_0Q8 || kType == kQ6_KQ8) {
        integer_blocks_matmul<kType>(x, rows, columns, blocks, out_features, y, nthreads);
        return;
    }
#if defined(EMBER_LANES4_VECTORS)
    if (kType == kLanes4) {
        lanes4_matmul(x, rows, columns, blocks, out_features, y, nthreads);
        return;
    }
#endif
#if defined(EMBER_FUSED_DOTS)
    if (kType == kQ8_0 && rows == 1) {  // cheap codes: each row streams alone, front to back
        const int64_t blocks_per_row = columns / 32, stride = blocks_per_row * kFormats[kType].bytes;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && out_features > 1)
        for (int64_t n = 0; n < out_features; n++) y[n] = fused_row_dot<kType>(blocks + n * stride, x, blocks_per_row);
        return;
    }
    if (kFusedDot<kType> && rows > 1 && rows <= kFusedRows) {
        fused_rows_matmul<kType>(x, rows, columns, blocks, out_features, y, nthreads);
        return;
    }
    if (kFusedDot<kType> && rows == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && tiles > 1)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t first = t * kTile;
            fused_tile_dots<kType>(blocks, first, (int)std::min<int64_t>(kTile, out_features - first), x, columns,
                                   y + first);
        }
        return;
    }
#endif
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && tiles > 1)
    {
        float* w = scratch(kTile * columns);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t first = t * kTile, count = std::min<int64_t>(kTile, out_features - first);
            for (int r = 0; r < count; r++) expand_row<kType>(blocks, first + r, columns, w + r * columns);
            if (count < kTile) std::memset(w + count * columns, 0, (kTile - count) * columns * sizeof(float));
            for (int64_t m = 0; m < rows; m++) {
                float out[kTile];
                tile_dots(w, x + m * columns, columns, out);
                for (int r = 0; r < count; r++) y[m * out_features + first + r] = out[r];
            }
        }
    }
}

template <int kType>
void expand_rows(const void* weight, int64_t columns, int64_t first_row, int64_t count, const int64_t* ids,
                 float* out, int nthreads) {
    const uint8_t* blocks = (const uint8_t*)weight;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && count > 1)
    for (int64_t i = 0; i < count; i++)
        expand_row<kType>(blocks, ids ? ids[i] : first_row + i, columns, out + i * columns);
}

typedef void (*MatmulKernel)(const float* x, int64_t rows, int64_t columns, const void* weight,
                             int64_t out_features, float* y, int nthreads);

}  // namespace

extern "C" int ember_ggml_abi_version() { return 1; }

// The widest instruction set the products use: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (portable C++).
extern "C" int ember_ggml_vector_bits() {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
}

#define EMBER_GGML_KERNELS(NAME, TYPE)                                                                      \
    extern "C" void ember_ggml_##NAME##_matmul(const float* x, int64_t rows, int64_t columns,              \
                                               const void* weight, int64_t out_features, float* y,        \
                                               int nthreads) {                                            \
        matmul<TYPE>(x, rows, columns, weight, out_features, y, nthreads);                                \
    }                                                                                                      \
    extern "C" void ember_ggml_##NAME##_expand_rows(const void* weight, int64_t columns, int64_t first_row, \
                                                    int64_t count, const int64_t* ids, float* out,         \
                                                    int nthreads) {                                        \
        expand_rows<TYPE>(weight, columns, first_row, count, ids, out, nthreads);                          \
    }

EMBER_GGML_KERNELS(q4_k, kQ4_K)
EMBER_GGML_KERNELS(q5_k, kQ5_K)
EMBER_GGML_KERNELS(q6_k, kQ6_K)
EMBER_GGML_KERNELS(q5_0, kQ5_0)
EMBER_GGML_KERNELS(q5_1, kQ5_1)
EMBER_GGML_KERNELS(q8_0, kQ8_0)
EMBER_GGML_KERNELS(q4_0, kQ4_0)
EMBER_GGML_KERNELS(q4_1, kQ4_1)
EMBER_GGML_KERNELS(lanes4, kLanes4)
EMBER_GGML_KERNELS(lanes4_q8, kLanes4Q8)
EMBER_GGML_KERNELS(lanes4h_q8, kLanes4HalfQ8)
EMBER_GGML_KERNELS(q8_0_q8, kQ8_0Q8)
EMBER_GGML_KERNELS(q6_k_q8, kQ6_KQ8)

// Several projections fused along out_features whose weights differ in kind (Q5_0 q and k with a Q8_0 v):
// table = [count, then (kernel, weight, out_features) per part], each part a kernel of this signature.
// Each part's product lands in a scratch block and is copied into its columns of y (rows, out_features).
extern "C" void ember_ggml_concat_matmul(const float* x, int64_t rows, int64_t columns, const void* table,
                                         int64_t out_features, float* y, int nthreads) {
    const int64_t* entries = (const int64_t*)table;
    const int64_t count = entries[0];
    int64_t widest = 0;
    for (int64_t p = 0; p < count; p++) widest = std::max(widest, entries[3 + 3 * p]);
    thread_local std::vector<float> part;
    if ((int64_t)part.size() < rows * widest) part.resize(rows * widest);
    int64_t offset = 0;
    for (int64_t p = 0; p < count; p++) {
        const MatmulKernel kernel = (MatmulKernel)entries[1 + 3 * p];
        const int64_t width = entries[3 + 3 * p];
        kernel(x, rows, columns, (const void*)entries[2 + 3 * p], width, part.data(), nthreads);
        for (int64_t m = 0; m < rows; m++)
            std::memcpy(y + m * out_features + offset, part.data() + m * width, width * sizeof(float));
        offset += width;
    }
}

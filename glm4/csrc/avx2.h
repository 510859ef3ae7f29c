// The linear kernels' AVX2 path, for x86-64 CPUs without AVX-512 BF16 (most desktop and laptop
// CPUs, and the AVX-512 Xeons before Cooper Lake): a few rows of bf16 x times a bf16, int8 or
// group-wise int4 weight, each weight row read once for all the rows of x and widened to float32
// in registers, then multiplied by float32 FMAs (bf16 x bf16 and int x bf16 products are exact;
// the sums are float32, rounded to bf16 once). Without these, such a CPU decodes through
// inductor's code, which reads an int8 weight at a few GB/s there (its loads of 8 of a vector's 32
// bytes go through a copy), or torch's int4 kernel, at about a fifth of the memory's rate.
//
// Each output is one thread's sum in a fixed order (4 accumulators of 8 columns, then the tail),
// whatever the number of rows: a row's numbers are the same alone or in a batch.
#pragma once

#include <ATen/Parallel.h>

#include "bf16.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && !(defined(__AVX512BW__) && defined(__AVX512BF16__))
#define GLM4_AVX2_KERNEL 1
#include <immintrin.h>

#include "simd.h"

namespace {
namespace avx2 {

constexpr int64_t STEP = 32;       // columns a step: four vectors of 8
constexpr int PASS_ROWS = 2;       // rows of x per pass over a weight row: 8 accumulators
constexpr int64_t GRAIN = 16;      // weight rows a thread takes at least

// 8 bf16 or int8 weights from p as float32 (bf16: a float32's top half), and one of them.
inline __m256 widen(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

inline __m256 widen(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

inline float to_float(uint16_t w) { return bf16_to_float(w); }
inline float to_float(int8_t w) { return (float)w; }

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 sum4(const __m256 *a) { return _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])); }

// acc[r][u] += w[u] * the 8 columns from k + 8u of x's row r.
template <int R>
inline void fma_step(const __m256 *w, const float *const *x, int64_t k, __m256 (*acc)[4]) {
    for (int r = 0; r < R; r++)
        for (int u = 0; u < 4; u++) acc[r][u] = _mm256_fmadd_ps(w[u], _mm256_loadu_ps(x[r] + k + 8 * u), acc[r][u]);
}

// out[r] = the sum over columns [k0, k1) (a multiple of STEP) of w . x[r], where load(k, w) widens
// the 32 weight columns from k.
template <int R, class Load>
inline void sums(const Load &load, const float *const *x, int64_t k0, int64_t k1, float *out) {
    __m256 acc[R][4];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < 4; u++) acc[r][u] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; k += STEP) {
        __m256 w[4];
        load(k, w);
        fma_step<R>(w, x, k, acc);
    }
    for (int r = 0; r < R; r++) out[r] = hsum(sum4(acc[r]));
}

// n floats in `buffer`, from a 64-byte boundary: the loads of x then never straddle two cache
// lines (malloc aligns to 16 bytes; on the AMD development machine this measured no different).
inline float *aligned(std::vector<float> &buffer, int64_t n) {
    buffer.resize(n + 16);
    return buffer.data() + (-(reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(float)) & 15);
}

// x's M rows (K columns of bf16) as float32, into buffer.
inline float *widen_rows(const uint16_t *x, int64_t M, int64_t K, std::vector<float> &buffer) {
    float *xf = aligned(buffer, M * K);
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(x[i]);
    return xf;
}

// For each weight row n of [0, N), in threads: row(n, x, rows, out) sets out[r] = the product of
// weight row n with the rows (std::integral_constant 1 or 2) of x from x[0], pass after pass over
// x's M rows, `most` rows a pass (1 or PASS_ROWS); y (M, N) bf16.
template <class Row>
inline void each_row(const float *xf, int64_t M, int64_t K, int64_t N, uint16_t *y, const Row &row,
                     int most = PASS_ROWS) {
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; n++)
            for (int64_t m = 0; m < M;) {
                const float *x[PASS_ROWS] = {xf + m * K, xf + std::min(m + 1, M - 1) * K};
                float out[PASS_ROWS];
                if (M - m == 1 || most == 1) {
                    row(n, x, std::integral_constant<int, 1>(), out);
                    y[m * N + n] = float_to_bf16(out[0]);
                    m += 1;
                } else {
                    row(n, x, std::integral_constant<int, 2>(), out);
                    y[m * N + n] = float_to_bf16(out[0]);
                    y[(m + 1) * N + n] = float_to_bf16(out[1]);
                    m += 2;
                }
            }
    });
}

// y (M, N) = x (M, K) w^T for a bf16 or int8 weight w (N, K), times the row's bf16 scale where
// `scales` is given (int8: applied to the float32 sum before the one rounding). The vector sums run
// over K rounded down to STEP, then the rest one by one.
template <class T>
inline void plain_rows(const uint16_t *xs, const T *w, const uint16_t *scales, uint16_t *y, int64_t M, int64_t K,
                       int64_t N) {
    const bool ask = asks_ahead(M);  // the lines 4 KiB ahead (simd.h)
    // Exactly 2 rows of bf16 take a row a pass: as the only pass over each weight row, a 2-row pass
    // read a weight of 1024 columns at half the rate of a 1-row one on the AMD development machine
    // (the bench's lm_head: 18-20 against 9-10 ms; two 1-row passes 9.6-9.9), though not when
    // another pass follows (3 and 4 rows), nor with int8 or int4 weights (there 2 rows a pass stay
    // faster). At 2816 and 4096 columns both ways take the same time. Unexplained: the stall is on
    // the weight's loads, and asking for lines ahead does not help.
    const bool lone_pair = std::is_same_v<T, uint16_t> && M == 2;
    std::vector<float> buffer;
    const float *xf = widen_rows(xs, M, K, buffer);
    const int64_t K32 = K / STEP * STEP;
    each_row(xf, M, K, N, y, [&](int64_t n, const float *const *x, auto rows, float *out) {
        const T *p = w + n * K;
        auto load = [p, ask](int64_t k, __m256 *v) {
            if (ask && k * sizeof(T) % 64 == 0) prefetch_ahead(p + k);  // a line per 64 bytes of weights
            for (int u = 0; u < 4; u++) v[u] = widen(p + k + 8 * u);
        };
        sums<rows>(load, x, 0, K32, out);
        for (int r = 0; r < rows; r++) {
            for (int64_t k = K32; k < K; k++) out[r] += to_float(p[k]) * x[r][k];
            if (scales != nullptr) out[r] *= bf16_to_float(scales[n]);
        }
    }, lone_pair ? 1 : PASS_ROWS);
}

inline void bf16_rows(const uint16_t *xs, const uint16_t *w, uint16_t *y, int64_t M, int64_t K, int64_t N) {
    plain_rows(xs, w, nullptr, y, M, K, N);
}

inline void int8_rows(const uint16_t *xs, const int8_t *q, const uint16_t *scales, uint16_t *y, int64_t M, int64_t K,
                      int64_t N) {
    plain_rows(xs, q, scales, y, M, K, N);
}

// The 32 columns from k of an int4 weight row (16 bytes at p + k / 2, two columns a byte, low
// nibble first) as q, in the order int4_rows lays x out in: the even columns, then the odd ones.
inline void widen_int4(const uint8_t *p, int64_t k, __m256 *v) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)(p + k / 2)), low = _mm_set1_epi8(0x0F);
    const __m128i even = _mm_and_si128(bytes, low), odd = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(even));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(even, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(odd));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(odd, 8)));
}

// The int4 product of R rows of x with one weight row (bytes p, (scale, zero) pairs), x laid out
// per 32 columns as widen_int4 widens the weight, xsum each row's sum of x per group: each group's
// products are summed in vectors, scaled into the row's total as a vector, and reduced once.
template <int R>
inline void int4_row(const uint8_t *p, const uint16_t *pairs, const float *const *x, const float *const *xsum,
                     int64_t K, int64_t group, bool ask, float *out) {
    __m256 total[R];
    float zeros[R];
    for (int r = 0; r < R; r++) total[r] = _mm256_setzero_ps(), zeros[r] = 0.0f;
    for (int64_t g = 0; g < K / group; g++) {
        const float scale = bf16_to_float(pairs[2 * g]), zero = bf16_to_float(pairs[2 * g + 1]);
        __m256 acc[R][4];
        for (int r = 0; r < R; r++)
            for (int u = 0; u < 4; u++) acc[r][u] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += STEP) {
            __m256 v[4];
            if (ask && k % 128 == 0) prefetch_ahead(p + k / 2);  // 16 bytes a step
            widen_int4(p, k, v);
            fma_step<R>(v, x, k, acc);
        }
        for (int r = 0; r < R; r++) {
            total[r] = _mm256_fmadd_ps(sum4(acc[r]), _mm256_set1_ps(scale), total[r]);
            zeros[r] += (zero - 8.0f * scale) * xsum[r][g];
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(total[r]) + zeros[r];
}

// y (M, N) = x (M, K) w^T for glm4's group-wise int4 weight (N, K/2) bytes and (N, K/group, 2)
// bf16 (scale, zero), w = (q - 8) * scale + zero:
//   y = sum_g scale_g * sum_{k in g} q x  +  sum_g (zero_g - 8 scale_g) * sum_{k in g} x.
inline void int4_rows(const uint16_t *xs, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t K,
                      int64_t N, int64_t group) {
    const bool ask = asks_ahead(M);  // the lines 4 KiB ahead (simd.h)
    const int64_t groups = K / group;
    std::vector<float> buffer, xsum(M * groups);
    float *xf = aligned(buffer, M * K);
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += STEP) {
            float *to = xf + m * K + k;
            for (int64_t i = 0; i < 16; i++) {
                to[i] = bf16_to_float(xs[m * K + k + 2 * i]);
                to[16 + i] = bf16_to_float(xs[m * K + k + 2 * i + 1]);
            }
        }
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) s += xf[m * K + k];
            xsum[m * groups + g] = s;
        }
    each_row(xf, M, K, N, y, [&](int64_t n, const float *const *x, auto rows, float *out) {
        const int64_t m = (x[0] - xf) / K;  // the pass's first row of x
        const float *sums[PASS_ROWS] = {xsum.data() + m * groups, xsum.data() + (m + rows - 1) * groups};
        int4_row<rows>(w + n * (K / 2), sz + n * groups * 2, x, sums, K, group, ask, out);
    });
}

// Weight row n as bf16, w = (q - 8) * scale + zero in float32 rounded once, as int4.h's (and
// quantization.Int4Linear.dequantize then .to(bfloat16)): (q - 8) * scale is exact, so a fused
// multiply-add gives the same numbers. The compiler vectorizes it.
inline void int4_dequantize_row(const uint8_t *w, const uint16_t *sz, int64_t n, int64_t K, int64_t group,
                                uint16_t *y) {
    const uint8_t *row = w + n * (K / 2);
    const uint16_t *pairs = sz + n * (K / group) * 2;
    for (int64_t g = 0; g < K / group; g++) {
        const float scale = bf16_to_float(pairs[2 * g]), zero = bf16_to_float(pairs[2 * g + 1]);
        for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
            const int q = row[k / 2];
            y[k] = float_to_bf16((float)((q & 15) - 8) * scale + zero);
            y[k + 1] = float_to_bf16((float)((q >> 4) - 8) * scale + zero);
        }
    }
}

}  // namespace avx2
}  // namespace

#endif

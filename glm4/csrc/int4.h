// The int4 kernel's core (see int4_linear.cpp), shared with the fused decode step
// (decode_step.cpp): int4_linear_row() over raw buffers.
#pragma once

#include <ATen/Parallel.h>

#include "bf16.h"

#include <cstdint>
#include <vector>

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#define GLM4_INT4_KERNEL 1
#include <immintrin.h>

#include "simd.h"
#endif

namespace {

#ifdef GLM4_INT4_KERNEL
// xp: x reordered per 64 columns as [the 32 even columns, the 32 odd ones], to meet the low and the
// high nibbles of 32 bytes. sums: x summed over each group (for the zeros).
void int4_rows(const uint16_t *xp, const float *sums, const uint8_t *w, const uint16_t *sz, uint16_t *y,
               int64_t K, int64_t group, int64_t n0, int64_t n1) {
    alignas(64) uint16_t table[32];
    for (int q = 0; q < 32; q++) table[q] = float_to_bf16((float)((q & 15) - 8));
    const __m512i lut = _mm512_load_si512(table), nibble = _mm512_set1_epi16(0x0F);
    const int64_t groups = K / group, blocks = group / 64;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        const uint16_t *szr = sz + n * groups * 2;
        __m512 acc = _mm512_setzero_ps();
        float zeros = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            __m512 part = _mm512_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                int64_t col = g * group + b * 64;
                prefetch_ahead(wr + col / 2);
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wr + col / 2)));
                __m512i low = _mm512_permutexvar_epi16(_mm512_and_si512(bytes, nibble), lut);
                __m512i high = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), lut);
                part = _mm512_dpbf16_ps(part, (__m512bh)low, (__m512bh)_mm512_loadu_si512(xp + col));
                part = _mm512_dpbf16_ps(part, (__m512bh)high, (__m512bh)_mm512_loadu_si512(xp + col + 32));
            }
            acc = _mm512_fmadd_ps(part, _mm512_set1_ps(bf16_to_float(szr[2 * g])), acc);
            zeros += bf16_to_float(szr[2 * g + 1]) * sums[g];
        }
        y[n] = float_to_bf16(_mm512_reduce_add_ps(acc) + zeros);
    }
}


// y (N) = one row x (K) times the int4 weight w (N, K/2) with scales and zeros sz (N, K/group, 2),
// on every thread.
inline void int4_linear_row(const uint16_t *xs, const uint8_t *w, const uint16_t *sz, uint16_t *out, int64_t K,
                            int64_t N, int64_t group) {
    std::vector<uint16_t> xp(K);
    std::vector<float> sums(K / group, 0.0f);
    for (int64_t c = 0; c < K; c += 64)
        for (int64_t i = 0; i < 32; i++) xp[c + i] = xs[c + 2 * i], xp[c + 32 + i] = xs[c + 2 * i + 1];
    for (int64_t k = 0; k < K; k++) sums[k / group] += bf16_to_float(xs[k]);
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        int4_rows(xp.data(), sums.data(), w, sz, out, K, group, n0, n1);
    });
}

#endif  // GLM4_INT4_KERNEL

}  // namespace

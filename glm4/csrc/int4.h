// The int4 kernel's core (see int4_linear.cpp), shared with the fused decode step
// (decode_step.cpp): int4_linear_row() over raw buffers.
#pragma once

#include <ATen/Parallel.h>

#include "bf16.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#define GLM4_INT4_KERNEL 1
#include <immintrin.h>

#include "simd.h"
#endif

namespace {

#ifdef GLM4_INT4_KERNEL
// The products of up to 16 groups of a weight row with x, C of them (a compile-time count, so that
// the 16 sums stay in registers), as one vector: lane i is group i's (128 + q) . x, see int4_rows.
template <int C>
inline __m512 int4_groups(const uint16_t *xp, const uint8_t *wr, int64_t col, int64_t blocks) {
    const __m512i nibble = _mm512_set1_epi16(0x0F), exponent = _mm512_set1_epi16(0x4300);  // bf16 128
    __m512 parts[16];
    for (int i = 0; i < 16; i++) parts[i] = _mm512_setzero_ps();
    for (int i = 0; i < C; i++)
        for (int64_t b = 0; b < blocks; b++, col += 64) {
            prefetch_ahead(wr + col / 2);
            __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wr + col / 2)));
            __m512i low = _mm512_ternarylogic_epi32(bytes, nibble, exponent, 0xEA);  // (b & 0x0F) | 0x4300
            __m512i high = _mm512_or_si512(_mm512_srli_epi16(bytes, 4), exponent);
            parts[i] = _mm512_dpbf16_ps(parts[i], (__m512bh)low, (__m512bh)_mm512_loadu_si512(xp + col));
            parts[i] = _mm512_dpbf16_ps(parts[i], (__m512bh)high, (__m512bh)_mm512_loadu_si512(xp + col + 32));
        }
    return reduce16(parts);
}

// xp: x reordered per 64 columns as [the 32 even columns, the 32 odd ones], to meet the low and the
// high nibbles of 32 bytes. sums: x summed over each group (for the zeros).
//
// A nibble q becomes the bf16 of 128 + q by setting the exponent bits of 128 above it, one bitwise
// op where a table lookup is a shuffle; then sum (q - 8) x = sum (128 + q) x - 136 sum x, and the
// 136 joins the zero's term. The groups' scales and zeros are applied 16 groups at a time, as
// vectors: per group, scalar work cost as much as the unpacking and the products.
void int4_rows(const uint16_t *xp, const float *sums, const uint8_t *w, const uint16_t *sz, uint16_t *y,
               int64_t K, int64_t group, int64_t n0, int64_t n1) {
    const int64_t groups = K / group, blocks = group / 64;
    const __m512i high_half = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        const uint32_t *pairs = reinterpret_cast<const uint32_t *>(sz) + n * groups;  // (scale, zero) bf16
        __m512 acc = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g += 16) {
            const int64_t count = std::min<int64_t>(16, groups - g), col = g * group;
            __m512 dots;  // a switch, so each count inlines (through a table of pointers: 1.5x slower)
            switch (count) {
                case 16: dots = int4_groups<16>(xp, wr, col, blocks); break;
                case 15: dots = int4_groups<15>(xp, wr, col, blocks); break;
                case 14: dots = int4_groups<14>(xp, wr, col, blocks); break;
                case 13: dots = int4_groups<13>(xp, wr, col, blocks); break;
                case 12: dots = int4_groups<12>(xp, wr, col, blocks); break;
                case 11: dots = int4_groups<11>(xp, wr, col, blocks); break;
                case 10: dots = int4_groups<10>(xp, wr, col, blocks); break;
                case 9: dots = int4_groups<9>(xp, wr, col, blocks); break;
                case 8: dots = int4_groups<8>(xp, wr, col, blocks); break;
                case 7: dots = int4_groups<7>(xp, wr, col, blocks); break;
                case 6: dots = int4_groups<6>(xp, wr, col, blocks); break;
                case 5: dots = int4_groups<5>(xp, wr, col, blocks); break;
                case 4: dots = int4_groups<4>(xp, wr, col, blocks); break;
                case 3: dots = int4_groups<3>(xp, wr, col, blocks); break;
                case 2: dots = int4_groups<2>(xp, wr, col, blocks); break;
                default: dots = int4_groups<1>(xp, wr, col, blocks); break;
            }
            const __mmask16 m = first(count);
            const __m512i sz16 = _mm512_maskz_loadu_epi32(m, pairs + g);
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(sz16, 16));
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(sz16, high_half));
            acc = _mm512_fmadd_ps(dots, scale, acc);
            // + (zero - 136 scale) * sum x, over the group
            const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), scale, zero);
            acc = _mm512_fmadd_ps(offset, _mm512_maskz_loadu_ps(m, sums + g), acc);
        }
        y[n] = float_to_bf16(_mm512_reduce_add_ps(acc));
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

// The int8 kernels of the fused decode step (decode_step.cpp): y = x (q * scale)^T for glm4's
// weight-only int8 (q int8 (N, K), one bf16 scale per output row) over raw buffers, for up to 32
// rows of x: widening q to bf16 in registers for vdpbf16ps, in each pass of up to 8 rows, or on
// AMX-INT8 tiles (int8_amx_rows).
#pragma once

#include <ATen/Parallel.h>

#include "bf16.h"
#include "linear.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(GLM4_BF16_LINEAR_KERNEL) && defined(__AVX512VL__)
#define GLM4_INT8_KERNEL 1
#endif

namespace {

#ifdef GLM4_INT8_KERNEL

// int8 weight rows as `tile` reads them (see Bf16Rows in linear.h): 32 columns widened to bf16,
// which holds every int8 exactly, so that the products are exact and summed in float32 as bf16
// weights' are, and the row's scale is applied before the one rounding.
struct Int8Rows {
    const int8_t *row[2];
    bool ask;
    static __m512bh widen(__m128i low, __m128i high) {  // 16 + 16 int8 columns
        return _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(high)),
                                   _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(low)));
    }
    __m512bh operator()(int j, int64_t k) const {
        if (ask) prefetch_ahead(row[j] + k);
        return widen(_mm_loadu_si128((const __m128i *)(row[j] + k)), _mm_loadu_si128((const __m128i *)(row[j] + k + 16)));
    }
    __m512bh operator()(int j, int64_t k, __mmask32 in) const {
        return widen(_mm_maskz_loadu_epi8((__mmask16)in, row[j] + k), _mm_maskz_loadu_epi8((__mmask16)(in >> 16), row[j] + k + 16));
    }
};

#ifdef GLM4_AMX_KERNEL
// Rows of x per pass over a block of weight rows: their 48 (row, digit) columns fill three int32 C
// tiles of 16 columns (a row's digits may straddle two).
constexpr int64_t INT8_PASS_ROWS = 16, INT8_DIGITS = 3;
// The widths whose int32 sums cannot overflow: |q * digit| <= 2^14.
constexpr int64_t INT8_AMX_MAX_K = 1 << 17;
constexpr float DIGIT_WEIGHT[INT8_DIGITS] = {1.0f, 1.0f / 256, 1.0f / 65536};

// x's M rows as the B tiles of int8_amx_rows: each row split, exactly but for its values below
// 2^-23 of its largest, into INT8_DIGITS signed 8-bit digits of one fixed-point unit per row,
// x = unit * (d0 + d1 / 256 + d2 / 65536) with unit a power of two. Per pass p, step s (64
// columns) and tile t, 16 rows of 64 bytes: row i holds columns 4i..4i+3 of x as the dwords of 16
// (row, digit) pairs of the pass, pair j = 3 * row + digit in tile j / 16, column j % 16.
inline void int8_digits(const uint16_t *x, int64_t M, int64_t K, int8_t *b, float *unit) {
    const int64_t steps = K / 64;
    const __m128i dwords = _mm_setr_epi32(0, 16, 32, 48);  // 4 dwords down 4 tile rows of 64 bytes
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *row = x + m * K;
        __m512 top = _mm512_setzero_ps();
        __mmask16 special = 0;  // NaN or infinite lanes
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 v = load_bf16(row + k, 0xFFFF);
            top = _mm512_max_ps(top, _mm512_abs_ps(v));
            special |= _mm512_fpclass_ps_mask(v, 0x99);  // QNaN, SNaN, +inf, -inf
        }
        const float largest = _mm512_reduce_max_ps(top);
        int e = 0;
        std::frexp(largest / 126.0f, &e);  // largest / 2^e in (63, 126]: the top digit stays within int8
        // A NaN or an infinity in x makes all of the row's outputs NaN (the FMAs: NaN or +-inf).
        unit[m] = special ? NAN : largest > 0 ? std::ldexp(1.0f, e) : 0.0f;
        const __m512 shift = _mm512_set1_ps((float)(16 - e));
        const int64_t p = m / INT8_PASS_ROWS, column = m % INT8_PASS_ROWS * INT8_DIGITS;  // of d0
        for (int64_t k = 0; k < K; k += 16) {
            // x * 2^(16 - e) is exact, an integer (but for values below 2^(e - 16)) of at most 23 bits.
            const __m512i X = _mm512_cvtps_epi32(_mm512_scalef_ps(load_bf16(row + k, 0xFFFF), shift));
            const __m512i d2 = _mm512_srai_epi32(_mm512_slli_epi32(X, 24), 24);  // balanced: -128..127
            const __m512i X1 = _mm512_srai_epi32(_mm512_sub_epi32(X, d2), 8);
            const __m512i d1 = _mm512_srai_epi32(_mm512_slli_epi32(X1, 24), 24);
            const __m512i d0 = _mm512_srai_epi32(_mm512_sub_epi32(X1, d1), 8);
            const __m512i digits[INT8_DIGITS] = {d0, d1, d2};
            int8_t *tiles = b + (p * steps + k / 64) * 3 * 1024 + (k % 64) / 4 * 64;
            for (int64_t d = 0, j = column; d < INT8_DIGITS; d++, j++)  // tile j / 16, its column j % 16
                _mm_i32scatter_epi32(tiles + j / 16 * 1024 + j % 16 * 4, dwords, _mm512_cvtepi32_epi8(digits[d]), 4);
        }
    }
}

// int8_linear_rows on AMX-INT8 tiles, for K a multiple of 64. Each thread takes its blocks of 16
// weight rows; per step of 64 columns the block's rows (tile A, loaded from the weight as stored:
// no widening) multiply up to 16 rows of x as digits (int8_digits: up to three B tiles), adding
// into int32 tiles C (16 weight rows x 16 (row, digit) pairs) that are exact for any K below 2^17. A
// row's output is then unit * (c0 + c1 / 256 + c2 / 65536) * scale, rounded once: it does not
// depend on the other rows. The weight's lines are asked for AMX_AHEAD steps on, as amx_linear_rows.
inline void int8_amx_rows(const uint16_t *x, const int8_t *w, const uint16_t *scales, uint16_t *y, int64_t M,
                          int64_t K, int64_t N) {
    const int64_t steps = K / 64, blocks = (N + 15) / 16, passes = (M + INT8_PASS_ROWS - 1) / INT8_PASS_ROWS;
    thread_local std::vector<int8_t> kept;  // every byte the tiles read is written: no clearing
    kept.resize(passes * steps * 3 * 1024);
    int8_t *b = kept.data();  // (the workers' own `kept` are other vectors)
    std::vector<float> unit(M);
    int8_digits(x, M, K, b, unit.data());
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        alignas(64) int32_t c[3][16 * 16];
        const __m512i down = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
        int64_t configured = -1;  // rows * passes + pass as configured
        int64_t ahead_block = b0 + AMX_AHEAD / steps, ahead_step = AMX_AHEAD % steps;
        for (int64_t block = b0; block < b1; block++) {
            const int rows = (int)std::min<int64_t>(16, N - block * 16);
            const int8_t *wb = w + block * 16 * K;
            const __mmask16 out = first(rows);
            const __m512 scale = load_bf16(scales + block * 16, out);
            for (int64_t p = 0; p < passes; p++) {
                const int64_t in_pass = std::min<int64_t>(INT8_PASS_ROWS, M - p * INT8_PASS_ROWS);
                const int tiles = (int)((in_pass * INT8_DIGITS + 15) / 16);
                if (rows * passes + p != configured) {  // tiles: 0-2 C; 3 A; 4-6 B
                    glm4_amx::Config config;
                    config.tile(3, rows, 64);
                    for (int t = 0; t < tiles; t++) {
                        const int64_t columns = std::min<int64_t>(16, in_pass * INT8_DIGITS - t * 16);
                        config.tile(t, rows, (int)columns * 4).tile(4 + t, 16, (int)columns * 4);
                    }
                    _tile_loadconfig(&config);
                    configured = rows * passes + p;
                }
                _tile_zero(0);  // (tile numbers are constants)
                if (tiles > 1) _tile_zero(1);
                if (tiles > 2) _tile_zero(2);
                const int8_t *bp = b + p * steps * 3 * 1024;
                for (int64_t s = 0; s < steps; s++) {
                    if (p == 0) {  // later passes find the block's lines in cache
                        if (ahead_block < blocks) {
                            const int8_t *line = w + ahead_block * 16 * K + ahead_step * 64;
                            for (int64_t i = 0; i < std::min<int64_t>(16, N - ahead_block * 16); i++)
                                _mm_prefetch(reinterpret_cast<const char *>(line + i * K), _MM_HINT_T0);
                        }
                        if (++ahead_step == steps) ahead_step = 0, ahead_block++;
                    }
                    _tile_loadd(3, wb + s * 64, K);
                    _tile_loadd(4, bp + s * 3 * 1024, 64);
                    _tile_dpbssd(0, 3, 4);
                    if (tiles > 1) {
                        _tile_loadd(5, bp + s * 3 * 1024 + 1024, 64);
                        _tile_dpbssd(1, 3, 5);
                    }
                    if (tiles > 2) {
                        _tile_loadd(6, bp + s * 3 * 1024 + 2048, 64);
                        _tile_dpbssd(2, 3, 6);
                    }
                }
                _tile_stored(0, c[0], 64);
                if (tiles > 1) _tile_stored(1, c[1], 64);
                if (tiles > 2) _tile_stored(2, c[2], 64);
                for (int64_t m = 0; m < in_pass; m++) {  // the row's three digit columns, down the weight rows
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t d = 0, j = m * INT8_DIGITS; d < INT8_DIGITS; d++, j++) {  // d0 + d1 / 256 + d2 / 65536
                        const int32_t *column = c[j / 16] + j % 16;
                        const __m512i digit = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), out, down, column, 4);
                        sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(digit), _mm512_set1_ps(DIGIT_WEIGHT[d]), sum);
                    }
                    const int64_t row = p * INT8_PASS_ROWS + m;
                    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(sum, _mm512_set1_ps(unit[row])), scale);
                    _mm256_mask_storeu_epi16(y + row * N + block * 16, out, (__m256i)_mm512_cvtneps_pbh(v));
                }
            }
        }
        if (configured >= 0) _tile_release();
    });
}
#endif

// y (M, N) = x (M, K) @ (w * scales)^T for an int8 w (N, K), scales (N) bf16, on every thread: on
// AMX-INT8 tiles where the CPU has them and K allows (which depends on the weight, not on M), else
// in tiles of two weight rows half the matrix apart, as linear_rows. Either way a row's numbers do
// not depend on the other rows (nor on how many there are).
inline void int8_linear_rows(const uint16_t *x, const int8_t *w, const uint16_t *scales, uint16_t *y, int64_t M,
                             int64_t K, int64_t N) {
#ifdef GLM4_AMX_KERNEL
    if (K % 64 == 0 && K < INT8_AMX_MAX_K && glm4_amx::on()) return int8_amx_rows(x, w, scales, y, M, K, N);
#endif
    // (A buffer widened once for all of the passes measured slower, 0.8-0.9x, at 9 to 32 rows.)
    const bool ask = asks_ahead(M);
    for_each_tile(N, [&](const int64_t *r, int rows) {
        tile_times(x, Int8Rows{{w + r[0] * K, w + r[rows - 1] * K}, ask}, rows, y, M, K, N, r, scales);
    });
}

#endif  // GLM4_INT8_KERNEL

}  // namespace

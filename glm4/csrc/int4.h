// The int4 kernel's core (see int4_linear.cpp), shared with the fused decode step
// (decode_step.cpp): int4_linear_rows() over raw buffers.
#pragma once

#include <ATen/Parallel.h>

#include "bf16.h"
#include "linear.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#define GLM4_INT4_KERNEL 1
#include <immintrin.h>

#include "simd.h"
#endif

#include "amx.h"

namespace {

// The group sizes the int4 kernels take (kernels.int4_group_fits): 64, two groups to int4_tile's
// blocks of 128 columns, or a multiple of 128.
inline bool int4_group_fits(int64_t group) { return group == 64 || (group > 0 && group % 128 == 0); }

#ifdef GLM4_INT4_KERNEL
// Columns a row of x takes in int4_tile's layout: K rounded up to its blocks of 128.
inline int64_t int4_padded(int64_t K) { return (K + 127) / 128 * 128; }

// The 128 columns from c of a weight row (64 bytes at p, two columns a byte, low nibble first; the
// first 32 bytes alone where only 64 columns are left) as four vectors of 32 bf16: n[t] lane l holds
// column c + 4 l + t as the bf16 of 128 + q. A nibble q becomes 128 + q by setting the exponent bits
// of 128 above it, a bitwise op where a table lookup is a shuffle: each 16-bit lane holds the four
// nibbles of columns 4 l .. 4 l + 3, shifted down in turn.
inline void int4_unpack128(const uint8_t *p, bool half, __m512bh *n) {
    const __m512i nibble = _mm512_set1_epi16(0x0F), exponent = _mm512_set1_epi16(0x4300);  // bf16 128
    const __m512i v = half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, p) : _mm512_loadu_si512(p);
    n[0] = (__m512bh)_mm512_ternarylogic_epi32(v, nibble, exponent, 0xEA);  // (v & 0x0F) | 0x4300
    n[1] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nibble, exponent, 0xEA);
    n[2] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), nibble, exponent, 0xEA);
#ifdef __AVX512VBMI2__
    n[3] = (__m512bh)_mm512_shldi_epi16(_mm512_set1_epi16(0x0430), v, 4);  // 0x4300 | v >> 12, one op
#else
    n[3] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), exponent);
#endif
}

// y[m, r[j]] = x[m] . w[r[j]] for M rows of x and NB weight rows (wr[j], their (scale, zero) pairs
// pairs[j]). xp holds the M rows, Kp columns each (K rounded up to 128, zeros past K), reordered per
// 128 columns as int4_unpack128 unpacks the weight: the columns 4 l, then 4 l + 1, 4 l + 2, 4 l + 3.
// sums: each row's sum of x per group, [m][group].
//
// sum (q - 8) x = sum (128 + q) x - 136 sum x, and the 136 joins the zero's term. Each weight row's
// nibbles are unpacked once for the M rows. Per row of x and weight row, a group's products add into
// one vector, which times the group's scale adds into the row's total (groups of 64: the products'
// lanes 0-7 are one group's, 8-15 the next one's, scaled as such); the zeros' terms add in 16 groups
// at a time, as vectors. Each output takes the same operations in the same order whatever M and NB:
// a row's numbers are the same alone or among others.
template <int M, int NB>
inline void int4_tile(const uint16_t *xp, const float *sums, const uint8_t *const *wr, const uint32_t *const *pairs,
                      uint16_t *y, int64_t K, int64_t N, int64_t group, const int64_t *r, bool ask) {
    const __m512i high_half = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512i two_groups = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const int64_t groups = K / group, Kp = int4_padded(K);
    // Sized M * NB, apart from reduce16's 16, so that they stay in registers: in memory, each block
    // waited on its store of them (1.1x the time of a row, one thread, the weight in cache).
    __m512 total[M * NB];
    for (int i = 0; i < M * NB; i++) total[i] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += 16) {
        const int64_t count = std::min<int64_t>(16, groups - g0);
        const __mmask16 in = first(count);
        __m512 scale[NB];
        for (int j = 0; j < NB; j++) {
            const __m512i sz16 = _mm512_maskz_loadu_epi32(in, pairs[j] + g0);
            scale[j] = _mm512_castsi512_ps(_mm512_slli_epi32(sz16, 16));
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(sz16, high_half));
            const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), scale[j], zero);  // zero - 136 scale
            for (int m = 0; m < M; m++)
                total[m * NB + j] = _mm512_fmadd_ps(offset, _mm512_maskz_loadu_ps(in, sums + m * groups + g0),
                                                    total[m * NB + j]);
        }
        const int64_t c1 = (g0 + count) * group;
        __m512 acc[M * NB];
        // One block of 128 columns from c into acc: each weight row's nibbles unpacked once for the M rows.
        const auto block = [&](int64_t c) {
            __m512bh n[NB][4];
            for (int j = 0; j < NB; j++) {
                const uint8_t *p = wr[j] + c / 2;
                if (ask) prefetch_ahead(p);
                int4_unpack128(p, c + 64 == K, n[j]);
            }
            for (int m = 0; m < M; m++)
                for (int t = 0; t < 4; t++) {
                    const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + m * Kp + c + 32 * t);
                    for (int j = 0; j < NB; j++) acc[m * NB + j] = _mm512_dpbf16_ps(acc[m * NB + j], n[j][t], xv);
                }
        };
        // acc times the scales of its lanes' groups (lanes: their indices in the chunk) into the totals.
        const auto fold = [&](__m512i lanes) {
            for (int j = 0; j < NB; j++) {
                const __m512 s = _mm512_permutexvar_ps(lanes, scale[j]);
                for (int m = 0; m < M; m++) total[m * NB + j] = _mm512_fmadd_ps(acc[m * NB + j], s, total[m * NB + j]);
            }
        };
        // One loop for both where a fold is a block: a loop per fold within one over the folds spent
        // most of a block's instructions on their bookkeeping (0.86-0.96x the time at 1 to 32 rows).
        if (group <= 128) {  // groups of 64 (two to a block: lanes 0-7 and 8-15) or 128, a fold a block
            __m512i lanes = group == 64 ? two_groups : _mm512_setzero_si512();
            const __m512i next = _mm512_set1_epi32(group == 64 ? 2 : 1);
            for (int64_t c = g0 * group; c < c1; c += 128, lanes = _mm512_add_epi32(lanes, next)) {
                for (int a = 0; a < M * NB; a++) acc[a] = _mm512_setzero_ps();
                block(c);
                fold(lanes);
            }
        } else {  // larger groups span blocks: a fold a group
            for (int64_t g = 0; g < count; g++) {
                for (int a = 0; a < M * NB; a++) acc[a] = _mm512_setzero_ps();
                for (int64_t c = (g0 + g) * group; c < (g0 + g + 1) * group; c += 128) block(c);
                fold(_mm512_set1_epi32((int)g));
            }
        }
    }
    __m512 all[16];
    for (int i = 0; i < 16; i++) all[i] = i < M * NB ? total[i] : _mm512_setzero_ps();
    alignas(64) float out[16];
    _mm512_store_ps(out, reduce16(all));
    for (int m = 0; m < M; m++)
        for (int j = 0; j < NB; j++) y[m * N + r[j]] = float_to_bf16(out[m * NB + j]);
}

// Rows of x per pass of int4_tile over a tile's weight rows, so that its accumulators stay in
// registers. Each pass unpacks the weight rows again: on the AMD development machine (2 threads, the
// bench's lm_head streamed from memory), unpacking them once into a buffer that the passes read took
// 1.0-1.3x the time at 8-32 rows, and passes of 8 rows 1.1-1.2x.
constexpr int64_t INT4_PASS_ROWS = 4;

// int4_tile's passes over M rows of x (any number), for one tile of for_each_tile: weight rows r
// (2 or 1).
inline void int4_tile_rows(const uint16_t *xp, const float *sums, const uint8_t *w, const uint16_t *sz, uint16_t *y,
                           int64_t M, int64_t K, int64_t N, int64_t group, const int64_t *r, int rows, bool ask) {
    const int64_t groups = K / group, Kp = int4_padded(K);
    const uint8_t *wr[2] = {w + r[0] * (K / 2), w + r[rows - 1] * (K / 2)};
    const uint32_t *pairs[2] = {reinterpret_cast<const uint32_t *>(sz) + r[0] * groups,
                                reinterpret_cast<const uint32_t *>(sz) + r[rows - 1] * groups};
    for (int64_t m0 = 0; m0 < M; m0 += INT4_PASS_ROWS) {
        const uint16_t *xm = xp + m0 * Kp;
        const float *sm = sums + m0 * groups;
        uint16_t *ym = y + m0 * N;
        switch (std::min<int64_t>(INT4_PASS_ROWS, M - m0) * 2 + (rows - 1)) {  // (rows of x, weight rows)
            case 2: int4_tile<1, 1>(xm, sm, wr, pairs, ym, K, N, group, r, ask); break;
            case 3: int4_tile<1, 2>(xm, sm, wr, pairs, ym, K, N, group, r, ask); break;
            case 4: int4_tile<2, 1>(xm, sm, wr, pairs, ym, K, N, group, r, ask); break;
            case 5: int4_tile<2, 2>(xm, sm, wr, pairs, ym, K, N, group, r, ask); break;
            case 6: int4_tile<3, 1>(xm, sm, wr, pairs, ym, K, N, group, r, ask); break;
            case 7: int4_tile<3, 2>(xm, sm, wr, pairs, ym, K, N, group, r, ask); break;
            case 8: int4_tile<4, 1>(xm, sm, wr, pairs, ym, K, N, group, r, ask); break;
            default: int4_tile<4, 2>(xm, sm, wr, pairs, ym, K, N, group, r, ask); break;
        }
    }
}

#ifdef GLM4_AMX_KERNEL
// 64-column blocks ahead that int4_amx_rows asks for each row's line (into the next 16 rows at the
// end of a row).
constexpr int64_t INT4_AHEAD = 6;

// The 64 columns from `block` of rows n0..n0+15 (the last row repeated past N) as bf16 128 + q, for
// tiles: lo[i] the even columns of row n0 + i, hi[i] the odd ones.
inline void int4_unpack16(uint16_t *lo, uint16_t *hi, const uint8_t *w, int64_t n0, int64_t N, int64_t K,
                          int64_t block) {
    const __m512i nibble = _mm512_set1_epi16(0x0F), exponent = _mm512_set1_epi16(0x4300);  // bf16 128
    const int64_t blocks = K / 64;
    int64_t ahead = block + INT4_AHEAD, ahead_n = n0;
    while (ahead >= blocks) ahead -= blocks, ahead_n += 16;
    for (int i = 0; i < 16; i++) {
        if (block % 2 == 0 && ahead_n + i < N) _mm_prefetch((const char *)(w + (ahead_n + i) * (K / 2) + ahead * 32), _MM_HINT_T0);
        const uint8_t *p = w + std::min(n0 + i, N - 1) * (K / 2) + block * 32;
        __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
        _mm512_store_si512(lo + i * 32, _mm512_ternarylogic_epi32(bytes, nibble, exponent, 0xEA));
        _mm512_store_si512(hi + i * 32, _mm512_or_si512(_mm512_srli_epi16(bytes, 4), exponent));
    }
}

// One group's products on the tiles (configured: 0 C; 1, 2 A; 3, 4 B), into tile 0 from zero: for
// each of its per_group blocks of 64 columns from `block` (advanced past them), the next block is
// unpacked into the other buffer of a meanwhile, and the block's 16 rows' nibbles (A, even and odd
// columns) multiply the column pairs of R rows of x: xb holds 128 R bytes a block, the R rows'
// pairs of even columns, then of odd ones, 16 pairs each.
inline void int4_amx_group(uint16_t (*a)[2][16 * 32], const uint8_t *w, const char *xb, int64_t R, int64_t n0,
                           int64_t N, int64_t K, int64_t &block, int64_t per_group) {
    _tile_zero(0);
    for (int64_t end = block + per_group; block < end; block++) {
        const int now = block % 2;
        if (block + 1 < K / 64) int4_unpack16(a[1 - now][0], a[1 - now][1], w, n0, N, K, block + 1);
        _tile_loadd(1, a[now][0], 64);
        _tile_loadd(2, a[now][1], 64);
        _tile_loadd(3, xb + block * 128 * R, 4 * R);
        _tile_loadd(4, xb + block * 128 * R + 64 * R, 4 * R);
        _tile_dpbf16ps(0, 1, 3);
        _tile_dpbf16ps(0, 2, 4);
    }
}

// Rows of x that int4_amx_rows takes in one pass over the weight (one column of tiles B and C each).
constexpr int64_t INT4_AMX_ROWS = 16;

// The int4 product on AMX tiles for R rows of x (1 to INT4_AMX_ROWS) at once, for the blocks of 16
// weight rows r0..r1, with nibbles turned into bf16 128 + q as int4_unpack128 does: per group, one
// tile op per 32 columns multiplies the 16 weight rows' unpacked nibbles (tile A, from a buffer the
// next block is unpacked into meanwhile) with the R rows' column pairs (tile B, R columns; xb from
// int4_operand, as int4_amx_group takes it), adding into a float32 tile of 16 weight rows x R that
// is then scaled, per row of x, as a vector of the 16 weight rows' scales and zeros; sums holds each
// row's sum of x per group, [group][R].
// Each output takes the same operations in the same order whatever R: a row's numbers are the same
// alone or among others. On the Intel development machine, one row, one thread, weights streamed
// from memory: 1.24x the vector path of the time (a pass per row, before int4_tile) on the bench's
// gate_up, 1.22x on its down_proj, 1.17x on its lm_head (1.4x with the weights in cache); 16 rows
// take 2.4x the time of one.
void int4_amx_rows(const char *xb, const float *sums, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t K,
                   int64_t group, int64_t N, int64_t R, int64_t r0, int64_t r1) {
    const int64_t groups = K / group, per_group = group / 64;
    const __m512i high_half = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i down = _mm512_slli_epi32(lanes, 4);  // a column of C stored 16 floats a row
    alignas(64) uint16_t a[2][2][16 * 32];              // [buffer][lo, hi]
    alignas(64) float c[16 * 16];
    __m512 acc[INT4_AMX_ROWS];
    glm4_amx::Config config;  // tiles: 0 C; 1, 2 A (lo, hi); 3, 4 B (lo, hi)
    const int bytes = (int)R * 4;  // a row of C or B
    _tile_loadconfig(&config.tile(0, 16, bytes).tile(1, 16, 64).tile(2, 16, 64).tile(3, 16, bytes).tile(4, 16, bytes));
    for (int64_t r = r0; r < r1; r++) {
        const int64_t n0 = r * 16;
        // Each weight row's (scale, zero) for group g at pairs[offsets[i] + g]; rows past N repeat the last.
        const int32_t *pairs = reinterpret_cast<const int32_t *>(sz) + n0 * groups;
        const __m512i offsets = _mm512_mullo_epi32(_mm512_min_epi32(lanes, _mm512_set1_epi32((int)(N - 1 - n0))),
                                                   _mm512_set1_epi32((int)groups));
        for (int64_t m = 0; m < R; m++) acc[m] = _mm512_setzero_ps();
        int4_unpack16(a[0][0], a[0][1], w, n0, N, K, 0);
        for (int64_t g = 0, block = 0; g < groups; g++) {
            int4_amx_group(a, w, xb, R, n0, N, K, block, per_group);
            _tile_stored(0, c, R == 1 ? 4 : 64);  // one row's column as one vector
            const __m512i sz16 = _mm512_i32gather_epi32(_mm512_add_epi32(offsets, _mm512_set1_epi32((int)g)), pairs, 4);
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(sz16, 16));
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(sz16, high_half));
            const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), scale, zero);  // zero - 136 scale
            for (int64_t m = 0; m < R; m++) {
                const __m512 dots = R == 1 ? _mm512_load_ps(c) : _mm512_i32gather_ps(down, c + m, 4);
                acc[m] = _mm512_fmadd_ps(dots, scale, acc[m]);
                acc[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[g * R + m]), acc[m]);  // + offset * sum x
            }
        }
        for (int64_t m = 0; m < R; m++)
            _mm256_mask_storeu_epi16(y + m * N + n0, first(N - n0), (__m256i)_mm512_cvtneps_pbh(acc[m]));
    }
    _tile_release();
}
#endif

// x's R rows (K columns each) as int4_amx_rows takes them: xb per 64 columns the pairs of even
// columns, then of odd ones, 16 pairs each, R rows a pair, and sums each row's sum of x per group,
// [group][R].
inline void int4_operand(const uint16_t *xs, int64_t R, int64_t K, int64_t group, std::vector<uint32_t> &xb,
                         std::vector<float> &sums) {
    xb.resize(K / 2 * R);
    sums.assign(K / group * R, 0.0f);
    for (int64_t m = 0; m < R; m++) {
        const uint16_t *x = xs + m * K;
        for (int64_t c = 0; c < K; c += 64)
            for (int64_t p = 0; p < 16; p++) {
                xb[(c / 2 + p) * R + m] = x[c + 4 * p] | (uint32_t)x[c + 4 * p + 2] << 16;            // even columns
                xb[(c / 2 + 16 + p) * R + m] = x[c + 4 * p + 1] | (uint32_t)x[c + 4 * p + 3] << 16;  // odd
            }
        for (int64_t k = 0; k < K; k++) sums[k / group * R + m] += bf16_to_float(x[k]);
    }
}

// x's M rows (K columns each) as int4_tile takes them: xp, Kp columns a row (K rounded up to 128,
// zeros past K), per 128 columns c the columns c + 4 l, then c + 4 l + 1, c + 4 l + 2, c + 4 l + 3
// (l = 0..31); sums each row's sum of x per group, [m][group].
inline void int4_vector_operand(const uint16_t *xs, int64_t M, int64_t K, int64_t group, std::vector<uint16_t> &xp,
                                std::vector<float> &sums) {
    const int64_t Kp = int4_padded(K);
    xp.assign(M * Kp, 0);
    sums.assign(M * (K / group), 0.0f);
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *x = xs + m * K;
        for (int64_t k = 0; k < K; k++) {
            const int64_t c = k / 128 * 128, l = (k - c) / 4, t = k % 4;
            xp[m * Kp + c + 32 * t + l] = x[k];
            sums[m * (K / group) + k / group] += bf16_to_float(x[k]);
        }
    }
}

// Weight row n as bf16: w = (q - 8) * scale + zero in float32, rounded once, as
// quantization.Int4Linear.dequantize() then .to(bfloat16). group: a multiple of 16.
inline void int4_dequantize_row(const uint8_t *w, const uint16_t *sz, int64_t n, int64_t K, int64_t group,
                                uint16_t *y) {
    // 16 columns from 8 bytes: byte j's low nibble is column 2j, its high one 2j + 1.
    const __m512i spread = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const int64_t groups = K / group;
    const uint8_t *row = w + n * (K / 2);
    for (int64_t g = 0; g < groups; g++) {
        const __m512 scale = _mm512_set1_ps(bf16_to_float(sz[(n * groups + g) * 2]));
        const __m512 zero = _mm512_set1_ps(bf16_to_float(sz[(n * groups + g) * 2 + 1]));
        for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
            if (k % 128 == 0) prefetch_ahead(row + k / 2);
            const __m128i eight = _mm_loadl_epi64((const __m128i *)(row + k / 2));
            const __m512i bytes = _mm512_permutexvar_epi32(spread, _mm512_cvtepu8_epi32(eight));
            const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(bytes, shifts), _mm512_set1_epi32(15));
            const __m512 centred = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(8)));
            // (q - 8) * scale is exact in float32 (a bf16 times 4 bits), so the fused multiply-add
            // rounds as the Python path's product and sum.
            const __m512 w16 = _mm512_fmadd_ps(centred, scale, zero);
            _mm256_storeu_si256((__m256i *)(y + k), (__m256i)_mm512_cvtneps_pbh(w16));
        }
    }
}

// y (M, N) = M rows of x (M, K) times the int4 weight w (N, K/2) with scales and zeros sz (N,
// K/group, 2; group 64 or a multiple of 128), on every thread: on AMX tiles (where the CPU has them
// and they are on, see amx.h) up to INT4_AMX_ROWS rows in one pass over the weight, else
// INT4_PASS_ROWS rows a pass (int4_tile). Either way a row's numbers are the same alone or among
// others (though the two ways' numbers differ).
inline void int4_linear_rows(const uint16_t *xs, const uint8_t *w, const uint16_t *sz, uint16_t *out, int64_t M,
                             int64_t K, int64_t N, int64_t group) {
    std::vector<float> sums;
#ifdef GLM4_AMX_KERNEL
    if (glm4_amx::on()) {
        std::vector<uint32_t> xb;
        for (int64_t m0 = 0; m0 < M; m0 += INT4_AMX_ROWS) {
            const int64_t R = std::min<int64_t>(INT4_AMX_ROWS, M - m0);
            int4_operand(xs + m0 * K, R, K, group, xb, sums);
            at::parallel_for(0, (N + 15) / 16, 4, [&](int64_t r0, int64_t r1) {
                int4_amx_rows(reinterpret_cast<const char *>(xb.data()), sums.data(), w, sz, out + m0 * N, K, group, N,
                              R, r0, r1);
            });
        }
        return;
    }
#endif
    std::vector<uint16_t> xp;
    int4_vector_operand(xs, M, K, group, xp, sums);
    const bool ask = asks_ahead(M);
    for_each_tile(N, [&](const int64_t *r, int rows) {
        int4_tile_rows(xp.data(), sums.data(), w, sz, out, M, K, N, group, r, rows, ask);
    });
}

#endif  // GLM4_INT4_KERNEL

}  // namespace

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

// int4_rows on AMX tiles for R rows of x (1 to INT4_AMX_ROWS) at once, for the blocks of 16 weight
// rows r0..r1: per group, one tile op per 32 columns multiplies the 16 weight rows' unpacked
// nibbles (tile A, from a buffer the next block is unpacked into meanwhile) with the R rows' column
// pairs (tile B, R columns; xb from int4_operand, as int4_amx_group takes it),
// adding into a float32 tile of 16 weight rows x R that is then scaled, per row of x, as a vector
// of the 16 weight rows' scales and zeros; sums holds each row's sum of x per group, [group][R].
// Each output takes the same operations in the same order whatever R: a row's numbers are the same
// alone or among others. On the Intel development machine, one row, one thread, weights streamed
// from memory: 1.24x int4_rows on the bench's gate_up, 1.22x on its down_proj, 1.17x on its lm_head
// (1.4x with the weights in cache); 16 rows take 2.4x the time of one.
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

// x's R rows (K columns each) as the kernels take them: xb per 64 columns the pairs of even
// columns, then of odd ones, 16 pairs each, R rows a pair (one row: int4_rows' xp, as bf16), and
// sums each row's sum of x per group, [group][R].
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

// Rows of x from which the vector path dequantizes each tile of the weight to bf16 once for all of
// them (widened_rows) instead of a pass of int4_rows per row. Measured on the AMD development
// machine (2 threads, the bench model's weights streamed from memory), against a pass per row:
// 0.75-0.85x at 2 rows, 1.3-1.8x at 4, 2-2.2x at 8 and 3.3-3.6x at 32.
constexpr int64_t INT4_WIDENED_ROWS = 3;

// y (M, N) = M rows of x (M, K) times the int4 weight w (N, K/2) with scales and zeros sz (N,
// K/group, 2), on every thread: on AMX tiles (where the CPU has them and they are on, see amx.h) up
// to INT4_AMX_ROWS rows in one pass over the weight, else one pass per row, or from
// INT4_WIDENED_ROWS rows the weight dequantized a tile at a time. A row's numbers are the same alone
// or among others on the tiles; on the vector path, among fewer than INT4_WIDENED_ROWS rows, or
// among at least as many.
inline void int4_linear_rows(const uint16_t *xs, const uint8_t *w, const uint16_t *sz, uint16_t *out, int64_t M,
                             int64_t K, int64_t N, int64_t group) {
    std::vector<uint32_t> xb;
    std::vector<float> sums;
#ifdef GLM4_AMX_KERNEL
    if (glm4_amx::on()) {
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
    if (M >= INT4_WIDENED_ROWS)
        return widened_rows(xs, out, M, K, N, [&](const int64_t *r, int rows, uint16_t *buffer) {
            for (int i = 0; i < rows; i++) int4_dequantize_row(w, sz, r[i], K, group, buffer + i * K);
        });
    for (int64_t m = 0; m < M; m++) {
        int4_operand(xs + m * K, 1, K, group, xb, sums);
        at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
            int4_rows(reinterpret_cast<const uint16_t *>(xb.data()), sums.data(), w, sz, out + m * N, K, group, n0, n1);
        });
    }
}

#endif  // GLM4_INT4_KERNEL

}  // namespace

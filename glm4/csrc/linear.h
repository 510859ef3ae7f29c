// The bf16 linear kernel's core (see bf16_linear.cpp), shared with the fused decode step
// (decode_step.cpp): linear_rows() over raw bf16 buffers.
#pragma once

#include <ATen/Parallel.h>

#include "bf16.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#define GLM4_BF16_LINEAR_KERNEL 1
#include <immintrin.h>

#include "simd.h"
#endif

#include "amx.h"

namespace {

#ifdef GLM4_BF16_LINEAR_KERNEL

constexpr int MAX_ROWS = 8;  // rows of x per pass over a tile: 2 x 8 accumulators, one reduce16

// Weight rows stored as bf16, as `tile` reads them: w(j, k) the 32 columns from k of row j (the
// lanes of `in` for the last K % 32, 0 elsewhere), asking for the lines ahead where `ask` says so.
struct Bf16Rows {
    const uint16_t *row[2];
    bool ask;
    __m512bh operator()(int j, int64_t k) const {
        if (ask) prefetch_ahead(row[j] + k);
        return (__m512bh)_mm512_loadu_si512(row[j] + k);
    }
    __m512bh operator()(int j, int64_t k, __mmask32 in) const {
        return (__m512bh)_mm512_maskz_loadu_epi16(in, row[j] + k);
    }
};

// y[m, r[j]] = x[m] . w[j] for the M rows of x (a pass) and the NB weight rows w (rows r[j] of the
// weight; see Bf16Rows), times scales[r[j]] before the rounding where there are scales (int8.h).
template <int M, int NB, typename Rows>
inline void tile(const uint16_t *x, const Rows &w, uint16_t *y, int64_t K, int64_t N, const int64_t *r,
                 const uint16_t *scales) {
    __m512 a[16];
    for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = w(j, k);
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
            for (int j = 0; j < NB; j++) a[m * NB + j] = _mm512_dpbf16_ps(a[m * NB + j], wv[j], xv);
        }
    }
    if (k < K) {  // the last K % 32 columns
        __mmask32 tail = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = w(j, k, tail);
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k);
            for (int j = 0; j < NB; j++) a[m * NB + j] = _mm512_dpbf16_ps(a[m * NB + j], wv[j], xv);
        }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, reduce16(a));
    for (int m = 0; m < M; m++)
        for (int j = 0; j < NB; j++)
            y[m * N + r[j]] = float_to_bf16(scales ? sums[m * NB + j] * bf16_to_float(scales[r[j]]) : sums[m * NB + j]);
}

// Every pass of MAX_ROWS rows (and the rest) over the weight rows w (rows r of the weight).
template <int NB, typename Rows>
void rows_times(const uint16_t *x, const Rows &w, uint16_t *y, int64_t M, int64_t K, int64_t N, const int64_t *r,
                const uint16_t *scales = nullptr) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
        const uint16_t *xm = x + m0 * K;
        uint16_t *ym = y + m0 * N;
        switch (std::min<int64_t>(M - m0, MAX_ROWS)) {
            case 1: tile<1, NB>(xm, w, ym, K, N, r, scales); break;
            case 2: tile<2, NB>(xm, w, ym, K, N, r, scales); break;
            case 3: tile<3, NB>(xm, w, ym, K, N, r, scales); break;
            case 4: tile<4, NB>(xm, w, ym, K, N, r, scales); break;
            case 5: tile<5, NB>(xm, w, ym, K, N, r, scales); break;
            case 6: tile<6, NB>(xm, w, ym, K, N, r, scales); break;
            case 7: tile<7, NB>(xm, w, ym, K, N, r, scales); break;
            default: tile<8, NB>(xm, w, ym, K, N, r, scales); break;
        }
    }
}

// rows_times for one tile of for_each_tile (below): its `rows` weight rows (2 or 1), read through w.
template <typename Rows>
inline void tile_times(const uint16_t *x, const Rows &w, int rows, uint16_t *y, int64_t M, int64_t K, int64_t N,
                       const int64_t *r, const uint16_t *scales = nullptr) {
    if (rows == 2)
        rows_times<2>(x, w, y, M, K, N, r, scales);
    else
        rows_times<1>(x, w, y, M, K, N, r, scales);
}

// tile(r, rows) for every tile of a weight of N rows, split over the threads: tile t holds the
// weight rows r = {t, t + half} (rows = 2), or the middle row of an odd N alone (rows = 1).
template <typename Tile>
inline void for_each_tile(int64_t N, const Tile &tile) {
    const int64_t half = (N + 1) / 2;
    at::parallel_for(0, half, 16, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++) {
            const int64_t r[2] = {t, t + half};
            tile(r, r[1] < N ? 2 : 1);
        }
    });
}

#ifdef GLM4_AMX_KERNEL
// Steps (16 weight rows x 32 columns) ahead that amx_linear_rows asks for the weight's lines.
constexpr int64_t AMX_AHEAD = 8;
// Rows of x per pass over the weight: two float32 tiles of 16 columns each.
constexpr int64_t AMX_ROWS = 32;

// y (M, N) = x (M, K) @ w (N, K)^T with AMX tiles, for K a multiple of 32. Each thread takes its
// blocks of 16 weight rows; per step of 32 columns the block's 16 rows (tile A, loaded from the
// weight as stored) multiply up to 32 rows of x (tiles B: 16 column pairs of 16 rows of x each),
// adding into float32 tiles C (16 weight rows x 16 rows of x) that are rounded once a block.
// Each output adds its column pairs in order, in float32, whatever the other rows: a row's numbers
// do not depend on its batch, as in the vector kernel (though they are not that kernel's).
//
// The block's 16 rows are 16 streams of one line a step, which the hardware prefetcher alone keeps
// at 0.8x the vector kernel's rate: each step asks for the lines AMX_AHEAD steps on (into the next
// block at the end of one). Measured with one thread on the bench model's gate_up weight streamed
// from memory (1 GB): 1.1x the vector kernel's rate at 1 and 2 rows, 1.15x at 4, 1.9x at 8.
inline void amx_linear_rows(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t K, int64_t N) {
    const int64_t steps = K / 32, blocks = (N + 15) / 16;
    for (int64_t m0 = 0; m0 < M; m0 += AMX_ROWS) {
        // Tile t (0 or 1) of the pass takes `cols[t]` rows of x from m0 + 16 t.
        const int64_t rows_of_x = std::min<int64_t>(AMX_ROWS, M - m0);
        const int64_t cols[2] = {std::min<int64_t>(16, rows_of_x), rows_of_x - std::min<int64_t>(16, rows_of_x)};
        // B per tile and step: 16 rows (column pairs) of cols[t] pairs. One row of x is laid out so.
        std::vector<uint32_t> paired[2];
        const uint32_t *b[2] = {};
        for (int t = 0; t < 2 && cols[t]; t++) {
            const uint32_t *first_row = reinterpret_cast<const uint32_t *>(x + (m0 + 16 * t) * K);
            if (cols[t] == 1) {
                b[t] = first_row;
                continue;
            }
            paired[t].resize(steps * 16 * cols[t]);
            for (int64_t m = 0; m < cols[t]; m++)
                for (int64_t i = 0; i < K / 2; i++) paired[t][i * cols[t] + m] = first_row[m * K / 2 + i];
            b[t] = paired[t].data();
        }
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
            alignas(64) float c[2][16 * 16] = {};
            alignas(64) uint16_t rounded[16 * 32];  // [weight row][row of x]
            int configured = 0;  // the A and C tiles' rows as configured, 0: not yet
            int64_t ahead_block = b0 + AMX_AHEAD / steps, ahead_step = AMX_AHEAD % steps;
            for (int64_t block = b0; block < b1; block++) {
                const int rows = (int)std::min<int64_t>(16, N - block * 16);
                if (rows != configured) {  // tiles: 0, 1 C; 2 A; 3, 4 B
                    glm4_amx::Config config;
                    config.tile(2, rows, 64);
                    for (int t = 0; t < 2 && cols[t]; t++) config.tile(t, rows, cols[t] * 4).tile(3 + t, 16, cols[t] * 4);
                    _tile_loadconfig(&config);
                    configured = rows;
                }
                const uint16_t *wb = w + block * 16 * K;
                _tile_zero(0);
                if (cols[1]) _tile_zero(1);
                for (int64_t s = 0; s < steps; s++) {
                    if (ahead_block < blocks) {
                        const char *line = reinterpret_cast<const char *>(w + ahead_block * 16 * K + ahead_step * 32);
                        for (int64_t i = 0; i < std::min<int64_t>(16, N - ahead_block * 16); i++)
                            _mm_prefetch(line + i * K * 2, _MM_HINT_T0);
                    }
                    if (++ahead_step == steps) ahead_step = 0, ahead_block++;
                    _tile_loadd(2, wb + s * 32, K * 2);
                    _tile_loadd(3, b[0] + s * 16 * cols[0], cols[0] * 4);
                    _tile_dpbf16ps(0, 2, 3);
                    if (cols[1]) {
                        _tile_loadd(4, b[1] + s * 16 * cols[1], cols[1] * 4);
                        _tile_dpbf16ps(1, 2, 4);
                    }
                }
                // Round a weight row's outputs (16 floats a tile) at once, then write them per row of x.
                _tile_stored(0, c[0], 64);
                if (cols[1]) _tile_stored(1, c[1], 64);
                for (int i = 0; i < rows; i++) {
                    __m512 lo = _mm512_load_ps(c[0] + i * 16), hi = _mm512_load_ps(c[1] + i * 16);
                    _mm512_store_si512(rounded + i * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                }
                for (int64_t m = 0; m < rows_of_x; m++) {
                    uint16_t *ym = y + (m0 + m) * N + block * 16;
                    for (int i = 0; i < rows; i++) ym[i] = rounded[i * 32 + m];
                }
            }
            if (configured) _tile_release();
        });
    }
}
#endif

// y (M, N) = x (M, K) @ w (N, K)^T, all bf16 and contiguous, on every thread: with AMX tiles where
// the CPU has them and K allows, else with vdpbf16ps. Which one depends on the weight, not on M.
inline void linear_rows(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t K, int64_t N) {
#ifdef GLM4_AMX_KERNEL
    if (K % 32 == 0 && glm4_amx::on()) return amx_linear_rows(x, w, y, M, K, N);
#endif
    const bool ask = asks_ahead(M);
    for_each_tile(N, [&](const int64_t *r, int rows) {
        tile_times(x, Bf16Rows{{w + r[0] * K, w + r[rows - 1] * K}, ask}, rows, y, M, K, N, r);
    });
}

#endif  // GLM4_BF16_LINEAR_KERNEL

}  // namespace

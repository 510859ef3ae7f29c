// The bf16 linear kernel's core (see bf16_linear.cpp), shared with the fused decode step
// (decode_step.cpp): linear_rows() over raw bf16 buffers.
#pragma once

#include <ATen/Parallel.h>

#include "bf16.h"

#include <algorithm>
#include <cstdint>

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#define GLM4_BF16_LINEAR_KERNEL 1
#include <immintrin.h>

#include "simd.h"
#endif

namespace {

#ifdef GLM4_BF16_LINEAR_KERNEL

constexpr int MAX_ROWS = 8;  // rows of x per pass over a tile: 2 x 8 accumulators, one reduce16

// y[m, r[j]] = x[m] . w[r[j]] for the M rows of x (a pass) and the NB weight rows r.
template <int M, int NB>
inline void tile(const uint16_t *x, const uint16_t *const *w, uint16_t *y, int64_t K, int64_t N,
                 const int64_t *r) {
    __m512 a[16];
    for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[NB];
        for (int j = 0; j < NB; j++) {
            wv[j] = (__m512bh)_mm512_loadu_si512(w[j] + k);
            prefetch_ahead(w[j] + k);
        }
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
            for (int j = 0; j < NB; j++) a[m * NB + j] = _mm512_dpbf16_ps(a[m * NB + j], wv[j], xv);
        }
    }
    if (k < K) {  // the last K % 32 columns
        __mmask32 tail = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(tail, w[j] + k);
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k);
            for (int j = 0; j < NB; j++) a[m * NB + j] = _mm512_dpbf16_ps(a[m * NB + j], wv[j], xv);
        }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, reduce16(a));
    for (int m = 0; m < M; m++)
        for (int j = 0; j < NB; j++) y[m * N + r[j]] = float_to_bf16(sums[m * NB + j]);
}

// Every pass of MAX_ROWS rows (and the rest) over the weight rows r.
template <int NB>
void rows_times(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t K, int64_t N,
                const int64_t *r) {
    const uint16_t *wr[NB];
    for (int j = 0; j < NB; j++) wr[j] = w + r[j] * K;
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
        const uint16_t *xm = x + m0 * K;
        uint16_t *ym = y + m0 * N;
        switch (std::min<int64_t>(M - m0, MAX_ROWS)) {
            case 1: tile<1, NB>(xm, wr, ym, K, N, r); break;
            case 2: tile<2, NB>(xm, wr, ym, K, N, r); break;
            case 3: tile<3, NB>(xm, wr, ym, K, N, r); break;
            case 4: tile<4, NB>(xm, wr, ym, K, N, r); break;
            case 5: tile<5, NB>(xm, wr, ym, K, N, r); break;
            case 6: tile<6, NB>(xm, wr, ym, K, N, r); break;
            case 7: tile<7, NB>(xm, wr, ym, K, N, r); break;
            default: tile<8, NB>(xm, wr, ym, K, N, r); break;
        }
    }
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

// y (M, N) = x (M, K) @ w (N, K)^T, all bf16 and contiguous, on every thread.
inline void linear_rows(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t K, int64_t N) {
    for_each_tile(N, [&](const int64_t *r, int rows) {
        if (rows == 2)
            rows_times<2>(x, w, y, M, K, N, r);
        else
            rows_times<1>(x, w, y, M, K, N, r);
    });
}

#endif  // GLM4_BF16_LINEAR_KERNEL

}  // namespace

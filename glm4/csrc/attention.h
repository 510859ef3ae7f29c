// The decode attention kernel's core (see decode_attention.cpp), shared with the fused decode step
// (decode_step.cpp): attend() over raw bf16 buffers; and unit_last, which the prompt kernel shares.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "bf16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>

#include "simd.h"
#endif

namespace {

// t itself where its last dim is unit-stride (a cache's view), else a contiguous copy.
inline at::Tensor unit_last(const at::Tensor &t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

#ifdef __AVX512F__

// 16 bf16 values as floats: bf16 is the top half of a float32.
inline __m512 load16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x for x <= 0 (e^-inf = 0): 2^n e^r with |r| <= ln2/2, a degree-6 polynomial for e^r (Cephes).
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

// scores[g * n + j] = scale * q[g] . k[j] for a block of 16 keys, -inf where hidden.
#ifdef __AVX512BF16__
// vdpbf16ps multiplies pairs of bf16 exactly and adds them in float32, 32 products an instruction.
template <int D>
void block_scores(const uint16_t *q, float scale, const uint16_t *k, int64_t k_ss, int64_t G, __mmask16 hidden,
                  float *scores, int64_t n) {
    for (int64_t g = 0; g < G; g++) {
        __m512bh qv[D / 32];
        for (int d = 0; d < D / 32; d++) qv[d] = (__m512bh)_mm512_loadu_si512(q + g * D + d * 32);
        __m512 a[16];
        for (int j = 0; j < 16; j++) {
            __m512 t = _mm512_setzero_ps();
            for (int d = 0; d < D / 32; d++)
                t = _mm512_dpbf16_ps(t, qv[d], (__m512bh)_mm512_loadu_si512(k + j * k_ss + d * 32));
            a[j] = t;
        }
        __m512 r = _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale));
        _mm512_storeu_ps(scores + g * n, _mm512_mask_mov_ps(r, hidden, _mm512_set1_ps(-INFINITY)));
    }
}
#else
// The same with float FMAs, the block's keys converted once.
template <int D>
void block_scores(const uint16_t *q, float scale, const uint16_t *k, int64_t k_ss, int64_t G, __mmask16 hidden,
                  float *scores, int64_t n) {
    alignas(64) float kf[16 * D];
    for (int j = 0; j < 16; j++)
        for (int d = 0; d < D; d += 16) _mm512_store_ps(kf + j * D + d, load16(k + j * k_ss + d));
    for (int64_t g = 0; g < G; g++) {
        __m512 qv[D / 16];
        for (int d = 0; d < D / 16; d++) qv[d] = load16(q + g * D + d * 16);
        __m512 a[16];
        for (int j = 0; j < 16; j++) {
            __m512 t0 = _mm512_mul_ps(qv[0], _mm512_load_ps(kf + j * D));
            __m512 t1 = _mm512_mul_ps(qv[1], _mm512_load_ps(kf + j * D + 16));
            for (int d = 2; d < D / 16; d += 2) {
                t0 = _mm512_fmadd_ps(qv[d], _mm512_load_ps(kf + j * D + d * 16), t0);
                t1 = _mm512_fmadd_ps(qv[d + 1], _mm512_load_ps(kf + j * D + d * 16 + 16), t1);
            }
            a[j] = _mm512_add_ps(t0, t1);
        }
        __m512 r = _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale));
        _mm512_storeu_ps(scores + g * n, _mm512_mask_mov_ps(r, hidden, _mm512_set1_ps(-INFINITY)));
    }
}
#endif

// scores[g * n + s] = scale * q[g] . k[s0 + s], -inf where the key is hidden: blocks of 16 keys,
// then the rest one by one.
template <int D>
void scores_of(const uint16_t *q, float scale, const uint16_t *k, const uint8_t *keep, int64_t G, int64_t s0,
               int64_t n, int64_t k_ss, float *scores) {
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) {
        __mmask16 hidden = 0;
        for (int j = 0; j < 16; j++)
            if (keep && !keep[s0 + s + j]) hidden |= (__mmask16)(1u << j);
        block_scores<D>(q, scale, k + (s0 + s) * k_ss, k_ss, G, hidden, scores + s, n);
    }
    for (; s < n; s++) {
        const uint16_t *kr = k + (s0 + s) * k_ss;
        bool hide = keep && !keep[s0 + s];
        for (int64_t g = 0; g < G; g++) {
            __m512 a = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 16) a = _mm512_fmadd_ps(load16(q + g * D + d), load16(kr + d), a);
            scores[g * n + s] = hide ? -INFINITY : _mm512_reduce_add_ps(a) * scale;
        }
    }
}

// Each score row becomes e^(score - its max); m and l get the max and the sum.
void softmax_rows(float *scores, int64_t G, int64_t n, float *m, float *l) {
    for (int64_t g = 0; g < G; g++) {
        float *sc = scores + g * n;
        __m512 mv = _mm512_set1_ps(-INFINITY);
        int64_t s = 0;
        for (; s + 16 <= n; s += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sc + s));
        float top = _mm512_reduce_max_ps(mv);
        for (; s < n; s++) top = sc[s] > top ? sc[s] : top;
        m[g] = top;
        if (top == -INFINITY) {
            l[g] = 0.0f;
            continue;
        }
        mv = _mm512_set1_ps(top);
        __m512 lv = _mm512_setzero_ps();
        for (s = 0; s + 16 <= n; s += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + s), mv));
            _mm512_storeu_ps(sc + s, e);
            lv = _mm512_add_ps(lv, e);
        }
        float sum = _mm512_reduce_add_ps(lv);
        for (; s < n; s++) {
            sc[s] = std::exp(sc[s] - top);
            sum += sc[s];
        }
        l[g] = sum;
    }
}

// acc[g] = sum_s p[g, s] v[s0 + s], for GN rows of p at a time and 32 columns of v at a time.
template <int D, int GN>
void weigh_values(const float *p, const uint16_t *v, int64_t g0, int64_t s0, int64_t n, int64_t v_ss, float *acc) {
    for (int d = 0; d < D; d += 32) {
        __m512 a0[GN], a1[GN];
        for (int i = 0; i < GN; i++) a0[i] = a1[i] = _mm512_setzero_ps();
        for (int64_t s = 0; s < n; s++) {
            const uint16_t *vr = v + (s0 + s) * v_ss + d;
            __m512 v0 = load16(vr), v1 = D - d >= 32 ? load16(vr + 16) : _mm512_setzero_ps();
            for (int i = 0; i < GN; i++) {
                __m512 w = _mm512_set1_ps(p[(g0 + i) * n + s]);
                a0[i] = _mm512_fmadd_ps(w, v0, a0[i]);
                a1[i] = _mm512_fmadd_ps(w, v1, a1[i]);
            }
        }
        for (int i = 0; i < GN; i++) {
            _mm512_storeu_ps(acc + (g0 + i) * D + d, a0[i]);
            if (D - d >= 32) _mm512_storeu_ps(acc + (g0 + i) * D + d + 16, a1[i]);
        }
    }
}

template <int D>
void chunk(const uint16_t *q, float scale, const uint16_t *k, const uint16_t *v, const uint8_t *keep, int64_t G, int64_t s0,
           int64_t s1, int64_t k_ss, int64_t v_ss, float *scores, float *m, float *l, float *acc) {
    int64_t n = s1 - s0, g = 0;  // one row of scores per query head of the group
    scores_of<D>(q, scale, k, keep, G, s0, n, k_ss, scores);
    softmax_rows(scores, G, n, m, l);
    for (; g + 8 <= G; g += 8) weigh_values<D, 8>(scores, v, g, s0, n, v_ss, acc);
    for (; g < G; g++) weigh_values<D, 1>(scores, v, g, s0, n, v_ss, acc);
}

// q, out: (B, H, G, D) contiguous, H the KV heads and G the query heads of each. k, v: unit stride
// along D. keep: (B, S) bytes, 0 where a key is hidden, or null. cache_rows: the batch row of k and
// v that row b of q reads (null: b). split_rows: the number of (row, KV head) pairs that decides
// how many chunks the keys are split into (0: B * H); a caller that passes some rows of a larger
// batch passes the larger batch's, so that a row's sums do not depend on its company. (A split's
// merge adds in another order; after the bf16 rounding of the output that rarely shows, but
// "rarely" is not "never".)
void attend(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *keep, uint16_t *out,
            int64_t B, int64_t H, int64_t G, int64_t D, int64_t S, const int64_t *ks, const int64_t *vs,
            int64_t keep_sb, float scale, const int64_t *cache_rows = nullptr, int64_t split_rows = 0) {
    auto run = D == 64 ? chunk<64> : D == 128 ? chunk<128> : chunk<256>;
    int64_t rows = B * H, threads = at::get_num_threads(), split = split_rows > 0 ? split_rows : rows;
    // Enough chunks of keys to give every thread work, none shorter than 256 keys.
    int64_t chunks = std::max<int64_t>(1, std::min((threads + split - 1) / split, (S + 255) / 256));
    int64_t per = (S + chunks - 1) / chunks, items = rows * chunks;
    std::vector<float> m(items * G), l(items * G), acc(items * G * D);
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores;
        for (int64_t item = begin; item < end; item++) {
            int64_t r = item / chunks, c = item % chunks, b = r / H, h = r % H;
            int64_t cb = cache_rows ? cache_rows[b] : b;
            int64_t s0 = c * per, s1 = std::min(s0 + per, S);
            if (s1 <= s0) {
                std::fill_n(&m[item * G], G, -INFINITY);
                std::fill_n(&l[item * G], G, 0.0f);
                continue;
            }
            scores.resize(G * (s1 - s0));
            run(q + r * G * D, scale, k + cb * ks[0] + h * ks[1], v + cb * vs[0] + h * vs[1],
                keep ? keep + b * keep_sb : nullptr, G, s0, s1, ks[2], vs[2], scores.data(), &m[item * G],
                &l[item * G], &acc[item * G * D]);
        }
    });
    std::vector<float> o(D);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < G; g++) {
            float top = -INFINITY, total = 0.0f;
            for (int64_t c = 0; c < chunks; c++) top = std::fmax(top, m[(r * chunks + c) * G + g]);
            std::fill(o.begin(), o.end(), 0.0f);
            for (int64_t c = 0; c < chunks && top != -INFINITY; c++) {
                int64_t i = (r * chunks + c) * G + g;
                if (l[i] == 0.0f) continue;
                float w = std::exp(m[i] - top);
                total += w * l[i];
                for (int64_t d = 0; d < D; d++) o[d] += w * acc[i * D + d];
            }
            float inv = total > 0.0f ? 1.0f / total : 0.0f;
            for (int64_t d = 0; d < D; d++) out[(r * G + g) * D + d] = float_to_bf16(o[d] * inv);
        }
}

#endif  // __AVX512F__

}  // namespace

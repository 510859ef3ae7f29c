// The decode attention kernel's core (see decode_attention.cpp), shared with the fused decode step
// (decode_step.cpp): attend() over raw bf16 buffers; and unit_last, which the prompt kernel shares.
// attend() is written once over a vector type, `Lanes`: 16 floats with AVX-512, 8 with AVX2 and
// FMA (most desktop and laptop CPUs); GLM4_DECODE_ATTENTION_KERNEL says it is built.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "bf16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define GLM4_DECODE_ATTENTION_KERNEL 1
#include <immintrin.h>

#include "simd.h"
#endif

namespace {

// t itself where its last dim is unit-stride (a cache's view), else a contiguous copy.
inline at::Tensor unit_last(const at::Tensor &t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

#ifdef GLM4_DECODE_ATTENTION_KERNEL

// e^x = 2^n e^r: n = round(x / ln2), r = x - n ln2 (|r| <= ln2/2, ln2 in two parts), and e^r by a
// degree-6 polynomial (Cephes). Returns e^r and sets n; L's exp scales by 2^n.
template <class L>
inline typename L::V exp_reduced(typename L::V x, typename L::V &n) {
    using V = typename L::V;
    n = L::round(L::mul(x, L::set1(1.44269504088896341f)));
    V r = L::fma(n, L::set1(-0.693145751953125f), x);
    r = L::fma(n, L::set1(-1.428606765330187045e-06f), r);
    V p = L::set1(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = L::fma(p, r, L::set1(c));
    return L::fma(p, L::mul(r, r), L::add(r, L::set1(1.0f)));
}

#endif

#ifdef __AVX512F__

struct Lanes16 {
    using V = __m512;
    static constexpr int W = 16;     // floats a vector
    static constexpr int GROUP = 8;  // query heads whose weighted values are summed in one pass

    static V zero() { return _mm512_setzero_ps(); }
    static V set1(float a) { return _mm512_set1_ps(a); }
    static V load(const float *p) { return _mm512_loadu_ps(p); }
    static void store(float *p, V a) { _mm512_storeu_ps(p, a); }
    // W bf16 values as floats: bf16 is the top half of a float32.
    static V bf16(const uint16_t *p) {
        __m256i h = _mm256_loadu_si256((const __m256i *)p);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V max(V a, V b) { return _mm512_max_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static float sum(V a) { return _mm512_reduce_add_ps(a); }
    static float top(V a) { return _mm512_reduce_max_ps(a); }
    static V sums(const V *a) { return reduce16(a); }  // lane j: the sum of a[j]'s lanes
    // a with the lanes set in `hidden` made -inf
    static V hide(V a, uint32_t hidden) { return _mm512_mask_mov_ps(a, (__mmask16)hidden, set1(-INFINITY)); }
    // e^x for x <= 0 (e^-inf = 0): scalef takes 2^n down through the subnormals.
    static V exp(V x) {
        V n, p = exp_reduced<Lanes16>(max(x, set1(-104.0f)), n);
        return _mm512_scalef_ps(p, n);
    }
};

// The AVX-512 kernels' names for two of them.
inline __m512 load16(const uint16_t *p) { return Lanes16::bf16(p); }
inline __m512 exp16(__m512 x) { return Lanes16::exp(x); }

using Lanes = Lanes16;

#elif defined(GLM4_DECODE_ATTENTION_KERNEL)

struct Lanes8 {
    using V = __m256;
    static constexpr int W = 8;
    static constexpr int GROUP = 4;  // 8 accumulators: AVX2 has 16 registers

    static V zero() { return _mm256_setzero_ps(); }
    static V set1(float a) { return _mm256_set1_ps(a); }
    static V load(const float *p) { return _mm256_loadu_ps(p); }
    static void store(float *p, V a) { _mm256_storeu_ps(p, a); }
    static V bf16(const uint16_t *p) {
        __m128i h = _mm_loadu_si128((const __m128i *)p);
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V max(V a, V b) { return _mm256_max_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static float sum(V a) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
    static float top(V a) {
        __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
    }
    // Lane j: the sum of a[j]'s lanes. Two rounds of pairwise sums leave a[j]'s halves' sums in
    // lane j % 4 of each 128-bit half; the halves then add.
    static V sums(const V *a) {
        V u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        V u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    }
    static V hide(V a, uint32_t hidden) {
        const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)hidden), bit), bit);
        return _mm256_blendv_ps(a, set1(-INFINITY), _mm256_castsi256_ps(set));
    }
    // e^x for x <= 0, 0 below -87 (where 2^n would leave float's normal range; e^-87 is 1.6e-38,
    // nothing beside the 1 that the row's largest score contributes).
    static V exp(V x) {
        V n, p = exp_reduced<Lanes8>(max(x, set1(-87.0f)), n);
        __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_and_ps(mul(p, _mm256_castsi256_ps(two_n)), _mm256_cmp_ps(x, set1(-87.0f), _CMP_GE_OQ));
    }
};

using Lanes = Lanes8;

#endif

#ifdef GLM4_DECODE_ATTENTION_KERNEL

using V = Lanes::V;
constexpr int W = Lanes::W;

// scores[g * n + j] = scale * q[g] . k[j] for a block of W keys, -inf where hidden.
#ifdef __AVX512BF16__
// vdpbf16ps multiplies pairs of bf16 exactly and adds them in float32, 32 products an instruction.
template <int D>
void block_scores(const uint16_t *q, float scale, const uint16_t *k, int64_t k_ss, int64_t G, uint32_t hidden,
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
        Lanes::store(scores + g * n, Lanes::hide(_mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale)), hidden));
    }
}
#else
// The same with float FMAs, the block's keys converted once.
template <int D>
void block_scores(const uint16_t *q, float scale, const uint16_t *k, int64_t k_ss, int64_t G, uint32_t hidden,
                  float *scores, int64_t n) {
    alignas(64) float kf[W * D];
    for (int j = 0; j < W; j++)
        for (int d = 0; d < D; d += W) Lanes::store(kf + j * D + d, Lanes::bf16(k + j * k_ss + d));
    for (int64_t g = 0; g < G; g++) {
        V qv[D / W];
        for (int d = 0; d < D / W; d++) qv[d] = Lanes::bf16(q + g * D + d * W);
        V a[W];
        for (int j = 0; j < W; j++) {
            V t0 = Lanes::mul(qv[0], Lanes::load(kf + j * D));
            V t1 = Lanes::mul(qv[1], Lanes::load(kf + j * D + W));
            for (int d = 2; d < D / W; d += 2) {
                t0 = Lanes::fma(qv[d], Lanes::load(kf + j * D + d * W), t0);
                t1 = Lanes::fma(qv[d + 1], Lanes::load(kf + j * D + d * W + W), t1);
            }
            a[j] = Lanes::add(t0, t1);
        }
        Lanes::store(scores + g * n, Lanes::hide(Lanes::mul(Lanes::sums(a), Lanes::set1(scale)), hidden));
    }
}
#endif

// scores[g * n + s] = scale * q[g] . k[s0 + s], -inf where the key is hidden: blocks of W keys,
// then the rest one by one.
template <int D>
void scores_of(const uint16_t *q, float scale, const uint16_t *k, const uint8_t *keep, int64_t G, int64_t s0,
               int64_t n, int64_t k_ss, float *scores) {
    int64_t s = 0;
    for (; s + W <= n; s += W) {
        uint32_t hidden = 0;
        for (int j = 0; j < W; j++)
            if (keep && !keep[s0 + s + j]) hidden |= 1u << j;
        block_scores<D>(q, scale, k + (s0 + s) * k_ss, k_ss, G, hidden, scores + s, n);
    }
    for (; s < n; s++) {
        const uint16_t *kr = k + (s0 + s) * k_ss;
        bool hide = keep && !keep[s0 + s];
        for (int64_t g = 0; g < G; g++) {
            V a = Lanes::zero();
            for (int d = 0; d < D; d += W) a = Lanes::fma(Lanes::bf16(q + g * D + d), Lanes::bf16(kr + d), a);
            scores[g * n + s] = hide ? -INFINITY : Lanes::sum(a) * scale;
        }
    }
}

// Each score row becomes e^(score - its max); m and l get the max and the sum.
void softmax_rows(float *scores, int64_t G, int64_t n, float *m, float *l) {
    for (int64_t g = 0; g < G; g++) {
        float *sc = scores + g * n;
        V mv = Lanes::set1(-INFINITY);
        int64_t s = 0;
        for (; s + W <= n; s += W) mv = Lanes::max(mv, Lanes::load(sc + s));
        float top = Lanes::top(mv);
        for (; s < n; s++) top = sc[s] > top ? sc[s] : top;
        m[g] = top;
        if (top == -INFINITY) {
            l[g] = 0.0f;
            continue;
        }
        V minus_top = Lanes::set1(-top), lv = Lanes::zero();
        for (s = 0; s + W <= n; s += W) {
            V e = Lanes::exp(Lanes::add(Lanes::load(sc + s), minus_top));
            Lanes::store(sc + s, e);
            lv = Lanes::add(lv, e);
        }
        float sum = Lanes::sum(lv);
        for (; s < n; s++) {
            sc[s] = std::exp(sc[s] - top);
            sum += sc[s];
        }
        l[g] = sum;
    }
}

// Keys whose value rows are weighed for every column and query head before the next keys': their
// rows stay in L1 over the passes (at head dim 128 and 16 query heads a KV head, a thread's chunk
// of 4000 keys' rows is 1 MB, which each pass would otherwise fetch again from L2 or beyond).
constexpr int64_t VALUE_BLOCK = 64;

// acc[g] += sum_s p[g, s] v[s0 + s] over s in [sa, sb) (acc[g] = where sa is 0), for GN rows of p
// at a time and 2W columns of v at a time. Each sum adds its keys in order, whatever the blocks.
template <int D, int GN>
void weigh_values(const float *p, const uint16_t *v, int64_t g0, int64_t s0, int64_t n, int64_t sa, int64_t sb,
                  int64_t v_ss, float *acc) {
    static_assert(D % (2 * W) == 0, "head dims are multiples of two vectors");
    for (int d = 0; d < D; d += 2 * W) {
        V a0[GN], a1[GN];
        for (int i = 0; i < GN; i++) {
            float *out = acc + (g0 + i) * D + d;
            a0[i] = sa == 0 ? Lanes::zero() : Lanes::load(out);
            a1[i] = sa == 0 ? Lanes::zero() : Lanes::load(out + W);
        }
        for (int64_t s = sa; s < sb; s++) {
            const uint16_t *vr = v + (s0 + s) * v_ss + d;
            V v0 = Lanes::bf16(vr), v1 = Lanes::bf16(vr + W);
            for (int i = 0; i < GN; i++) {
                V w = Lanes::set1(p[(g0 + i) * n + s]);
                a0[i] = Lanes::fma(w, v0, a0[i]);
                a1[i] = Lanes::fma(w, v1, a1[i]);
            }
        }
        for (int i = 0; i < GN; i++) {
            Lanes::store(acc + (g0 + i) * D + d, a0[i]);
            Lanes::store(acc + (g0 + i) * D + d + W, a1[i]);
        }
    }
}

template <int D>
void chunk(const uint16_t *q, float scale, const uint16_t *k, const uint16_t *v, const uint8_t *keep, int64_t G, int64_t s0,
           int64_t s1, int64_t k_ss, int64_t v_ss, float *scores, float *m, float *l, float *acc) {
    int64_t n = s1 - s0;  // one row of scores per query head of the group
    scores_of<D>(q, scale, k, keep, G, s0, n, k_ss, scores);
    softmax_rows(scores, G, n, m, l);
    for (int64_t sa = 0; sa < n; sa += VALUE_BLOCK) {
        int64_t sb = std::min(sa + VALUE_BLOCK, n), g = 0;
        for (; g + Lanes::GROUP <= G; g += Lanes::GROUP)
            weigh_values<D, Lanes::GROUP>(scores, v, g, s0, n, sa, sb, v_ss, acc);
        for (; g < G; g++) weigh_values<D, 1>(scores, v, g, s0, n, sa, sb, v_ss, acc);
    }
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

#endif  // GLM4_DECODE_ATTENTION_KERNEL

}  // namespace

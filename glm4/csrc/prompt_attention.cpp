// Attention of a prompt's queries on the CPU: many queries a row (a prompt, or a chunk of one over
// the cache before it) attend over a bf16 cache, causally or under a boolean mask, flash style.
//
// torch's CPU flash kernel (2.13) runs at about 60-75 GMAC/s on 2 cores of the AMD development
// machine, where oneDNN's bf16 GEMM reaches over 200: it multiplies small blocks through the
// general GEMM. Here each work item is one KV head's group of query heads over a block of queries
// (their rows taken together, as they share the keys), and both products run on vdpbf16ps
// micro-tiles: the scores with each 64 keys' pairs of dims transposed once into vectors, the
// values with each two keys' rows interleaved once. The softmax runs online, in float32, and its
// weights are rounded to bf16 for the second product, as torch's flash kernel does for bf16.
//
// glm4/kernels.py builds this with the machine's C++ compiler (-march=native) against torch's
// headers on first use and defines the op glm4::prompt_attention; built without AVX-512BW and
// AVX-512 BF16 it only says so (glm4_prompt_attention_supported() returns 0), and glm4 keeps SDPA.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "attention.h"

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#define GLM4_PROMPT_ATTENTION_KERNEL 1
#endif

namespace {

#ifdef GLM4_PROMPT_ATTENTION_KERNEL

constexpr int64_t KEYS = 64;  // keys a block: four vectors of scores a row
constexpr int TILE = 4;       // rows of a micro-tile: their 16 accumulators stay in registers

inline __m512bh pair_of(const uint32_t *p) { return (__m512bh)_mm512_set1_epi32((int)*p); }

// r[i] lane j = r[j] lane i, for 16 vectors of 16 32-bit lanes: four rounds of shuffles.
inline void transpose16(__m512i *r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
    }
}

// One block of keys, laid out for the products: kt[p][j] the pair of dims (2p, 2p + 1) of key j,
// vp[i][d] the pair (key 2i, key 2i + 1) of dim d; keys past n are zeros.
struct Block {
    std::vector<uint32_t> kt, vp;

    void load(const uint16_t *k, const uint16_t *v, int64_t k_ss, int64_t v_ss, int64_t n, int64_t D) {
        kt.resize(D / 2 * KEYS);
        vp.resize(KEYS / 2 * D);
        if (n < KEYS) {  // the last block: zeros past its keys
            std::fill(kt.begin(), kt.end(), 0u);
            std::fill(vp.begin(), vp.end(), 0u);
        }
        // 16 keys by 16 pairs of dims at a time, transposed in registers.
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            const int64_t rows = std::min<int64_t>(16, n - j0);
            for (int64_t p0 = 0; p0 < D / 2; p0 += 16) {
                __m512i r[16];
                for (int64_t j = 0; j < 16; j++)
                    r[j] = j < rows ? _mm512_loadu_si512(k + (j0 + j) * k_ss + 2 * p0) : _mm512_setzero_si512();
                transpose16(r);
                for (int64_t p = 0; p < 16; p++) _mm512_storeu_si512(&kt[(p0 + p) * KEYS + j0], r[p]);
            }
        }
        // Two keys' rows interleaved, 32 dims at a time: lane 2i from the first, 2i + 1 the second.
        const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                             6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
        for (int64_t i = 0; 2 * i < n; i++) {
            const uint16_t *a = v + 2 * i * v_ss, *b = a + v_ss;
            for (int64_t d = 0; d < D; d += 32) {
                __m512i x = _mm512_loadu_si512(a + d);
                __m512i y = 2 * i + 1 < n ? _mm512_loadu_si512(b + d) : _mm512_setzero_si512();
                _mm512_storeu_si512(&vp[i * D + d], _mm512_permutex2var_epi16(x, low, y));
                _mm512_storeu_si512(&vp[i * D + d + 16], _mm512_permutex2var_epi16(x, high, y));
            }
        }
    }
};

// s[r][j] = q[r] . k[j] for R rows of queries (bf16 rows at q[r]) and the block's 64 keys.
template <int R>
inline void tile_scores(const uint16_t *const *q, const Block &blk, int64_t D, float *s) {
    __m512 acc[R][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < D / 2; p++) {
        __m512bh kv[4];
        for (int c = 0; c < 4; c++) kv[c] = (__m512bh)_mm512_loadu_si512(&blk.kt[p * KEYS + 16 * c]);
        for (int r = 0; r < R; r++) {
            const __m512bh qv = pair_of(reinterpret_cast<const uint32_t *>(q[r]) + p);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv, kv[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + r * KEYS + 16 * c, acc[r][c]);
}

// o[r] += the block's values weighted by p[r] (each row's 32 pairs of bf16 weights), 64 dims at a time.
template <int R>
inline void tile_values(const uint32_t *p, const Block &blk, int64_t D, float *const *o) {
    for (int64_t d = 0; d < D; d += 64) {
        __m512 acc[R][4];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_loadu_ps(o[r] + d + 16 * c);
        for (int64_t i = 0; i < KEYS / 2; i++) {
            __m512bh vv[4];
            for (int c = 0; c < 4; c++) vv[c] = (__m512bh)_mm512_loadu_si512(&blk.vp[i * D + d + 16 * c]);
            for (int r = 0; r < R; r++) {
                const __m512bh pv = pair_of(p + r * (KEYS / 2) + i);
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pv, vv[c]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(o[r] + d + 16 * c, acc[r][c]);
    }
}

// The running softmax of one row over one block: s (64 scores, scaled here) with the keys the row
// sees (`seen`), its max m and sum l so far, its output o (D floats) rescaled to the new max, and
// the weights as bf16 pairs into p.
inline void online_softmax(float *s, uint64_t seen, float scale, float &m, float &l, float *o, int64_t D, uint32_t *p) {
    __m512 x[4];
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c < 4; c++) {
        const __mmask16 lanes = (__mmask16)(seen >> (16 * c));
        x[c] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), lanes, _mm512_loadu_ps(s + 16 * c), _mm512_set1_ps(scale));
        top = _mm512_max_ps(top, x[c]);
    }
    const float m_new = std::max(m, _mm512_reduce_max_ps(top));
    if (m_new == -INFINITY) {  // nothing seen yet: nothing to add
        std::fill_n(p, KEYS / 2, 0u);
        return;
    }
    const float alpha = m == -INFINITY ? 0.0f : std::exp(m - m_new);
    const __m512 mv = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    __m512 e[4];
    for (int c = 0; c < 4; c++) {
        const __mmask16 lanes = (__mmask16)(seen >> (16 * c));
        e[c] = _mm512_maskz_mov_ps(lanes, exp16(_mm512_sub_ps(x[c], mv)));
        sum = _mm512_add_ps(sum, e[c]);
    }
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
    _mm512_storeu_si512(p + 16, (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
    l = l * alpha + _mm512_reduce_add_ps(sum);
    m = m_new;
    if (alpha != 1.0f) {
        const __m512 a = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), a));
    }
}

// The keys j0..j0+63 (of S) that query t sees: its mask row's bytes, or causally those up to
// offset + t (the queries are the cache's last T positions).
inline uint64_t seen_keys(const uint8_t *keep, int64_t t, int64_t j0, int64_t S, int64_t offset) {
    const int64_t n = std::min<int64_t>(KEYS, S - j0);
    const uint64_t in = n >= 64 ? ~0ull : (1ull << n) - 1;
    if (keep) return _mm512_test_epi8_mask(_mm512_maskz_loadu_epi8(in, keep + j0), _mm512_set1_epi8(-1)) & in;
    const int64_t upto = offset + t - j0 + 1;  // keys seen in this block
    return upto <= 0 ? 0 : upto >= 64 ? in : ((1ull << upto) - 1) & in;
}

// q, out: (B, H * G, T, D) contiguous; k, v: (B, H, S, D), unit stride along D; keep: (B, T, S)
// bytes (row stride keep_ts, batch stride keep_bs) or null for causal.
void attend_prompt(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *keep, uint16_t *out,
                   int64_t B, int64_t H, int64_t G, int64_t T, int64_t S, int64_t D, const int64_t *ks,
                   const int64_t *vs, int64_t keep_bs, int64_t keep_ts, float scale) {
    const int64_t threads = at::get_num_threads();
    // About 256 rows (queries times their group) an item, fewer where the items would not fill the threads.
    int64_t per = std::max<int64_t>(1, 256 / G);
    while (per > 4 && B * H * ((T + per - 1) / per) < 4 * threads) per /= 2;
    const int64_t blocks = (T + per - 1) / per, items = B * H * blocks, offset = S - T;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
        Block blk;
        std::vector<float> o, m, l, s(TILE * KEYS);
        std::vector<uint32_t> p(TILE * KEYS / 2);
        std::vector<const uint16_t *> qr;
        std::vector<float *> orow;
        for (int64_t item = begin; item < end; item++) {
            // Early and late query blocks alternate, so that each thread's run of items does as much
            // causal work as another's.
            const int64_t bh = item / blocks, i = item % blocks, b = bh / H, h = bh % H;
            const int64_t qb = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2;
            const int64_t t0 = qb * per, t1 = std::min(T, t0 + per), rows = (t1 - t0) * G;
            o.assign(rows * D, 0.0f);
            m.assign(rows, -INFINITY);
            l.assign(rows, 0.0f);
            qr.resize(rows);
            orow.resize(rows);
            for (int64_t r = 0; r < rows; r++) {  // query-major: the rows of a query share its mask
                const int64_t t = t0 + r / G, g = r % G;
                qr[r] = q + ((b * H * G + h * G + g) * T + t) * D;
                orow[r] = o.data() + r * D;
            }
            const uint8_t *kb = keep ? keep + b * keep_bs : nullptr;
            const uint16_t *kh = k + b * ks[0] + h * ks[1], *vh = v + b * vs[0] + h * vs[1];
            for (int64_t j0 = 0; j0 < S; j0 += KEYS) {
                uint64_t any = 0;
                for (int64_t t = t0; t < t1 && !any; t++) any |= seen_keys(kb ? kb + t * keep_ts : nullptr, t, j0, S, offset);
                if (!any) continue;  // a block no query of the item sees (the causal future)
                blk.load(kh + j0 * ks[2], vh + j0 * vs[2], ks[2], vs[2], std::min(KEYS, S - j0), D);
                for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
                    const int R = (int)std::min<int64_t>(TILE, rows - r0);
                    switch (R) {
                        case 4: tile_scores<4>(&qr[r0], blk, D, s.data()); break;
                        case 3: tile_scores<3>(&qr[r0], blk, D, s.data()); break;
                        case 2: tile_scores<2>(&qr[r0], blk, D, s.data()); break;
                        default: tile_scores<1>(&qr[r0], blk, D, s.data()); break;
                    }
                    for (int r = 0; r < R; r++) {
                        const int64_t t = t0 + (r0 + r) / G;
                        const uint64_t seen = seen_keys(kb ? kb + t * keep_ts : nullptr, t, j0, S, offset);
                        online_softmax(&s[r * KEYS], seen, scale, m[r0 + r], l[r0 + r], orow[r0 + r], D,
                                       &p[r * (KEYS / 2)]);
                    }
                    switch (R) {
                        case 4: tile_values<4>(p.data(), blk, D, &orow[r0]); break;
                        case 3: tile_values<3>(p.data(), blk, D, &orow[r0]); break;
                        case 2: tile_values<2>(p.data(), blk, D, &orow[r0]); break;
                        default: tile_values<1>(p.data(), blk, D, &orow[r0]); break;
                    }
                }
            }
            for (int64_t r = 0; r < rows; r++) {
                const int64_t t = t0 + r / G, g = r % G;
                uint16_t *dst = out + ((b * H * G + h * G + g) * T + t) * D;
                const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
                for (int64_t d = 0; d < D; d++) dst[d] = float_to_bf16(orow[r][d] * inv);
            }
        }
    });
}

#endif  // GLM4_PROMPT_ATTENTION_KERNEL

// q (B, H_q, T, D), k and v (B, H, S, D) with S >= T, mask None (causal: the queries are the last T
// of the S positions) or (B, 1, T, S) bool: softmax(q k^T scale + mask) v, (B, H_q, T, D).
at::Tensor prompt_attention(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                            const std::optional<at::Tensor> &mask, double scale) {
#ifdef GLM4_PROMPT_ATTENTION_KERNEL
    TORCH_CHECK(q_in.scalar_type() == at::kBFloat16 && k_in.scalar_type() == at::kBFloat16 &&
                    v_in.scalar_type() == at::kBFloat16,
                "glm4::prompt_attention takes bfloat16 tensors");
    TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.sizes() == k_in.sizes(),
                "glm4::prompt_attention takes q (B, H, T, D) and k, v (B, H_kv, S, D)");
    const int64_t B = q_in.size(0), Hq = q_in.size(1), T = q_in.size(2), D = q_in.size(3);
    const int64_t H = k_in.size(1), S = k_in.size(2);
    TORCH_CHECK(D == 64 || D == 128 || D == 256, "glm4::prompt_attention has no kernel for head dim ", D);
    TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D && Hq % H == 0 && S >= T && T > 0,
                "glm4::prompt_attention: shapes");
    at::Tensor q = q_in.contiguous(), k = unit_last(k_in), v = unit_last(v_in);
    at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
    at::Tensor keep;
    int64_t keep_bs = 0, keep_ts = 0;
    if (mask.has_value()) {
        TORCH_CHECK(mask->dim() == 4 && mask->size(1) == 1 && mask->size(2) == T && mask->size(3) == S &&
                        (mask->size(0) == B || mask->size(0) == 1),
                    "glm4::prompt_attention takes a mask (B, 1, T, S)");
        keep = mask->to(at::kBool).contiguous();
        keep_bs = keep.size(0) == 1 ? 0 : T * S;
        keep_ts = S;
    }
    const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
    attend_prompt(reinterpret_cast<const uint16_t *>(q.const_data_ptr()),
                  reinterpret_cast<const uint16_t *>(k.const_data_ptr()),
                  reinterpret_cast<const uint16_t *>(v.const_data_ptr()),
                  keep.defined() ? reinterpret_cast<const uint8_t *>(keep.const_data_ptr()) : nullptr,
                  reinterpret_cast<uint16_t *>(out.mutable_data_ptr()), B, H, Hq / H, T, S, D, ks, vs, keep_bs,
                  keep_ts, (float)scale);
    return out;
#else
    TORCH_CHECK(false, "glm4::prompt_attention was built without AVX-512BW and AVX-512 BF16");
#endif
}

}  // namespace

extern "C" int glm4_prompt_attention_supported() {
#ifdef GLM4_PROMPT_ATTENTION_KERNEL
    return 1;
#else
    return 0;
#endif
}

TORCH_LIBRARY_IMPL(glm4, CPU, m) { m.impl("prompt_attention", &prompt_attention); }

// A whole decode step of a Glm4ForCausalLM on the CPU in one call: embedding, every layer (norms,
// q/k/v with bias, the partial interleaved rope, the cache write, attention, o, the MLP, the
// sandwich norms and residuals), the final norm and the lm_head, for 1 to 32 rows; the projections
// bf16, int8 with one scale per output row or int4 with a scale and zero per group (glm4's
// weight-only int8 and int4).
//
// At batch 1 the step streams every weight once, and the compiled graph of the same step spent
// about 2 ms of its 13 (bench model, 60 GB/s) around the matmuls: dynamo's entry, the wrapper's
// ~200 calls, a parallel region per small fused op. Here the matmuls are linear.h's, int8.h's and
// int4.h's (one parallel region each; on AMX tiles where the CPU has them), the attention is
// attention.h's, and everything else is vectorised loops over a row of at most a few thousand
// values: on the calling thread for a few rows, spread over the threads from ROWS_APART rows up
// (each_row).
//
// The arithmetic is the eager model's, rounding to bf16 wherever it does: after each norm (the
// normalised row, then its product with the weight), each matmul (an int8 one after its scale),
// bias add, rope product and sum, silu and residual add. Reductions (the norms' sums of squares,
// the matmuls) add in a different order than the library's, so results agree with the eager path
// within bf16 rounding, not bit for bit.
//
// Needs what linear.h needs (AVX-512BW and BF16) and AVX-512VL; built without them it only says
// so (glm4_decode_step_supported() returns 0).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "attention.h"
#include "int4.h"
#include "int8.h"
#include "linear.h"

#if defined(GLM4_BF16_LINEAR_KERNEL) && defined(GLM4_INT4_KERNEL) && defined(__AVX512VL__)
#define GLM4_DECODE_STEP_KERNEL 1
#endif

namespace {

#ifdef GLM4_DECODE_STEP_KERNEL

// The weights list decode_step takes (glm4/fused.py builds it): the embedding; per layer its four
// norms (input, post-attention-output, pre-MLP, post-MLP) and six projections (q, k, v, o, gate_up,
// down) of three tensors each: the weight (bf16; int8; or int4, two columns a byte), the scales
// (int8: one per row; int4: a scale and a zero per group of columns; bf16: empty) and the bias (or
// empty); then the final norm and the lm_head's three.
constexpr int NORMS = 4, PROJECTIONS = 6, PER_PROJECTION = 3;
constexpr int PER_LAYER = NORMS + PROJECTIONS * PER_PROJECTION;
// Rows a step takes (glm4/fused.py says when it pays: up to 8 on the vector kernels, 32 on AMX).
constexpr int64_t MAX_STEP_ROWS = 32;
// From this many rows the per-row loops (norms, rope, silu, the logits, the argmax) run on every
// thread: at batch 32 on the 2-core development machine (AMX) they had left one thread waiting for
// about a tenth of the step, and spreading them measured 1.08x (717 against 666 tok/s, means of 9
// alternating runs); at batch 8 it measured no gain (287 against 293).
constexpr int64_t ROWS_APART = 16;

// fn(b) for each row b < B, spread over the threads from ROWS_APART rows up. Each row's numbers
// are the same either way.
template <typename F>
void each_row(int64_t B, const F &fn) {
    if (B < ROWS_APART) {
        for (int64_t b = 0; b < B; b++) fn(b);
        return;
    }
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) fn(b);
    });
}

inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }  // round to nearest even

inline void store(uint16_t *p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }

inline __m512 rounded(__m512 v) {  // v rounded to bf16, as a float again
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

// out = w * bf16(x / rms(x)) rounded, or residual + that rounded (residual may be out): RMSNorm as
// the model writes it, statistics in float32.
void rms_norm(const uint16_t *x, const uint16_t *w, const uint16_t *residual, uint16_t *out, int64_t n, float eps) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __m512 v = load_bf16(x + i, first(n - i));
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first(n - i);
        __m512 y = rounded(_mm512_mul_ps(load_bf16(w + i, m), rounded(_mm512_mul_ps(load_bf16(x + i, m), r))));
        if (residual) y = _mm512_add_ps(load_bf16(residual + i, m), y);
        store(out + i, y, m);
    }
}

inline void add_bias(uint16_t *y, const uint16_t *b, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first(n - i);
        store(y + i, _mm512_add_ps(load_bf16(y + i, m), load_bf16(b + i, m)), m);
    }
}

// act = up * bf16(silu(gate)), gate_up = (gate | up), n each.
void silu_mul(const uint16_t *gate_up, uint16_t *act, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first(n - i);
        __m512 g = load_bf16(gate_up + i, m);
        __m512 silu = rounded(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
        store(act + i, _mm512_mul_ps(load_bf16(gate_up + n + i, m), silu), m);
    }
}

// Rotate the first R dims of each of `heads` heads of D in adjacent pairs (a, b) -> (a c - b s,
// b c + a s): x * cos + swap(x) * sin, with cos = (c, c) and sin = (-s, s) per pair, as the model.
void rope(uint16_t *x, int64_t heads, int64_t D, int64_t R, const float *cos, const float *sin) {
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < R; i += 16) {
            __mmask16 m = first(R - i);
            uint16_t *p = x + h * D + i;
            __m512 v = load_bf16(p, m), swapped = _mm512_permute_ps(v, 0xB1);  // (b, a) per pair
            __m512 a = rounded(_mm512_mul_ps(v, _mm512_loadu_ps(cos + i)));
            __m512 b = rounded(_mm512_mul_ps(swapped, _mm512_loadu_ps(sin + i)));
            store(p, _mm512_add_ps(a, b), m);
        }
}

const uint16_t *bits(const at::Tensor &t) {
    return t.numel() ? reinterpret_cast<const uint16_t *>(t.const_data_ptr()) : nullptr;
}

// One projection of the weights list: y = x W^T (+ bias), W bf16, int8 with per-row scales, or int4
// with per-group scales and zeros (glm4's layout, see int4.h; one pass over W for up to 16 rows of
// x on AMX tiles, else for up to 4).
struct Projection {
    enum Kind { BF16, INT8, INT4 } kind = BF16;
    const void *weight = nullptr;
    const uint16_t *scales = nullptr, *bias = nullptr;
    int64_t N = 0, K = 0, group = 0;

    void operator()(const uint16_t *x, uint16_t *y, int64_t M) const {
        if (kind == INT8)
            int8_linear_rows(x, static_cast<const int8_t *>(weight), scales, y, M, K, N);
        else if (kind == INT4)
            int4_linear_rows(x, static_cast<const uint8_t *>(weight), scales, y, M, K, N, group);
        else
            linear_rows(x, static_cast<const uint16_t *>(weight), y, M, K, N);
        if (bias)
            for (int64_t m = 0; m < M; m++) add_bias(y + m * N, bias, N);
    }
};

// The projection at t[0..2] (weight, scales, bias), checked against the shape (N, K) it must have.
Projection projection(const at::Tensor *t, int64_t N, int64_t K, const char *name) {
    const at::Tensor &w = t[0], &s = t[1], &b = t[2];
    TORCH_CHECK(b.numel() == 0 || (b.numel() == N && b.scalar_type() == at::kBFloat16), "glm4::decode_step: ",
                name, ": a bf16 bias of ", N, " or none");
    TORCH_CHECK(s.numel() == 0 || s.scalar_type() == at::kBFloat16, "glm4::decode_step: ", name, ": bf16 scales");
    if (w.scalar_type() == at::kByte) {  // int4, two columns a byte
        const int64_t group = s.dim() == 3 && s.size(1) > 0 ? K / s.size(1) : 0;
        TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) * 2 == K && int4_group_fits(group) &&
                        s.size(1) * group == K && s.size(0) == N && s.size(2) == 2,
                    "glm4::decode_step: ", name, " must be an int4 weight (", N, ", ", K / 2,
                    ") with scales and zeros (", N, ", K / group, 2), groups of 64 or a multiple of 128");
        return Projection{Projection::INT4, w.const_data_ptr(), bits(s), bits(b), N, K, group};
    }
    const bool int8 = w.scalar_type() == at::kChar;
    TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) == K && (int8 || w.scalar_type() == at::kBFloat16),
                "glm4::decode_step: ", name, " must be a bf16, int8 or int4 (", N, ", ", K, ") weight");
    TORCH_CHECK(int8 ? s.numel() == N : s.numel() == 0, "glm4::decode_step: ", name,
                ": int8 weights take one scale per row, bf16 weights none");
    return Projection{int8 ? Projection::INT8 : Projection::BF16, w.const_data_ptr(), int8 ? bits(s) : nullptr,
                      bits(b), N, K};
}

#endif  // GLM4_DECODE_STEP_KERNEL

// tokens, positions (B, 1) int64; mask (B, 1, 1, S) bool, the keys each row attends over (the first
// S cache slots); cache_position (1) or (B) int64, the slot each row's key and value go to;
// weights: as PER_LAYER above; keys and values: the cache, (C, H_kv, max_length, D) per layer,
// written in place, whose batch row rows[b] is row b's (rows None: C = B and row b); inv_freq
// (R / 2) float32 and rope_scale: the rotary frequencies and cos/sin factor. Returns float32
// logits (B, vocab). A row's numbers do not depend on the other rows, nor on how many there are.
at::Tensor decode_step(const at::Tensor &tokens, const at::Tensor &positions, const at::Tensor &mask,
                       const at::Tensor &cache_position, at::TensorList weights, at::TensorList keys,
                       at::TensorList values, const at::Tensor &inv_freq, double rope_scale, double eps,
                       double scale, const std::optional<at::Tensor> &rows) {
#ifdef GLM4_DECODE_STEP_KERNEL
    const int64_t layers = keys.size();
    TORCH_CHECK(layers > 0 && (int64_t)values.size() == layers &&
                    (int64_t)weights.size() == 2 + PER_LAYER * layers + PER_PROJECTION,
                "glm4::decode_step: ", weights.size(), " weights and ", keys.size(), " cache layers do not match");
    for (const auto &w : weights)
        TORCH_CHECK(w.is_contiguous() && w.device().is_cpu() &&
                        (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kChar || w.scalar_type() == at::kByte),
                    "glm4::decode_step takes contiguous bf16 (or int8, int4) CPU weights");
    const at::Tensor &embed = weights[0], &final_norm = weights[1 + PER_LAYER * layers];
    const at::Tensor *lm_head = &weights[2 + PER_LAYER * layers];
    TORCH_CHECK(embed.dim() == 2 && embed.scalar_type() == at::kBFloat16, "glm4::decode_step: a bf16 embedding");
    const int64_t B = tokens.size(0), hidden = embed.size(1), vocab = lm_head[0].size(0);
    const int64_t C = keys[0].size(0), Hkv = keys[0].size(1), max_length = keys[0].size(2), D = keys[0].size(3);
    const int64_t q_width = weights[1 + NORMS].size(0), kv_width = Hkv * D, Hq = q_width / D, G = Hq / Hkv;
    const int64_t inter = weights[1 + NORMS + 4 * PER_PROJECTION].size(0) / 2, R = 2 * inv_freq.numel(), S = mask.size(-1);
    TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == 1 && positions.sizes() == tokens.sizes() &&
                    tokens.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
                "glm4::decode_step takes tokens and positions (B, 1) int64");
    TORCH_CHECK(B >= 1 && B <= MAX_STEP_ROWS, "glm4::decode_step runs 1 to ", MAX_STEP_ROWS, " rows, got ", B);
    TORCH_CHECK(D == 64 || D == 128 || D == 256, "glm4::decode_step has no kernel for head dim ", D);
    TORCH_CHECK(q_width == Hq * D && Hq % Hkv == 0 && R <= D && inv_freq.scalar_type() == at::kFloat &&
                    inv_freq.is_contiguous(),
                "glm4::decode_step: head shapes");
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(0) == B && mask.stride(3) == 1 &&
                    S >= 1 && S <= max_length,
                "glm4::decode_step takes a (B, 1, 1, S) bool mask over the first S <= max_length slots");
    TORCH_CHECK(cache_position.scalar_type() == at::kLong && (cache_position.numel() == 1 || cache_position.numel() == B),
                "glm4::decode_step: cache_position holds one slot, or one per row");

    struct Layer {
        const uint16_t *norm[NORMS];  // input, post-attention-output, pre-MLP, post-MLP
        Projection q, k, v, o, gate_up, down;
    };
    std::vector<Layer> net(layers);
    for (int64_t l = 0; l < layers; l++) {
        const at::Tensor &kc = keys[l], &vc = values[l];
        TORCH_CHECK(kc.scalar_type() == at::kBFloat16 && vc.scalar_type() == at::kBFloat16 && kc.is_contiguous() &&
                        vc.is_contiguous() && kc.sizes() == vc.sizes() && kc.sizes() == keys[0].sizes() &&
                        (rows.has_value() || kc.size(0) == B),
                    "glm4::decode_step takes contiguous bf16 caches (B, H_kv, max_length, D), or (C, ...) with rows");
        const at::Tensor *w = &weights[1 + l * PER_LAYER], *p = w + NORMS;
        for (int i = 0; i < NORMS; i++) {
            TORCH_CHECK(w[i].numel() == hidden && w[i].scalar_type() == at::kBFloat16,
                        "glm4::decode_step: the norms of layer ", l, " must be bf16 (", hidden, ")");
            net[l].norm[i] = bits(w[i]);
        }
        net[l].q = projection(p, q_width, hidden, "q_proj");
        net[l].k = projection(p + PER_PROJECTION, kv_width, hidden, "k_proj");
        net[l].v = projection(p + 2 * PER_PROJECTION, kv_width, hidden, "v_proj");
        net[l].o = projection(p + 3 * PER_PROJECTION, hidden, q_width, "o_proj");
        net[l].gate_up = projection(p + 4 * PER_PROJECTION, 2 * inter, hidden, "gate_up_proj");
        net[l].down = projection(p + 5 * PER_PROJECTION, hidden, inter, "down_proj");
    }
    TORCH_CHECK(final_norm.numel() == hidden && final_norm.scalar_type() == at::kBFloat16,
                "glm4::decode_step: the final norm must be bf16 (", hidden, ")");
    const Projection head = projection(lm_head, vocab, hidden, "lm_head");

    const int64_t *tok = tokens.const_data_ptr<int64_t>(), *pos = positions.const_data_ptr<int64_t>();
    const int64_t *slots = cache_position.const_data_ptr<int64_t>();
    std::vector<int64_t> cache_row(B), slot(B);  // per row: its cache row, and its slot there
    TORCH_CHECK(!rows.has_value() || (rows->scalar_type() == at::kLong && rows->numel() == B && rows->is_contiguous()),
                "glm4::decode_step: rows holds one int64 cache row per row");
    for (int64_t b = 0; b < B; b++) {
        cache_row[b] = rows.has_value() ? rows->const_data_ptr<int64_t>()[b] : b;
        TORCH_CHECK(cache_row[b] >= 0 && cache_row[b] < C, "glm4::decode_step: cache row ", cache_row[b], " out of range");
        TORCH_CHECK(tok[b] >= 0 && tok[b] < embed.size(0), "glm4::decode_step: token id ", tok[b], " out of range");
        slot[b] = slots[cache_position.numel() == 1 ? 0 : b];
        TORCH_CHECK(slot[b] >= 0 && slot[b] < max_length, "glm4::decode_step: cache slot ", slot[b], " out of range");
    }

    // cos and sin per row, laid out per pair as the model's rotary module does, rounded to bf16.
    std::vector<float> cos(B * (R + 16)), sin(B * (R + 16));
    const float *freq = inv_freq.const_data_ptr<float>();
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < R / 2; i++) {
            float angle = (float)pos[b] * freq[i];
            float c = bf16_to_float(float_to_bf16(std::cos(angle) * (float)rope_scale));
            float s = bf16_to_float(float_to_bf16(std::sin(angle) * (float)rope_scale));
            cos[b * (R + 16) + 2 * i] = cos[b * (R + 16) + 2 * i + 1] = c;
            sin[b * (R + 16) + 2 * i] = -s;
            sin[b * (R + 16) + 2 * i + 1] = s;
        }

    // Activations, (B, width) each, in one buffer kept from step to step by the calling thread:
    // allocating and zeroing them each step (the logits alone are B x vocab) was about 2% of a
    // step at batch 32.
    thread_local std::vector<uint16_t> arena;
    const int64_t widths[] = {hidden, hidden, q_width, kv_width, kv_width, q_width, hidden, 2 * inter, inter, vocab};
    int64_t total = 0;
    for (int64_t w : widths) total += B * w;
    if ((int64_t)arena.size() < total) arena.resize(total);
    uint16_t *parts[10], *next = arena.data();
    for (int i = 0; i < 10; i++) parts[i] = next, next += B * widths[i];
    uint16_t *x = parts[0], *h = parts[1], *q = parts[2], *k = parts[3], *v = parts[4], *attn = parts[5],
             *o = parts[6], *gate_up = parts[7], *act = parts[8], *logits = parts[9];
    const uint16_t *embedding = bits(embed);
    for (int64_t b = 0; b < B; b++) std::copy_n(embedding + tok[b] * hidden, hidden, &x[b * hidden]);
    const float epsilon = (float)eps;
    const uint8_t *keep = reinterpret_cast<const uint8_t *>(mask.const_data_ptr());

    for (int64_t l = 0; l < layers; l++) {
        const Layer &L = net[l];
        each_row(B, [&](int64_t b) { rms_norm(&x[b * hidden], L.norm[0], nullptr, &h[b * hidden], hidden, epsilon); });
        L.q(h, q, B);
        L.k(h, k, B);
        L.v(h, v, B);
        uint16_t *kc = reinterpret_cast<uint16_t *>(keys[l].data_ptr()), *vc = reinterpret_cast<uint16_t *>(values[l].data_ptr());
        each_row(B, [&](int64_t b) {
            rope(&q[b * q_width], Hq, D, R, &cos[b * (R + 16)], &sin[b * (R + 16)]);
            rope(&k[b * kv_width], Hkv, D, R, &cos[b * (R + 16)], &sin[b * (R + 16)]);
            for (int64_t j = 0; j < Hkv; j++) {
                std::copy_n(&k[b * kv_width + j * D], D, kc + ((cache_row[b] * Hkv + j) * max_length + slot[b]) * D);
                std::copy_n(&v[b * kv_width + j * D], D, vc + ((cache_row[b] * Hkv + j) * max_length + slot[b]) * D);
            }
        });
        const int64_t strides[3] = {Hkv * max_length * D, max_length * D, D};
        attend(q, kc, vc, keep, attn, B, Hkv, G, D, S, strides, strides, mask.stride(0), (float)scale,
               cache_row.data(), C * Hkv);
        L.o(attn, o, B);
        each_row(B, [&](int64_t b) {
            uint16_t *xb = &x[b * hidden];
            rms_norm(&o[b * hidden], L.norm[1], xb, xb, hidden, epsilon);
            rms_norm(xb, L.norm[2], nullptr, &h[b * hidden], hidden, epsilon);
        });
        L.gate_up(h, gate_up, B);
        each_row(B, [&](int64_t b) { silu_mul(&gate_up[b * 2 * inter], &act[b * inter], inter); });
        L.down(act, o, B);
        each_row(B, [&](int64_t b) {
            rms_norm(&o[b * hidden], L.norm[3], &x[b * hidden], &x[b * hidden], hidden, epsilon);
        });
    }
    each_row(B, [&](int64_t b) { rms_norm(&x[b * hidden], bits(final_norm), nullptr, &h[b * hidden], hidden, epsilon); });
    head(h, logits, B);
    at::Tensor out = at::empty({B, vocab}, tokens.options().dtype(at::kFloat));
    float *y = out.mutable_data_ptr<float>();
    each_row(B, [&](int64_t b) {
        for (int64_t i = b * vocab; i < (b + 1) * vocab; i += 16) {
            __mmask16 m = first((b + 1) * vocab - i);
            _mm512_mask_storeu_ps(y + i, m, load_bf16(&logits[i], m));
        }
    });
    return out;
#else
    TORCH_CHECK(false, "glm4::decode_step was built without AVX-512BW, VL and BF16");
#endif
}

// The index of each row's largest value (the first of equals; the first NaN if there is one), as
// torch.argmax: the greedy token, about 10 times faster than the library's single-row reduction.
at::Tensor argmax(const at::Tensor &logits_in) {
#ifdef GLM4_DECODE_STEP_KERNEL
    TORCH_CHECK(logits_in.scalar_type() == at::kFloat && logits_in.dim() == 2 && logits_in.size(1) > 0,
                "glm4::argmax takes float32 (B, V) logits, V > 0");
    at::Tensor logits = logits_in.contiguous();
    const int64_t B = logits.size(0), V = logits.size(1);
    at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
    const float *x = logits.const_data_ptr<float>();
    int64_t *best = out.mutable_data_ptr<int64_t>();
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    each_row(B, [&](int64_t b) {
        const float *row = x + b * V;
        // Per lane: the largest value seen and the first block it was seen in (blocks of 16).
        __m512 top = _mm512_set1_ps(-INFINITY);
        __m512i where = _mm512_setzero_si512(), block = _mm512_setzero_si512();
        __mmask16 nan = 0;
        int64_t i = 0;
        for (; i + 16 <= V; i += 16) {
            __m512 v = _mm512_loadu_ps(row + i);
            __mmask16 up = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            top = _mm512_mask_mov_ps(top, up, v);
            where = _mm512_mask_mov_epi32(where, up, block);
            block = _mm512_add_epi32(block, _mm512_set1_epi32(1));
        }
        alignas(64) float tops[16];
        alignas(64) int32_t blocks[16];
        _mm512_store_ps(tops, top);
        _mm512_store_si512(blocks, _mm512_add_epi32(_mm512_slli_epi32(where, 4), lanes));
        int64_t index = -1;
        float value = -INFINITY;
        for (int j = 0; j < 16; j++)  // the largest, the smallest index among equals
            if (index < 0 ? tops[j] > -INFINITY : (tops[j] > value || (tops[j] == value && blocks[j] < index)))
                value = tops[j], index = blocks[j];
        for (; i < V; i++) {
            if (std::isnan(row[i])) nan = 1;
            if (row[i] > value) value = row[i], index = i;
        }
        if (index < 0) index = 0;  // every value -inf
        if (nan)
            for (int64_t j = 0; j < V; j++)
                if (std::isnan(row[j])) {
                    index = j;
                    break;
                }
        best[b] = index;
    });
    return out;
#else
    TORCH_CHECK(false, "glm4::argmax was built without AVX-512BW, VL and BF16");
#endif
}

}  // namespace

extern "C" int glm4_decode_step_supported() {
#ifdef GLM4_DECODE_STEP_KERNEL
    return 1;
#else
    return 0;
#endif
}

TORCH_LIBRARY_IMPL(glm4, CPU, m) {
    m.impl("decode_step", &decode_step);
    m.impl("argmax", &argmax);
}

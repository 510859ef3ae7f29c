// A whole decode step of a bf16 Glm4ForCausalLM on the CPU in one call: embedding, every layer
// (norms, q/k/v with bias, the partial interleaved rope, the cache write, attention, o, the MLP,
// the sandwich norms and residuals), the final norm and the lm_head, for 1 to 8 rows.
//
// At batch 1 the step streams every weight once, and the compiled graph of the same step spent
// about 2 ms of its 13 (bench model, 60 GB/s) around the matmuls: dynamo's entry, the wrapper's
// ~200 calls, a parallel region per small fused op. Here the matmuls are linear.h's (one parallel
// region each), the attention is attention.h's, and everything else runs on the calling thread
// over a row of at most a few thousand values, vectorised.
//
// The arithmetic is the eager model's, rounding to bf16 wherever it does: after each norm (the
// normalised row, then its product with the weight), each matmul, bias add, rope product and sum,
// silu and residual add. Reductions (the norms' sums of squares, the matmuls) add in a different
// order than the library's, so results agree with the eager path within bf16 rounding, not bit
// for bit.
//
// Needs what linear.h needs (AVX-512BW and BF16) and AVX-512VL; built without them it only says
// so (glm4_decode_step_supported() returns 0).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "attention.h"
#include "linear.h"

#if defined(GLM4_BF16_LINEAR_KERNEL) && defined(__AVX512VL__)
#define GLM4_DECODE_STEP_KERNEL 1
#endif

namespace {

#ifdef GLM4_DECODE_STEP_KERNEL

constexpr int PER_LAYER = 13;  // weights per layer in the list decode_step takes (see glm4/fused.py)

inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

inline __m512 load(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
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
        __m512 v = load(x + i, first(n - i));
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first(n - i);
        __m512 y = rounded(_mm512_mul_ps(load(w + i, m), rounded(_mm512_mul_ps(load(x + i, m), r))));
        if (residual) y = _mm512_add_ps(load(residual + i, m), y);
        store(out + i, y, m);
    }
}

inline void add_bias(uint16_t *y, const uint16_t *b, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first(n - i);
        store(y + i, _mm512_add_ps(load(y + i, m), load(b + i, m)), m);
    }
}

// act = up * bf16(silu(gate)), gate_up = (gate | up), n each.
void silu_mul(const uint16_t *gate_up, uint16_t *act, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first(n - i);
        __m512 g = load(gate_up + i, m);
        __m512 silu = rounded(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
        store(act + i, _mm512_mul_ps(load(gate_up + n + i, m), silu), m);
    }
}

// Rotate the first R dims of each of `heads` heads of D in adjacent pairs (a, b) -> (a c - b s,
// b c + a s): x * cos + swap(x) * sin, with cos = (c, c) and sin = (-s, s) per pair, as the model.
void rope(uint16_t *x, int64_t heads, int64_t D, int64_t R, const float *cos, const float *sin) {
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < R; i += 16) {
            __mmask16 m = first(R - i);
            uint16_t *p = x + h * D + i;
            __m512 v = load(p, m), swapped = _mm512_permute_ps(v, 0xB1);  // (b, a) per pair
            __m512 a = rounded(_mm512_mul_ps(v, _mm512_loadu_ps(cos + i)));
            __m512 b = rounded(_mm512_mul_ps(swapped, _mm512_loadu_ps(sin + i)));
            store(p, _mm512_add_ps(a, b), m);
        }
}

struct Layer {
    const uint16_t *input_norm, *q, *q_bias, *k, *k_bias, *v, *v_bias, *o, *post_attn_norm, *pre_mlp_norm,
        *gate_up, *down, *post_mlp_norm;
};

const uint16_t *bits(const at::Tensor &t) {
    return t.numel() ? reinterpret_cast<const uint16_t *>(t.const_data_ptr()) : nullptr;
}

#endif  // GLM4_DECODE_STEP_KERNEL

// tokens, positions (B, 1) int64; mask (B, 1, 1, S) bool, the keys each row attends over (the first
// S cache slots); cache_position (1) or (B) int64, the slot each row's key and value go to;
// weights: the embedding, 13 per layer (see glm4/fused.py), the final norm and the lm_head; keys and
// values: the cache, (B, H_kv, max_length, D) per layer, written in place; inv_freq (R / 2) float32
// and rope_scale: the rotary frequencies and cos/sin factor. Returns float32 logits (B, vocab).
at::Tensor decode_step(const at::Tensor &tokens, const at::Tensor &positions, const at::Tensor &mask,
                       const at::Tensor &cache_position, at::TensorList weights, at::TensorList keys,
                       at::TensorList values, const at::Tensor &inv_freq, double rope_scale, double eps,
                       double scale) {
#ifdef GLM4_DECODE_STEP_KERNEL
    const int64_t layers = keys.size();
    TORCH_CHECK(layers > 0 && (int64_t)values.size() == layers && (int64_t)weights.size() == 3 + PER_LAYER * layers,
                "glm4::decode_step: ", weights.size(), " weights and ", keys.size(), " cache layers do not match");
    for (const auto &w : weights)
        TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.device().is_cpu(),
                    "glm4::decode_step takes contiguous bf16 CPU weights");
    const at::Tensor &embed = weights[0], &lm_head = weights[weights.size() - 1];
    const int64_t B = tokens.size(0), hidden = embed.size(1), vocab = lm_head.size(0);
    const int64_t Hkv = keys[0].size(1), max_length = keys[0].size(2), D = keys[0].size(3);
    const int64_t q_width = weights[2].size(0), kv_width = Hkv * D, Hq = q_width / D, G = Hq / Hkv;
    const int64_t inter = weights[12].size(1), R = 2 * inv_freq.numel(), S = mask.size(-1);
    TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == 1 && positions.sizes() == tokens.sizes() &&
                    tokens.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
                "glm4::decode_step takes tokens and positions (B, 1) int64");
    TORCH_CHECK(B >= 1 && B <= MAX_ROWS, "glm4::decode_step runs 1 to ", MAX_ROWS, " rows, got ", B);
    TORCH_CHECK(D == 64 || D == 128 || D == 256, "glm4::decode_step has no kernel for head dim ", D);
    TORCH_CHECK(q_width == Hq * D && Hq % Hkv == 0 && R <= D && inv_freq.scalar_type() == at::kFloat &&
                    inv_freq.is_contiguous(),
                "glm4::decode_step: head shapes");
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(0) == B && mask.stride(3) == 1 &&
                    S >= 1 && S <= max_length,
                "glm4::decode_step takes a (B, 1, 1, S) bool mask over the first S <= max_length slots");
    TORCH_CHECK(cache_position.scalar_type() == at::kLong && (cache_position.numel() == 1 || cache_position.numel() == B),
                "glm4::decode_step: cache_position holds one slot, or one per row");
    for (int64_t l = 0; l < layers; l++) {
        const at::Tensor &k = keys[l], &v = values[l];
        TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && k.is_contiguous() &&
                        v.is_contiguous() && k.sizes() == v.sizes() && k.sizes() == keys[0].sizes() && k.size(0) == B,
                    "glm4::decode_step takes contiguous bf16 caches (B, H_kv, max_length, D)");
        const at::Tensor *w = &weights[1 + l * PER_LAYER];
        TORCH_CHECK(w[1].sizes() == at::IntArrayRef({q_width, hidden}) && w[3].sizes() == at::IntArrayRef({kv_width, hidden}) &&
                        w[5].sizes() == at::IntArrayRef({kv_width, hidden}) && w[7].sizes() == at::IntArrayRef({hidden, q_width}) &&
                        w[10].sizes() == at::IntArrayRef({2 * inter, hidden}) && w[11].sizes() == at::IntArrayRef({hidden, inter}) &&
                        (w[2].numel() == 0 || w[2].numel() == q_width) && (w[4].numel() == 0 || w[4].numel() == kv_width) &&
                        (w[6].numel() == 0 || w[6].numel() == kv_width) && w[0].numel() == hidden && w[8].numel() == hidden &&
                        w[9].numel() == hidden && w[12].numel() == hidden,
                    "glm4::decode_step: the weights of layer ", l, " do not have the model's shapes");
    }
    TORCH_CHECK(lm_head.dim() == 2 && lm_head.size(1) == hidden && weights[weights.size() - 2].numel() == hidden,
                "glm4::decode_step: the final norm or lm_head");

    const int64_t *tok = tokens.const_data_ptr<int64_t>(), *pos = positions.const_data_ptr<int64_t>();
    const int64_t *slots = cache_position.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++) {
        TORCH_CHECK(tok[b] >= 0 && tok[b] < embed.size(0), "glm4::decode_step: token id ", tok[b], " out of range");
        int64_t slot = slots[cache_position.numel() == 1 ? 0 : b];
        TORCH_CHECK(slot >= 0 && slot < max_length, "glm4::decode_step: cache slot ", slot, " out of range");
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

    // Activations, (B, width) each.
    std::vector<uint16_t> x(B * hidden), h(B * hidden), q(B * q_width), k(B * kv_width), v(B * kv_width),
        attn(B * q_width), o(B * hidden), gate_up(B * 2 * inter), act(B * inter), logits(B * vocab);
    const uint16_t *embedding = bits(embed);
    for (int64_t b = 0; b < B; b++) std::copy_n(embedding + tok[b] * hidden, hidden, &x[b * hidden]);
    const float epsilon = (float)eps;
    const uint8_t *keep = reinterpret_cast<const uint8_t *>(mask.const_data_ptr());

    for (int64_t l = 0; l < layers; l++) {
        const at::Tensor *w = &weights[1 + l * PER_LAYER];
        Layer L{bits(w[0]), bits(w[1]), bits(w[2]), bits(w[3]), bits(w[4]), bits(w[5]), bits(w[6]),
                bits(w[7]), bits(w[8]), bits(w[9]), bits(w[10]), bits(w[11]), bits(w[12])};
        for (int64_t b = 0; b < B; b++) rms_norm(&x[b * hidden], L.input_norm, nullptr, &h[b * hidden], hidden, epsilon);
        linear_rows(h.data(), L.q, q.data(), B, hidden, q_width);
        linear_rows(h.data(), L.k, k.data(), B, hidden, kv_width);
        linear_rows(h.data(), L.v, v.data(), B, hidden, kv_width);
        uint16_t *kc = reinterpret_cast<uint16_t *>(keys[l].data_ptr()), *vc = reinterpret_cast<uint16_t *>(values[l].data_ptr());
        for (int64_t b = 0; b < B; b++) {
            if (L.q_bias) add_bias(&q[b * q_width], L.q_bias, q_width);
            if (L.k_bias) add_bias(&k[b * kv_width], L.k_bias, kv_width);
            if (L.v_bias) add_bias(&v[b * kv_width], L.v_bias, kv_width);
            rope(&q[b * q_width], Hq, D, R, &cos[b * (R + 16)], &sin[b * (R + 16)]);
            rope(&k[b * kv_width], Hkv, D, R, &cos[b * (R + 16)], &sin[b * (R + 16)]);
            int64_t slot = slots[cache_position.numel() == 1 ? 0 : b];
            for (int64_t j = 0; j < Hkv; j++) {
                std::copy_n(&k[b * kv_width + j * D], D, kc + ((b * Hkv + j) * max_length + slot) * D);
                std::copy_n(&v[b * kv_width + j * D], D, vc + ((b * Hkv + j) * max_length + slot) * D);
            }
        }
        const int64_t strides[3] = {Hkv * max_length * D, max_length * D, D};
        attend(q.data(), kc, vc, keep, attn.data(), B, Hkv, G, D, S, strides, strides, mask.stride(0), (float)scale);
        linear_rows(attn.data(), L.o, o.data(), B, q_width, hidden);
        for (int64_t b = 0; b < B; b++) {
            uint16_t *xb = &x[b * hidden];
            rms_norm(&o[b * hidden], L.post_attn_norm, xb, xb, hidden, epsilon);
            rms_norm(xb, L.pre_mlp_norm, nullptr, &h[b * hidden], hidden, epsilon);
        }
        linear_rows(h.data(), L.gate_up, gate_up.data(), B, hidden, 2 * inter);
        for (int64_t b = 0; b < B; b++) silu_mul(&gate_up[b * 2 * inter], &act[b * inter], inter);
        linear_rows(act.data(), L.down, o.data(), B, inter, hidden);
        for (int64_t b = 0; b < B; b++) rms_norm(&o[b * hidden], L.post_mlp_norm, &x[b * hidden], &x[b * hidden], hidden, epsilon);
    }
    const uint16_t *final_norm = bits(weights[weights.size() - 2]);
    for (int64_t b = 0; b < B; b++) rms_norm(&x[b * hidden], final_norm, nullptr, &h[b * hidden], hidden, epsilon);
    linear_rows(h.data(), bits(lm_head), logits.data(), B, hidden, vocab);
    at::Tensor out = at::empty({B, vocab}, tokens.options().dtype(at::kFloat));
    float *y = out.mutable_data_ptr<float>();
    for (int64_t i = 0; i < B * vocab; i += 16) {
        __mmask16 m = first(B * vocab - i);
        _mm512_mask_storeu_ps(y + i, m, load(&logits[i], m));
    }
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
    for (int64_t b = 0; b < B; b++) {
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
    }
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

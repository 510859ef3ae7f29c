// One row of activations times a group-wise int4 weight, as glm4 stores it: (N, K/2) bytes, two
// columns a byte (low nibble first), and (N, K/group, 2) bf16 (scale, zero) with
// w = (q - 8) * scale + zero.
//
// Batch-1 decoding reads every weight once per token. torch's CPU int4 kernel spends more time
// unpacking than the memory takes to deliver the bytes; this one turns 64 nibbles into bf16 with
// two table lookups (vpermw) and multiplies them with vdpbf16ps, so that it keeps up with memory:
//   y[n] = sum_g scale[n,g] * sum_{k in g} (q[n,k] - 8) x[k]  +  sum_g zero[n,g] * sum_{k in g} x[k].
// Products of bf16 are exact and summed in float32. Needs AVX-512BW and AVX-512 BF16; built without
// them it only says so (glm4_int4_linear_supported() returns 0), and glm4 keeps torch's kernel.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "bf16.h"

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#define GLM4_INT4_KERNEL 1
#include <immintrin.h>
#endif

namespace {

#ifdef GLM4_INT4_KERNEL
// Ask for the bytes 4 KiB ahead of those being unpacked: measured on weights streamed from memory,
// 1.2-1.35x the rate of leaving it to the hardware prefetcher (which torch's kernel does).
constexpr int64_t PREFETCH = 4096;

// xp: x reordered per 64 columns as [the 32 even columns, the 32 odd ones], to meet the low and the
// high nibbles of 32 bytes. sums: x summed over each group (for the zeros).
void int4_rows(const uint16_t *xp, const float *sums, const uint8_t *w, const uint16_t *sz, uint16_t *y,
               int64_t K, int64_t group, int64_t n0, int64_t n1) {
    alignas(64) uint16_t table[32];
    for (int q = 0; q < 32; q++) table[q] = float_to_bf16((float)((q & 15) - 8));
    const __m512i lut = _mm512_load_si512(table), nibble = _mm512_set1_epi16(0x0F);
    const int64_t groups = K / group, blocks = group / 64;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        const uint16_t *szr = sz + n * groups * 2;
        __m512 acc = _mm512_setzero_ps();
        float zeros = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            __m512 part = _mm512_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                int64_t col = g * group + b * 64;
                _mm_prefetch((const char *)(wr + col / 2) + PREFETCH, _MM_HINT_T0);
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wr + col / 2)));
                __m512i low = _mm512_permutexvar_epi16(_mm512_and_si512(bytes, nibble), lut);
                __m512i high = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), lut);
                part = _mm512_dpbf16_ps(part, (__m512bh)low, (__m512bh)_mm512_loadu_si512(xp + col));
                part = _mm512_dpbf16_ps(part, (__m512bh)high, (__m512bh)_mm512_loadu_si512(xp + col + 32));
            }
            acc = _mm512_fmadd_ps(part, _mm512_set1_ps(bf16_to_float(szr[2 * g])), acc);
            zeros += bf16_to_float(szr[2 * g + 1]) * sums[g];
        }
        y[n] = float_to_bf16(_mm512_reduce_add_ps(acc) + zeros);
    }
}

#endif  // GLM4_INT4_KERNEL

// x (..., K) bf16 with one row; weight (N, K/2) uint8; scales_and_zeros (N, K/group, 2) bf16.
at::Tensor int4_linear(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &scales_and_zeros,
                       int64_t group) {
#ifdef GLM4_INT4_KERNEL
    int64_t K = x.size(-1), N = weight.size(0);
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && scales_and_zeros.scalar_type() == at::kBFloat16 &&
                    weight.scalar_type() == at::kByte,
                "glm4::int4_linear takes bfloat16 x and scales, uint8 weight");
    TORCH_CHECK(x.numel() == K, "glm4::int4_linear takes one row of x");
    TORCH_CHECK(group % 64 == 0 && K % group == 0, "glm4::int4_linear has no kernel for group size ", group);
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) * 2 == K && scales_and_zeros.numel() == N * (K / group) * 2,
                "glm4::int4_linear: weight (N, K/2) and scales_and_zeros (N, K/group, 2)");
    at::Tensor xc = x.contiguous(), wc = weight.contiguous(), szc = scales_and_zeros.contiguous();
    const uint16_t *xs = reinterpret_cast<const uint16_t *>(xc.const_data_ptr());
    std::vector<uint16_t> xp(K);
    std::vector<float> sums(K / group, 0.0f);
    for (int64_t c = 0; c < K; c += 64)
        for (int64_t i = 0; i < 32; i++) xp[c + i] = xs[c + 2 * i], xp[c + 32 + i] = xs[c + 2 * i + 1];
    for (int64_t k = 0; k < K; k++) sums[k / group] += bf16_to_float(xs[k]);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    at::Tensor y = at::empty(shape, x.options());
    const uint8_t *w = reinterpret_cast<const uint8_t *>(wc.const_data_ptr());
    const uint16_t *sz = reinterpret_cast<const uint16_t *>(szc.const_data_ptr());
    uint16_t *out = reinterpret_cast<uint16_t *>(y.mutable_data_ptr());
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        int4_rows(xp.data(), sums.data(), w, sz, out, K, group, n0, n1);
    });
    return y;
#else
    TORCH_CHECK(false, "glm4::int4_linear was built without AVX-512BW and AVX-512 BF16");
#endif
}

}  // namespace

extern "C" int glm4_int4_linear_supported() {
#ifdef GLM4_INT4_KERNEL
    return 1;
#else
    return 0;
#endif
}

TORCH_LIBRARY_IMPL(glm4, CPU, m) { m.impl("int4_linear", &int4_linear); }

// One row of activations times a group-wise int4 weight, as glm4 stores it: (N, K/2) bytes, two
// columns a byte (low nibble first), and (N, K/group, 2) bf16 (scale, zero) with
// w = (q - 8) * scale + zero.
//
// Batch-1 decoding reads every weight once per token. torch's CPU int4 kernel spends more time
// unpacking than the memory takes to deliver the bytes; this one turns 128 nibbles into bf16 with
// seven bitwise ops (each q becomes 128 + q, see int4.h) and multiplies them with vdpbf16ps:
//   y[n] = sum_g scale[n,g] * sum_{k in g} (q[n,k] - 8) x[k]  +  sum_g zero[n,g] * sum_{k in g} x[k].
// Products of bf16 are exact and summed in float32, up to 4 rows of x on the nibbles of two weight
// rows unpacked once (int4.h: int4_tile); on a CPU with AMX tiles the products run on them
// (int4_amx_rows), where up to 16 rows share one pass over the weight.
// Needs AVX-512BW and AVX-512 BF16; without them, AVX2 and FMA (avx2.h: the nibbles widened to
// float32 for FMAs, x laid out to match); built without either it only says so
// (glm4_int4_linear_supported() returns 0), and glm4 keeps torch's kernel.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "avx2.h"
#include "int4.h"

namespace {

// x (..., K) bf16; weight (N, K/2) uint8; scales_and_zeros (N, K/group, 2) bf16. Any number of rows.
at::Tensor int4_linear(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &scales_and_zeros,
                       int64_t group) {
#if defined(GLM4_INT4_KERNEL) || defined(GLM4_AVX2_KERNEL)
    int64_t K = x.size(-1), N = weight.size(0);
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && scales_and_zeros.scalar_type() == at::kBFloat16 &&
                    weight.scalar_type() == at::kByte,
                "glm4::int4_linear takes bfloat16 x and scales, uint8 weight");
    const int64_t M = x.numel() / K;
    TORCH_CHECK(int4_group_fits(group) && K % group == 0, "glm4::int4_linear has no kernel for group size ", group);
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) * 2 == K && scales_and_zeros.numel() == N * (K / group) * 2,
                "glm4::int4_linear: weight (N, K/2) and scales_and_zeros (N, K/group, 2)");
    at::Tensor xc = x.contiguous(), wc = weight.contiguous(), szc = scales_and_zeros.contiguous();
    const uint16_t *xs = reinterpret_cast<const uint16_t *>(xc.const_data_ptr());
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    at::Tensor y = at::empty(shape, x.options());
    const uint8_t *w = reinterpret_cast<const uint8_t *>(wc.const_data_ptr());
    const uint16_t *sz = reinterpret_cast<const uint16_t *>(szc.const_data_ptr());
    uint16_t *out = reinterpret_cast<uint16_t *>(y.mutable_data_ptr());
#ifdef GLM4_INT4_KERNEL
    if (y.numel()) int4_linear_rows(xs, w, sz, out, M, K, N, group);
#else
    if (y.numel()) avx2::int4_rows(xs, w, sz, out, M, K, N, group);
#endif
    return y;
#else
    TORCH_CHECK(false, "glm4::int4_linear was built without AVX-512BW and AVX-512 BF16, or AVX2 and FMA");
#endif
}

// The int4 weight as bf16 (N, K): w = (q - 8) * scale + zero in float32, rounded once, as
// quantization.Int4Linear.dequantize() then .to(bfloat16). For matmuls of many rows (prefill),
// which then run the library's bf16 GEMM: torch's int4 kernel is several times slower there, and
// the same in Python takes ten times as long as here (float32 copies of the whole weight).
at::Tensor int4_dequantize(const at::Tensor &weight, const at::Tensor &scales_and_zeros, int64_t group) {
#if defined(GLM4_INT4_KERNEL) || defined(GLM4_AVX2_KERNEL)
    TORCH_CHECK(weight.scalar_type() == at::kByte && scales_and_zeros.scalar_type() == at::kBFloat16,
                "glm4::int4_dequantize takes a uint8 weight and bfloat16 scales");
    const int64_t N = weight.size(0), K = weight.dim() == 2 ? weight.size(1) * 2 : 0;
    TORCH_CHECK(weight.dim() == 2 && group > 0 && group % 16 == 0 && K % group == 0 &&
                    scales_and_zeros.numel() == N * (K / group) * 2,
                "glm4::int4_dequantize: weight (N, K/2), scales_and_zeros (N, K/group, 2), groups of a multiple of 16");
    at::Tensor wc = weight.contiguous(), szc = scales_and_zeros.contiguous();
    at::Tensor out = at::empty({N, K}, scales_and_zeros.options());
    const uint8_t *w = wc.const_data_ptr<uint8_t>();
    const uint16_t *sz = reinterpret_cast<const uint16_t *>(szc.const_data_ptr());
    uint16_t *y = reinterpret_cast<uint16_t *>(out.mutable_data_ptr());
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#ifdef GLM4_INT4_KERNEL
        for (int64_t n = n0; n < n1; n++) int4_dequantize_row(w, sz, n, K, group, y + n * K);
#else
        for (int64_t n = n0; n < n1; n++) avx2::int4_dequantize_row(w, sz, n, K, group, y + n * K);
#endif
    });
    return out;
#else
    TORCH_CHECK(false, "glm4::int4_dequantize was built without AVX-512BW and AVX-512 BF16, or AVX2 and FMA");
#endif
}

}  // namespace

extern "C" int glm4_int4_linear_supported() {
#if defined(GLM4_INT4_KERNEL) || defined(GLM4_AVX2_KERNEL)
    return 1;
#else
    return 0;
#endif
}

TORCH_LIBRARY_IMPL(glm4, CPU, m) {
    m.impl("int4_linear", &int4_linear);
    m.impl("int4_dequantize", &int4_dequantize);
}

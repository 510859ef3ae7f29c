// A few rows of bf16 activations times glm4's weight-only int8 weight: q (N, K) int8 with one bf16
// scale per output row, y = x (q * scale)^T. The fused decode step's int8 matmuls (int8.h), as an
// op of their own: q widened to bf16 (exactly) for vdpbf16ps, and on a CPU with AMX tiles q as
// stored times x split exactly into 8-bit digits; either way a row's numbers do not depend on the
// other rows.
// Needs AVX-512BW, VL and BF16; without them, AVX2 and FMA (avx2.h: q widened to float32 for
// FMAs); built without either it only says so (glm4_int8_linear_supported() returns 0), and glm4
// keeps torch's kernel.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "avx2.h"
#include "int8.h"

namespace {

// x (..., K) bf16; weight (N, K) int8; scales (N) bf16. Returns x @ (weight * scales).T, (..., N).
at::Tensor int8_linear(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &scales) {
#if defined(GLM4_INT8_KERNEL) || defined(GLM4_AVX2_KERNEL)
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kChar &&
                    scales.scalar_type() == at::kBFloat16,
                "glm4::int8_linear takes bfloat16 x and scales, int8 weight");
    TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1) && weight.size(1) > 0 &&
                    scales.numel() == weight.size(0),
                "glm4::int8_linear: x (..., K), weight (N, K), K > 0, and N scales");
    const int64_t K = weight.size(1), N = weight.size(0), M = x.numel() / K;
    at::Tensor xc = x.contiguous(), wc = weight.contiguous(), sc = scales.contiguous();
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    at::Tensor y = at::empty(shape, x.options());
    if (y.numel() == 0) return y;
    const uint16_t *xs = reinterpret_cast<const uint16_t *>(xc.const_data_ptr());
    const uint16_t *ss = reinterpret_cast<const uint16_t *>(sc.const_data_ptr());
    uint16_t *out = reinterpret_cast<uint16_t *>(y.mutable_data_ptr());
#ifdef GLM4_INT8_KERNEL
    int8_linear_rows(xs, wc.const_data_ptr<int8_t>(), ss, out, M, K, N);
#else
    avx2::int8_rows(xs, wc.const_data_ptr<int8_t>(), ss, out, M, K, N);
#endif
    return y;
#else
    TORCH_CHECK(false, "glm4::int8_linear was built without AVX-512BW, VL and BF16, or AVX2 and FMA");
#endif
}

}  // namespace

extern "C" int glm4_int8_linear_supported() {
#if defined(GLM4_INT8_KERNEL) || defined(GLM4_AVX2_KERNEL)
    return 1;
#else
    return 0;
#endif
}

TORCH_LIBRARY_IMPL(glm4, CPU, m) { m.impl("int8_linear", &int8_linear); }

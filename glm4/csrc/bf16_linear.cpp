// A few rows of bf16 activations times a bf16 weight (N, K) as it is stored: decoding's matmuls
// at batch 1 to 8 (the server's slots, a batch given to generate) without a packed copy.
//
// Decoding at a small batch reads every weight once per step, so the product is bound by the
// weight's stream. oneDNN's bf16 GEMM wants its own blocked copy of the weight for that (on the
// plain weight it reorders the whole weight on every call), and with the copy it still runs at 2
// to 4 rows well below what either memory or arithmetic allow. Here each thread reads its rows
// once, two weight rows at a time, and multiplies each 32 columns of them with every row of x with
// vdpbf16ps (exact bf16 products, float32 sums): the two rows are half the weight apart, so that
// the thread's two streams run through different pages (two streams in one page, as adjacent rows
// of 2 KiB are, halve the rate the hardware prefetcher keeps up on the AMD development machine),
// and each line is asked for 4 KiB ahead (simd.h: the Intel one's prefetcher alone falls short).
// Needs AVX-512BW and AVX-512 BF16; without them, AVX2 and FMA (avx2.h: the weight widened to
// float32 for FMAs); built without either it only says so (glm4_bf16_linear_supported() returns
// 0), and glm4 keeps oneDNN.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "avx2.h"
#include "linear.h"

namespace {

// x (..., K) bf16; weight (N, K) bf16. Returns x @ weight.T, (..., N) bf16.
at::Tensor bf16_linear(const at::Tensor &x, const at::Tensor &weight) {
#if defined(GLM4_BF16_LINEAR_KERNEL) || defined(GLM4_AVX2_KERNEL)
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
                "glm4::bf16_linear takes bfloat16 x and weight");
    TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1) && weight.size(1) > 0,
                "glm4::bf16_linear: x (..., K) and weight (N, K), K > 0");
    const int64_t K = weight.size(1), N = weight.size(0), M = x.numel() / K;
    at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    at::Tensor y = at::empty(shape, x.options());
    if (y.numel() == 0) return y;
    const uint16_t *xs = reinterpret_cast<const uint16_t *>(xc.const_data_ptr());
    const uint16_t *w = reinterpret_cast<const uint16_t *>(wc.const_data_ptr());
    uint16_t *out = reinterpret_cast<uint16_t *>(y.mutable_data_ptr());
#ifdef GLM4_BF16_LINEAR_KERNEL
    linear_rows(xs, w, out, M, K, N);
#else
    avx2::bf16_rows(xs, w, out, M, K, N);
#endif
    return y;
#else
    TORCH_CHECK(false, "glm4::bf16_linear was built without AVX-512BW and AVX-512 BF16, or AVX2 and FMA");
#endif
}

}  // namespace

extern "C" int glm4_bf16_linear_supported() {
#if defined(GLM4_BF16_LINEAR_KERNEL) || defined(GLM4_AVX2_KERNEL)
    return 1;
#else
    return 0;
#endif
}

// Whether the linear kernels are avx2.h's (this CPU lacks AVX-512 BF16): they take fewer rows.
extern "C" int glm4_avx2() {
#ifdef GLM4_AVX2_KERNEL
    return 1;
#else
    return 0;
#endif
}

// Turn the kernels' AMX paths on (1) or off (0), or leave them (-1); returns whether they run now.
extern "C" int glm4_set_amx(int on) {
#ifdef GLM4_AMX_KERNEL
    if (on >= 0) glm4_amx::enabled = on != 0;
    return glm4_amx::on();
#else
    return 0;
#endif
}

// The rows of x from which the vector kernels ask for their weight's lines ahead (simd.h's
// asks_ahead): set it where rows > 0; returns it.
extern "C" int64_t glm4_set_prefetch_rows(int64_t rows) {
#if defined(GLM4_BF16_LINEAR_KERNEL) || defined(GLM4_AVX2_KERNEL)
    if (rows > 0) glm4_prefetch::from_rows = rows;
    return glm4_prefetch::from_rows.load();
#else
    return 0;
#endif
}

TORCH_LIBRARY_IMPL(glm4, CPU, m) { m.impl("bf16_linear", &bf16_linear); }

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
// of 2 KiB are, halve the rate the hardware prefetcher keeps up on the development machine).
// Needs AVX-512BW and AVX-512 BF16; built without them it only says so
// (glm4_bf16_linear_supported() returns 0), and glm4 keeps oneDNN.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "bf16.h"

#include <cstdint>
#include <vector>

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
        for (int j = 0; j < NB; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w[j] + k);
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

#endif  // GLM4_BF16_LINEAR_KERNEL

// x (..., K) bf16; weight (N, K) bf16. Returns x @ weight.T, (..., N) bf16.
at::Tensor bf16_linear(const at::Tensor &x, const at::Tensor &weight) {
#ifdef GLM4_BF16_LINEAR_KERNEL
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
    // Tile t holds the weight rows t and t + half (the second missing for the middle of odd N).
    const int64_t half = (N + 1) / 2;
    at::parallel_for(0, half, 16, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++) {
            const int64_t r[2] = {t, t + half};
            if (r[1] < N)
                rows_times<2>(xs, w, out, M, K, N, r);
            else
                rows_times<1>(xs, w, out, M, K, N, r);
        }
    });
    return y;
#else
    TORCH_CHECK(false, "glm4::bf16_linear was built without AVX-512BW and AVX-512 BF16");
#endif
}

}  // namespace

extern "C" int glm4_bf16_linear_supported() {
#ifdef GLM4_BF16_LINEAR_KERNEL
    return 1;
#else
    return 0;
#endif
}

TORCH_LIBRARY_IMPL(glm4, CPU, m) { m.impl("bf16_linear", &bf16_linear); }

// Decode attention on the CPU: one query per row attends over a bf16 KV cache, for every query
// head of a GQA group at once, in one pass over each key and value row.
//
// The library path (einsum on float copies, or SDPA) spends most of its time converting and
// setting up; this reads the cache as it is. Work splits over (batch row, KV head, chunk of keys);
// chunks keep their own max and sum, merged at the end as in flash decoding. Scores and the
// softmax are float32, the output is rounded to bf16 once, as the float path does.
//
// glm4/kernels.py builds this with the machine's C++ compiler (-march=native) against torch's
// headers on first use; it registers the CPU kernel of the op glm4::decode_attention, which
// kernels.py defines. It runs on AVX-512 or on AVX2 with FMA (attention.h); built without either
// it only says so (glm4_decode_attention_supported() returns 0), and glm4 keeps its float path.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "bf16.h"

#include <optional>

#include "attention.h"

namespace {

// q (B, H_q, 1, D), k and v (B, H, S, D), mask None or (B, 1, 1, S) bool: softmax(q k^T scale) v.
at::Tensor decode_attention(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                            const std::optional<at::Tensor> &mask, double scale) {
#ifdef GLM4_DECODE_ATTENTION_KERNEL
    TORCH_CHECK(q_in.scalar_type() == at::kBFloat16 && k_in.scalar_type() == at::kBFloat16 &&
                    v_in.scalar_type() == at::kBFloat16,
                "glm4::decode_attention takes bfloat16 tensors");
    TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1 && k_in.dim() == 4 && v_in.sizes() == k_in.sizes(),
                "glm4::decode_attention takes q (B, H, 1, D) and k, v (B, H_kv, S, D)");
    int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(3), H = k_in.size(1), S = k_in.size(2);
    TORCH_CHECK(D == 64 || D == 128 || D == 256, "glm4::decode_attention has no kernel for head dim ", D);
    TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D && Hq % H == 0 && S > 0, "glm4::decode_attention: shapes");
    at::Tensor q = q_in.contiguous(), k = unit_last(k_in), v = unit_last(v_in);
    at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
    at::Tensor keep;
    if (mask.has_value()) {
        keep = unit_last(mask->reshape({B, S}).to(at::kBool));
    }
    int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
    attend(reinterpret_cast<const uint16_t *>(q.const_data_ptr()), reinterpret_cast<const uint16_t *>(k.const_data_ptr()),
           reinterpret_cast<const uint16_t *>(v.const_data_ptr()),
           keep.defined() ? reinterpret_cast<const uint8_t *>(keep.const_data_ptr()) : nullptr,
           reinterpret_cast<uint16_t *>(out.mutable_data_ptr()), B, H, Hq / H, D, S, ks, vs,
           keep.defined() ? keep.stride(0) : 0, (float)scale);
    return out;
#else
    TORCH_CHECK(false, "glm4::decode_attention was built without AVX-512F or AVX2 and FMA");
#endif
}

}  // namespace

extern "C" int glm4_decode_attention_supported() {
#ifdef GLM4_DECODE_ATTENTION_KERNEL
    return 1;
#else
    return 0;
#endif
}

TORCH_LIBRARY_IMPL(glm4, CPU, m) { m.impl("decode_attention", &decode_attention); }

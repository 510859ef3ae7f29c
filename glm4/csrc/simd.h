// Helpers shared by the kernels: asking for lines ahead (any x86-64), and AVX-512 ones (under
// __AVX512F__); include after <immintrin.h>.
#pragma once

#include <atomic>
#include <cstdint>

namespace {

// Ask for the cache line PREFETCH bytes past p. The kernels stream their weights row after row (each
// thread through its own rows) and ask ahead from glm4_prefetch::from_rows rows of x on (see
// asks_ahead).
constexpr int64_t PREFETCH = 4096;

inline void prefetch_ahead(const void *p) { _mm_prefetch(static_cast<const char *>(p) + PREFETCH, _MM_HINT_T0); }

}  // namespace

namespace glm4_prefetch {
// One setting for every source file, as glm4_amx::enabled (glm4_set_prefetch_rows).
inline std::atomic<int64_t> from_rows{1};
}  // namespace glm4_prefetch

namespace {

// Whether a product of M rows of x asks for its weight's lines ahead. On an Intel Xeon, whose
// hardware prefetcher keeps a single core's stream well below what memory allows, asking reads the
// weights up to 1.9x as fast at 1 to 8 rows. On the AMD development machine (Zen 4) the prefetcher
// alone streams one row's product faster (bf16: 1.03-1.10x, and the batch-1 decode step 1.3x when
// the machine's bandwidth is high), while from 4 rows asking is 1.03-1.2x faster (kernels.py sets
// the threshold by CPU vendor).
inline bool asks_ahead(int64_t M) { return M >= glm4_prefetch::from_rows.load(std::memory_order_relaxed); }

#if defined(__AVX512BW__) && defined(__AVX512VL__)
// The 16 bf16 values at p (the lanes of m; the others 0) as float32: bf16 is a float32's top half.
inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
#endif

#ifdef __AVX512F__
// A mask of the first n of 16 lanes.
inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

// r[j] = the sum of a[j]'s lanes: four rounds of shuffles and adds, instead of 16 reductions.
inline __m512 reduce16(const __m512 *a) {
    __m512 x[8], y[4], z[2];
    for (int i = 0; i < 8; i++)
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[i], x[i + 4], 0x88), _mm512_shuffle_f32x4(x[i], x[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        z[i] = _mm512_add_ps(_mm512_unpacklo_ps(y[i], y[i + 2]), _mm512_unpackhi_ps(y[i], y[i + 2]));
    __m512 r = _mm512_add_ps(_mm512_unpacklo_ps(z[0], z[1]), _mm512_unpackhi_ps(z[0], z[1]));
    return _mm512_shuffle_f32x4(r, r, 0xD8);
}

#endif

}  // namespace

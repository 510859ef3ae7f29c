// The bandwidth meter's second reader (bench/decode.py, Meter): sums a float32 buffer on every
// thread, asking for each line 4 KiB ahead as glm4's kernels do (csrc/simd.h). On some CPUs (an
// Intel Xeon among this project's machines) a core's hardware prefetcher alone keeps its stream
// well below what memory allows, so torch's sum() under-reads the roofline and glm4's kernels
// measured above it.
#include <immintrin.h>
#include <omp.h>

#include <cstdint>

extern "C" double glm4_bench_read(const float *p, int64_t n, int threads) {
    double total = 0.0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
    for (int64_t chunk = 0; chunk < n / 4096; chunk++) {  // 16 KiB per chunk
        const float *q = p + chunk * 4096;
#ifdef __AVX512F__
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps(), c = _mm512_setzero_ps(), d = _mm512_setzero_ps();
        for (int64_t i = 0; i < 4096; i += 64) {
            for (int line = 0; line < 256; line += 64)  // the four lines read below, 4 KiB on
                _mm_prefetch(reinterpret_cast<const char *>(q + i) + 4096 + line, _MM_HINT_T0);
            a = _mm512_add_ps(a, _mm512_loadu_ps(q + i));
            b = _mm512_add_ps(b, _mm512_loadu_ps(q + i + 16));
            c = _mm512_add_ps(c, _mm512_loadu_ps(q + i + 32));
            d = _mm512_add_ps(d, _mm512_loadu_ps(q + i + 48));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
#else  // AVX: the kernels' AVX2 build (glm4/csrc/avx2.h)
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int64_t i = 0; i < 4096; i += 64) {
            for (int line = 0; line < 256; line += 64)
                _mm_prefetch(reinterpret_cast<const char *>(q + i) + 4096 + line, _MM_HINT_T0);
            for (int j = 0; j < 8; j++) a[j] = _mm256_add_ps(a[j], _mm256_loadu_ps(q + i + 8 * j));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, a[0]);
        for (int j = 1; j < 8; j++) _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_loadu_ps(lanes), a[j]));
        for (float lane : lanes) total += lane;
#endif
    }
    return total;
}

/* AVX2 NH kernel.  A 64-byte unit is two 32-byte loads: lo = words 0..7, hi = words 8..15,
 * so word j pairs with word j+8 lane-for-lane.  vpmuludq multiplies the even 32-bit
 * elements; a 32-bit right shift of both operands gives the odd ones.  The 4 partial sums
 * per lane are added at the end: addition mod 2^64 commutes, so the result equals the
 * scalar kernel's. */
#include "hash_impl.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

__attribute__((target("avx2"))) static inline uint64_t hsum256(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return (uint64_t)_mm_cvtsi128_si64(s) + (uint64_t)_mm_extract_epi64(s, 1);
}

__attribute__((target("avx2"))) void pv_stripes_avx2(const uint8_t *p, size_t ns,
                                                     const uint32_t *k, uint64_t *out,
                                                     uint64_t *orv) {
    __m256i orr = _mm256_setzero_si256();
    for (size_t s = 0; s < ns; s++) {
        const uint8_t *q = p + s * PV_STRIPE_BYTES;
        __m256i e0 = _mm256_setzero_si256(), o0 = e0, e1 = e0, o1 = e0;
        for (int u = 0; u < 16; u++) {
            __m256i lo = _mm256_loadu_si256((const __m256i *)(q + 64 * u));
            __m256i hi = _mm256_loadu_si256((const __m256i *)(q + 64 * u + 32));
            orr = _mm256_or_si256(orr, _mm256_or_si256(lo, hi));
            const uint32_t *k0 = k + 16 * u, *k1 = k0 + PV_TOEPLITZ_SHIFT;
            __m256i a = _mm256_add_epi32(lo, _mm256_loadu_si256((const __m256i *)k0));
            __m256i b = _mm256_add_epi32(hi, _mm256_loadu_si256((const __m256i *)(k0 + 8)));
            e0 = _mm256_add_epi64(e0, _mm256_mul_epu32(a, b));
            o0 = _mm256_add_epi64(o0, _mm256_mul_epu32(_mm256_srli_epi64(a, 32),
                                                       _mm256_srli_epi64(b, 32)));
            __m256i c = _mm256_add_epi32(lo, _mm256_loadu_si256((const __m256i *)k1));
            __m256i d = _mm256_add_epi32(hi, _mm256_loadu_si256((const __m256i *)(k1 + 8)));
            e1 = _mm256_add_epi64(e1, _mm256_mul_epu32(c, d));
            o1 = _mm256_add_epi64(o1, _mm256_mul_epu32(_mm256_srli_epi64(c, 32),
                                                       _mm256_srli_epi64(d, 32)));
        }
        out[2 * s] = hsum256(_mm256_add_epi64(e0, o0));
        out[2 * s + 1] = hsum256(_mm256_add_epi64(e1, o1));
    }
    __m128i t = _mm_or_si128(_mm256_castsi256_si128(orr), _mm256_extracti128_si256(orr, 1));
    *orv |= (uint64_t)_mm_cvtsi128_si64(t) | (uint64_t)_mm_extract_epi64(t, 1);
}
#else
void pv_stripes_avx2(const uint8_t *p, size_t ns, const uint32_t *k, uint64_t *out,
                     uint64_t *orv) {
    pv_stripes_scalar(p, ns, k, out, orv); /* never selected: pv_cpu_kernels() says no */
}
#endif

/* AVX-512 (F+BW) NH kernel.  Two 64-byte units A, B are processed together:
 *   X = [A.words 0..7, B.words 0..7], Y = [A.words 8..15, B.words 8..15]
 * (one vshufi64x2 each), so X and Y pair word j with word j+8 element-for-element, as in
 * the scalar kernel.  The key is laid out the same way once per call (kx/ky below), which
 * keeps the inner loop at 2 shuffles + per lane 2 adds, 2 shifts, 2 multiplies, 2 adds per
 * 128 bytes.  Sums are reduced at the end (addition mod 2^64 commutes). */
#include "hash_impl.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define T512 __attribute__((target("avx512f,avx512bw")))

T512 void pv_stripes_avx512(const uint8_t *p, size_t ns, const uint32_t *k, uint64_t *out,
                            uint64_t *orv) {
    __m512i kx[PV_LANES][8], ky[PV_LANES][8];
    for (int l = 0; l < PV_LANES; l++) {
        for (int v = 0; v < 8; v++) {
            const uint32_t *ka = k + 32 * v + PV_TOEPLITZ_SHIFT * l; /* unit 2v */
            __m512i A = _mm512_loadu_si512((const void *)ka);
            __m512i B = _mm512_loadu_si512((const void *)(ka + 16)); /* unit 2v+1 */
            kx[l][v] = _mm512_shuffle_i64x2(A, B, 0x44);
            ky[l][v] = _mm512_shuffle_i64x2(A, B, 0xEE);
        }
    }
    __m512i orr = _mm512_setzero_si512();
    for (size_t s = 0; s < ns; s++) {
        const uint8_t *q = p + s * PV_STRIPE_BYTES;
        __m512i e0 = _mm512_setzero_si512(), o0 = e0, e1 = e0, o1 = e0;
        for (int v = 0; v < 8; v++) {
            __m512i A = _mm512_loadu_si512((const void *)(q + 128 * v));
            __m512i B = _mm512_loadu_si512((const void *)(q + 128 * v + 64));
            orr = _mm512_ternarylogic_epi64(orr, A, B, 0xFE); /* orr | A | B */
            __m512i X = _mm512_shuffle_i64x2(A, B, 0x44);
            __m512i Y = _mm512_shuffle_i64x2(A, B, 0xEE);
            __m512i a = _mm512_add_epi32(X, kx[0][v]), b = _mm512_add_epi32(Y, ky[0][v]);
            e0 = _mm512_add_epi64(e0, _mm512_mul_epu32(a, b));
            o0 = _mm512_add_epi64(o0, _mm512_mul_epu32(_mm512_srli_epi64(a, 32),
                                                       _mm512_srli_epi64(b, 32)));
            __m512i c = _mm512_add_epi32(X, kx[1][v]), d = _mm512_add_epi32(Y, ky[1][v]);
            e1 = _mm512_add_epi64(e1, _mm512_mul_epu32(c, d));
            o1 = _mm512_add_epi64(o1, _mm512_mul_epu32(_mm512_srli_epi64(c, 32),
                                                       _mm512_srli_epi64(d, 32)));
        }
        out[2 * s] = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(e0, o0));
        out[2 * s + 1] = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(e1, o1));
    }
    *orv |= (uint64_t)_mm512_reduce_or_epi64(orr);
}
#else
void pv_stripes_avx512(const uint8_t *p, size_t ns, const uint32_t *k, uint64_t *out,
                       uint64_t *orv) {
    pv_stripes_scalar(p, ns, k, out, orv); /* never selected: pv_cpu_kernels() says no */
}
#endif

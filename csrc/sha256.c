/* SHA-256 with the x86 SHA extensions (SHA-NI), two messages at a time.
 *
 * Block names are SHA-256 (docs/FORMAT.md), computed for every changed block on backup and
 * for every block on restore and verify.  One sha256rnds2 stream is latency-bound; two
 * independent streams interleaved in the same loop fill the gaps: on the project's AMD EPYC
 * (2 vCPUs), 64 KiB blocks hash at 3.23 GB/s per core two at a time vs 1.78 GB/s for a
 * single-stream version of this code - no faster than hashlib/OpenSSL (1.78 GB/s;
 * bench/sha256.py, bench/RESULTS.md).  Four streams would need 32 xmm registers (16
 * without AVX-512) and spill.  A lone message runs through both streams.
 *
 * The reference is hashlib: pyvbak/native.py falls back to it where this kernel is missing,
 * and tests/test_sha256.py checks the kernel bit-identical to it.  Constants: FIPS 180-4. */
#include <string.h>

#include "pyvbak_native.h"

#if defined(__x86_64__)
#include <immintrin.h>

/* FIPS 180-4 section 4.2.2 round constants and 5.3.3 initial hash value. */
static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

#define PV_SHA_TARGET __attribute__((target("sha,sse4.1,ssse3")))

/* Two independent SHA-256 streams over nblk 64-byte blocks each; interleaved so the
 * sha256rnds2 latency of one stream hides behind the other's. */
PV_SHA_TARGET static void blocks_x2(__m128i st[4], const uint8_t *pa, const uint8_t *pb, size_t nblk) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i a0 = st[0], a1 = st[1], b0 = st[2], b1 = st[3];
    for (size_t k = 0; k < nblk; k++, pa += 64, pb += 64) {
        __m128i va[4], vb[4];
        const __m128i sa0 = a0, sa1 = a1, sb0 = b0, sb1 = b1;
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++) {
            if (g < 4) {
                va[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(pa + 16 * g)), bswap);
                vb[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(pb + 16 * g)), bswap);
            } else {
                va[g & 3] = _mm_sha256msg2_epu32(
                    _mm_add_epi32(_mm_sha256msg1_epu32(va[g & 3], va[(g + 1) & 3]),
                                  _mm_alignr_epi8(va[(g + 3) & 3], va[(g + 2) & 3], 4)),
                    va[(g + 3) & 3]);
                vb[g & 3] = _mm_sha256msg2_epu32(
                    _mm_add_epi32(_mm_sha256msg1_epu32(vb[g & 3], vb[(g + 1) & 3]),
                                  _mm_alignr_epi8(vb[(g + 3) & 3], vb[(g + 2) & 3], 4)),
                    vb[(g + 3) & 3]);
            }
            const __m128i kk = _mm_loadu_si128((const __m128i *)(K256 + 4 * g));
            __m128i ma = _mm_add_epi32(va[g & 3], kk), mb = _mm_add_epi32(vb[g & 3], kk);
            a1 = _mm_sha256rnds2_epu32(a1, a0, ma);
            b1 = _mm_sha256rnds2_epu32(b1, b0, mb);
            ma = _mm_shuffle_epi32(ma, 0x0E);
            mb = _mm_shuffle_epi32(mb, 0x0E);
            a0 = _mm_sha256rnds2_epu32(a0, a1, ma);
            b0 = _mm_sha256rnds2_epu32(b0, b1, mb);
        }
        a0 = _mm_add_epi32(a0, sa0); a1 = _mm_add_epi32(a1, sa1);
        b0 = _mm_add_epi32(b0, sb0); b1 = _mm_add_epi32(b1, sb1);
    }
    st[0] = a0; st[1] = a1; st[2] = b0; st[3] = b1;
}

/* H0..H7 <-> the (ABEF, CDGH) register pair sha256rnds2 works on. */
PV_SHA_TARGET static void state_in(__m128i st[2]) {
    __m128i abcd = _mm_loadu_si128((const __m128i *)H0), efgh = _mm_loadu_si128((const __m128i *)(H0 + 4));
    abcd = _mm_shuffle_epi32(abcd, 0xB1);
    efgh = _mm_shuffle_epi32(efgh, 0x1B);
    st[0] = _mm_alignr_epi8(abcd, efgh, 8);
    st[1] = _mm_blend_epi16(efgh, abcd, 0xF0);
}

PV_SHA_TARGET static void state_out(const __m128i st[2], uint8_t out[32]) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i feba = _mm_shuffle_epi32(st[0], 0x1B), dchg = _mm_shuffle_epi32(st[1], 0xB1);
    __m128i abcd = _mm_blend_epi16(feba, dchg, 0xF0), efgh = _mm_alignr_epi8(dchg, feba, 8);
    _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(abcd, bswap));
    _mm_storeu_si128((__m128i *)(out + 16), _mm_shuffle_epi8(efgh, bswap));
}

/* The final one or two blocks: the message tail, 0x80, zeros, 64-bit big-endian bit count. */
static size_t pad_tail(uint8_t buf[128], const uint8_t *msg, uint64_t len) {
    size_t rem = (size_t)(len & 63), n = rem < 56 ? 64 : 128;
    memset(buf, 0, n);
    if (rem)
        memcpy(buf, msg + (len - rem), rem);
    buf[rem] = 0x80;
    uint64_t bits = len << 3;
    for (int i = 0; i < 8; i++) buf[n - 1 - i] = (uint8_t)(bits >> (8 * i));
    return n / 64;
}

PV_SHA_TARGET static void sha256_x2(const uint8_t *ma, const uint8_t *mb, uint64_t len, uint8_t outa[32], uint8_t outb[32]) {
    __m128i st[4];
    uint8_t ta[128], tb[128];
    state_in(st);
    st[2] = st[0]; st[3] = st[1];
    blocks_x2(st, ma, mb, len / 64);
    size_t nt = pad_tail(ta, ma, len);
    pad_tail(tb, mb, len);
    blocks_x2(st, ta, tb, nt);
    state_out(st, outa);
    state_out(st + 2, outb);
}

int pv_sha256_available(void) {
    static int cached = -1; /* a benign race: every thread computes the same value */
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("sha") && __builtin_cpu_supports("sse4.1") &&
                 __builtin_cpu_supports("ssse3");
    }
    return cached;
}

PV_SHA_TARGET static void hash_all(const uint8_t *base, const uint8_t *const *msgs, const int64_t *offsets,
                                   const uint64_t *lens, uint64_t n, uint8_t *out) {
    uint64_t i = 0;
    while (i < n) {
        const uint8_t *a = base ? base + offsets[i] : msgs[i];
        if (i + 1 < n && lens[i + 1] == lens[i]) {
            const uint8_t *b = base ? base + offsets[i + 1] : msgs[i + 1];
            sha256_x2(a, b, lens[i], out + 32 * i, out + 32 * (i + 1));
            i += 2;
        } else {
            /* a single message: the same one in both streams costs ~12 % more than one
             * stream alone would, and it happens at most once per run of equal lengths */
            uint8_t unused[32];
            sha256_x2(a, a, lens[i], out + 32 * i, unused);
            i += 1;
        }
    }
}

int pv_sha256_many(const uint8_t *const *msgs, const uint64_t *lens, uint64_t n, uint8_t *out) {
    if (!pv_sha256_available())
        return PV_ERR_KERNEL;
    hash_all(NULL, msgs, NULL, lens, n, out);
    return PV_OK;
}

int pv_sha256_blocks(const uint8_t *base, const int64_t *offsets, const uint64_t *lens, uint64_t n,
                     uint8_t *out) {
    if (!pv_sha256_available())
        return PV_ERR_KERNEL;
    hash_all(base, NULL, offsets, lens, n, out);
    return PV_OK;
}

#else /* not x86-64: no kernel; native.py uses hashlib */

int pv_sha256_available(void) { return 0; }

int pv_sha256_many(const uint8_t *const *msgs, const uint64_t *lens, uint64_t n, uint8_t *out) {
    return PV_ERR_KERNEL;
}

int pv_sha256_blocks(const uint8_t *base, const int64_t *offsets, const uint64_t *lens, uint64_t n,
                     uint8_t *out) {
    return PV_ERR_KERNEL;
}

#endif

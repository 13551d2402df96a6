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
#include "sha256_impl.h"

#if defined(__x86_64__)
#include <immintrin.h>

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
            const __m128i kk = _mm_loadu_si128((const __m128i *)(PV_K256 + 4 * g));
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
    __m128i abcd = _mm_loadu_si128((const __m128i *)PV_H0), efgh = _mm_loadu_si128((const __m128i *)(PV_H0 + 4));
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

PV_SHA_TARGET static void sha256_x2(const uint8_t *ma, const uint8_t *mb, uint64_t len, uint8_t outa[32], uint8_t outb[32]) {
    __m128i st[4];
    uint8_t ta[128], tb[128];
    state_in(st);
    st[2] = st[0]; st[3] = st[1];
    blocks_x2(st, ma, mb, len / 64);
    size_t nt = pv_sha256_pad_tail(ta, ma, len);
    pv_sha256_pad_tail(tb, mb, len);
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

int pv_sha256_kernels(void) {
    /* PV_SHA_X16 leaves short runs to SHA-NI: it needs both; PV_SHA_X16_ALONE is what a
     * CPU with AVX-512 but without SHA-NI (Skylake-SP, Cascade Lake) gets */
    if (!pv_sha256_available())
        return pv_sha256_x16_available() ? 1 << PV_SHA_X16_ALONE : 0;
    return (1 << PV_SHA_NI) | (pv_sha256_x16_available() ? 1 << PV_SHA_X16 | 1 << PV_SHA_X16_ALONE : 0);
}

PV_SHA_TARGET static void hash_pairs(const uint8_t *base, const uint8_t *const *msgs, const int64_t *offsets,
                                     const uint64_t *lens, uint64_t i, uint64_t end, uint8_t *out) {
    while (i < end) {
        const uint8_t *a = base ? base + offsets[i] : msgs[i];
        if (i + 1 < end && lens[i + 1] == lens[i]) {
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

static void hash_lanes(const uint8_t *base, const uint8_t *const *msgs, const int64_t *offsets, uint64_t len,
                       uint64_t i, uint64_t count, uint8_t *out) {
    const uint8_t *m[PV_SHA_LANES];
    uint8_t *o[PV_SHA_LANES];
    for (uint64_t lane = 0; lane < PV_SHA_LANES; lane++) {
        uint64_t k = i + (lane < count ? lane : 0);
        m[lane] = base ? base + offsets[k] : msgs[k];
        o[lane] = lane < count ? out + 32 * (i + lane) : NULL;
    }
    pv_sha256_x16(m, len, o);
}

static void hash_all(const uint8_t *base, const uint8_t *const *msgs, const int64_t *offsets,
                     const uint64_t *lens, uint64_t n, uint8_t *out, int kernel) {
    if (kernel == PV_SHA_NI) {
        hash_pairs(base, msgs, offsets, lens, 0, n, out);
        return;
    }
    /* the lanes; without SHA-NI (PV_SHA_X16_ALONE) short runs take them too, spare lanes
     * and all: native.py hands calls of fewer than 9 messages to hashlib instead */
    const uint64_t min_run = kernel == PV_SHA_X16 ? PV_X16_MIN_RUN : 1;
    uint64_t i = 0;
    while (i < n) {
        uint64_t end = i + 1;
        while (end < n && lens[end] == lens[i]) end++;
        while (end - i >= min_run) {
            uint64_t count = end - i < PV_SHA_LANES ? end - i : PV_SHA_LANES;
            hash_lanes(base, msgs, offsets, lens[i], i, count, out);
            i += count;
        }
        if (i < end)
            hash_pairs(base, msgs, offsets, lens, i, end, out);
        i = end;
    }
}

static int known_kernel(int kernel) {
    return (kernel == PV_SHA_NI || kernel == PV_SHA_X16 || kernel == PV_SHA_X16_ALONE) &&
           (pv_sha256_kernels() >> kernel & 1);
}

int pv_sha256_many(const uint8_t *const *msgs, const uint64_t *lens, uint64_t n, uint8_t *out, int kernel) {
    if (!known_kernel(kernel))
        return PV_ERR_KERNEL;
    hash_all(NULL, msgs, NULL, lens, n, out, kernel);
    return PV_OK;
}

int pv_sha256_blocks(const uint8_t *base, const int64_t *offsets, const uint64_t *lens, uint64_t n,
                     uint8_t *out, int kernel) {
    if (!known_kernel(kernel))
        return PV_ERR_KERNEL;
    hash_all(base, NULL, offsets, lens, n, out, kernel);
    return PV_OK;
}

#else /* not x86-64: no kernel; native.py uses hashlib */

int pv_sha256_available(void) { return 0; }

int pv_sha256_kernels(void) { return 0; }

int pv_sha256_many(const uint8_t *const *msgs, const uint64_t *lens, uint64_t n, uint8_t *out, int kernel) {
    return PV_ERR_KERNEL;
}

int pv_sha256_blocks(const uint8_t *base, const int64_t *offsets, const uint64_t *lens, uint64_t n,
                     uint8_t *out, int kernel) {
    return PV_ERR_KERNEL;
}

#endif

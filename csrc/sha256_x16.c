/* SHA-256 of 16 equal-length messages at once, one per 32-bit lane of AVX-512 registers.
 *
 * The SHA-NI kernel (sha256.c) runs two messages through the dedicated rounds instruction;
 * here the plain FIPS 180-4 rounds run on 16 messages side by side, each step one vector
 * instruction for all 16: rotations are single instructions (vprord), and each of the
 * three-input functions (Ch, Maj, the XOR of three rotations) is one vpternlogd.  On the
 * project's Intel Xeon (2 vCPUs, session 20) 64 KiB blocks hash at 3.8 GB/s per core this way
 * against 2.0 GB/s for the SHA-NI pair (bench/sha256.py, bench/RESULTS.md "SHA-256 of
 * blocks").  On a CPU that splits 512-bit work in two halves it may lose to SHA-NI: native.py
 * measures both once per process and uses the faster.
 *
 * Each 64-byte block of the 16 messages is loaded as 16 rows of 16 words and transposed so
 * that register j holds word j of every message; the state registers hold one of A..H for
 * every message.  The reference is hashlib (tests/test_sha256.py, every padding boundary). */
#include "pyvbak_native.h"
#include "sha256_impl.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define PV_X16_TARGET __attribute__((target("avx512f,avx512bw")))

typedef __m512i vec;
#define ROR(x, n) _mm512_ror_epi32((x), (n))
#define ADD(a, b) _mm512_add_epi32((a), (b))
#define XOR3(a, b, c) _mm512_ternarylogic_epi32((a), (b), (c), 0x96) /* a ^ b ^ c */
#define CH(e, f, g) _mm512_ternarylogic_epi32((e), (f), (g), 0xCA)   /* e ? f : g */
#define MAJ(a, b, c) _mm512_ternarylogic_epi32((a), (b), (c), 0xE8)  /* majority */

/* r[i] = the 16 words of message i -> r[j] = word j of messages 0..15. */
PV_X16_TARGET static void transpose16(vec r[16]) {
    vec t[16];
    for (int i = 0; i < 16; i += 2) { /* pairs of rows interleaved by word */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* then by 64-bit pair: 4x4 blocks done per 128 bits */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) { /* then the 128-bit quarters, in two rounds */
        t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xDD);
        t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xDD);
        r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
        r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xDD);
    }
}

/* One 64-byte block at byte off of each of the 16 messages into the state st (A..H). */
PV_X16_TARGET static void compress16(vec st[8], const uint8_t *const m[16], uint64_t off) {
    const vec bswap = _mm512_set4_epi32(0x0c0d0e0f, 0x08090a0b, 0x04050607, 0x00010203);
    vec w[16];
    for (int i = 0; i < 16; i++) w[i] = _mm512_loadu_si512((const void *)(m[i] + off));
    transpose16(w);
    for (int i = 0; i < 16; i++) w[i] = _mm512_shuffle_epi8(w[i], bswap); /* words are big-endian */
    vec a = st[0], b = st[1], c = st[2], d = st[3], e = st[4], f = st[5], g = st[6], h = st[7];
#pragma GCC unroll 64
    for (int r = 0; r < 64; r++) {
        vec wr;
        if (r < 16) {
            wr = w[r];
        } else { /* the message schedule, kept as a ring of the last 16 words */
            vec w15 = w[(r - 15) & 15], w2 = w[(r - 2) & 15];
            vec s0 = XOR3(ROR(w15, 7), ROR(w15, 18), _mm512_srli_epi32(w15, 3));
            vec s1 = XOR3(ROR(w2, 17), ROR(w2, 19), _mm512_srli_epi32(w2, 10));
            wr = w[r & 15] = ADD(ADD(w[r & 15], s0), ADD(w[(r - 7) & 15], s1));
        }
        vec t1 = ADD(ADD(h, XOR3(ROR(e, 6), ROR(e, 11), ROR(e, 25))),
                     ADD(CH(e, f, g), ADD(wr, _mm512_set1_epi32((int)PV_K256[r]))));
        vec t2 = ADD(XOR3(ROR(a, 2), ROR(a, 13), ROR(a, 22)), MAJ(a, b, c));
        h = g; g = f; f = e; e = ADD(d, t1);
        d = c; c = b; b = a; a = ADD(t1, t2);
    }
    st[0] = ADD(st[0], a); st[1] = ADD(st[1], b); st[2] = ADD(st[2], c); st[3] = ADD(st[3], d);
    st[4] = ADD(st[4], e); st[5] = ADD(st[5], f); st[6] = ADD(st[6], g); st[7] = ADD(st[7], h);
}

PV_X16_TARGET void pv_sha256_x16(const uint8_t *const msgs[PV_SHA_LANES], uint64_t len,
                                 uint8_t *const out[PV_SHA_LANES]) {
    vec st[8];
    for (int i = 0; i < 8; i++) st[i] = _mm512_set1_epi32((int)PV_H0[i]);
    for (uint64_t k = 0, full = len / 64; k < full; k++) compress16(st, msgs, 64 * k);
    uint8_t tails[PV_SHA_LANES][128];
    const uint8_t *tail[PV_SHA_LANES];
    size_t nt = 0;
    for (int i = 0; i < PV_SHA_LANES; i++) { /* every lane has the same length: the same nt */
        nt = pv_sha256_pad_tail(tails[i], msgs[i], len);
        tail[i] = tails[i];
    }
    for (size_t k = 0; k < nt; k++) compress16(st, tail, 64 * k);
    uint32_t words[8][PV_SHA_LANES];
    for (int i = 0; i < 8; i++) _mm512_storeu_si512((void *)words[i], st[i]);
    for (int lane = 0; lane < PV_SHA_LANES; lane++) {
        if (!out[lane])
            continue;
        for (int i = 0; i < 8; i++) { /* the digest is H0..H7, each big-endian */
            uint32_t v = words[i][lane];
            out[lane][4 * i] = (uint8_t)(v >> 24);
            out[lane][4 * i + 1] = (uint8_t)(v >> 16);
            out[lane][4 * i + 2] = (uint8_t)(v >> 8);
            out[lane][4 * i + 3] = (uint8_t)v;
        }
    }
}

int pv_sha256_x16_available(void) {
    static int cached = -1; /* a benign race: every thread computes the same value */
    if (cached < 0) {
        __builtin_cpu_init(); /* libgcc's avx512 bits include the OS's zmm state (XCR0) */
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    }
    return cached;
}

#else /* not x86-64 */

int pv_sha256_x16_available(void) { return 0; }

void pv_sha256_x16(const uint8_t *const msgs[PV_SHA_LANES], uint64_t len, uint8_t *const out[PV_SHA_LANES]) {}

#endif

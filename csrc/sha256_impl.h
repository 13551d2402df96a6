/* Internal to the native module: what the SHA-256 kernels (sha256.c, sha256_x16.c) share. */
#ifndef PYVBAK_SHA256_IMPL_H
#define PYVBAK_SHA256_IMPL_H

#include <stdint.h>
#include <string.h>

/* FIPS 180-4 section 4.2.2 round constants and 5.3.3 initial hash value. */
static const uint32_t PV_K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
static const uint32_t PV_H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                  0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

/* The final one or two 64-byte blocks of a message of len bytes: its tail, 0x80, zeros,
 * then the 64-bit big-endian bit count (FIPS 180-4 section 5.1.1).  Returns how many. */
static inline size_t pv_sha256_pad_tail(uint8_t buf[128], const uint8_t *msg, uint64_t len) {
    size_t rem = (size_t)(len & 63), n = rem < 56 ? 64 : 128;
    memset(buf, 0, n);
    if (rem)
        memcpy(buf, msg + (len - rem), rem);
    buf[rem] = 0x80;
    uint64_t bits = len << 3;
    for (int i = 0; i < 8; i++) buf[n - 1 - i] = (uint8_t)(bits >> (8 * i));
    return n / 64;
}

#define PV_SHA_LANES 16
/* 1 if the 16-lane kernel runs here (AVX-512 F and BW, with the OS saving zmm state). */
int pv_sha256_x16_available(void);
/* SHA-256 of 16 messages of len bytes each, msgs[i] -> out[i] (32 bytes).  A lane may repeat
 * another's message; out[i] NULL drops that lane's digest. */
void pv_sha256_x16(const uint8_t *const msgs[PV_SHA_LANES], uint64_t len, uint8_t *const out[PV_SHA_LANES]);

#endif

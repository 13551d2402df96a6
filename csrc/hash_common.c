/* Block hashing shared by all kernels: NH lane values -> polynomial over GF(2^61-1) ->
 * length -> keyed bijective mixer.  Kernel dispatch.  See docs/HASH.md. */
#include "hash_impl.h"
#include "pyvbak_native.h"

#define BATCH 64 /* stripes per kernel call: 64 KiB of data, 1 KiB of NH outputs on stack */

int pv_cpu_kernels(void) {
    int m = 1 << PV_KERNEL_SCALAR;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    /* libgcc's cpu model also checks that the OS saves the YMM/ZMM state (XGETBV). */
    if (__builtin_cpu_supports("avx2"))
        m |= 1 << PV_KERNEL_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        m |= 1 << PV_KERNEL_AVX512;
#endif
    return m;
}

pv_stripes_fn pv_kernel_fn(int kernel) {
    if (kernel < 0 || kernel > PV_KERNEL_AVX512 || !(pv_cpu_kernels() & (1 << kernel)))
        return NULL;
    switch (kernel) {
    case PV_KERNEL_AVX2:
        return pv_stripes_avx2;
    case PV_KERNEL_AVX512:
        return pv_stripes_avx512;
    default:
        return pv_stripes_scalar;
    }
}

void pv_key_load(pv_key *k, const uint8_t *ktab) {
    for (int i = 0; i < PV_NH_KEY_WORDS; i++)
        k->nh[i] = pv_le32(ktab + 4 * i);
    const uint8_t *t = ktab + 4 * PV_NH_KEY_WORDS;
    for (int l = 0; l < PV_LANES; l++) {
        k->r[l] = pv_le64(t + 8 * l) & PV_P61; /* uniform on [0, 2^61-1]; see HASH.md */
        if (k->r[l] == PV_P61)
            k->r[l] = 0;
        k->fin[l] = pv_le64(t + 8 * PV_LANES + 8 * l);
    }
}

/* a, b < p  ->  a*b mod p, fully reduced. */
static inline uint64_t mulmod61(uint64_t a, uint64_t b) {
    unsigned __int128 x = (unsigned __int128)a * b;
    uint64_t s = ((uint64_t)x & PV_P61) + (uint64_t)(x >> 61);
    s = (s & PV_P61) + (s >> 61);
    return s >= PV_P61 ? s - PV_P61 : s;
}

/* h < p, c < 2^32  ->  h*r + c mod p. */
static inline uint64_t horner(uint64_t h, uint64_t r, uint64_t c) {
    h = mulmod61(h, r) + c;
    return h >= PV_P61 ? h - PV_P61 : h;
}

/* Bijective 64-bit mixer (xorshift / odd multiply rounds; each step is invertible). */
static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 32;
    x *= UINT64_C(0xd6e8feb86659fd93);
    x ^= x >> 32;
    x *= UINT64_C(0xd6e8feb86659fd93);
    x ^= x >> 32;
    return x;
}

/* Hash len bytes; returns 1 (and out = 0,0) if they are all zero. */
static int hash_one(const uint8_t *p, uint64_t len, const pv_key *k, pv_stripes_fn fn,
                    uint64_t out[2]) {
    uint64_t h[PV_LANES] = {1, 1};
    uint64_t nh[2 * BATCH];
    uint64_t orv = 0;
    uint64_t full = len / PV_STRIPE_BYTES;
    while (full) {
        size_t n = full < BATCH ? (size_t)full : BATCH;
        fn(p, n, k->nh, nh, &orv);
        for (size_t s = 0; s < n; s++)
            for (int l = 0; l < PV_LANES; l++) {
                uint64_t v = nh[2 * s + l];
                h[l] = horner(horner(h[l], k->r[l], v & 0xffffffffu), k->r[l], v >> 32);
            }
        p += n * PV_STRIPE_BYTES;
        full -= n;
    }
    size_t rem = (size_t)(len % PV_STRIPE_BYTES);
    if (rem) { /* partial last stripe: zero-padded; the length below tells it apart */
        uint8_t pad[PV_STRIPE_BYTES] __attribute__((aligned(64)));
        memset(pad + rem, 0, sizeof pad - rem);
        memcpy(pad, p, rem);
        fn(pad, 1, k->nh, nh, &orv);
        for (int l = 0; l < PV_LANES; l++) {
            uint64_t v = nh[l];
            h[l] = horner(horner(h[l], k->r[l], v & 0xffffffffu), k->r[l], v >> 32);
        }
    }
    if (orv == 0) {
        out[0] = out[1] = 0;
        return 1;
    }
    for (int l = 0; l < PV_LANES; l++) {
        uint64_t v = horner(horner(h[l], k->r[l], len & 0xffffffffu), k->r[l], len >> 32);
        out[l] = mix64(v + k->fin[l]);
    }
    return 0;
}

void pv_scan_loaded(const uint8_t *buf, uint64_t len, uint32_t block_size, const pv_key *k,
                    pv_stripes_fn fn, uint8_t *zero_out, uint64_t *hash_out) {
    uint64_t n = (len + block_size - 1) / block_size;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t off = i * block_size;
        uint64_t bl = len - off < block_size ? len - off : block_size;
        zero_out[i] = (uint8_t)hash_one(buf + off, bl, k, fn, hash_out + 2 * i);
    }
}

int pv_scan_buffer(const uint8_t *buf, uint64_t len, uint32_t block_size, const uint8_t *ktab,
                   int kernel, uint8_t *zero_out, uint64_t *hash_out) {
    pv_stripes_fn fn = pv_kernel_fn(kernel);
    if (!fn)
        return PV_ERR_KERNEL;
    if (block_size == 0 || (block_size % PV_STRIPE_BYTES) != 0)
        return PV_ERR_ARG;
    pv_key k;
    pv_key_load(&k, ktab);
    pv_scan_loaded(buf, len, block_size, &k, fn, zero_out, hash_out);
    return PV_OK;
}

int pv_hash_block(const uint8_t *buf, uint64_t len, const uint8_t *ktab, int kernel,
                  uint8_t *out) {
    pv_stripes_fn fn = pv_kernel_fn(kernel);
    if (!fn)
        return PV_ERR_KERNEL;
    pv_key k;
    pv_key_load(&k, ktab);
    uint64_t h[2];
    int z = hash_one(buf, len, &k, fn, h);
    for (int l = 0; l < 2; l++)
        for (int b = 0; b < 8; b++)
            out[8 * l + b] = (uint8_t)(h[l] >> (8 * b));
    return z;
}

/* Internal to the native module: key layout, kernel entry points, shared helpers. */
#ifndef PYVBAK_HASH_IMPL_H
#define PYVBAK_HASH_IMPL_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define PV_STRIPE_BYTES 1024
#define PV_STRIPE_WORDS 256
#define PV_LANES 2
#define PV_TOEPLITZ_SHIFT 16 /* words: one 64-byte unit, so pair (u,j) -> pair (u+1,j) */
#define PV_NH_KEY_WORDS (PV_STRIPE_WORDS + PV_TOEPLITZ_SHIFT * (PV_LANES - 1))
#define PV_P61 ((UINT64_C(1) << 61) - 1)

typedef struct {
    uint32_t nh[PV_NH_KEY_WORDS];
    uint64_t r[PV_LANES];
    uint64_t fin[PV_LANES];
} pv_key;

/* A stripe kernel: for each of ns full 1 KiB stripes at p, writes the two 64-bit NH lane
 * values to out[2s], out[2s+1] and ORs every data bit into *orv (zero detection).
 * All kernels must be bit-identical to pv_stripes_scalar. */
typedef void (*pv_stripes_fn)(const uint8_t *p, size_t ns, const uint32_t *nhkey,
                              uint64_t *out, uint64_t *orv);

void pv_stripes_scalar(const uint8_t *p, size_t ns, const uint32_t *nhkey, uint64_t *out,
                       uint64_t *orv);
void pv_stripes_avx2(const uint8_t *p, size_t ns, const uint32_t *nhkey, uint64_t *out,
                     uint64_t *orv);
void pv_stripes_avx512(const uint8_t *p, size_t ns, const uint32_t *nhkey, uint64_t *out,
                       uint64_t *orv);

/* Returns the stripe function for a kernel id, or NULL if unknown/unsupported. */
pv_stripes_fn pv_kernel_fn(int kernel);
void pv_key_load(pv_key *k, const uint8_t *ktab);
/* Scan a buffer with an already-loaded key (used by scan.c per window). */
void pv_scan_loaded(const uint8_t *buf, uint64_t len, uint32_t block_size, const pv_key *k,
                    pv_stripes_fn fn, uint8_t *zero_out, uint64_t *hash_out);

static inline uint32_t pv_le32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t pv_le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

#endif

/* Portable reference NH kernel (see docs/HASH.md).  Every SIMD kernel must match it bit
 * for bit; tests/test_native.py checks that on random and adversarial inputs. */
#include "hash_impl.h"

void pv_stripes_scalar(const uint8_t *p, size_t ns, const uint32_t *k, uint64_t *out,
                       uint64_t *orv) {
    uint64_t o = 0;
    for (size_t s = 0; s < ns; s++) {
        const uint8_t *q = p + s * PV_STRIPE_BYTES;
        uint64_t a0 = 0, a1 = 0;
        for (int u = 0; u < 16; u++) {
            uint32_t m[16];
            for (int j = 0; j < 16; j++) {
                m[j] = pv_le32(q + 64 * u + 4 * j);
                o |= m[j];
            }
            const uint32_t *k0 = k + 16 * u;
            const uint32_t *k1 = k0 + PV_TOEPLITZ_SHIFT;
            for (int j = 0; j < 8; j++) {
                a0 += (uint64_t)(uint32_t)(m[j] + k0[j]) * (uint32_t)(m[j + 8] + k0[j + 8]);
                a1 += (uint64_t)(uint32_t)(m[j] + k1[j]) * (uint32_t)(m[j + 8] + k1[j + 8]);
            }
        }
        out[2 * s] = a0;
        out[2 * s + 1] = a1;
    }
    *orv |= o;
}

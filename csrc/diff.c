/* Changed-block diff between two scans (no per-block Python). */
#include "pyvbak_native.h"

int64_t pv_changed_blocks(const uint8_t *oz, const uint64_t *oh, uint64_t on,
                          const uint8_t *nz, const uint64_t *nh, uint64_t nn, int64_t *out) {
    int64_t c = 0;
    uint64_t common = on < nn ? on : nn;
    for (uint64_t i = 0; i < common; i++) {
        /* Hashes only matter when both blocks are non-zero; a non-zero block's hash covers
         * its length, so a grown/shrunk partial tail block shows up as changed. */
        if ((oz[i] != nz[i]) ||
            (!nz[i] && ((oh[2 * i] != nh[2 * i]) | (oh[2 * i + 1] != nh[2 * i + 1]))))
            out[c++] = (int64_t)i;
    }
    for (uint64_t i = common; i < nn; i++)
        out[c++] = (int64_t)i;
    return c;
}

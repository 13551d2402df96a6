/* Back-to-back copy of many buffers into one, outside the GIL.
 *
 * The local backend stages each ~16 MiB pack (thousands of zstd frames) in a page-aligned
 * buffer for its O_DIRECT write.  Done as Python slice assignments the copy held the GIL
 * while the compression workers needed it; here it is one call per staging buffer. */
#include <stdint.h>
#include <string.h>

#include "pyvbak_native.h"

/* Returns the bytes copied, or UINT64_MAX (nothing copied) when a source overlaps the
 * destination bytes to be written: memcpy of overlapping ranges is undefined.  Checked
 * here rather than in Python, where it cost ~1 us per source (a pack has thousands). */
uint64_t pv_gather(uint8_t *dst, const uint8_t *const *srcs, const uint64_t *lens, uint64_t n) {
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) total += lens[i];
    uintptr_t d0 = (uintptr_t)dst, d1 = d0 + (uintptr_t)total;
    for (uint64_t i = 0; i < n; i++) {
        uintptr_t s0 = (uintptr_t)srcs[i];
        if (lens[i] && s0 < d1 && d0 < s0 + (uintptr_t)lens[i]) return UINT64_MAX;
    }
    uint64_t pos = 0;
    for (uint64_t i = 0; i < n; i++) {
        memcpy(dst + pos, srcs[i], lens[i]);
        pos += lens[i];
    }
    return pos;
}

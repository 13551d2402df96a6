/* Back-to-back copy of many buffers into one, outside the GIL.
 *
 * The local backend stages each ~16 MiB pack (thousands of zstd frames) in a page-aligned
 * buffer for its O_DIRECT write.  Done as Python slice assignments the copy held the GIL
 * while the compression workers needed it; here it is one call per staging buffer. */
#include <string.h>

#include "pyvbak_native.h"

uint64_t pv_gather(uint8_t *dst, const uint8_t *const *srcs, const uint64_t *lens, uint64_t n) {
    uint64_t pos = 0;
    for (uint64_t i = 0; i < n; i++) {
        memcpy(dst + pos, srcs[i], lens[i]);
        pos += lens[i];
    }
    return pos;
}

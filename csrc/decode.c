/* Decode-and-check of stored blocks for restore and verify, outside the GIL.
 *
 * Each stored block is one zstd frame named by the SHA-256 of its content (docs/FORMAT.md).
 * pyvbak/repo/reader.py's reference path decompresses a frame with python-zstandard into a
 * new bytes object, hashes it in a second call and the restore copies it into its O_DIRECT
 * staging buffer under the GIL.  Here the frames of one pack range are decompressed
 * straight into their destination and hashed there while still in cache, in one call: on
 * this project's 2-core VM the restore of the 2 GiB bench image spent ~0.5 s beyond its
 * decode work on that copy and per-block Python (bench/RESULTS.md, "Restore decode kernel").
 *
 * libzstd is the reference zstd library; it is loaded at run time (dlopen of the
 * distribution's libzstd.so.1, which the zstd tool restore.sh needs links against), so
 * building pyvbak needs no zstd headers and a machine without the library still runs the
 * reference path.  The decisions match the reference path exactly (tests/test_decode.py):
 *   - a frame holding its content as one raw block of exactly ulen bytes is copied as is
 *     (no XXH64: the SHA-256 covers it), as reader.raw_frame_content does;
 *   - any other frame must declare a content size equal to ulen and decode to it; bytes
 *     after the frame are ignored, as python-zstandard's decompress() ignores them;
 *   - the SHA-256 of the content must equal the block's name.
 * "Exactly" holds as far as the two zstd libraries agree: python-zstandard bundles its own
 * zstd, and releases differ on frames no encoder writes (zstd 1.5.7 refuses a set reserved
 * bit in a sequences section's Symbol_Compression_Modes byte, the 1.5.4 of Debian 12 decodes
 * it).  Such a difference can only refuse a block or accept one that is exactly the original
 * (the SHA-256 is checked either way); tests/test_decode.py allows it where the libraries
 * themselves disagree.  restore.sh's zstd tool uses the same libzstd.so.1 as this kernel. */
#include <dlfcn.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>

#include "pyvbak_native.h"
#include "sha256_impl.h"

#define ZSTD_CONTENTSIZE_UNKNOWN (0ULL - 1)
#define ZSTD_CONTENTSIZE_ERROR (0ULL - 2)

/* Z.state: 0 not tried, 2 loading, 1 loaded, -1 unavailable.  Read with acquire (the
 * function pointers and version are written before the release store of 1). */
static struct {
    int state;
    unsigned version;
    void *(*create_dctx)(void);
    size_t (*free_dctx)(void *);
    size_t (*decompress_dctx)(void *, void *, size_t, const void *, size_t);
    unsigned (*is_error)(size_t);
    unsigned long long (*content_size)(const void *, size_t);
    size_t (*frame_size)(const void *, size_t);
} Z;

/* Oldest libzstd whose ZSTD_findFrameCompressedSize/ZSTD_getFrameContentSize are stable. */
#define PV_ZSTD_MIN_VERSION 10400

static int loaded(void) { return __atomic_load_n(&Z.state, __ATOMIC_ACQUIRE) == 1; }

static int load_library(void) {
    void *h = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return -1;
    unsigned (*version)(void) = (unsigned (*)(void))dlsym(h, "ZSTD_versionNumber");
    *(void **)&Z.create_dctx = dlsym(h, "ZSTD_createDCtx");
    *(void **)&Z.free_dctx = dlsym(h, "ZSTD_freeDCtx");
    *(void **)&Z.decompress_dctx = dlsym(h, "ZSTD_decompressDCtx");
    *(void **)&Z.is_error = dlsym(h, "ZSTD_isError");
    *(void **)&Z.content_size = dlsym(h, "ZSTD_getFrameContentSize");
    *(void **)&Z.frame_size = dlsym(h, "ZSTD_findFrameCompressedSize");
    if (!version || !Z.create_dctx || !Z.free_dctx || !Z.decompress_dctx || !Z.is_error || !Z.content_size ||
        !Z.frame_size || version() < PV_ZSTD_MIN_VERSION) {
        dlclose(h);
        return -1;
    }
    Z.version = version();
    return 1;
}

unsigned pv_zstd_load(void) {
    /* cffi releases the GIL around every call, so threads may get here at once: one loads,
     * the others wait for its answer (a caller must never see "unavailable" because
     * another thread is still loading). */
    int expected = 0;
    if (__atomic_compare_exchange_n(&Z.state, &expected, 2, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        __atomic_store_n(&Z.state, load_library(), __ATOMIC_RELEASE);
    int state;
    while ((state = __atomic_load_n(&Z.state, __ATOMIC_ACQUIRE)) == 2)
        sched_yield();
    return state == 1 ? Z.version : 0;
}

void *pv_zstd_dctx_new(void) { return loaded() ? Z.create_dctx() : NULL; }

void pv_zstd_dctx_free(void *dctx) {
    if (loaded() && dctx)
        Z.free_dctx(dctx);
}

/* The content of a frame that is one last Raw_Block of exactly ulen bytes (RFC 8878,
 * 3.1.1), or NULL: reader.raw_frame_content, byte for byte. */
static const uint8_t *raw_content(const uint8_t *f, uint64_t len, uint64_t ulen) {
    static const uint8_t dict_id_bytes[4] = {0, 1, 2, 4};
    static const uint8_t fcs_bytes[4] = {0, 2, 4, 8};
    if (len < ulen + 8 || f[0] != 0x28 || f[1] != 0xb5 || f[2] != 0x2f || f[3] != 0xfd)
        return NULL;
    uint8_t fhd = f[4];
    if (fhd & 0x08)
        return NULL;
    unsigned single = (fhd >> 5) & 1;
    unsigned fcs = fcs_bytes[fhd >> 6] ? fcs_bytes[fhd >> 6] : single;
    uint64_t pos = 5 + (single ? 0 : 1) + dict_id_bytes[fhd & 3] + fcs;
    if (pos + 3 > len)
        return NULL;
    uint32_t bh = f[pos] | ((uint32_t)f[pos + 1] << 8) | ((uint32_t)f[pos + 2] << 16);
    uint64_t end = pos + 3 + (bh >> 3);
    if (!(bh & 1) || ((bh >> 1) & 3) != 0 || (bh >> 3) != ulen || end + ((fhd & 0x04) ? 4 : 0) != len)
        return NULL;
    return f + pos + 3;
}

static uint8_t decode_one(void *dctx, const uint8_t *frame, uint64_t len, uint8_t *dst, uint64_t ulen) {
    const uint8_t *raw = raw_content(frame, len, ulen);
    if (raw) {
        memcpy(dst, raw, ulen);
        return PV_DECODE_OK;
    }
    unsigned long long fcs = Z.content_size(frame, len);
    if (fcs == ZSTD_CONTENTSIZE_ERROR || fcs == ZSTD_CONTENTSIZE_UNKNOWN)
        return PV_DECODE_CORRUPT;
    if (fcs != ulen)
        return PV_DECODE_MISMATCH;
    size_t fsz = Z.frame_size(frame, len);
    if (Z.is_error(fsz))
        return PV_DECODE_CORRUPT;
    size_t got = Z.decompress_dctx(dctx, dst, ulen, frame, fsz);
    if (Z.is_error(got))
        return PV_DECODE_CORRUPT;
    return got == ulen ? PV_DECODE_OK : PV_DECODE_MISMATCH;
}

int64_t pv_decode_blocks(void *dctx, const uint8_t *src, const int64_t *src_off, const uint64_t *src_len,
                         uint8_t *dst, const int64_t *dst_off, const uint64_t *ulen, const uint8_t *digests,
                         uint64_t n, uint8_t *status, int sha_kernel) {
    /* PV_SHA_X16_ALONE: the lanes on a CPU with AVX-512 and no SHA extensions (Xeons
     * before Ice Lake), where a group short of sixteen takes the lanes too */
    if (!loaded() || !dctx ||
        (sha_kernel != PV_SHA_NI && sha_kernel != PV_SHA_X16 && sha_kernel != PV_SHA_X16_ALONE) ||
        !(pv_sha256_kernels() >> sha_kernel & 1))
        return PV_ERR_KERNEL;
    int64_t good = 0;
    /* A group at a time, hashed in one call while the group is still in cache from its
     * decompression: two blocks for the SHA-NI pairs, sixteen for the AVX-512 lanes
     * (sha256.c; 16 blocks of 64 KiB are 1 MiB, within a core's L2 here). */
    const uint64_t group = sha_kernel == PV_SHA_NI ? 2 : PV_SHA_LANES;
    for (uint64_t i = 0; i < n; i += group) {
        uint64_t m = n - i < group ? n - i : group;
        const uint8_t *msgs[PV_SHA_LANES];
        uint64_t lens[PV_SHA_LANES];
        uint64_t idx[PV_SHA_LANES];
        uint64_t k = 0;
        for (uint64_t j = i; j < i + m; j++) {
            status[j] = decode_one(dctx, src + src_off[j], src_len[j], dst + dst_off[j], ulen[j]);
            if (status[j] == PV_DECODE_OK) {
                msgs[k] = dst + dst_off[j];
                lens[k] = ulen[j];
                idx[k++] = j;
            }
        }
        uint8_t out[32 * PV_SHA_LANES];
        if (k && pv_sha256_many(msgs, lens, k, out, sha_kernel) != PV_OK)
            return PV_ERR_KERNEL; /* not reached: the kernel was checked above */
        for (uint64_t t = 0; t < k; t++) {
            if (memcmp(out + 32 * t, digests + 32 * idx[t], 32) != 0)
                status[idx[t]] = PV_DECODE_MISMATCH;
            else
                good++;
        }
    }
    return good;
}

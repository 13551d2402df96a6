/* pyvbak native delta-engine scanner: public C interface.
 *
 * Everything here is called from pyvbak/native.py through cffi (out-of-line API mode);
 * the same declarations are repeated, without preprocessor logic, in native_cdef.h.
 * See docs/HASH.md for the hash construction and its collision bound.
 */
#ifndef PYVBAK_NATIVE_H
#define PYVBAK_NATIVE_H

#include <stdint.h>
#include <stddef.h>

/* Expanded key table (made from the 16-byte repository key by native.py):
 *   bytes [0, 1088)    272 little-endian uint32 NH key words (256 + 16 for the Toeplitz shift)
 *   bytes [1088, 1104) 2 little-endian uint64 polynomial points r_0, r_1 (masked to 61 bits)
 *   bytes [1104, 1120) 2 little-endian uint64 finalizer key words f_0, f_1                  */
#define PV_KEY_TABLE_BYTES 1120

#define PV_KERNEL_SCALAR 0
#define PV_KERNEL_AVX2 1
#define PV_KERNEL_AVX512 2

/* Return codes (negative = error). */
#define PV_OK 0
#define PV_ERR_ARG (-1)    /* bad argument (Python validates first; defensive) */
#define PV_ERR_KERNEL (-2) /* kernel unknown or not supported by this CPU */
#define PV_ERR_IO (-3)     /* I/O error; *detail = errno */
#define PV_ERR_SIGBUS (-4) /* mapped page vanished (file truncated); *detail = file offset */
#define PV_ERR_SHORT (-5)  /* file shorter than offset+length; *detail = current size */

/* pv_scan_fd flags. */
#define PV_SCAN_NO_HOLES 1      /* do not use SEEK_DATA/SEEK_HOLE */
#define PV_SCAN_PREAD 2         /* read with pread instead of mmap */
#define PV_SCAN_NO_POPULATE 4   /* mmap without MAP_POPULATE (benchmarking) */
#define PV_SCAN_TEST_TRUNCATE 8 /* test hook: ftruncate(fd, offset) right after mapping */

/* Bit i set <=> kernel i usable on this CPU (bit 0 always). */
int pv_cpu_kernels(void);

/* Scan len bytes at buf in blocks of block_size (last block may be partial):
 * zero_out[i] = 1 and hash (0,0) for an all-zero block, else 0 and the keyed hash;
 * hash_out[2i], hash_out[2i+1] = the two 64-bit words. */
int pv_scan_buffer(const uint8_t *buf, uint64_t len, uint32_t block_size, const uint8_t *ktab,
                   int kernel, uint8_t *zero_out, uint64_t *hash_out);

/* Hash one block of any length; out = 16 bytes (two little-endian uint64), all zero for
 * all-zero data.  Returns 1 if the data was all zero, 0 if not, <0 on error. */
int pv_hash_block(const uint8_t *buf, uint64_t len, const uint8_t *ktab, int kernel,
                  uint8_t *out);

/* Scan [offset, offset+length) of fd (offset block-aligned) into zero_out/hash_out
 * (entries for this range only).  window_bytes bounds each mmap (0 = default). */
int pv_scan_fd(int fd, uint64_t offset, uint64_t length, uint32_t block_size,
               const uint8_t *ktab, int kernel, uint8_t *zero_out, uint64_t *hash_out,
               uint64_t window_bytes, int flags, int64_t *detail);

/* Indices (ascending) of blocks of the new image that differ from the old one; returns
 * how many were written to out (which must hold new_n entries). */
int64_t pv_changed_blocks(const uint8_t *old_zero, const uint64_t *old_hash, uint64_t old_n,
                          const uint8_t *new_zero, const uint64_t *new_hash, uint64_t new_n,
                          int64_t *out);

/* SHA-256 (block names).  Kernels: PV_SHA_NI pairs of messages through the SHA extensions
 * (sha256.c); PV_SHA_X16 16 messages side by side in AVX-512 lanes (sha256_x16.c), runs of
 * fewer than 9 equal-length messages through SHA-NI; PV_SHA_X16_ALONE the lanes for every
 * run (CPUs with AVX-512 and without SHA-NI). */
#define PV_SHA_NI 1
#define PV_SHA_X16 2
#define PV_SHA_X16_ALONE 3
/* A run of this many equal-length messages or more goes through the 16 lanes, the lanes
 * left over repeating its first message; a shorter one, in pairs through SHA-NI (without
 * SHA-NI, native.py hands calls of fewer to hashlib).  Lanes cost the same full or not:
 * 16 lanes take ~16/3.8 of a one-block time at 3.8 GB/s, a pair ~2/2.0 (session 20,
 * bench/sha256.py), so 9 blocks is where the lanes win. */
#define PV_X16_MIN_RUN 9
/* 1 if the SHA-NI kernel runs on this CPU (decode.c's checks use it). */
int pv_sha256_available(void);
/* The kernels that run on this CPU: bit k set for kernel k (0 with neither SHA-NI nor AVX-512). */
int pv_sha256_kernels(void);
/* SHA-256 of n messages, msgs[i] of lens[i] bytes, into out[32*i .. 32*i+32).  Neighbours
 * of equal length are hashed together.  PV_ERR_KERNEL for a kernel this CPU lacks. */
int pv_sha256_many(const uint8_t *const *msgs, const uint64_t *lens, uint64_t n, uint8_t *out, int kernel);
/* The same for n blocks of one buffer: message i is base[offsets[i] .. offsets[i]+lens[i]). */
int pv_sha256_blocks(const uint8_t *base, const int64_t *offsets, const uint64_t *lens, uint64_t n,
                     uint8_t *out, int kernel);

/* Copy srcs[i] (lens[i] bytes each) back to back to dst; returns the bytes copied. */
uint64_t pv_gather(uint8_t *dst, const uint8_t *const *srcs, const uint64_t *lens, uint64_t n);

/* Decode-and-check of stored blocks (decode.c), with libzstd loaded at run time. */
#define PV_DECODE_OK 0       /* content decoded into its destination, SHA-256 equal to its name */
#define PV_DECODE_CORRUPT 1  /* not a frame zstd can decode (damaged, truncated, no content size) */
#define PV_DECODE_MISMATCH 2 /* decodes, but to another size or content than the block's name */

/* Load libzstd.so.1: its version number (e.g. 10504), or 0 when it is missing or too old. */
unsigned pv_zstd_load(void);
/* A decompression context for one thread (NULL without libzstd); free with pv_zstd_dctx_free. */
void *pv_zstd_dctx_new(void);
void pv_zstd_dctx_free(void *dctx);
/* Block i: the frame src[src_off[i] .. +src_len[i]) decoded to dst[dst_off[i] .. +ulen[i])
 * and checked against digests[32*i .. +32) with SHA-256 kernel sha_kernel (PV_SHA_*);
 * status[i] = PV_DECODE_*.  Returns the number of good blocks, or PV_ERR_KERNEL without
 * libzstd or that kernel.  Bounds and non-overlap of the ranges are the caller's
 * (native.py checks them). */
int64_t pv_decode_blocks(void *dctx, const uint8_t *src, const int64_t *src_off, const uint64_t *src_len,
                         uint8_t *dst, const int64_t *dst_off, const uint64_t *ulen, const uint8_t *digests,
                         uint64_t n, uint8_t *status, int sha_kernel);

#endif

/* cffi cdef for pyvbak._native: the declarations of pyvbak_native.h, without preprocessor
 * logic (cffi parses this file; build_native.py reads it). Keep the two in step. */
#define PV_KEY_TABLE_BYTES 1120
#define PV_KERNEL_SCALAR 0
#define PV_KERNEL_AVX2 1
#define PV_KERNEL_AVX512 2
#define PV_SHA_NI 1
#define PV_SHA_X16 2
#define PV_SHA_X16_ALONE 3
#define PV_X16_MIN_RUN 9
#define PV_OK 0
#define PV_ERR_ARG -1
#define PV_ERR_KERNEL -2
#define PV_ERR_IO -3
#define PV_ERR_SIGBUS -4
#define PV_ERR_SHORT -5
#define PV_SCAN_NO_HOLES 1
#define PV_SCAN_PREAD 2
#define PV_SCAN_NO_POPULATE 4
#define PV_SCAN_TEST_TRUNCATE 8
#define PV_DECODE_OK 0
#define PV_DECODE_CORRUPT 1
#define PV_DECODE_MISMATCH 2

int pv_cpu_kernels(void);
int pv_scan_buffer(const uint8_t *buf, uint64_t len, uint32_t block_size, const uint8_t *ktab,
                   int kernel, uint8_t *zero_out, uint64_t *hash_out);
int pv_hash_block(const uint8_t *buf, uint64_t len, const uint8_t *ktab, int kernel,
                  uint8_t *out);
int pv_scan_fd(int fd, uint64_t offset, uint64_t length, uint32_t block_size,
               const uint8_t *ktab, int kernel, uint8_t *zero_out, uint64_t *hash_out,
               uint64_t window_bytes, int flags, int64_t *detail);
int64_t pv_changed_blocks(const uint8_t *old_zero, const uint64_t *old_hash, uint64_t old_n,
                          const uint8_t *new_zero, const uint64_t *new_hash, uint64_t new_n,
                          int64_t *out);
int pv_sha256_available(void);
int pv_sha256_kernels(void);
int pv_sha256_many(const uint8_t *const *msgs, const uint64_t *lens, uint64_t n, uint8_t *out, int kernel);
int pv_sha256_blocks(const uint8_t *base, const int64_t *offsets, const uint64_t *lens, uint64_t n,
                     uint8_t *out, int kernel);
uint64_t pv_gather(uint8_t *dst, const uint8_t *const *srcs, const uint64_t *lens, uint64_t n);
unsigned pv_zstd_load(void);
void *pv_zstd_dctx_new(void);
void pv_zstd_dctx_free(void *dctx);
int64_t pv_decode_blocks(void *dctx, const uint8_t *src, const int64_t *src_off, const uint64_t *src_len,
                         uint8_t *dst, const int64_t *dst_off, const uint64_t *ulen, const uint8_t *digests,
                         uint64_t n, uint8_t *status, int sha_kernel);

/* Reading an image for the scan: holes via SEEK_DATA/SEEK_HOLE (never read), data via
 * bounded mmap windows (pread fallback), SIGBUS guard for files truncated while mapped.
 * Called concurrently from several Python threads (GIL released), one range each. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hash_impl.h"
#include "pyvbak_native.h"

/* Window size and MAP_POPULATE (measured on the 2-core AMD EPYC, 2 GiB page-cached image,
 * 64 MiB windows): mapping page-cache pages costs 41-61 ms per 2 GiB (80-115 ns/page) with
 * MAP_POPULATE vs 54-60 ms (103-114 ns/page) faulting them in by touch (fault-around), i.e.
 * about a third of the time of hashing at ~25 GB/s per core; so we populate.  pread into an
 * L2-sized buffer instead was slower (21.6 vs 34.2 GB/s on 2 threads: the copy costs more
 * than the mapping).  Windows of 16-128 MiB were within run-to-run noise; 64 MiB bounds the
 * address space to 64 MiB per thread.  Details: bench/RESULTS.md, "## Native scan". */
#define DEFAULT_WINDOW (64u << 20)
#define PREAD_CHUNK (4u << 20)

/* ---- SIGBUS guard -------------------------------------------------------------------- */

/* initial-exec TLS: reading it in the signal handler must not call __tls_get_addr (which
 * may allocate) in a thread that never scanned. */
#define TLS __thread __attribute__((tls_model("initial-exec")))
static TLS sigjmp_buf *tl_jmp;
static TLS const uint8_t *tl_lo, *tl_hi;
static TLS const uint8_t *tl_fault;
static struct sigaction prev_bus;
static pthread_once_t bus_once = PTHREAD_ONCE_INIT;

static void bus_handler(int sig, siginfo_t *si, void *uc) {
    const uint8_t *a = (const uint8_t *)si->si_addr;
    if (tl_jmp && a >= tl_lo && a < tl_hi) {
        sigjmp_buf *j = tl_jmp;
        tl_jmp = NULL;
        tl_fault = a;
        siglongjmp(*j, 1);
    }
    /* Not ours (e.g. a bug elsewhere, or faulthandler's turn): chain to the previous one. */
    if (prev_bus.sa_flags & SA_SIGINFO) {
        prev_bus.sa_sigaction(sig, si, uc);
    } else if (prev_bus.sa_handler == SIG_DFL || prev_bus.sa_handler == SIG_IGN) {
        signal(SIGBUS, SIG_DFL);
        raise(SIGBUS); /* blocked until we return; then the default action applies */
    } else {
        prev_bus.sa_handler(sig);
    }
}

static void install_bus_handler(void) {
    /* Installed lazily on the first file scan, i.e. after pytest's / Python's faulthandler,
     * which we then chain to for faults outside our mapped windows. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = bus_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &prev_bus);
}

/* Scan a mapped window; returns 0, or -1 if a page vanished (fault address in tl_fault). */
static int guarded_scan(const uint8_t *map, uint64_t maplen, const uint8_t *data, uint64_t len,
                        uint32_t bs, const pv_key *k, pv_stripes_fn fn, uint8_t *z,
                        uint64_t *h) {
    sigjmp_buf jb;
    if (sigsetjmp(jb, 1)) /* savemask=1: SIGBUS is unblocked again after the jump */
        return -1;
    tl_lo = map;
    tl_hi = map + maplen;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    tl_jmp = &jb;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    pv_scan_loaded(data, len, bs, k, fn, z, h);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    tl_jmp = NULL;
    return 0;
}

/* ---- scanning ------------------------------------------------------------------------ */

typedef struct {
    int fd, flags, use_pread;
    uint64_t base; /* file offset of entry 0 */
    uint32_t bs;
    uint64_t window;
    long page;
    const pv_key *k;
    pv_stripes_fn fn;
    uint8_t *z;
    uint64_t *h;
    uint8_t *buf; /* pread buffer, allocated on first use */
    uint64_t buflen;
    int64_t *detail;
} ctx_t;

static void mark_zero(ctx_t *c, uint64_t from, uint64_t to) {
    if (to <= from)
        return;
    uint64_t i0 = (from - c->base) / c->bs, i1 = (to - c->base + c->bs - 1) / c->bs;
    memset(c->z + i0, 1, i1 - i0);
    memset(c->h + 2 * i0, 0, (i1 - i0) * 16);
}

static int scan_pread(ctx_t *c, uint64_t from, uint64_t to) {
    if (!c->buf) {
        c->buflen = c->bs > PREAD_CHUNK ? c->bs : PREAD_CHUNK;
        if (posix_memalign((void **)&c->buf, 4096, c->buflen)) {
            *c->detail = ENOMEM;
            return PV_ERR_IO;
        }
    }
    for (uint64_t pos = from; pos < to;) {
        uint64_t n = to - pos < c->buflen ? to - pos : c->buflen;
        uint64_t got = 0;
        while (got < n) {
            ssize_t r = pread(c->fd, c->buf + got, n - got, (off_t)(pos + got));
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                *c->detail = errno;
                return PV_ERR_IO;
            }
            if (r == 0) { /* EOF before the stated end: the file shrank */
                *c->detail = (int64_t)(pos + got);
                return PV_ERR_SHORT;
            }
            got += (uint64_t)r;
        }
        uint64_t i = (pos - c->base) / c->bs;
        pv_scan_loaded(c->buf, n, c->bs, c->k, c->fn, c->z + i, c->h + 2 * i);
        pos += n;
    }
    return PV_OK;
}

static int scan_data(ctx_t *c, uint64_t from, uint64_t to) {
    for (uint64_t w = from; w < to;) {
        uint64_t wl = to - w < c->window ? to - w : c->window;
        if (c->use_pread)
            return scan_pread(c, w, to);
        uint64_t adj = w % (uint64_t)c->page; /* 0 unless page size > block size */
        uint64_t maplen = wl + adj;
        int mf = MAP_SHARED;
        if (!(c->flags & PV_SCAN_NO_POPULATE))
            mf |= MAP_POPULATE;
        uint8_t *map = mmap(NULL, maplen, PROT_READ, mf, c->fd, (off_t)(w - adj));
        if (map == MAP_FAILED) {
            if (errno == EINVAL || errno == ENODEV || errno == EACCES || errno == ENOMEM) {
                c->use_pread = 1; /* e.g. a pipe-like device or a filesystem without mmap */
                continue;
            }
            *c->detail = errno;
            return PV_ERR_IO;
        }
        if (c->flags & PV_SCAN_NO_POPULATE)
            madvise(map, maplen, MADV_SEQUENTIAL);
        if (c->flags & PV_SCAN_TEST_TRUNCATE) {
            /* Test hook: the file loses the whole window while it is mapped. */
            if (ftruncate(c->fd, (off_t)w) != 0) {
                *c->detail = errno;
                munmap(map, maplen);
                return PV_ERR_IO;
            }
        }
        uint64_t i = (w - c->base) / c->bs;
        int r = guarded_scan(map, maplen, map + adj, wl, c->bs, c->k, c->fn, c->z + i,
                             c->h + 2 * i);
        if (r) {
            *c->detail = (int64_t)(w - adj + (uint64_t)(tl_fault - map));
            munmap(map, maplen);
            return PV_ERR_SIGBUS;
        }
        munmap(map, maplen);
        w += wl;
    }
    return PV_OK;
}

static int file_size_check(int fd, uint64_t end, int64_t *detail) {
    struct stat st;
    if (fstat(fd, &st) != 0) {
        *detail = errno;
        return PV_ERR_IO;
    }
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < end) {
        *detail = (int64_t)st.st_size;
        return PV_ERR_SHORT;
    }
    return PV_OK;
}

int pv_scan_fd(int fd, uint64_t offset, uint64_t length, uint32_t block_size,
               const uint8_t *ktab, int kernel, uint8_t *zero_out, uint64_t *hash_out,
               uint64_t window_bytes, int flags, int64_t *detail) {
    *detail = 0;
    pv_stripes_fn fn = pv_kernel_fn(kernel);
    if (!fn)
        return PV_ERR_KERNEL;
    if (block_size == 0 || (block_size & (block_size - 1)) || block_size % PV_STRIPE_BYTES ||
        offset % block_size)
        return PV_ERR_ARG;
    if (length == 0)
        return PV_OK;
    uint64_t end = offset + length;
    int rc = file_size_check(fd, end, detail);
    if (rc)
        return rc;
    pthread_once(&bus_once, install_bus_handler);

    pv_key k;
    pv_key_load(&k, ktab);
    ctx_t c;
    memset(&c, 0, sizeof c);
    c.fd = fd;
    c.flags = flags;
    c.use_pread = (flags & PV_SCAN_PREAD) != 0;
    c.base = offset;
    c.bs = block_size;
    c.page = sysconf(_SC_PAGESIZE);
    c.window = window_bytes ? window_bytes : DEFAULT_WINDOW;
    c.window -= c.window % block_size;
    if (c.window < block_size)
        c.window = block_size;
    c.k = &k;
    c.fn = fn;
    c.z = zero_out;
    c.h = hash_out;
    c.detail = detail;

    int holes = !(flags & PV_SCAN_NO_HOLES);
    uint64_t cur = offset;
    while (cur < end && rc == PV_OK) {
        uint64_t d = cur, e = end;
        if (holes) {
            off_t r = lseek(fd, (off_t)cur, SEEK_DATA);
            if (r < 0) {
                if (errno == ENXIO) {
                    d = end; /* only a hole from cur to EOF */
                } else {
                    holes = 0; /* EINVAL etc.: no hole information; read everything */
                }
            } else {
                d = (uint64_t)r;
            }
            if (holes && d < end) {
                off_t hr = lseek(fd, (off_t)d, SEEK_HOLE);
                e = hr < 0 ? end : (uint64_t)hr;
            }
        }
        /* Blocks wholly inside a hole are zero without reading; a block partly in data is
         * read (the hole part reads as zeros). */
        uint64_t d_blk = d >= end ? end : d - (d - offset) % block_size;
        if (d_blk < cur)
            d_blk = cur;
        mark_zero(&c, cur, d_blk);
        if (d_blk >= end)
            break;
        uint64_t e_blk = e >= end ? end : e + (block_size - (e - offset) % block_size) % block_size;
        if (e_blk > end)
            e_blk = end;
        if (e_blk <= d_blk) /* defensive: always make progress */
            e_blk = d_blk + block_size < end ? d_blk + block_size : end;
        rc = scan_data(&c, d_blk, e_blk);
        cur = e_blk;
    }
    free(c.buf);
    if (rc == PV_OK) /* shrunk during the scan? then the "holes" past EOF were not holes */
        rc = file_size_check(fd, end, detail);
    return rc;
}

"""The native delta-engine scanner: zero detection + keyed 128-bit fast hash per block.

This is the only module that imports the compiled ``pyvbak._native`` (built from csrc/ by
cffi, out-of-line API mode).  It validates every argument (``UsageError`` naming the bad
value), turns C return codes into exceptions (``SourceError`` naming the file) and splits
file scans over a thread pool; the C calls release the GIL.

Conventions (shared with the engine and the index format):
  * an all-zero block has zero flag 1 and hash (0, 0) — holes are never hashed;
  * a non-zero block has zero flag 0 and the keyed hash (two uint64 words, stored and
    returned little-endian), which covers the block's byte length;
  * the hash is only for comparing the block at the same index of two backups of the
    same disk under the same repository key — deduplication uses SHA-256 (docs/HASH.md).
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from pyvbak._native import ffi, lib
from pyvbak.errors import SourceError, UsageError

KEY_BYTES = 16
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 16 * 2**20

KERNELS = ("scalar", "avx2", "avx512")  # index = C kernel id
_KERNEL_ID = {name: i for i, name in enumerate(KERNELS)}
_ENV = "PYVBAK_KERNEL"

# Ranges handed to one C call.  Several per thread so a thread that drew mostly holes
# picks up more work; at least this big so per-call overhead stays negligible.
_RANGES_PER_THREAD = 4
_MIN_RANGE = 32 * 2**20

# Domain-separation label of the key expansion.  Changing it changes every hash: do not.
_KDF_LABEL = b"pyvbak fast block hash v1 key table\x00"

# Private test/benchmark hooks passed to the C scanner (see csrc/pyvbak_native.h).
SCAN_NO_HOLES = lib.PV_SCAN_NO_HOLES
SCAN_PREAD = lib.PV_SCAN_PREAD
SCAN_NO_POPULATE = lib.PV_SCAN_NO_POPULATE
SCAN_TEST_TRUNCATE = lib.PV_SCAN_TEST_TRUNCATE


# ---- kernels ------------------------------------------------------------------------------

def available_kernels() -> list[str]:
    """The kernels this CPU (and OS) supports, slowest first; "scalar" is always there."""
    mask = lib.pv_cpu_kernels()
    return [name for i, name in enumerate(KERNELS) if mask & (1 << i)]


def _choose(kind: str, kernel, env: str, known: tuple, avail: list[str]) -> str:
    """``kernel`` if given, else $env, else the fastest available (the last).  A forced
    kernel that is unknown or that this CPU lacks raises ``UsageError``: a forced kernel
    never silently falls back to another one."""
    source = "kernel argument"
    if kernel is None:
        kernel = os.environ.get(env) or None
        source = f"${env}"
    if kernel is None:
        return avail[-1]
    if not isinstance(kernel, str) or kernel not in known:
        raise UsageError(f"unknown {kind} kernel {kernel!r} ({source}); choose one of {', '.join(known)}")
    if kernel not in avail:
        raise UsageError(f"{kind} kernel {kernel!r} ({source}) is not supported by this CPU; available: {', '.join(avail)}")
    return kernel


def selected_kernel(kernel: str | None = None) -> str:
    """The scan kernel to use: ``kernel`` if given, else $PYVBAK_KERNEL, else the fastest."""
    return _choose("scan", kernel, _ENV, KERNELS, available_kernels())


def _kernel_id(kernel: str | None) -> int:
    return _KERNEL_ID[selected_kernel(kernel)]


# ---- argument checks ----------------------------------------------------------------------

def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise UsageError(f"block size must be an integer, got {block_size!r}")
    bs = int(block_size)
    if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        raise UsageError(
            f"block size {bs} is invalid: it must be a power of two between "
            f"{MIN_BLOCK_SIZE} (4 KiB) and {MAX_BLOCK_SIZE} (16 MiB)"
        )
    return bs


#: sizes and offsets the C side takes as int64 / off_t
_MAX_SIZE = (1 << 63) - 1


def _check_size(size, what: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 <= size <= _MAX_SIZE:
        raise UsageError(f"{what} must be an integer from 0 to 2^63-1, got {size!r}")
    return int(size)


def _check_fd(fd) -> int:
    if isinstance(fd, bool) or not isinstance(fd, (int, np.integer)) or not 0 <= fd < (1 << 31):
        raise UsageError(f"fd must be an open file descriptor (an int), got {fd!r}")
    return int(fd)


def _index_array(values, name: str) -> np.ndarray:
    """``values`` as an aligned, C-contiguous int64 array (UsageError if they are not integers
    that fit)."""
    try:
        return np.require(values, dtype=np.int64, requirements=["C", "A"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"{name} must be integers from -2^63 to 2^63-1: {exc}") from None


@lru_cache(maxsize=64)
def _key_table(key: bytes) -> bytes:
    """Expand the 16-byte key into the C key table: SHA-256 in counter mode (35 blocks)."""
    n = lib.PV_KEY_TABLE_BYTES
    out = b"".join(
        hashlib.sha256(_KDF_LABEL + key + i.to_bytes(4, "little")).digest()
        for i in range((n + 31) // 32)
    )
    return out[:n]


def _key(key) -> bytes:
    try:
        kb = bytes(memoryview(key))
    except TypeError:
        raise UsageError(f"key must be {KEY_BYTES} bytes, got {type(key).__name__}") from None
    if len(kb) != KEY_BYTES:
        raise UsageError(f"key must be {KEY_BYTES} bytes, got {len(kb)} bytes")
    return _key_table(kb)


def _check_array(arr, name: str, dtype, ncols: int | None, min_rows: int, writable: bool):
    want = f"{np.dtype(dtype).name} array of shape ({min_rows},{' ' + str(ncols) if ncols else ''})"
    if not isinstance(arr, np.ndarray):
        raise UsageError(f"{name} must be a numpy {want}, got {type(arr).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise UsageError(f"{name} has dtype {arr.dtype}, expected {np.dtype(dtype).name}")
    shape_ok = arr.ndim == (1 if ncols is None else 2) and (ncols is None or arr.shape[1] == ncols)
    if not shape_ok:
        raise UsageError(f"{name} has shape {arr.shape}, expected a {want}")
    if arr.shape[0] < min_rows:
        raise UsageError(f"{name} has {arr.shape[0]} entries, needs at least {min_rows}")
    if not arr.flags.c_contiguous:
        raise UsageError(f"{name} is not C-contiguous")
    if not arr.flags.aligned:  # C reads and writes its elements as uint64_t / int64_t
        raise UsageError(f"{name} is not aligned to its element size (a view at an odd byte offset?)")
    if writable and not arr.flags.writeable:
        raise UsageError(f"{name} is read-only")


def _input_buffer(buf, name: str):
    try:
        mv = memoryview(buf)
    except TypeError:
        raise UsageError(f"{name} must support the buffer protocol, got {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise UsageError(f"{name} is not a contiguous buffer")
    return ffi.from_buffer("uint8_t[]", mv), mv.nbytes


# ---- public API ---------------------------------------------------------------------------

def block_count(size: int, block_size: int) -> int:
    """Number of blocks (the last one may be partial) in ``size`` bytes."""
    size = _check_size(size, "size")
    bs = _check_block_size(block_size)
    return -(-size // bs)


def new_arrays(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Result arrays for n blocks: zero flags uint8 (n,), hashes uint64 (n, 2)."""
    from .allocator import sparse_zeros

    n = _check_size(n, "block count")
    return np.zeros(n, dtype=np.uint8), sparse_zeros((n, 2), np.uint64)


def scan_buffer(buf, block_size, key, zero_out, hash_out, *, kernel=None) -> None:
    """Scan an in-memory image: fill the first ceil(len(buf)/block_size) entries."""
    bs = _check_block_size(block_size)
    ktab = _key(key)
    kid = _kernel_id(kernel)
    cbuf, nbytes = _input_buffer(buf, "buf")
    n = -(-nbytes // bs)
    _check_array(zero_out, "zero_out", np.uint8, None, n, True)
    _check_array(hash_out, "hash_out", np.uint64, 2, n, True)
    if n == 0:
        return
    rc = lib.pv_scan_buffer(cbuf, nbytes, bs, ktab, kid,
                            ffi.from_buffer("uint8_t[]", zero_out, require_writable=True),
                            ffi.from_buffer("uint64_t[]", hash_out, require_writable=True))
    if rc != lib.PV_OK:  # pragma: no cover - arguments were checked above
        raise UsageError(f"native scan rejected its arguments (code {rc})")


def hash_block(data, key, *, kernel=None) -> bytes:
    """The 16-byte fast hash of one block (what a scan stores); all-zero data -> 16 zeros."""
    ktab = _key(key)
    kid = _kernel_id(kernel)
    cbuf, nbytes = _input_buffer(data, "data")
    out = ffi.new("uint8_t[16]")
    rc = lib.pv_hash_block(cbuf, nbytes, ktab, kid, out)
    if rc < 0:  # pragma: no cover
        raise UsageError(f"native hash rejected its arguments (code {rc})")
    return bytes(ffi.buffer(out, 16))


def scan_fd_range(fd: int, offset: int, length: int, block_size, key, zero_out, hash_out, *,
                  kernel=None, name: str | None = None, size: int | None = None) -> None:
    """Scan ``length`` bytes of an open file or block device from ``offset`` (a multiple of
    ``block_size``) into the first ceil(length/block_size) entries of the output arrays.

    The piece of work the backup engine schedules per window, so that the changed blocks
    of a window are read again while still in the page cache.  Holes read as zero without
    being read.  Raises SourceError for truncated or unreadable images (``name`` and
    ``size`` only word the message).  Moves the descriptor's file offset (SEEK_DATA /
    SEEK_HOLE): read through it with ``pread``, as the engine does."""
    bs = _check_block_size(block_size)
    ktab = _key(key)
    kid = _kernel_id(kernel)
    offset, length = _check_size(offset, "offset"), _check_size(length, "length")
    if offset % bs:
        raise UsageError(f"offset {offset} is not a multiple of the block size {bs}")
    if offset + length > _MAX_SIZE:  # C computes the end as offset + length
        raise UsageError(f"offset {offset} + length {length} is past 2^63-1")
    fd = _check_fd(fd)
    n = -(-length // bs)
    _check_array(zero_out, "zero_out", np.uint8, None, n, True)
    _check_array(hash_out, "hash_out", np.uint64, 2, n, True)
    if n == 0:
        return
    detail = ffi.new("int64_t *")
    rc = lib.pv_scan_fd(fd, offset, length, bs, ktab, kid,
                        ffi.from_buffer("uint8_t[]", zero_out, require_writable=True),
                        ffi.from_buffer("uint64_t[]", hash_out, require_writable=True),
                        0, 0, detail)
    if rc != lib.PV_OK:
        raise _scan_error(rc, detail[0], name or f"file descriptor {fd}", offset, length,
                          offset + length if size is None else size)


def changed_blocks(old_zero, old_hash, old_size, new_zero, new_hash, new_size, block_size) -> np.ndarray:
    """Indices (int64, ascending) of the new image's blocks that differ from the old scan.

    A block is changed if it is past the old end, its zero flag changed, or both are
    non-zero and their hashes differ (the hash covers the length, so a partial old tail
    that grew is changed)."""
    bs = _check_block_size(block_size)
    on = -(-_check_size(old_size, "old_size") // bs)
    nn = -(-_check_size(new_size, "new_size") // bs)
    for arr, name, n in ((old_zero, "old_zero", on), (new_zero, "new_zero", nn)):
        _check_array(arr, name, np.uint8, None, 0, False)
        if arr.shape[0] != n:
            raise UsageError(
                f"{name} has {arr.shape[0]} entries but the image size "
                f"{old_size if name == 'old_zero' else new_size} has {n} blocks of {bs} bytes"
            )
    for arr, name, n in ((old_hash, "old_hash", on), (new_hash, "new_hash", nn)):
        _check_array(arr, name, np.uint64, 2, 0, False)
        if arr.shape[0] != n:
            raise UsageError(f"{name} has {arr.shape[0]} rows, expected {n} (as many as the zero flags)")
    out = np.empty(nn, dtype=np.int64)
    if nn == 0:
        return out
    count = lib.pv_changed_blocks(
        ffi.from_buffer("uint8_t[]", old_zero), ffi.from_buffer("uint64_t[]", old_hash), on,
        ffi.from_buffer("uint8_t[]", new_zero), ffi.from_buffer("uint64_t[]", new_hash), nn,
        ffi.from_buffer("int64_t[]", out, require_writable=True))
    return out[:count].copy() if count < nn // 2 else out[:count]


def _split(size: int, bs: int, threads: int) -> list[tuple[int, int]]:
    """Block-aligned (offset, length) ranges covering [0, size)."""
    if size == 0:
        return []
    nblocks = -(-size // bs)
    per = max(-(-nblocks // (threads * _RANGES_PER_THREAD)), -(-_MIN_RANGE // bs), 1)
    if threads == 1:
        per = nblocks
    return [(i * bs, min(size, (i + per) * bs) - i * bs) for i in range(0, nblocks, per)]


def scan_file(path_or_fd, block_size, key, *, size=None, threads=None, kernel=None,
              _flags: int = 0, _window: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scan a whole regular file or block device; returns (zero flags, hashes).

    ``path_or_fd``: a path, or an open file descriptor (its file position is restored).
    ``size``: bytes to scan (default: the file's size; a block device's size by seeking
    to its end).  ``threads``: default ``os.cpu_count()``.  Holes are reported zero
    without reading them.  ``_flags``/``_window`` are test and benchmark hooks."""
    bs = _check_block_size(block_size)
    ktab = _key(key)
    kid = _kernel_id(kernel)
    if threads is None:
        threads = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    if size is not None:
        size = _check_size(size, "size")
    _window = _check_size(_window, "_window")

    if isinstance(path_or_fd, bool):
        raise UsageError(f"expected a path or file descriptor, got {path_or_fd!r}")
    own = not isinstance(path_or_fd, (int, np.integer))
    if own:
        name = os.fsdecode(path_or_fd) if isinstance(path_or_fd, (str, bytes, os.PathLike)) else None
        if name is None:
            raise UsageError(f"expected a path or file descriptor, got {type(path_or_fd).__name__}")
        try:
            fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(f"cannot open image {name}: {e.strerror}") from e
    else:
        fd = _check_fd(path_or_fd)
        name = f"file descriptor {fd}"
    saved_pos = None
    try:
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise SourceError(f"cannot scan {name}: not a regular file or block device")
            saved_pos = None if own else os.lseek(fd, 0, os.SEEK_CUR)
            if size is None:
                size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
        except OSError as e:
            raise SourceError(f"cannot scan {name}: {e.strerror}") from e
        zero, hashes = new_arrays(-(-size // bs))
        zp = ffi.from_buffer("uint8_t[]", zero, require_writable=True)
        hp = ffi.from_buffer("uint64_t[]", hashes, require_writable=True)

        def run(rng):
            off, length = rng
            detail = ffi.new("int64_t *")
            i = off // bs
            rc = lib.pv_scan_fd(fd, off, length, bs, ktab, kid, zp + i, hp + 2 * i,
                                _window, _flags, detail)
            return rc, detail[0], off, length

        ranges = _split(size, bs, threads)
        if threads == 1 or len(ranges) <= 1:
            results = [run(r) for r in ranges]
        else:
            with ThreadPoolExecutor(max_workers=min(threads, len(ranges))) as pool:
                results = list(pool.map(run, ranges))
        for rc, detail, off, length in results:
            if rc != lib.PV_OK:
                raise _scan_error(rc, detail, name, off, length, size)
        return zero, hashes
    finally:
        if own:
            os.close(fd)
        elif saved_pos is not None:  # on errors too: the caller's descriptor is as it was
            os.lseek(fd, saved_pos, os.SEEK_SET)


# ---- copying (outside the GIL) --------------------------------------------------------------

#: what pv_gather returns when a source overlaps the destination (UINT64_MAX)
_GATHER_OVERLAP = (1 << 64) - 1


def gather_into(dst, buffers) -> int:
    """Copy the bytes-like objects in ``buffers`` back to back into the start of the
    writable buffer ``dst`` in one C call (the GIL is released); returns the bytes copied."""
    try:
        cdst = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
        srcs = [ffi.from_buffer(b) for b in buffers]
    except (TypeError, BufferError, ValueError) as exc:  # ValueError: a non-contiguous array
        raise UsageError(f"gather_into needs a writable buffer and bytes-like sources: {exc}") from None
    lens = [len(c) for c in srcs]
    total = sum(lens)
    if total > len(cdst):
        raise UsageError(f"gather_into: {total} bytes do not fit in a {len(cdst)}-byte buffer")
    if not srcs:
        return 0
    copied = int(lib.pv_gather(cdst, ffi.new("uint8_t *[]", srcs), ffi.new("uint64_t[]", lens), len(srcs)))
    if copied == _GATHER_OVERLAP:  # memcpy of overlapping ranges is undefined: C refused
        raise UsageError("gather_into: a source overlaps the part of the destination written")
    return copied


# ---- SHA-256 of blocks (block names) ------------------------------------------------------
#
# Blocks are named by SHA-256 (docs/FORMAT.md).  hashlib (OpenSSL) is the reference; the
# native kernels must give identical digests (tests/test_sha256.py): "sha-ni" (csrc/sha256.c)
# hashes two equal-length blocks at a time through the SHA extensions, "avx512"
# (csrc/sha256_x16.c) sixteen at a time in AVX-512 lanes, leaving short runs to SHA-NI.  Per
# core here: hashlib 1.4 GB/s, sha-ni 2.1, avx512 3.8 (bench/RESULTS.md, "SHA-256 of
# blocks").  Which is faster depends on the CPU (one that splits 512-bit work in halves may
# favour SHA-NI), so the first use times the candidates once on the same blocks and keeps
# the faster.  On a CPU with AVX-512 and no SHA-NI (Skylake-SP, Cascade Lake) "avx512" runs
# every run through the lanes (kernel PV_SHA_X16_ALONE) and calls of fewer than 9 blocks go
# to hashlib; there the candidates are hashlib and avx512.  $PYVBAK_SHA256 forces one of
# SHA256_KERNELS.

SHA256_KERNELS = ("hashlib", "sha-ni", "avx512")
_SHA_ENV = "PYVBAK_SHA256"


def _sha_kernel_id(kernel: str) -> int:
    if kernel == "sha-ni":
        return lib.PV_SHA_NI
    return lib.PV_SHA_X16 if lib.pv_sha256_available() else lib.PV_SHA_X16_ALONE


def available_sha256_kernels() -> list[str]:
    """The SHA-256 kernels this CPU supports, reference first."""
    mask = lib.pv_sha256_kernels()
    return ["hashlib"] + [name for name in SHA256_KERNELS[1:] if mask >> _sha_kernel_id(name) & 1]


_FASTEST_SHA256: dict[tuple, str] = {}  # available kernels -> the faster one, timed once
_FASTEST_SHA256_LOCK = threading.Lock()


def _fastest_sha256_kernel(avail: tuple) -> str:
    """The faster kernel of ``avail`` on this CPU, timed once per process (under a lock:
    threads that first hash at once wait for one timing and all get its answer)."""
    chosen = _FASTEST_SHA256.get(avail)
    if chosen is None:
        with _FASTEST_SHA256_LOCK:
            chosen = _FASTEST_SHA256.get(avail)
            if chosen is None:
                chosen = _FASTEST_SHA256[avail] = _time_sha256_kernels(avail)
    return chosen


def _time_sha256_kernels(avail: tuple) -> str:
    """Times the candidates of ``avail`` on 16 blocks of 16 KiB (~0.1 ms per kernel and
    round; best of 3 alternating rounds after one warm-up each) and names the faster.  The
    candidates: the native kernels, with hashlib among them where SHA-NI is missing (the
    lanes alone are the one native kernel then; SHA-NI pairs always beat hashlib)."""
    candidates = [k for k in avail if k != "hashlib"]
    if candidates and "sha-ni" not in candidates:
        candidates.insert(0, "hashlib")
    if len(candidates) < 2:
        return avail[-1]
    n, size = 16, 16 << 10
    probe = bytearray(n * size)
    offs = np.arange(n, dtype=np.int64) * size
    lens = np.full(n, size, dtype=np.int64)
    best = dict.fromkeys(candidates, float("inf"))
    for round_ in range(4):
        for kernel in candidates:
            started = time.perf_counter()
            sha256_blocks(probe, offs, lens, kernel=kernel)
            if round_:
                best[kernel] = min(best[kernel], time.perf_counter() - started)
    return min(candidates, key=best.__getitem__)


def selected_sha256_kernel(kernel: str | None = None) -> str:
    """``kernel`` if given, else $PYVBAK_SHA256, else the fastest here (measured once)."""
    avail = available_sha256_kernels()
    chosen = _choose("SHA-256", kernel, _SHA_ENV, SHA256_KERNELS, avail)
    if kernel is None and not os.environ.get(_SHA_ENV):
        return _fastest_sha256_kernel(tuple(avail))
    return chosen


def check_forced_kernels() -> None:
    """Raises UsageError for a scan or SHA-256 kernel forced ($PYVBAK_KERNEL,
    $PYVBAK_SHA256) that is unknown or that this CPU lacks, timing nothing.  A backup
    checks first: otherwise a typo failed only a backup that found a block to scan or hash,
    and a nightly job passed on quiet nights."""
    selected_kernel()
    _choose("SHA-256", None, _SHA_ENV, SHA256_KERNELS, available_sha256_kernels())


def _by_hashlib(kernel: str, n: int) -> bool:
    """Whether a call of ``n`` messages goes to hashlib: the reference chosen, or the lanes
    without SHA-NI for fewer messages than fill them usefully."""
    return kernel == "hashlib" or (n < lib.PV_X16_MIN_RUN and _sha_kernel_id(kernel) == lib.PV_SHA_X16_ALONE)


def sha256_blocks(buf, offsets, lengths, *, kernel=None) -> bytes:
    """SHA-256 of ``buf[offsets[i] : offsets[i] + lengths[i]]`` for every i, concatenated
    (32 bytes each, in order).  ``offsets`` and ``lengths``: int64 arrays of equal length."""
    cbuf, nbytes = _input_buffer(buf, "buf")
    offs = _index_array(offsets, "offsets")
    lens = _index_array(lengths, "lengths")
    if offs.ndim != 1 or lens.shape != offs.shape:
        raise UsageError(f"offsets {offs.shape} and lengths {lens.shape} must be 1-d arrays of one length")
    n = len(offs)
    # element by element, without offs + lens (which wraps past 2^63 and passed the check)
    if n and (offs.min() < 0 or lens.min() < 0 or offs.max() > nbytes or (lens > nbytes - offs).any()):
        raise UsageError(f"a block lies outside the {nbytes}-byte buffer")
    kernel = selected_sha256_kernel(kernel)
    if _by_hashlib(kernel, n):
        mv = memoryview(buf).cast("B")
        return b"".join(hashlib.sha256(mv[o : o + ln]).digest() for o, ln in zip(offs.tolist(), lens.tolist()))
    out = bytearray(32 * n)
    if n:
        rc = lib.pv_sha256_blocks(cbuf, ffi.from_buffer("int64_t[]", offs), ffi.from_buffer("uint64_t[]", lens.view(np.uint64)),
                                  n, ffi.from_buffer("uint8_t[]", out), _sha_kernel_id(kernel))
        if rc != lib.PV_OK:  # pragma: no cover - availability was checked above
            raise UsageError(f"native SHA-256 failed (code {rc})")
    return bytes(out)


def sha256_many(buffers, *, kernel=None) -> list[bytes]:
    """SHA-256 digest of each bytes-like object in ``buffers`` (any iterable), in order."""
    buffers = buffers if isinstance(buffers, list) else list(buffers)
    kernel = selected_sha256_kernel(kernel)
    if _by_hashlib(kernel, len(buffers)):
        try:
            return [hashlib.sha256(b).digest() for b in buffers]
        except TypeError as exc:
            raise UsageError(f"sha256_many needs bytes-like objects: {exc}") from None
    n = len(buffers)
    if not n:
        return []
    try:
        cbufs = [ffi.from_buffer(b) for b in buffers]  # keeps every buffer alive for the call
    except (TypeError, ValueError) as exc:
        raise UsageError(f"sha256_many needs bytes-like objects: {exc}") from None
    out = bytearray(32 * n)
    rc = lib.pv_sha256_many(ffi.new("uint8_t *[]", cbufs), ffi.new("uint64_t[]", [len(c) for c in cbufs]), n,
                            ffi.from_buffer("uint8_t[]", out), _sha_kernel_id(kernel))
    if rc != lib.PV_OK:  # pragma: no cover
        raise UsageError(f"native SHA-256 failed (code {rc})")
    return [bytes(out[i : i + 32]) for i in range(0, 32 * n, 32)]


# ---- decode-and-check of stored blocks (restore, verify) ------------------------------------
#
# csrc/decode.c decompresses a pack range's zstd frames straight into their destination
# and checks each block's SHA-256 there, in one call without the GIL.  It needs libzstd
# (loaded at run time) and the SHA-256 kernel; pyvbak/repo/reader.py keeps the reference
# path (python-zstandard + sha256_many) and chooses (reader.selected_decode_kernel).

DECODE_OK, DECODE_CORRUPT, DECODE_MISMATCH = lib.PV_DECODE_OK, lib.PV_DECODE_CORRUPT, lib.PV_DECODE_MISMATCH
DECODE_KERNELS = ("python", "native")
_DECODE_ENV = "PYVBAK_DECODE"


@lru_cache(maxsize=None)
def zstd_library_version() -> int:
    """libzstd.so.1's version number (e.g. 10504) as loaded for the decode kernel, or 0
    when it is missing or older than 1.4.0."""
    return int(lib.pv_zstd_load())


def decode_kernel_available() -> bool:
    """Whether ``decode_blocks_into`` runs here (libzstd loaded, and SHA extensions or
    AVX-512 on this CPU)."""
    return bool(zstd_library_version()) and bool(lib.pv_sha256_kernels() & (1 << lib.PV_SHA_NI | 1 << lib.PV_SHA_X16_ALONE))


def available_decode_kernels() -> list[str]:
    """The decode kernels that run here, reference first."""
    return list(DECODE_KERNELS) if decode_kernel_available() else ["python"]


def selected_decode_kernel(kernel: str | None = None) -> str:
    """``kernel`` if given, else $PYVBAK_DECODE, else the fastest available."""
    return _choose("decode", kernel, _DECODE_ENV, DECODE_KERNELS, available_decode_kernels())


def new_decode_context():
    """A zstd decompression context for ``decode_blocks_into``; one per thread (not
    thread-safe), freed when the returned object is collected."""
    if not decode_kernel_available():
        raise UsageError("the native decode kernel needs libzstd.so.1 (1.4+) and a CPU with SHA extensions or AVX-512")
    return ffi.gc(lib.pv_zstd_dctx_new(), lib.pv_zstd_dctx_free)


def _address_range(cbuf, nbytes: int) -> tuple[int, int]:
    start = int(ffi.cast("uintptr_t", cbuf))
    return start, start + nbytes


def _decode_index(values, name: str) -> np.ndarray:
    """_index_array for decode_blocks_into, integer arrays only: _index_array casts, so an
    offset of 0.7 (or True, or "1000") was read as 0 (1, 1000) without a word."""
    arr = np.asarray(values)
    if arr.size and arr.dtype.kind not in "iu":  # (an empty list is float64: nothing to read)
        raise UsageError(f"{name} must be integers, got {arr.dtype}")
    return _index_array(arr, name)


def _decode_sha_kernel() -> int:
    """The SHA-256 kernel the decode kernel checks blocks with: the lanes where they are
    the selected kernel, else SHA-NI pairs; without SHA extensions, the lanes alone (a
    forced hashlib reference applies to sha256_many and sha256_blocks, not to this kernel)."""
    if not lib.pv_sha256_available():
        return lib.PV_SHA_X16_ALONE
    return lib.PV_SHA_X16 if selected_sha256_kernel() == "avx512" else lib.PV_SHA_NI


def decode_min_batch() -> int:
    """The fewest blocks a batch should hold to be worth the decode kernel: with the
    AVX-512 lanes alone (no SHA extensions), a group of fewer than PV_X16_MIN_RUN blocks
    costs the lanes as much as sixteen, and such a batch is better checked by hashlib
    (the reference path, as ``sha256_many`` does); 1 elsewhere."""
    return lib.PV_X16_MIN_RUN if _decode_sha_kernel() == lib.PV_SHA_X16_ALONE else 1


def decode_blocks_into(dctx, src, src_offsets, src_lengths, dst, dst_offsets, ulens, digests) -> np.ndarray:
    """Decode block i, the zstd frame ``src[src_offsets[i] : +src_lengths[i]]``, into
    ``dst[dst_offsets[i] : +ulens[i]]`` and check its SHA-256 against ``digests[i]``
    (``digests``: n x 32 bytes, e.g. an ``S32``/``V32`` array).  Returns a uint8 status
    per block: DECODE_OK, DECODE_CORRUPT (not a decodable frame) or DECODE_MISMATCH
    (another size or content than its name); a bad block's destination bytes are
    undefined.  Offset/length arrays: int64 of one length n."""
    csrc, nsrc = _input_buffer(src, "src")
    try:
        cdst = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
    except (TypeError, BufferError, ValueError) as exc:
        raise UsageError(f"dst must be a writable contiguous buffer: {exc}") from None
    ndst = len(cdst)
    so, sl = _decode_index(src_offsets, "src_offsets"), _decode_index(src_lengths, "src_lengths")
    do, ul = _decode_index(dst_offsets, "dst_offsets"), _decode_index(ulens, "ulens")
    n = len(so)
    if so.ndim != 1 or not (sl.shape == do.shape == ul.shape == so.shape):
        raise UsageError("src_offsets, src_lengths, dst_offsets and ulens must be 1-d arrays of one length")
    try:
        cdig = ffi.from_buffer("uint8_t[]", digests)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"digests must be a contiguous buffer of 32-byte digests: {exc}") from None
    if len(cdig) != 32 * n:
        raise UsageError(f"digests holds {len(cdig)} bytes, {n} blocks need {32 * n}")
    status = np.empty(n, np.uint8)
    if not n:
        return status
    # element by element (no offs + lens, which wraps past 2^63), as sha256_blocks
    if so.min() < 0 or sl.min() < 0 or so.max() > nsrc or (sl > nsrc - so).any():
        raise UsageError(f"a frame lies outside the {nsrc}-byte source buffer")
    if do.min() < 0 or ul.min() < 0 or do.max() > ndst or (ul > ndst - do).any():
        raise UsageError(f"a block lies outside the {ndst}-byte destination buffer")
    order = np.argsort(do, kind="stable") if n > 1 and (np.diff(do) < 0).any() else None
    d_sorted, u_sorted = (do, ul) if order is None else (do[order], ul[order])
    if n > 1 and (d_sorted[1:] < d_sorted[:-1] + u_sorted[:-1]).any():
        raise UsageError("two blocks' destinations overlap")
    s0, s1 = _address_range(csrc, nsrc)
    t0, t1 = _address_range(cdst, ndst)
    if s0 < t1 and t0 < s1:  # decompressing over its own input is undefined
        raise UsageError("the destination buffer overlaps the source buffer")
    rc = lib.pv_decode_blocks(dctx, csrc, ffi.from_buffer("int64_t[]", so), ffi.from_buffer("uint64_t[]", sl.view(np.uint64)),
                              cdst, ffi.from_buffer("int64_t[]", do), ffi.from_buffer("uint64_t[]", ul.view(np.uint64)),
                              cdig, n, ffi.from_buffer("uint8_t[]", status), _decode_sha_kernel())
    if rc < 0:  # pragma: no cover - availability was checked by new_decode_context
        raise UsageError(f"native decode failed (code {rc})")
    return status


def _scan_error(rc: int, detail: int, name: str, off: int, length: int, size: int) -> Exception:
    if rc == lib.PV_ERR_SIGBUS:
        return SourceError(
            f"image {name} was truncated while being scanned (page at offset {detail} vanished); "
            "is something else writing to it?"
        )
    if rc == lib.PV_ERR_SHORT:
        return SourceError(
            f"image {name} is shorter than the {size} bytes to scan (found {detail} bytes); "
            "was it truncated?"
        )
    if rc == lib.PV_ERR_IO:
        return SourceError(
            f"cannot read image {name} at bytes {off}..{off + length}: {os.strerror(detail)}"
        )
    return UsageError(f"native scan of {name} rejected its arguments (code {rc})")

"""Process-wide C allocator settings for pyvbak's data pipelines (glibc only).

A backup or restore allocates and frees its block-sized buffers (compressed frames,
decompression output, pack pieces) by the tens of thousands while the pipeline's working
set stays bounded.  glibc's defaults return freed memory at the top of a heap to the kernel
as soon as it exceeds 128 KiB (``M_TRIM_THRESHOLD``) and serve anything above a threshold
that it keeps raising (``M_MMAP_THRESHOLD``, dynamic from 128 KiB) by ``mmap``, so the same
few dozen MiB are handed back and faulted in again, zero-filled by the kernel, all the way
through.  Measured on the 2 GiB bench image (bench/RESULTS.md, "Allocator settings"):
a full backup in a fresh process spent 0.6-0.85 s of system CPU, 0.36-0.49 s with the
thresholds below, and ran 7-12 % faster.

The memory kept is about the pipeline's own high-water mark, which the process would reach
again anyway: peak RSS of that full backup 81-85 MiB instead of 70-71 MiB; of a restore or
verify of it, unchanged (108 / 80 MiB).  Called once by the CLI (``cli.main.main``), the process's
owner; a program embedding pyvbak decides for itself.  Elsewhere than glibc nothing happens;
``PYVBAK_MALLOC_TUNING=0`` keeps glibc's defaults (``bench/allocator.py`` times both).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

# mallopt parameter numbers (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: blocks and pack pieces (64 KiB-16 MiB, 4 MiB jobs) come from the heap, not fresh mmaps;
#: 32 MiB is the largest value glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: freed memory at a heap's top stays mapped up to this much
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024

#: "0" keeps glibc's defaults
TUNING_ENV = "PYVBAK_MALLOC_TUNING"

_tuned: bool | None = None


def tune_for_throughput() -> bool:
    """Apply the thresholds above once per process; whether they are in effect."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if sys.platform.startswith("linux") and os.environ.get(TUNING_ENV, "1") != "0":
            try:
                # the process's own symbols: libc's when it is glibc (find_library would
                # run ldconfig, milliseconds of every start-up)
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _tuned


#: per-block arrays this large are mapped without transparent huge pages (sparse_zeros)
SPARSE_MIN_BYTES = 64 * 1024 * 1024


def sparse_zeros(shape, dtype):
    """A zeroed numpy array for per-block data of a large disk that may be written only
    here and there (a thin disk's scattered data: its blocks' index records and hashes).

    With transparent huge pages (``always``, as on this project's VMs) the first write
    into each 2 MiB of a fresh ``np.zeros`` array makes the kernel zero all 2 MiB: 20 000
    digests scattered over a 1 TiB disk's 800 MB index touched every huge page, 2.1 s on
    a fresh VM, against 94 ms with 4 KiB pages (bench/RESULTS.md, "Fragmented disks of a
    terabyte").  So arrays of at least SPARSE_MIN_BYTES are anonymous maps advised
    ``MADV_NOHUGEPAGE``; smaller ones, and platforms without the advice, are plain
    ``np.zeros``.  A disk written densely pays 4 KiB faults instead (64 MB: ~16 k faults,
    milliseconds beside reading the ~90 GiB such an index describes)."""
    import numpy as np

    dt = np.dtype(dtype)
    count = 1
    for dim in (shape if isinstance(shape, tuple) else (shape,)):
        count *= int(dim)
    nbytes = count * dt.itemsize
    if nbytes < SPARSE_MIN_BYTES or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dt)
    # private: a shared anonymous map is shmem, whose pages are real even when only read
    # (the whole 800 MB index of a thin TiB was resident after one scan over it)
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20))
    try:
        area.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: nothing to advise
        pass
    return np.frombuffer(area, dt, count).reshape(shape)

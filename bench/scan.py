"""Benchmark the native scanner against a plain memory read of the same bytes.

    python bench/scan.py --size-mib 2048 --json [--kernel K] [--threads N]

Creates (or reuses) bench/.data/scan-<size>MiB.img — non-sparse, 3/4 random and 1/4 zero
1 MiB pieces — reads it once so it is in the page cache, then reports the best of
--reps runs of:
  scan_gbps     scan_file with --threads threads (default: all cores)
  scan_gbps_1t  scan_file with 1 thread
  memread_gbps  numpy sum over an np.memmap of the same file (already faulted in), 1 thread
  ratio         scan_gbps / memread_gbps, measured in the same run (this machine is noisy)
Prints one JSON object (--json) or a readable line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vmimage  # noqa: E402
from pyvbak import native  # noqa: E402

DATA = vmimage.DATA
MIB = 2**20


def make_image(size_mib: int) -> str:
    os.makedirs(DATA, exist_ok=True)
    path = os.path.join(DATA, f"scan-{size_mib}MiB.img")
    if os.path.exists(path) and os.path.getsize(path) == size_mib * MIB:
        return path
    rng = np.random.default_rng(20240601)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        done = 0
        while done < size_mib:
            n = min(64, size_mib - done)
            piece = rng.integers(0, 256, size=n * MIB, dtype=np.uint8)
            for i in range(n):
                if (done + i) % 4 == 3:  # every 4th MiB zero, but written (not a hole)
                    piece[i * MIB:(i + 1) * MIB] = 0
            f.write(piece.tobytes())
            done += n
    os.replace(tmp, path)
    return path


def page_cache(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MIB)
        while f.readinto(buf):
            pass


def best(fn, reps: int) -> float:
    t = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=64 * 1024)
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--window-mib", type=int, default=0, help="mmap window (0 = built-in default)")
    ap.add_argument("--pread", action="store_true", help="read with pread instead of mmap")
    ap.add_argument("--no-populate", action="store_true", help="mmap without MAP_POPULATE")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    kernel = native.selected_kernel(a.kernel)
    path = make_image(a.size_mib)
    page_cache(path)
    size = os.path.getsize(path)
    key = bytes(range(16))
    flags = (native.SCAN_PREAD if a.pread else 0) | (native.SCAN_NO_POPULATE if a.no_populate else 0)
    opts = dict(kernel=kernel, _flags=flags, _window=a.window_mib * MIB)

    mm = np.memmap(path, dtype=np.uint64, mode="r")
    mm.sum()  # fault the mapping in once: memread measures memory, not page faults
    t_mem = best(lambda: mm.sum(), a.reps)
    t_scan = best(lambda: native.scan_file(path, a.block_size, key, threads=a.threads, **opts), a.reps)
    t_1t = best(lambda: native.scan_file(path, a.block_size, key, threads=1, **opts), a.reps)
    del mm

    gb = size / 1e9
    res = {
        "kernel": kernel,
        "threads": a.threads,
        "block_size": a.block_size,
        "size_mib": a.size_mib,
        "mode": "pread" if a.pread else ("mmap" if a.no_populate else "mmap+populate"),
        "scan_gbps": round(gb / t_scan, 2),
        "scan_gbps_1t": round(gb / t_1t, 2),
        "memread_gbps": round(gb / t_mem, 2),
    }
    res["ratio"] = round(res["scan_gbps"] / res["memread_gbps"], 3)
    print(json.dumps(res) if a.json else " ".join(f"{k}={v}" for k, v in res.items()))


if __name__ == "__main__":
    main()

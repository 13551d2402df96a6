#!/usr/bin/env python3
"""SHA-256 of 64 KiB blocks: the native kernel (csrc/sha256.c) against hashlib, same run.

    python bench/sha256.py [--mib 256] [--block-kib 64] [--reps 5] [--json]

Hashes MIB of random bytes cut into blocks, as the engine does for changed blocks, with
(a) hashlib.sha256 per block (the reference, OpenSSL) and (b) native.sha256_blocks (one
call per 4 MiB chunk, two blocks at a time), each on 1 and on 2 threads; alternating the
order every round.  Reports the median MB/s and the per-round ratio native / hashlib.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from benchutil import cpu_model  # noqa: E402

from pyvbak import native  # noqa: E402

CHUNK = 4 << 20


def run_hashlib(view: memoryview, bs: int) -> None:
    for i in range(0, len(view), bs):
        hashlib.sha256(view[i : i + bs]).digest()


def run_native(view: memoryview, bs: int) -> None:
    offs = np.arange(0, len(view), bs, dtype=np.int64)
    native.sha256_blocks(view, offs, np.minimum(len(view) - offs, bs), kernel="sha-ni")


def timed(fn, data: memoryview, bs: int, threads: int) -> float:
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    t = time.perf_counter()
    if threads == 1:
        for c in chunks:
            fn(c, bs)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda c: fn(c, bs), chunks))
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--block-kib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if "sha-ni" not in native.available_sha256_kernels():
        print("this CPU has no SHA extensions: nothing to compare", file=sys.stderr)
        return 2
    data = memoryview(os.urandom(args.mib << 20))
    bs = args.block_kib * 1024
    res: dict = {}
    for threads in (1, 2):
        rates: dict = {"hashlib": [], "sha-ni": []}
        ratios = []
        for r in range(args.reps):
            order = ["hashlib", "sha-ni"] if r % 2 == 0 else ["sha-ni", "hashlib"]
            t = {}
            for name in order:
                t[name] = timed(run_hashlib if name == "hashlib" else run_native, data, bs, threads)
                rates[name].append(len(data) / t[name] / 1e6)
            ratios.append(t["hashlib"] / t["sha-ni"])
        res[f"{threads}_threads"] = {
            "hashlib_MBps": round(statistics.median(rates["hashlib"])),
            "native_MBps": round(statistics.median(rates["sha-ni"])),
            "ratio_median": round(statistics.median(ratios), 2),
            "ratios": [round(x, 2) for x in ratios],
        }
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "mib": args.mib, "block_bytes": bs, "results": res}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: hashlib {v['hashlib_MBps']} MB/s, native {v['native_MBps']} MB/s, x{v['ratio_median']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

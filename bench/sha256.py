#!/usr/bin/env python3
"""SHA-256 of 64 KiB blocks: the native kernels (csrc/sha256.c, csrc/sha256_x16.c) against
hashlib, same run.

    python bench/sha256.py [--mib 256] [--block-kib 64] [--reps 5] [--json]

Hashes MIB of random bytes cut into blocks, as the engine does for changed blocks, with
(a) hashlib.sha256 per block (the reference, OpenSSL) and (b) native.sha256_blocks with each
native kernel this CPU has (one call per 4 MiB chunk: "sha-ni" two blocks at a time,
"avx512" sixteen), each on 1 and on 2 threads; the order rotates every round.  Reports the
median MB/s of each and its per-round ratio to hashlib.
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


def run_native(kernel: str):
    def run(view: memoryview, bs: int) -> None:
        offs = np.arange(0, len(view), bs, dtype=np.int64)
        native.sha256_blocks(view, offs, np.minimum(len(view) - offs, bs), kernel=kernel)

    return run


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
    kernels = native.available_sha256_kernels()
    if len(kernels) < 2:
        print("this CPU has no native SHA-256 kernel: nothing to compare", file=sys.stderr)
        return 2
    runners = {k: run_hashlib if k == "hashlib" else run_native(k) for k in kernels}
    data = memoryview(os.urandom(args.mib << 20))
    bs = args.block_kib * 1024
    res: dict = {}
    for threads in (1, 2):
        rates: dict = {k: [] for k in kernels}
        ratios: dict = {k: [] for k in kernels if k != "hashlib"}
        for r in range(args.reps):
            order = kernels[r % len(kernels):] + kernels[: r % len(kernels)]
            t = {}
            for name in order:
                t[name] = timed(runners[name], data, bs, threads)
                rates[name].append(len(data) / t[name] / 1e6)
            for name in ratios:
                ratios[name].append(t["hashlib"] / t[name])
        res[f"{threads}_threads"] = {
            "MBps": {k: round(statistics.median(v)) for k, v in rates.items()},
            "x_hashlib_median": {k: round(statistics.median(v), 2) for k, v in ratios.items()},
            "x_hashlib": {k: [round(x, 2) for x in v] for k, v in ratios.items()},
        }
    res["default"] = native.selected_sha256_kernel()
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "mib": args.mib, "block_bytes": bs, "results": res}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in res.items():
            if k == "default":
                print(f"default kernel here: {v}")
                continue
            print(f"{k}: " + ", ".join(f"{name} {mbps} MB/s" + (f" (x{v['x_hashlib_median'][name]})" if name in v["x_hashlib_median"] else "")
                                     for name, mbps in v["MBps"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

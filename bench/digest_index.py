#!/usr/bin/env python3
"""The digest index at scale: merged in memory vs through the local cache, same run.

    python bench/digest_index.py [--records 4000000] [--files 100] [--lookups 500] [--json]

Makes a pyvbak repository under bench/.data/digest_index/ whose pack indexes hold RECORDS
synthetic entries (random digests, as many stored 64 KiB blocks: 4 M = 256 GiB stored) in
FILES index objects; no packs (only the index is measured).  Then, each in a fresh
subprocess (what a nightly incremental pays), times ``load_digest_index()`` followed by one
``locate`` of LOOKUPS digests (the changed blocks of an incremental), and records the
subprocess's peak RSS:

  memory   PYVBAK_CACHE_DIR="" - every pack index read, concatenated, argsorted (the
           behaviour before the cache; still the fallback);
  cached   the cache built by an earlier run, nothing new;
  delta    the cache plus one new pack index object (a night's backup) read and sorted.

The first cached load (the build) is reported too.  Rounds alternate the order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import vmimage  # noqa: E402
from benchutil import cpu_model, report  # noqa: E402

CHILD = r"""
import os, sys, time, json
from benchutil import peak_rss_mib
import numpy as np
t0 = time.perf_counter()
from pyvbak.repo.repository import Repository
repo = Repository.open(sys.argv[1])
t1 = time.perf_counter()
idx = repo.load_digest_index()
t2 = time.perf_counter()
keys = np.frombuffer(open(sys.argv[2], "rb").read(), "S32")
pos = idx.locate(keys)
t3 = time.perf_counter()
assert (pos >= 0).all(), "lookup missed a stored digest"
print(json.dumps({"load_s": t2 - t1, "locate_s": t3 - t2, "total_s": t3 - t1,
                  "maxrss_mib": peak_rss_mib(), "records": len(idx)}))
"""


def child(repo: str, keys: str, cache: str) -> dict:
    env = dict(os.environ, PYVBAK_CACHE_DIR=cache, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    out = subprocess.run([sys.executable, "-c", CHILD, repo, keys], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=4_000_000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--lookups", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np

    from pyvbak.repo import format as fmt
    from pyvbak.repo.repository import Repository

    work = os.path.join(vmimage.DATA, "digest_index")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        repo_path = os.path.join(work, "repo")
        repo = Repository.init(repo_path)
        rng = np.random.default_rng(1)
        per = -(-args.records // args.files)
        sample = []
        for i in range(args.files):
            n = min(per, args.records - i * per)
            recs = np.zeros(n, fmt.PACK_INDEX_RECORD)
            recs["digest"] = np.frombuffer(rng.bytes(32 * n), "V32")
            recs["pack"] = np.frombuffer(rng.bytes(32), "V32")[0]
            recs["offset"] = np.arange(n, dtype=np.uint64) * 40000
            recs["clen"], recs["ulen"] = 40000, 65536
            repo.write_pack_index(recs)
            sample.append(recs["digest"][rng.integers(0, n, size=max(1, args.lookups // args.files))])
        keys = os.path.join(work, "keys.bin")
        with open(keys, "wb") as f:
            f.write(np.concatenate(sample).tobytes())
        cache = tempfile.mkdtemp(prefix="cache-", dir=work)
        build = child(repo_path, keys, cache)
        results: dict = {"memory": [], "cached": []}
        for r in range(args.rounds):
            for mode in (["memory", "cached"] if r % 2 == 0 else ["cached", "memory"]):
                results[mode].append(child(repo_path, keys, "" if mode == "memory" else cache))
        # one more night: a new pack index object of ~1 % of the records
        n = max(1, args.records // 100)
        recs = np.zeros(n, fmt.PACK_INDEX_RECORD)
        recs["digest"] = np.frombuffer(rng.bytes(32 * n), "V32")
        repo.write_pack_index(recs)
        results["delta"] = [child(repo_path, keys, cache) for _ in range(args.rounds)]

        def med(mode, key):
            return round(statistics.median(x[key] for x in results[mode]), 4)

        out = {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "records": args.records,
            "index_files": args.files,
            "lookups": args.lookups,
            "first_cached_load_s (build)": round(build["total_s"], 3),
            "first_cached_load_maxrss_mib": round(build["maxrss_mib"]),
        }
        for mode in ("memory", "cached", "delta"):
            out[mode] = {k: med(mode, k) for k in ("load_s", "locate_s", "total_s", "maxrss_mib")}
        out["speedup_cached_vs_memory"] = round(out["memory"]["total_s"] / out["cached"]["total_s"], 1)
        out["speedup_delta_vs_memory"] = round(out["memory"]["total_s"] / out["delta"]["total_s"], 1)
        report(out, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

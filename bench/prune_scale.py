#!/usr/bin/env python3
"""Prune planning at scale: time and peak memory against reading what it must read.

    python bench/prune_scale.py [--records 4000000] [--rounds 3] [--json]

Makes a repository under bench/.data/prune_scale/ whose pack indexes hold RECORDS
synthetic entries (random digests, 250 per 16 MiB pack: 4 M = 256 GiB stored at 64 KiB)
in 40 index objects, and one snapshot referencing a random 90 % of them; no packs (the
plan is measured, nothing is deleted).  Then, each in a fresh subprocess:

  prune      ``prune_repository(dry_run=True)`` under the exclusive lock: time, peak RSS;
  baseline   reading and decoding every pack index and the snapshot index (the input any
             prune has to read), and their union of digests as one array: time, peak RSS.

``ratio = prune_s / baseline_s``; rounds alternate the order, medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vmimage  # noqa: E402
from benchutil import cpu_model, report  # noqa: E402

PRUNE = r"""
import sys, time, json
from benchutil import peak_rss_mib
from pyvbak.repo.repository import Repository
from pyvbak.repo.prune import prune_repository
r = Repository.open(sys.argv[1])
t = time.perf_counter()
with r.lock(exclusive=True, purpose="bench"):
    rep = prune_repository(r, dry_run=True)
print(json.dumps({"s": time.perf_counter() - t, "maxrss_mib": peak_rss_mib(),
                  "referenced": rep["referenced_blocks"]}))
"""

BASELINE = r"""
import sys, time, json
from benchutil import peak_rss_mib
import numpy as np
from pyvbak.repo import format as fmt
from pyvbak.repo.repository import Repository
r = Repository.open(sys.argv[1])
t = time.perf_counter()
recs = np.concatenate([fmt.decode_pack_index(r.backend.read(n), n) for n in sorted(r.pack_index_names())])
snap = r.snapshots()[0]
_, _, srecs = r.load_snapshot_index(snap)
print(json.dumps({"s": time.perf_counter() - t, "maxrss_mib": peak_rss_mib(),
                  "records": len(recs) + len(srecs)}))
"""


def make(repo_path: str, records: int) -> None:
    import numpy as np

    from pyvbak.repo import format as fmt
    from pyvbak.repo.repository import Repository

    repo = Repository.init(repo_path)
    rng = np.random.default_rng(1)
    files = 40
    per = -(-records // files)
    digests = []
    for i in range(files):
        n = min(per, records - i * per)
        recs = np.zeros(n, fmt.PACK_INDEX_RECORD)
        recs["digest"] = np.frombuffer(rng.bytes(32 * n), "V32")
        recs["pack"] = np.frombuffer(rng.bytes(32 * (n // 250 + 1)), "V32")[np.arange(n) // 250]
        recs["offset"] = (np.arange(n) % 250).astype(np.uint64) * 40000
        recs["clen"], recs["ulen"] = 40000, 65536
        repo.write_pack_index(recs)
        digests.append(recs["digest"])
    every = np.concatenate(digests)
    ref = every[rng.random(len(every)) < 0.9]
    srecs = np.zeros(len(ref), fmt.SNAPSHOT_RECORD)
    srecs["digest"] = ref
    meta = {"vm": "bench", "disk": "d", "source": "synthetic", "size": len(ref) * 65536, "block_size": 65536,
            "time": "2026-11-25T00:00:00Z", "parent": None, "change_tracking": {}, "stats": {}, "warnings": []}
    with repo.lock():
        repo.commit_snapshot("20261125T000000Z-00000001", meta, srecs)


def child(code: str, repo: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code, repo], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=4_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--make", metavar="REPO", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:
        make(a.make, a.records)
        return 0
    work = os.path.join(vmimage.DATA, "prune_scale")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        repo = os.path.join(work, "repo")
        # in a child too: a child's peak RSS counts what it inherited at fork, so the
        # parent must not hold the generated arrays
        subprocess.run([sys.executable, os.path.abspath(__file__), "--make", repo, "--records", str(a.records)], check=True)
        res: dict[str, list[dict]] = {"prune": [], "baseline": []}
        for r in range(a.rounds):
            for mode in (["prune", "baseline"] if r % 2 == 0 else ["baseline", "prune"]):
                res[mode].append(child(PRUNE if mode == "prune" else BASELINE, repo))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"cpu": cpu_model(), "records": a.records, "rounds": a.rounds}
    for mode, rows in res.items():
        out[mode] = {k: round(statistics.median(x[k] for x in rows), 3) for k in ("s", "maxrss_mib")}
    out["ratio"] = round(out["prune"]["s"] / out["baseline"]["s"], 2)
    out["rss_ratio"] = round(out["prune"]["maxrss_mib"] / out["baseline"]["maxrss_mib"], 2)
    report(out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

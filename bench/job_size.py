#!/usr/bin/env python3
"""Full backups of an image file with full-read jobs of several sizes, same run, alternating.

    python bench/job_size.py [--size-mib 2048] [--rounds 4] [--sizes-mib 1,2,4,8,16] [--json]

Each round, for each job size in alternating order: a fresh repository on the repository
disk (bench/.data/), the VM-like image of bench/vmimage.py (the peers bench's image, put
back in the page cache), and an in-process ``run_backup`` in a fresh process with the
engine's full-read job size (``LOCAL_CHUNK_BYTES``) set to the variant.  Measured: the
backup's wall time and the process's user + system CPU during it.  Reported: medians per
size and each one's ratio to the engine's own choice (``LOCAL_CHUNK_BYTES``; < 1: faster).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchutil import cpu_model, ensure_bytecode, image_bench_args, report  # noqa: E402
from vmimage import ensure_image, page_cache  # noqa: E402

DATA = os.environ.get("PYVBAK_BENCH_DATA") or os.path.join(HERE, ".data")
MiB = 1024 * 1024

_CHILD = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pyvbak import allocator
allocator.tune_for_throughput()  # as the CLI does
import pyvbak.engine.backup as eb
from pyvbak.repo.repository import Repository
from pyvbak.sources.file import FileSource
job = int(sys.argv[2])
eb.LOCAL_CHUNK_BYTES, eb.LOCAL_CHUNK_BUDGET = job, 1 << 62
eb.GROUP_BYTES = eb.CHUNK_BYTES = min(job, eb.CHUNK_BYTES)  # (below 4 MiB: the runs are cut smaller too)
repo = Repository.init(sys.argv[3])
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
with repo.lock(purpose="bench"), FileSource(sys.argv[4]) as src:
    res = eb.run_backup(repo, src, vm="bench", disk="d")
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
                  "stored_bytes": res.stored_bytes}))
'''


def main() -> int:
    a = image_bench_args(__doc__, size_mib=2048, rounds=4,
                         extra=lambda ap: ap.add_argument("--sizes-mib", default="1,2,4,8,16"))
    ensure_bytecode()
    sys.path.insert(0, os.path.dirname(HERE))
    from pyvbak.engine.backup import LOCAL_CHUNK_BYTES

    sizes = [int(float(x) * MiB) for x in a.sizes_mib.split(",")]
    if LOCAL_CHUNK_BYTES not in sizes:
        sizes.append(LOCAL_CHUNK_BYTES)
    os.makedirs(DATA, exist_ok=True)
    img = os.path.join(DATA, f"vm-{a.size_mib}MiB-s1-peers.img")
    ensure_image(img, a.size_mib)
    page_cache(img)
    repo = os.path.join(DATA, "job-size-repo")
    runs: dict[int, list[dict]] = {s: [] for s in sizes}
    try:
        for r in range(a.rounds):
            for s in sizes if r % 2 == 0 else sizes[::-1]:
                shutil.rmtree(repo, ignore_errors=True)
                out = subprocess.run([sys.executable, "-c", _CHILD, os.path.dirname(HERE), str(s), repo, img],
                                     check=True, capture_output=True, text=True).stdout
                runs[s].append(json.loads(out.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    med = {s: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "cpu_s")} for s, rs in runs.items()}
    base = med[LOCAL_CHUNK_BYTES]
    report({
        "cpu": cpu_model(), "cores": os.cpu_count(), "size_mib": a.size_mib, "rounds": a.rounds,
        "engine_choice_mib": LOCAL_CHUNK_BYTES / MiB,
        "results": [{"job_mib": s / MiB, "wall_s": round(med[s]["wall_s"], 3), "cpu_s": round(med[s]["cpu_s"], 2),
                     "wall_rounds": [round(x["wall_s"], 3) for x in runs[s]],
                     "wall_vs_engine_choice": round(med[s]["wall_s"] / base["wall_s"], 3)}
                    for s in sorted(sizes)],
        # the job size changes how the work is cut, never what is stored
        "stored_bytes_identical": len({x["stored_bytes"] for rs in runs.values() for x in rs}) == 1,
    }, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

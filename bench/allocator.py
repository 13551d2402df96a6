#!/usr/bin/env python3
"""Full and incremental CLI backups with pyvbak's glibc malloc thresholds against glibc's
defaults (``PYVBAK_MALLOC_TUNING=0``), same run, alternating.

    python bench/allocator.py [--size-mib 2048] [--rounds 3] [--json]

Each round, for each variant in alternating order: a fresh repository on the repository
disk (bench/.data/), the VM-like image of bench/vmimage.py put back in the page cache,
then ``pyvbak backup IMG --repo R --vm bench --json`` (a full backup) in its own process,
then 1 % of the image's 4 KiB pages rewritten in clustered runs (the same seed for both
variants of a round, applied to a copy) and an incremental.  Measured per command: wall
time, and the child's user and system CPU (``RUSAGE_CHILDREN``) - the settings exist to cut
system CPU spent faulting in memory glibc had just given back (pyvbak/allocator.py).

Reported: medians per variant and ``default_over_tuned`` for wall and CPU (> 1: the
settings help).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchutil import cpu_model, ensure_bytecode, image_bench_args, report  # noqa: E402
from vmimage import ensure_image, page_cache, rewrite_clustered  # noqa: E402

DATA = os.environ.get("PYVBAK_BENCH_DATA") or os.path.join(HERE, ".data")
VARIANTS = {"tuned": "1", "default": "0"}


def timed(cmd: list[str], env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc = json.loads(out)
    doc = doc[0] if isinstance(doc, list) else doc
    return {"wall_s": round(wall, 4), "user_s": round(after.ru_utime - before.ru_utime, 3),
            "sys_s": round(after.ru_stime - before.ru_stime, 3), "duration_s": round(doc["duration"], 4)}


def main() -> int:
    a = image_bench_args(__doc__, size_mib=2048, rounds=3)
    ensure_bytecode()
    os.makedirs(DATA, exist_ok=True)
    pristine = os.path.join(DATA, f"vm-{a.size_mib}MiB-s1-allocator.img")
    ensure_image(pristine, a.size_mib)
    img = os.path.join(DATA, "allocator-work.img")
    repo = os.path.join(DATA, "allocator-repo")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        for rnd in range(a.rounds):
            order = list(VARIANTS) if rnd % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                env = dict(os.environ, PYVBAK_MALLOC_TUNING=VARIANTS[variant])
                shutil.rmtree(repo, ignore_errors=True)
                shutil.copyfile(pristine, img)
                subprocess.run([sys.executable, "-m", "pyvbak", "init", repo], check=True, capture_output=True)
                cmd = [sys.executable, "-m", "pyvbak", "backup", img, "--repo", repo, "--vm", "bench", "--json"]
                page_cache(img)
                full = timed(cmd, env)
                rewrite_clustered(img, seed=100 + rnd)
                page_cache(img)
                incr = timed(cmd, env)
                runs[variant].append({"full": full, "incremental": incr})
                print(f"round {rnd} {variant}: full {full['wall_s']:.3f} s (user {full['user_s']:.2f}, sys "
                      f"{full['sys_s']:.2f}), incremental {incr['wall_s']:.3f} s (sys {incr['sys_s']:.3f})",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(repo, ignore_errors=True)
        if os.path.exists(img):
            os.unlink(img)

    def med(variant: str, kind: str, key: str) -> float:
        return round(statistics.median(r[kind][key] for r in runs[variant]), 4)

    summary = {}
    for kind in ("full", "incremental"):
        for key in ("wall_s", "user_s", "sys_s"):
            t, d = med("tuned", kind, key), med("default", kind, key)
            summary[f"{kind}_{key}"] = {"tuned": t, "default": d, "default_over_tuned": round(d / t, 3) if t else None}
    out = {"command": "python bench/allocator.py " + " ".join(sys.argv[1:]), "cpu": cpu_model(),
           "cores": os.cpu_count(), "size_mib": a.size_mib, "rounds": a.rounds, "summary": summary, "runs": runs}
    report(out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""LocalBackend pack writes: O_DIRECT path against the buffered path, in one run.

    python bench/backend_write.py --total-mib 1024 --json [--reps 3] [--threads 1]
                                  [--sweep 64K,256K,1M,4M] [--sweep-mib 256] [--work-dir DIR]

Writes ``--total-mib`` MiB as packs of ``--pack-mib`` (16) MiB, each given to
``write_new(name, frames)`` as a list of ~``--frames`` (300) random-size bytes frames of
random (incompressible, like zstd output) data -- the shape the packer hands the backend --
through ``LocalBackend(dir, direct_io=True)`` and ``LocalBackend(dir, direct_io=False)``,
alternating which goes first, ``--reps`` rounds.  Each round writes into a fresh directory
under ``--work-dir`` (default bench/.data/backend_write, i.e. the disk the repository would
be on); ``sync`` runs untimed before each timed write, the directory is removed untimed
after it.  The frames are built before timing (a few distinct packs, reused under new names)
so fresh-memory page faults are not counted.

``--settle`` (default 10 s) waits, untimed, before each timed write.  On this VM
(virtio_balloon with free page reporting) pages freed a few seconds ago are handed back to
the host and cost ~2.5 s/GiB of system CPU to fill again, like the never-used memory a long
backup's page cache grows into; pages reused at once cost ~0.3 s/GiB (dd bs=16M 1 GiB
conv=fsync after rm + sleep 0/1/3/6 s: 0.35/0.81/0.92/1.45 s sys).  ``--settle 0`` measures
that optimistic case.

Reported per mode (median over rounds): wall seconds per GiB and CPU seconds per GiB
(``resource.getrusage(RUSAGE_SELF)`` user + sys, all threads), and the ratios
``cpu_ratio = buffered_cpu / direct_cpu`` and ``wall_ratio = buffered_wall / direct_wall``
computed within each round (> 1 means the direct path is cheaper).

``--sweep SIZES`` repeats the comparison for objects of each size (``--sweep-mib`` MiB of
them per mode and round, frames of ~56 KiB like packs) with the direct threshold lowered to
0, to choose ``pyvbak.backends.local.DIRECT_MIN_BYTES``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from pyvbak.backends import local as local_mod  # noqa: E402
from pyvbak.backends.local import LocalBackend  # noqa: E402
from benchutil import cpu_model  # noqa: E402
import vmimage  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_WORK = os.path.join(vmimage.DATA, "backend_write")
DISTINCT_PACKS = 4



def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if text[-1:] in "KMG" else text) * mult


def make_frames(rng: random.Random, size: int, mean_frame: int) -> list[bytes]:
    """``size`` bytes of random data as frames of random sizes (1 .. 2*mean_frame)."""
    frames, left = [], size
    while left:
        n = min(left, rng.randint(1, 2 * mean_frame))
        frames.append(os.urandom(n))
        left -= n
    return frames


def cpu_seconds() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def timed_write(root: str, direct: bool, objects: list[list[bytes]], count: int, threads: int, settle: float) -> dict:
    """Write ``count`` objects (cycling through ``objects``) into a fresh backend at root."""
    shutil.rmtree(root, ignore_errors=True)
    backend = LocalBackend(root, direct_io=direct)
    backend.write_new("config", b"warm")  # create the root outside the timed region
    subprocess.run(["sync"], check=True)
    time.sleep(settle)  # let the guest hand the previous round's freed pages back (see --settle)
    before = dict(local_mod.direct_stats)
    names = [f"packs/{i % 256:02x}/{i:064x}" for i in range(count)]
    total = sum(sum(len(f) for f in objects[i % len(objects)]) for i in range(count))
    u0, s0 = cpu_seconds()
    t0 = time.perf_counter()
    if threads <= 1:
        for i, name in enumerate(names):
            assert backend.write_new(name, objects[i % len(objects)])
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for ok in pool.map(lambda i: backend.write_new(names[i], objects[i % len(objects)]), range(count)):
                assert ok
    wall = time.perf_counter() - t0
    u1, s1 = cpu_seconds()
    paths = {k: local_mod.direct_stats[k] - before[k] for k in before}
    want = "direct" if direct else "buffered"
    assert paths[want] == count, (want, paths)  # the path under test was really taken
    backend.close()
    shutil.rmtree(root, ignore_errors=True)
    gib = total / GIB
    return {
        "bytes": total,
        "wall_s_per_gib": wall / gib,
        "cpu_s_per_gib": (u1 - u0 + s1 - s0) / gib,
        "user_s_per_gib": (u1 - u0) / gib,
        "sys_s_per_gib": (s1 - s0) / gib,
        "mib_per_s": total / MIB / wall,
    }


def compare(work: str, objects, count: int, reps: int, threads: int, settle: float) -> dict:
    rounds = []
    for r in range(reps):
        order = [True, False] if r % 2 == 0 else [False, True]
        res = {}
        for direct in order:
            res["direct" if direct else "buffered"] = timed_write(os.path.join(work, "repo"), direct, objects, count, threads, settle)
        res["cpu_ratio"] = res["buffered"]["cpu_s_per_gib"] / max(res["direct"]["cpu_s_per_gib"], 1e-9)
        res["wall_ratio"] = res["buffered"]["wall_s_per_gib"] / max(res["direct"]["wall_s_per_gib"], 1e-9)
        rounds.append(res)

    def med(mode, key):
        return round(statistics.median(r[mode][key] for r in rounds), 3)

    out = {}
    for mode in ("direct", "buffered"):
        out[mode] = {k: med(mode, k) for k in ("wall_s_per_gib", "cpu_s_per_gib", "user_s_per_gib", "sys_s_per_gib", "mib_per_s")}
    for key in ("cpu_ratio", "wall_ratio"):
        vals = [r[key] for r in rounds]
        out[key] = round(statistics.median(vals), 2)
        out[key + "_min_max"] = [round(min(vals), 2), round(max(vals), 2)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total-mib", type=int, default=1024)
    ap.add_argument("--pack-mib", type=int, default=16)
    ap.add_argument("--frames", type=int, default=300, help="frames per pack (about)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="writer threads (the backup's workers)")
    ap.add_argument("--sweep", default="", help="object sizes for the threshold sweep, e.g. 64K,256K,1M,4M")
    ap.add_argument("--sweep-mib", type=int, default=256)
    ap.add_argument("--work-dir", default=DEFAULT_WORK)
    ap.add_argument("--settle", type=float, default=10.0,
                    help="seconds to wait (untimed) before each timed write; 0 reuses the pages the previous round just freed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    rng = random.Random(a.seed)
    os.makedirs(a.work_dir, exist_ok=True)
    fstype = " ".join(subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", a.work_dir], capture_output=True, text=True).stdout.split())
    pack = a.pack_mib * MIB
    mean_frame = pack // a.frames
    packs = [make_frames(rng, pack, mean_frame) for _ in range(DISTINCT_PACKS)]
    count = max(1, a.total_mib * MIB // pack)
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "fs": fstype,
        "work_dir": a.work_dir,
        "packs": count,
        "pack_mib": a.pack_mib,
        "frames_per_pack": round(statistics.mean(len(p) for p in packs)),
        "threads": a.threads,
        "reps": a.reps,
        "settle_s": a.settle,
        "direct_min_bytes": local_mod.DIRECT_MIN_BYTES,
        "staging_max_bytes": local_mod.STAGING_MAX_BYTES,
        "packs_result": compare(a.work_dir, packs, count, a.reps, a.threads, a.settle),
    }
    if a.sweep:
        sweep = {}
        saved = local_mod.DIRECT_MIN_BYTES
        local_mod.DIRECT_MIN_BYTES = 0  # every object takes the path under test
        try:
            for text in a.sweep.split(","):
                size = parse_size(text)
                objs = [make_frames(rng, size, min(size, mean_frame)) for _ in range(DISTINCT_PACKS)]
                n = max(1, a.sweep_mib * MIB // size)
                sweep[text.strip()] = compare(a.work_dir, objs, n, a.reps, a.threads, a.settle)
        finally:
            local_mod.DIRECT_MIN_BYTES = saved
        result["sweep"] = sweep
    shutil.rmtree(a.work_dir, ignore_errors=True)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        r = result["packs_result"]
        print(f"{result['cpu']}, {result['cores']} cores, {result['fs']}: {count} x {a.pack_mib} MiB packs")
        for mode in ("direct", "buffered"):
            m = r[mode]
            print(f"  {mode:9s} wall {m['wall_s_per_gib']:.3f} s/GiB  cpu {m['cpu_s_per_gib']:.3f} s/GiB "
                  f"(user {m['user_s_per_gib']:.3f}, sys {m['sys_s_per_gib']:.3f})")
        print(f"  buffered/direct: cpu {r['cpu_ratio']}x, wall {r['wall_ratio']}x")
        for size, s in result.get("sweep", {}).items():
            print(f"  {size:>6s}: cpu direct {s['direct']['cpu_s_per_gib']:.3f} buffered {s['buffered']['cpu_s_per_gib']:.3f} "
                  f"({s['cpu_ratio']}x); wall direct {s['direct']['wall_s_per_gib']:.3f} buffered "
                  f"{s['buffered']['wall_s_per_gib']:.3f} ({s['wall_ratio']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

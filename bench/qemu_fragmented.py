#!/usr/bin/env python3
"""A large, fragmented VM disk: hot backups of a 1 TiB qcow2 whose data lies in many
scattered clusters, against the cost of learning its allocation map once.

    python bench/qemu_fragmented.py [--size-gib 1024] [--clusters 20000] [--rounds 3] [--json]

A sparse qcow2 of --size-gib behind the stand-in VM (pyvbak/hypervisors/qemu/standin.py:
``qemu-storage-daemon``, a QMP socket, a writable FUSE view as the guest); the guest writes
--clusters random 64 KiB clusters at random cluster-aligned offsets (seed 1), so QEMU's
allocation map of the disk has about as many extents.  Then, each as a CLI command in its
own process (``python -m pyvbak``):

  * the full backup;
  * per round: the guest writes 1 MiB at a random offset, then the incremental (checked:
    ``"cbt": true``).

Baseline, same run: ``qemu-img map -U --output=json`` of the image, i.e. what it costs
QEMU's block layer to walk the whole allocation map once (a full backup must; before
session 8 an incremental asked for it twice, once on the dirty bitmap's query).
``incr_over_map = incremental / map`` (< 1: an incremental costs less than one whole-disk
map).  Everything lives under a temporary directory in /tmp, removed at the end; the
daemon is stopped and the FUSE view unmounted in ``finally``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchutil import cpu_model, ensure_bytecode  # noqa: E402
from qemu_multidisk import pyvbak  # noqa: E402  (runs one CLI command, checks "cbt")

sys.path.insert(0, os.path.dirname(HERE))
from pyvbak.hypervisors.qemu.standin import StandInVM, missing_tools  # noqa: E402

GiB, MiB, CLUSTER = 1 << 30, 1 << 20, 64 << 10


def scatter(guest: str, size: int, clusters: int, seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(guest, os.O_WRONLY)
    try:
        for _ in range(clusters):
            os.pwrite(fd, rng.randbytes(CLUSTER), rng.randrange(size // CLUSTER) * CLUSTER)
        os.fsync(fd)
    finally:
        os.close(fd)


def map_seconds(image: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    p = subprocess.run(["qemu-img", "map", "-U", "--output=json", image], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, len(json.loads(p.stdout))


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=int, default=1024)
    ap.add_argument("--clusters", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if missing_tools():
        raise SystemExit(f"needs {', '.join(missing_tools())}")
    ensure_bytecode()  # time pyvbak as installed: see benchutil.ensure_bytecode
    size = a.size_gib * GiB
    work = tempfile.mkdtemp(prefix="pvb-frag-", dir="/tmp")
    env = dict(os.environ, PYVBAK_WORK_DIR=os.path.join(work, "w"), PYTHONPATH=os.path.dirname(HERE))
    image = os.path.join(work, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(size)], check=True)
    vm = StandInVM(work, [image])
    rounds = []
    try:
        vm.start()
        scatter(vm.guests[0], size, a.clusters, seed=1)
        map_s, extents = map_seconds(image)
        repo = os.path.join(work, "repo")
        pyvbak(["init", repo], env)
        backup = ["backup", vm.uri(), "--repo", repo, "--vm", "vm", "--json"]
        full_s = pyvbak(backup, env)
        rng = random.Random(2)
        for _ in range(a.rounds):
            fd = os.open(vm.guests[0], os.O_WRONLY)
            try:
                os.pwrite(fd, rng.randbytes(MiB), rng.randrange(size // MiB) * MiB)
                os.fsync(fd)
            finally:
                os.close(fd)
            incr_s = pyvbak(backup, env)
            map_again, _ = map_seconds(image)
            rounds.append({"incr_s": round(incr_s, 3), "map_s": round(map_again, 3)})
    finally:
        vm.stop()
        shutil.rmtree(work, ignore_errors=True)
    incr = statistics.median(r["incr_s"] for r in rounds)
    maps = statistics.median([map_s] + [r["map_s"] for r in rounds])
    out = {
        "command": " ".join(["python", "bench/qemu_fragmented.py", *sys.argv[1:]]),
        "cpu": cpu_model(), "cores": os.cpu_count(), "size_gib": a.size_gib, "clusters": a.clusters,
        "map_extents": extents, "map_s": round(maps, 3), "full_s": round(full_s, 3), "incr_s": round(incr, 3),
        "full_over_map": round(full_s / maps, 2), "incr_over_map": round(incr / maps, 2), "rounds": rounds,
    }
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{a.size_gib} GiB qcow2, {a.clusters} scattered clusters ({extents} map extents): "
              f"qemu-img map {maps:.2f} s; full backup {full_s:.2f} s ({full_s / maps:.1f}x); "
              f"incremental of 1 MiB {incr:.2f} s ({incr / maps:.2f}x the map)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

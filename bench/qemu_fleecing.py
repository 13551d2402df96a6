#!/usr/bin/env python3
"""The two ways of taking a running disk's frozen view, side by side: snapshot-access
(QEMU >= 8.0, forced here on 7.2: a raw fleecing file pyvbak creates itself, the view a snapshot-access node
over the copy-before-write filter) against the qcow2 fleecing image backed by the disk
(what QEMU < 8.0 gets; a copy of a cached `qemu-img create` template per disk per backup).

    python bench/qemu_fleecing.py [--disks 4] [--size-mib 256] [--rounds 7] [--json]

The stand-in VM of bench/qemu_multidisk.py (``qemu-storage-daemon``, ``--disks`` qcow2
disks, each half random data) is backed up once in full; then each round rewrites 1 % of
every disk's 4 KiB pages through the guest views and times one in-process incremental of
all the disks (``backup_source``: QEMU session set-up, the engine, commit, teardown) per
variant, in alternating order, rewriting again before each.  In-process, so that
interpreter start-up does not drown a difference of milliseconds.  Reported: medians,
and ``qcow2_over_snapshot_access`` (> 1: snapshot-access is faster).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchutil import cpu_model, image_bench_args  # noqa: E402
from qemu_multidisk import Disks  # noqa: E402

sys.path.insert(0, os.path.dirname(HERE))
from pyvbak.cli.backup_cmd import backup_source  # noqa: E402
from pyvbak.hypervisors.qemu import hot  # noqa: E402
from pyvbak.hypervisors.qemu.standin import missing_tools  # noqa: E402
from pyvbak.repo.repository import Repository  # noqa: E402

MiB = 1 << 20
# the version each form is taken from, forced: QEMU 7.2 here gets the qcow2 form by default
# (hot.SNAPSHOT_ACCESS_SINCE), its snapshot-access view is read block by block by this bench
VARIANTS = {"snapshot_access": (7, 1), "qcow2": (99, 0)}


def main() -> int:
    a = image_bench_args(__doc__, size_mib=256, rounds=7,
                         extra=lambda ap: ap.add_argument("--disks", type=int, default=4))
    if missing_tools():
        raise SystemExit(f"needs {', '.join(missing_tools())}")
    work = tempfile.mkdtemp(prefix="pvb-fl-", dir="/tmp")
    vm = None
    rounds = []
    try:
        vm = Disks(work, a.disks, a.size_mib * MiB, seed=1).start()
        repo = Repository.init(os.path.join(work, "repo"))
        wd = os.path.join(work, "w")

        def backup(variant: str) -> float:
            hot.SNAPSHOT_ACCESS_SINCE = VARIANTS[variant]
            t0 = time.perf_counter()
            results, _ = backup_source(repo, vm.uri(), vm="vm", show_progress=False, work_dir=wd)
            dt = time.perf_counter() - t0
            if any(not r.cbt for r in results) and rounds:
                raise SystemExit(f"change tracking not used: {results[0].fallback_reason}")
            return dt

        backup("snapshot_access")  # the full backup
        for rnd in range(a.rounds):
            res = {}
            order = ("snapshot_access", "qcow2") if rnd % 2 == 0 else ("qcow2", "snapshot_access")
            for i, variant in enumerate(order):
                vm.rewrite(seed=100 + 2 * rnd + i)
                res[f"{variant}_s"] = backup(variant)
            rounds.append(res)
    finally:
        hot.SNAPSHOT_ACCESS_SINCE = VARIANTS["snapshot_access"]
        if vm is not None:
            vm.stop()
        shutil.rmtree(work, ignore_errors=True)
    sa = statistics.median(r["snapshot_access_s"] for r in rounds)
    q = statistics.median(r["qcow2_s"] for r in rounds)
    out = {
        "command": " ".join(["python", "bench/qemu_fleecing.py", *sys.argv[1:]]),
        "cpu": cpu_model(), "cores": os.cpu_count(), "disks": a.disks, "size_mib": a.size_mib,
        "snapshot_access_s": round(sa, 4), "qcow2_s": round(q, 4),
        "per_disk_saved_ms": round(1000 * (q - sa) / a.disks, 1),
        "qcow2_over_snapshot_access": round(q / sa, 3),
        "rounds": [{k: round(v, 4) for k, v in r.items()} for r in rounds],
    }
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{a.disks} disks x {a.size_mib} MiB, in-process incremental of 1 % each: snapshot-access "
              f"{sa:.3f} s, qcow2 fleecing {q:.3f} s ({out['qcow2_over_snapshot_access']}x, "
              f"{out['per_disk_saved_ms']} ms per disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

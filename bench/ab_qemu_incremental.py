#!/usr/bin/env python3
"""A/B of two (or more) pyvbak checkouts on the hot incremental of bench/qemu_incremental.py,
in process, alternating on one VM: for changes of a few milliseconds that separate
benchmark runs on this shared machine cannot see.

    git worktree add /tmp/wt-base COMMIT && (cd /tmp/wt-base && python setup.py build_ext --inplace)
    python bench/ab_qemu_incremental.py --rounds 15 /tmp/wt-base /path/to/this/checkout [--json]

One ``qemu-storage-daemon`` stands in for the VM (bench/qemu_multidisk.py: one 2 GiB disk
of the VM-like image, a writable FUSE export as the guest).  One long-lived child process
per checkout imports that checkout's pyvbak and, on each request, runs
``main(["backup", "qemu:///…", "--repo", R, "--vm", "vm", "--json"])`` into the shared
repository R (the same format), timing ``main()`` alone (interpreter start-up and imports
are the same for every checkout and paid once).  Every child runs the full backup and one
warm-up incremental first.  Per round, before each child's backup: the 1 % clustered
rewrite of 4 KiB pages through the guest, ``sync``, ``--settle`` seconds; the order of
the children rotates each round.  Reported: each checkout's median and sorted times, and
the median of the per-round differences against the first checkout.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchutil import PyvbakWorker  # noqa: E402
from qemu_multidisk import Disks  # noqa: E402

MiB = 1 << 20

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkouts", nargs="+", help="directories of pyvbak checkouts (built), the first is the base")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--settle", type=float, default=0.3)
    ap.add_argument("--work-dir", default=os.path.join(HERE, ".data"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    roots = [os.path.abspath(c) for c in a.checkouts]
    if len(roots) < 2:
        raise SystemExit("give at least two checkouts")
    # labels: the checkout, numbered when one is given twice (an A/A run shows the noise)
    labels = [r if roots.count(r) == 1 else f"{r} ({roots[:i + 1].count(r)})" for i, r in enumerate(roots)]
    os.makedirs(a.work_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ab-qemu-", dir=a.work_dir)
    vm = Disks(work, 1, a.size_mib * MiB, seed=1).start()
    children: dict[str, PyvbakWorker] = {}  # by label
    times: dict[str, list[float]] = collections.defaultdict(list)
    try:
        repo = os.path.join(work, "repo")
        env = dict(os.environ, PYVBAK_WORK_DIR=os.path.join(work, "w"))
        env.pop("PYTHONPATH", None)
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                        "from pyvbak.cli.main import main; sys.exit(main(['init', sys.argv[2]]))", roots[0], repo],
                       check=True, capture_output=True, env=env, cwd=work)
        args = ["backup", vm.uri(), "--repo", repo, "--vm", "vm", "--json"]
        for label, root in zip(labels, roots):
            children[label] = PyvbakWorker(root, args, env, cwd=work)

        def backup(label: str) -> dict:
            seconds, code, result = children[label].run()
            if code != 0:
                raise SystemExit(f"backup with {label} failed (exit {code})")
            return {"s": seconds, "cbt": result.get("cbt")}

        for label in labels:  # the full backup (first child), then a warm-up incremental each
            backup(label)
        for r in range(a.rounds):
            for i, label in enumerate(labels[r % len(labels):] + labels[: r % len(labels)]):
                vm.rewrite(seed=1000 + r * len(labels) + i)
                os.sync()
                time.sleep(a.settle)
                doc = backup(label)
                if doc["cbt"] is not True:
                    raise SystemExit(f"the incremental with {label} did not use the dirty bitmap")
                times[label].append(doc["s"])
        base = labels[0]
        out = {"command": " ".join(sys.argv), "rounds": a.rounds, "size_mib": a.size_mib,
               "checkouts": {label: {"median_ms": round(statistics.median(times[label]) * 1000, 1),
                                     "sorted_ms": sorted(round(x * 1000, 1) for x in times[label])} for label in labels},
               "paired_median_diff_ms": {label: round(statistics.median(
                   [b - x for b, x in zip(times[base], times[label])]) * 1000, 1) for label in labels[1:]}}
        if a.json:
            print(json.dumps(out, indent=2))
        else:
            for label, d in out["checkouts"].items():
                print(f"{label}: median {d['median_ms']} ms {d['sorted_ms']}")
            for label, diff in out["paired_median_diff_ms"].items():
                print(f"{base} - {label}: paired median {diff} ms")
        return 0
    finally:
        for child in children.values():
            child.close()
        vm.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

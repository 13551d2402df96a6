#!/usr/bin/env python3
"""A VM with several disks: one `pyvbak backup qemu:///…?node=A&node=B…` against one
invocation per disk, incremental backups, same VM, same rewrites, same run.

    python bench/qemu_multidisk.py [--disks 8] [--size-mib 256] [--rounds 3] [--json]

The stand-in VM (pyvbak/hypervisors/qemu/standin.py: ``qemu-storage-daemon``) serves
``--disks`` qcow2 disks (nodes disk0…, each half random data) with a QMP socket for pyvbak
and a writable FUSE view per disk (the guest).  After
one full backup of every disk, each round rewrites 1 % of every disk's 4 KiB pages
(clustered runs, fsync) and times, in alternating order:

  * ``together``: one invocation naming every node (all disks frozen at one instant);
  * ``apart``: one invocation per disk, one after the other (each its own instant);

rewriting again between the two so both back up the same amount of change.  Reported:
medians of the rounds and ``apart_over_together`` (> 1: one invocation is faster).
Everything runs under a temporary directory in /tmp (UNIX socket paths), removed at the
end; the daemon is stopped and the FUSE views unmounted in ``finally``.
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
from benchutil import cpu_model, ensure_bytecode, image_bench_args  # noqa: E402

sys.path.insert(0, os.path.dirname(HERE))
from pyvbak.hypervisors.qemu.standin import StandInVM, missing_tools  # noqa: E402

MiB = 1 << 20
PAGE = 4096


class Disks(StandInVM):
    """The stand-in VM with ``n`` qcow2 disks, each half random data by 1 MiB extents."""

    def __init__(self, work: str, n: int, size: int, seed: int):
        rng = random.Random(seed)
        images = []
        for i in range(n):
            raw, qcow = os.path.join(work, f"d{i}.raw"), os.path.join(work, f"d{i}.qcow2")
            with open(raw, "wb") as f:
                for _ in range(size // MiB):
                    f.write(rng.randbytes(MiB) if rng.random() < 0.5 else bytes(MiB))
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow], check=True)
            os.unlink(raw)
            images.append(qcow)
        super().__init__(work, images)
        self.size = size

    def rewrite(self, seed: int, fraction: float = 0.01) -> int:
        """1 % of each disk's pages in clustered runs of 1-64 pages, through the guest."""
        rng = random.Random(seed)
        pages, total = self.size // PAGE, 0
        for g in self.guests:
            fd = os.open(g, os.O_WRONLY)
            try:
                left = int(pages * fraction)
                while left > 0:
                    run = min(left, rng.randint(1, 64))
                    start = rng.randrange(0, pages - run)
                    os.pwrite(fd, rng.randbytes(run * PAGE), start * PAGE)
                    left -= run
                    total += run * PAGE
                os.fsync(fd)
            finally:
                os.close(fd)
        return total


def pyvbak(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pyvbak", *args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"pyvbak {' '.join(args[:2])} failed: {p.stderr.strip()[-400:]}")
    results = json.loads(p.stdout) if "--json" in args else None
    if results is not None:
        for r in results if isinstance(results, list) else [results]:
            if not r["cbt"] and r.get("parent"):
                raise SystemExit(f"{r['disk']}: change tracking not used: {r.get('fallback_reason')}")
    return dt


def main() -> int:
    a = image_bench_args(__doc__, size_mib=256, rounds=3,
                         extra=lambda ap: ap.add_argument("--disks", type=int, default=8))
    if missing_tools():
        raise SystemExit(f"needs {', '.join(missing_tools())}")
    ensure_bytecode()  # time pyvbak as installed: see benchutil.ensure_bytecode
    work = tempfile.mkdtemp(prefix="pvb-md-", dir="/tmp")
    env = dict(os.environ, PYVBAK_WORK_DIR=os.path.join(work, "w"), PYTHONPATH=os.path.dirname(HERE))
    vm = None
    rounds = []
    try:
        vm = Disks(work, a.disks, a.size_mib * MiB, seed=1).start()
        repo = os.path.join(work, "repo")
        pyvbak(["init", repo], env)
        together = ["backup", vm.uri(), "--repo", repo, "--vm", "vm", "--json"]
        full_s = pyvbak(together, env)
        for rnd in range(a.rounds):
            res = {}
            for which in (("together", "apart") if rnd % 2 == 0 else ("apart", "together")):
                res["rewritten_bytes"] = vm.rewrite(seed=100 + 2 * rnd + (which == "apart"))
                if which == "together":
                    res["together_s"] = pyvbak(together, env)
                else:
                    res["apart_s"] = sum(pyvbak(["backup", vm.uri(i), "--repo", repo, "--vm", "vm", "--json"], env)
                                         for i in range(a.disks))
            rounds.append(res)
    finally:
        if vm is not None:
            vm.stop()
        shutil.rmtree(work, ignore_errors=True)
    tog = statistics.median(r["together_s"] for r in rounds)
    apart = statistics.median(r["apart_s"] for r in rounds)
    out = {
        "command": " ".join(["python", "bench/qemu_multidisk.py", *sys.argv[1:]]),
        "cpu": cpu_model(), "cores": os.cpu_count(), "disks": a.disks, "size_mib": a.size_mib,
        "full_s": round(full_s, 3),
        "together_s": round(tog, 3), "apart_s": round(apart, 3),
        "together_per_disk_s": round(tog / a.disks, 4), "apart_per_disk_s": round(apart / a.disks, 4),
        "apart_over_together": round(apart / tog, 2),
        "rounds": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rounds],
    }
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{a.disks} disks x {a.size_mib} MiB, incremental of 1 % each: one invocation {tog:.2f} s, "
              f"one per disk {apart:.2f} s ({out['apart_over_together']}x); full {full_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

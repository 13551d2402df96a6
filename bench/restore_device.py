#!/usr/bin/env python3
"""Restore onto a block device: zero runs zeroed by the device (BLKZEROOUT) against the
same restore writing the zeros from user space, alternating in one run.

    python bench/restore_device.py --size-mib 1024 --rounds 3 --json

A thin VM disk (``--data-mib`` of random + text data at two places, the rest zeros) is
backed up into a fresh repository under ``--work-dir``; a sparse file of the disk's size
is attached as a loop device (needs root and /dev/loop-control); every round restores
the snapshot onto the device twice, once per variant (order alternating), after a
``sync``.  Each restore is checked against the image.  ``ratio = written / device``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from images import backup_file, make_image, restore_to  # noqa: E402
from pyvbak.repo import restore as restore_mod  # noqa: E402
from pyvbak.repo.repository import Repository  # noqa: E402

MiB = 1 << 20


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def same_content(device: str, image: str, size: int) -> bool:
    """The device's first ``size`` bytes equal the image (a device's st_size is 0)."""
    with open(device, "rb") as fd, open(image, "rb") as fi:
        left = size
        while left > 0:
            n = min(left, 8 * MiB)
            if fd.read(n) != fi.read(n):
                return False
            left -= n
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=96, help="non-zero data in the disk (the rest is zeros)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work-dir", default=os.path.join(HERE, ".data"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.work_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="restore-device-", dir=a.work_dir)
    dev = None
    try:
        size = a.size_mib * MiB
        half = a.data_mib * MiB // 2
        img = make_image(os.path.join(work, "disk.img"), size,
                         [(0, half, "random"), (size // 2, half, "text")], seed=3)
        repo = Repository.init(os.path.join(work, "repo"))
        sid = backup_file(repo, img).snapshot_id
        dev_file = os.path.join(work, "device.img")
        with open(dev_file, "wb") as f:
            f.truncate(size)
        r = subprocess.run(["losetup", "-f", "--show", dev_file], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"cannot attach a loop device ({r.stderr.strip()}): run as root")
        dev = r.stdout.strip()
        real = restore_mod._block_zeroout
        times: dict[str, list[float]] = {"device": [], "written": []}
        for rnd in range(a.rounds):
            order = ("device", "written") if rnd % 2 == 0 else ("written", "device")
            for variant in order:
                restore_mod._block_zeroout = real if variant == "device" else (lambda *args: False)
                os.sync()
                t0 = time.perf_counter()
                restore_to(repo, sid, dev, force=True)
                times[variant].append(time.perf_counter() - t0)
                if not same_content(dev, img, size):
                    raise SystemExit(f"restore onto {dev} ({variant}) differs from the image")
        restore_mod._block_zeroout = real
        med = {k: statistics.median(v) for k, v in times.items()}
        out = {"command": " ".join(sys.argv), "cpu": cpu_model(), "size_mib": a.size_mib, "data_mib": a.data_mib,
               "device_s": round(med["device"], 4), "written_s": round(med["written"], 4),
               "ratio_written_over_device": round(med["written"] / med["device"], 2),
               "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()}}
        print(json.dumps(out, indent=2) if a.json else
              f"device zeroing {med['device']:.3f}s, zeros written {med['written']:.3f}s "
              f"({out['ratio_written_over_device']}x)")
        return 0
    finally:
        if dev:
            subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

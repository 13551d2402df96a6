#!/usr/bin/env python3
"""What a cold restore asks of the disk: pyvbak's restore against the disk's own traffic.

    python bench/restore_disk.py --size-mib 2048 --json [--rounds 3]

1. The VM-like image of bench/vmimage.py (its own copy under bench/.data/) and a full
   backup of it into a fresh repository on the same filesystem.
2. Per round, in this process:
   - ``cold``: the repository's files evicted from the page cache (fsync +
     POSIX_FADV_DONTNEED; pack files are written with O_DIRECT, so this is how a restore
     finds them anyway), then ``restore_snapshot`` to a new file, while a thread samples
     ``/proc/diskstats`` of the device holding the repository every 50 ms;
   - ``warm``: the same restore with the packs cached (read once before);
   - ``copy`` (baseline): the bytes a restore must move on this disk, moved by the kernel
     alone, same round: read every pack file (cold) and write the restored image's
     non-zero bytes to a new file with 4 MiB O_DIRECT writes, fsync; both in parallel.
   ``ratio = cold_s / copy_s`` (1.0 = the restore runs at the disk's speed).
3. The disk samples taken while the cold restore ran report its read and write MB/s and
   the share of time the device was busy (``io_ticks``), medians over the samples.
"""

from __future__ import annotations

import mmap
import os
import shutil
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vmimage  # noqa: E402
from benchutil import cpu_model, ensure_bytecode, image_bench_args, report  # noqa: E402

from pyvbak.engine.backup import run_backup  # noqa: E402
from pyvbak.repo.repository import Repository  # noqa: E402
from pyvbak.repo.restore import restore_snapshot  # noqa: E402
from pyvbak.sources.file import FileSource  # noqa: E402

PIECE = 4 * 1024 * 1024


def device_of(path: str) -> str | None:
    """The /proc/diskstats name of the block device holding ``path`` (None if unknown)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if int(p[0]) == major and int(p[1]) == minor:
                return p[2]
    return None


def disk_counters(name: str) -> tuple[int, int, int]:
    """(bytes read, bytes written, ms busy) of device ``name`` so far."""
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if p[2] == name:
                return int(p[5]) * 512, int(p[9]) * 512, int(p[12])
    raise RuntimeError(f"no device {name} in /proc/diskstats")


class DiskSampler:
    def __init__(self, name: str | None, every: float = 0.05):
        self.name, self.every, self.rows = name, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        last, lt = disk_counters(self.name), time.perf_counter()
        while not self._stop.wait(self.every):
            cur, now = disk_counters(self.name), time.perf_counter()
            dt = now - lt
            self.rows.append(((cur[0] - last[0]) / dt / 1e6, (cur[1] - last[1]) / dt / 1e6, (cur[2] - last[2]) / 1000 / dt))
            last, lt = cur, now

    def __enter__(self):
        if self.name:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.name:
            self._thread.join()


def evict_tree(root: str) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            vmimage.evict(os.path.join(d, f))


def read_tree(root: str) -> int:
    n = 0
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb", buffering=0) as fh:
                while chunk := fh.read(PIECE):
                    n += len(chunk)
    return n


def copy_baseline(pack_dir: str, out: str, write_bytes: int) -> float:
    """Read every pack (cold) while writing ``write_bytes`` with O_DIRECT: the disk traffic
    of a restore without any of its work."""
    evict_tree(pack_dir)
    buf = mmap.mmap(-1, PIECE)
    buf.write(os.urandom(PIECE))
    t = time.perf_counter()
    reader = threading.Thread(target=read_tree, args=(pack_dir,))
    reader.start()
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o600)
        try:
            done = 0
            while done < write_bytes:
                done += os.pwrite(fd, buf, done)
            os.fsync(fd)
        finally:
            os.close(fd)
        reader.join()  # the baseline ends when both the reads and the writes are done
        return time.perf_counter() - t
    finally:
        reader.join()
        buf.close()
        if os.path.exists(out):
            os.unlink(out)


def main() -> int:
    a = image_bench_args(__doc__, size_mib=2048, rounds=3)
    ensure_bytecode()
    os.makedirs(vmimage.DATA, exist_ok=True)
    image = os.path.join(vmimage.DATA, f"vm-{a.size_mib}MiB-s1-restore-disk.img")
    vmimage.ensure_image(image, a.size_mib, seed=1)
    work = os.path.join(vmimage.DATA, "restore_disk")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        repo = Repository.init(os.path.join(work, "repo"))
        with repo.lock(purpose="bench"), FileSource(image) as src:
            snap_id = run_backup(repo, src, vm="bench", disk="vm").snapshot_id
        snap = repo.resolve(snap_id)
        nonzero = 0  # bytes a restore writes: from the first report
        out = os.path.join(work, "restored.img")
        device = device_of(work)
        rows: dict[str, list[float]] = {"cold_s": [], "warm_s": [], "copy_s": []}
        samples: list[tuple[float, float, float]] = []
        for _ in range(a.rounds):
            evict_tree(os.path.join(work, "repo"))
            with DiskSampler(device) as sampler:
                t = time.perf_counter()
                rep = restore_snapshot(repo, snap, out, force=True)
                rows["cold_s"].append(time.perf_counter() - t)
            samples += sampler.rows[1:-1] or sampler.rows  # steady state: drop the edges
            nonzero = rep["bytes_written"]
            read_tree(os.path.join(work, "repo", "packs"))
            t = time.perf_counter()
            restore_snapshot(repo, snap, out, force=True)
            rows["warm_s"].append(time.perf_counter() - t)
            os.unlink(out)
            rows["copy_s"].append(copy_baseline(os.path.join(work, "repo", "packs"), out, nonzero))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: round(statistics.median(v), 3) for k, v in rows.items()}
    result = {
        "cpu": cpu_model(),
        "size_mib": a.size_mib,
        "rounds": a.rounds,
        "device": device,
        "bytes_written": nonzero,
        **med,
        "ratio": round(med["cold_s"] / med["copy_s"], 2),
        "cold_s_all": [round(x, 3) for x in rows["cold_s"]],
    }
    if samples:
        result["during_cold_restore"] = {
            "read_MBps": round(statistics.median(s[0] for s in samples)),
            "write_MBps": round(statistics.median(s[1] for s in samples)),
            "busy": round(statistics.median(s[2] for s in samples), 2),
            "samples": len(samples),
        }
    report(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

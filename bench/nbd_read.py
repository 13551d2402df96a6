#!/usr/bin/env python3
"""Read throughput of pyvbak's NBD client against ``qemu-img convert`` from the same export.

Makes a random (non-sparse) raw image on tmpfs, serves it with
``qemu-nbd -t -r -f raw --socket``, then alternately times

  * NbdSource.read_into over the whole export from ``--depth`` threads, each filling its
    own reused buffer with ``--chunk-mib`` requests on the one pipelined connection (the
    way the engine's workers read a network source; ``ratio`` is this one),
  * NbdSource.read_many (``--depth`` reads in flight, each returned as a new ``bytes``:
    one copy more; ``ratio_read_many``), and
  * ``qemu-img convert -n -f raw --target-image-opts nbd+unix:///?socket=... driver=null-co,size=N``
    (qemu's own NBD client writing to a discarding target),

and reports the best of ``--repeat`` runs of each and their ratio (client / qemu-img).

    python bench/nbd_read.py [--size-mib 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyvbak.hypervisors.qemu.cleanup import socket_listening  # noqa: E402
from pyvbak.sources.nbd import NbdSource  # noqa: E402
from benchutil import cpu_model  # noqa: E402

MiB = 1 << 20



def make_image(path: str, size: int) -> None:
    with open(path, "wb") as f:
        piece = 64 * MiB
        for off in range(0, size, piece):
            f.write(os.urandom(min(piece, size - off)))


def time_client(uri: str, size: int, chunk: int, depth: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to read the whole export."""
    with NbdSource(uri, timeout=60) as src:
        assert src.size == size
        ranges = [(off, min(chunk, size - off)) for off in range(0, size, chunk)]
        c0 = os.times()
        t0 = time.perf_counter()
        total = 0
        for data in src.read_many(ranges, depth=depth):
            total += len(data)
        elapsed = time.perf_counter() - t0
        c1 = os.times()
    assert total == size, (total, size)
    return elapsed, (c1.user - c0.user) + (c1.system - c0.system)


def time_client_into(uri: str, size: int, chunk: int, depth: int) -> tuple[float, float]:
    """(wall, CPU) of ``depth`` threads reading the export with read_into, as the engine's
    workers do: each takes the next chunk and fills its own buffer."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()
    with NbdSource(uri, timeout=60) as src:
        assert src.size == size

        def job(off: int) -> int:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = memoryview(bytearray(chunk))
            return src.read_into(off, buf[: min(chunk, size - off)])

        c0 = os.times()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(depth) as pool:
            total = sum(pool.map(job, range(0, size, chunk)))
        elapsed = time.perf_counter() - t0
        c1 = os.times()
    assert total == size, (total, size)
    return elapsed, (c1.user - c0.user) + (c1.system - c0.system)


def time_qemu_img(uri: str, size: int) -> tuple[float, float]:
    # null-co:// discards writes; its default size (1 GiB) must be >= the source, so
    # give the size explicitly through --target-image-opts.
    argv = ["qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", uri,
            f"driver=null-co,size={size}"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True)
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    # 2 MiB x 8 in flight: what qemu-img convert itself uses (2 MiB buffers, 8
    # coroutines), so both sides ask the server for the same thing.  32 MiB results
    # as bytes cost page faults on every read (glibc mmaps them), see docs/NBD.md.
    ap.add_argument("--chunk-mib", type=int, default=2, help="client request size (MiB)")
    ap.add_argument("--depth", type=int, default=8, help="client reads in flight")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("qemu-nbd", "qemu-img"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: install the Debian package 'qemu-utils'")

    size = args.size_mib * MiB
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = tempfile.mkdtemp(prefix="pyvbak-nbdbench-", dir=base)
    proc = None
    try:
        image = os.path.join(work, "disk.raw")
        sock = os.path.join(work, "nbd.sock")
        make_image(image, size)
        proc = subprocess.Popen(["qemu-nbd", "-t", "-r", "-e", "4", "-f", "raw", "--socket", sock, image],
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not socket_listening(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"qemu-nbd did not start: {proc.stderr.read().decode(errors='replace')}")
            time.sleep(0.01)
        uri = f"nbd+unix:///?socket={sock}"
        client, many, qimg = [], [], []
        for _ in range(args.repeat):  # alternate so machine noise hits all alike
            client.append(time_client_into(uri, size, args.chunk_mib * MiB, args.depth))
            qimg.append(time_qemu_img(uri, size))
            many.append(time_client(uri, size, args.chunk_mib * MiB, args.depth))
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    gb = size / 1e9
    ct = [w for w, _ in client]
    mt = [w for w, _ in many]
    qt = [w for w, _ in qimg]
    result = {
        "size_mib": args.size_mib,
        "chunk_mib": args.chunk_mib,
        "depth": args.depth,
        "repeat": args.repeat,
        "client_gbps": round(gb / min(ct), 3),
        "qemu_img_gbps": round(gb / min(qt), 3),
        "ratio": round(min(qt) / min(ct), 3),
        "client_read_many_gbps": round(gb / min(mt), 3),
        "ratio_read_many": round(min(qt) / min(mt), 3),
        "client_times_s": [round(t, 4) for t in ct],
        "client_read_many_times_s": [round(t, 4) for t in mt],
        "qemu_img_times_s": [round(t, 4) for t in qt],
        # CPU seconds per run (client: this process; qemu-img: the child), which the
        # machine's noise disturbs less than wall time.  The server's CPU is in neither.
        "client_cpu_s": [round(c, 3) for _, c in client],
        "client_read_many_cpu_s": [round(c, 3) for _, c in many],
        "qemu_img_cpu_s": [round(c, 3) for _, c in qimg],
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"NbdSource read_into: {result['client_gbps']} GB/s (read_many {result['client_read_many_gbps']})   "
              f"qemu-img convert: {result['qemu_img_gbps']} GB/s   "
              f"ratio {result['ratio']} (read_many {result['ratio_read_many']})  CPU s client {min(result['client_cpu_s'])} qemu-img {min(result['qemu_img_cpu_s'])}  ({args.size_mib} MiB, {args.chunk_mib} MiB x {args.depth} in flight, "
              f"best of {args.repeat}; {result['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Issue 4: incremental hot backup of a running QEMU disk via the dirty bitmap, against
the minimal work any tool must do for the same changed blocks.

    python bench/qemu_incremental.py --size-mib 2048 --json [--rounds 3] [--no-profile]

1. A VM-like image (bench/vmimage.py: 35 % random, 30 % text, 35 % zero by 1 MiB
   extents) is converted to qcow2 under bench/.data/qemu_incr/ and opened by
   ``qemu-storage-daemon`` standing in for the VM: node ``disk0``, a QMP socket for
   pyvbak, a control QMP socket for us, and a writable FUSE export ``guest.img`` (the
   guest's disk: writes to it enter the block graph above ``disk0``).
2. ``pyvbak backup qemu:///SOCK?node=disk0 --repo R --vm bench --json`` (full backup).
3. Per round: through guest.img, rewrite 1 % of the 4 KiB pages in clustered runs of
   1-64 pages (vmimage.clustered_pages, seed 100+round; ``--max-run-pages 1``: scattered
   single pages), fsync; the same bytes go to a raw copy of the image (the baseline's
   input, kept in the page cache).  Then, untimed, ``sync`` and ``--settle`` seconds
   (default 0.3) before whichever of the timed steps comes first: the rewrite's own
   writes (QEMU's qcow2 updates, the raw copy) were still reaching the disk when the
   round began, and the step that came first paid for them - pyvbak's fsync'd packs
   far more than the baselines, which write nothing (session 10: in-process rounds
   of pyvbak-first 0.18-0.25 s against baselines-first 0.09-0.11 s; with the settle
   0.10-0.14 s in both orders).  The same settle runs between the two steps too: the
   NBD baseline detaches and re-attaches the guest's FUSE export, which flushes QEMU's
   image (session 11: in-process pyvbak after the baselines 0.127-0.146 s, before them
   0.088-0.091 s, in one run), and pyvbak's own writes are not the baselines' to pay.
4. Time the incremental ``pyvbak backup`` (same command, a subprocess: the user's wall
   time including interpreter start-up), check "cbt": true.
5. Baseline, same round: read exactly the 64 KiB blocks the rewrite touched from the raw
   copy (page cache), SHA-256 and zstd-3 each, all cores (thread pool, one compressor per
   thread, contiguous runs read in one pread of at most 4 MiB, as the engine reads).
   ``ratio = incremental_s / baseline_read_compress_s`` (target <= 2.0).
   Second baseline, same round: the same blocks read from where any backup tool must
   read them, the running QEMU.  Through the control QMP socket: ``nbd-server-start`` on
   a unix socket in the run dir, ``block-export-add`` of ``disk0`` read-only; a minimal
   NBD client in this file (fixed newstyle, NBD_OPT_GO, NBD_CMD_READ, simple replies;
   not pyvbak's) reads the same runs (<= 4 MiB per request) from ``--nbd-readers``
   threads, each on its own connection (so that many requests in flight), and hands
   each run to the same 2-thread SHA-256 + zstd-3 pool as the first baseline; then the
   export is deleted and the server stopped (in ``finally``).  The writable FUSE export
   (our stand-in guest) is removed for the baseline and re-added after it: in QEMU 7.2 it
   takes the RESIZE permission an NBD export unshares (a real guest device does not).  Server start, export add
   and the NBD handshakes are outside the clock and reported apart (``qemu_nbd_setup_s``).
   ``ratio_vs_qemu_read = incremental_s / baseline_qemu_nbd_s``.  The export only reads,
   so it does not touch the dirty bitmap; odd rounds run both baselines before pyvbak,
   even rounds after (pyvbak's own NBD server must be gone first: one per QEMU).
6. ``--in-process-rounds N`` (default 3) more rounds the same way, each running the backup
   command in an already started worker process (``pyvbak.cli.main.main`` called once
   per round by a child that imported pyvbak once, as a job runner would; no timers
   wrapped around anything: the CLI's work without interpreter start-up and imports),
   against both baselines of its own round; ``in_process`` reports the medians (the
   number the engine and control plane can be held to, since start-up alone exceeds the
   baseline).  The worker runs one untimed backup first (what a process pays once).
   It is a process of its own, not this one: run here, right after
   the baselines' thread pools and 30 MB of buffers, main() took 0.13-0.19 s against
   0.08-0.11 s in a worker in the same conditions (session 11).
7. A last, separate round runs the same backup in-process with timers wrapped around the
   phases (QMP session set-up / teardown, NBD connect, block-status queries, index
   loading, the read/hash/compress pipeline, pack + index + snapshot writes) and
   measures interpreter + CLI import start-up apart; ``in_process_ratio`` (vs the
   page-cache baseline) and ``in_process_ratio_vs_qemu_read``.

The daemon is stopped by its pid and the FUSE mount removed in ``finally`` (and on
SIGTERM/SIGINT); repositories and work dirs are deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import vmimage  # noqa: E402  (bench/vmimage.py, the shared VM-like image generator)
from benchutil import PyvbakWorker, cpu_model, ensure_bytecode  # noqa: E402

MiB = 1 << 20
PAGE = 4096
BLOCK = 64 * 1024  # pyvbak's default block size: the granularity the bitmap is read at
CHUNK = 4 * MiB  # the engine's CHUNK_BYTES



def log(*m) -> None:
    print(*m, file=sys.stderr, flush=True)


def pyvbak_cmd() -> list[str]:
    # The console script next to this interpreter: a pyenv shim in front of it adds a
    # bash + `pyenv exec` start-up (measured ~0.1-0.5 s here) that is not pyvbak's.
    exe = os.path.join(os.path.dirname(sys.executable), "pyvbak")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "pyvbak"]


# --------------------------------------------------------------------------------------
# the stand-in VM (own harness; tests/qemu_vm.py is not imported)
# --------------------------------------------------------------------------------------


def Qmp(path: str):
    """The bench's control connection to the stand-in VM: pyvbak's own QMP client (the
    bench measures the backup, not QMP; the minimal NBD client below stays independent)."""
    from pyvbak.hypervisors.qemu.qmp import QmpClient

    return QmpClient(path, timeout=30).connect()


class BenchVM:
    def __init__(self, d: str, image: str):
        self.dir, self.image = d, image
        self.qmp_path = os.path.join(d, "qmp.sock")
        self.ctl_path = os.path.join(d, "ctl.sock")
        self.guest = os.path.join(d, "guest.img")
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(d, "qsd.log")

    @property
    def uri(self) -> str:
        return f"qemu://{self.qmp_path}?node=disk0"

    def mounted(self) -> bool:
        with open("/proc/self/mountinfo") as f:
            # (mountinfo names the resolved path: bench/.data may be a symlink, as in a
            # frozen copy of the tree that shares the images)
            guest = os.path.realpath(self.guest)
            return any(line.split()[4] == guest for line in f)

    def start(self) -> "BenchVM":
        for p in (self.qmp_path, self.ctl_path):
            if os.path.exists(p):
                os.unlink(p)
        open(self.guest, "a").close()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["qemu-storage-daemon",
                 "--blockdev", f"driver=file,node-name=disk0-file,filename={self.image}",
                 "--blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
                 "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=qmp0",
                 "--monitor", "chardev=qmp0",
                 "--chardev", f"socket,path={self.ctl_path},server=on,wait=off,id=ctl0",
                 "--monitor", "chardev=ctl0",
                 "--export", f"type=fuse,id=guest,node-name=disk0,mountpoint={self.guest},writable=on"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("qemu-storage-daemon failed: " + open(self.log).read())
            if os.path.exists(self.ctl_path) and self.mounted():
                return self
            time.sleep(0.02)
        raise RuntimeError("qemu-storage-daemon did not start within 30 s")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)  # by pid: only the daemon this script started
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if self.mounted():
            subprocess.run(["fusermount3", "-u", self.guest], check=False)

    def wait_export_gone(self, q: "Qmp", exp_id: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while any(e.get("id") == exp_id for e in q.execute("query-block-exports")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"export {exp_id} still present after {timeout} s")
            time.sleep(0.005)

    def detach_guest(self, q: "Qmp") -> None:
        """Remove the writable FUSE export (unmounts guest.img).  QEMU 7.2's writable FUSE
        export takes the RESIZE permission and an NBD export unshares it, so the two cannot
        coexist on disk0; a real guest device (virtio-blk) does not take RESIZE, and a
        read-only NBD export of its node is allowed.  The guest is idle here anyway."""
        q.execute("block-export-del", id="guest")
        self.wait_export_gone(q, "guest")
        deadline = time.monotonic() + 10
        while self.mounted() and time.monotonic() < deadline:
            time.sleep(0.005)

    def attach_guest(self, q: "Qmp") -> None:
        q.execute("block-export-add", type="fuse", id="guest", **{"node-name": "disk0"},
              mountpoint=self.guest, writable=True)
        deadline = time.monotonic() + 10
        while not self.mounted():
            if time.monotonic() > deadline:
                raise RuntimeError("FUSE guest export did not come back")
            time.sleep(0.005)

    def bitmaps(self) -> list[str]:
        q = Qmp(self.ctl_path)
        try:
            for n in q.execute("query-named-block-nodes", flat=True):
                if n["node-name"] == "disk0":
                    return [b.get("name") for b in n.get("dirty-bitmaps", [])]
            return []
        finally:
            q.close()


# --------------------------------------------------------------------------------------
# guest writes, baseline
# --------------------------------------------------------------------------------------


#: the longest run of pages one rewrite writes (--max-run-pages; 1: scattered single pages)
MAX_RUN_PAGES = 64


def rewrite(paths: list[str], size: int, seed: int) -> dict:
    """1 % of pages in clustered runs of 1-MAX_RUN_PAGES pages, the same random bytes
    written to every path (the guest file and the raw copy); fsync each."""
    runs = vmimage.clustered_pages(size // PAGE, 0.01, seed, MAX_RUN_PAGES)
    rng = np.random.default_rng([seed, 7])
    fds = [os.open(p, os.O_WRONLY) for p in paths]
    try:
        for first, count in runs:
            data = rng.bytes(count * PAGE)
            for fd in fds:
                os.pwrite(fd, data, first * PAGE)
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    marks = np.zeros(-(-size // BLOCK), dtype=bool)
    for first, count in runs:
        marks[first * PAGE // BLOCK : -(-(first + count) * PAGE // BLOCK)] = True
    blocks = np.flatnonzero(marks)
    pages = sum(c for _, c in runs)
    return {"runs": len(runs), "pages": pages, "bytes": pages * PAGE, "blocks": blocks}


def block_runs(blocks: np.ndarray, max_blocks: int):
    if not len(blocks):
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    out = []
    for part in np.split(blocks, breaks):
        s, e = int(part[0]), int(part[-1]) + 1
        for a in range(s, e, max_blocks):
            out.append((a, min(a + max_blocks, e)))
    return out


class HashCompress:
    """SHA-256 + zstd-3 of every 64 KiB block of a run, one compressor per thread; the
    digests are kept (block index -> digest) so the two baselines can be compared."""

    def __init__(self):
        self.cctxs: dict[int, zstandard.ZstdCompressor] = {}
        self.digests: dict[int, bytes] = {}

    def __call__(self, first_block: int, data) -> tuple[int, int]:
        c = self.cctxs.get(threading.get_ident())
        if c is None:
            c = self.cctxs[threading.get_ident()] = zstandard.ZstdCompressor(level=3, write_checksum=True)
        mv = memoryview(data)
        out = 0
        for n, i in enumerate(range(0, len(data), BLOCK)):
            blk = mv[i : i + BLOCK]
            self.digests[first_block + n] = hashlib.sha256(blk).digest()
            out += len(c.compress(blk))
        return len(data), out


def baseline(path: str, blocks: np.ndarray, threads: int) -> tuple[float, int, int, dict]:
    """Read exactly ``blocks`` (64 KiB each) from ``path``, SHA-256 + zstd-3 each block,
    ``threads`` workers.  Returns (seconds, bytes read, compressed bytes, digests)."""
    jobs = block_runs(blocks, CHUNK // BLOCK)
    fd = os.open(path, os.O_RDONLY)
    hc = HashCompress()

    def work(job):
        a, b = job
        return hc(a, os.pread(fd, (b - a) * BLOCK, a * BLOCK))

    try:
        with ThreadPoolExecutor(threads) as pool:
            pool.submit(lambda: None).result()  # threads exist before the clock starts
            t0 = time.perf_counter()
            res = list(pool.map(work, jobs))
            dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return dt, sum(r[0] for r in res), sum(r[1] for r in res), hc.digests


# --------------------------------------------------------------------------------------
# second baseline: the same blocks read from the running QEMU over NBD
# --------------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
NBD_OPT_GO = 7
NBD_REP_ACK, NBD_REP_INFO = 1, 3
NBD_CMD_READ, NBD_CMD_DISC = 0, 2


class MiniNbd:
    """Just enough of an NBD client for the baseline, independent of pyvbak: fixed
    newstyle handshake, NBD_OPT_GO, one NBD_CMD_READ at a time, simple replies (no
    structured replies are negotiated, so the server must answer with simple ones)."""

    def __init__(self, path: str, name: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.handle = 0
        self.size = None
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT or not flags & 1:
            raise RuntimeError("NBD server does not speak fixed newstyle")
        self.sock.sendall(struct.pack(">I", 1 | (flags & 2)))  # FIXED_NEWSTYLE [| NO_ZEROES]
        nm = name.encode()
        payload = struct.pack(">I", len(nm)) + nm + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(payload)) + payload)
        while True:
            magic, opt, rtype, ln = struct.unpack(">QIII", self._recv(20))
            data = self._recv(ln) if ln else b""
            if magic != OPT_REPLY_MAGIC or opt != NBD_OPT_GO:
                raise RuntimeError("bad NBD option reply")
            if rtype == NBD_REP_ACK:
                break
            if rtype & 0x80000000:
                raise RuntimeError(f"NBD_OPT_GO refused ({rtype:#x}): {data!r}")
            if rtype == NBD_REP_INFO and len(data) >= 10 and struct.unpack(">H", data[:2])[0] == 0:
                self.size = struct.unpack(">Q", data[2:10])[0]

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        while len(view):
            k = self.sock.recv_into(view)
            if not k:
                raise RuntimeError("NBD server closed the connection")
            view = view[k:]

    def read(self, offset: int, length: int) -> bytearray:
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, NBD_CMD_READ, self.handle, offset, length))
        magic, err, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self.handle:
            raise RuntimeError(f"unexpected NBD reply (magic {magic:#x}, handle {handle})")
        if err:
            raise RuntimeError(f"NBD read at {offset} failed: errno {err}")
        buf = bytearray(length)
        self._recv_into(memoryview(buf))
        return buf

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()


def baseline_qemu_nbd(vm: "BenchVM", blocks: np.ndarray, threads: int, readers: int) -> dict:
    """Export ``disk0`` read-only over NBD from the running daemon (control QMP), read
    exactly ``blocks`` through it from ``readers`` connections, SHA-256 + zstd-3 on
    ``threads`` workers; always remove the export and stop the server."""
    sock = os.path.join(vm.dir, "baseline-nbd.sock")
    exp_id = name = "bench-baseline"
    jobs = block_runs(blocks, CHUNK // BLOCK)
    q = Qmp(vm.ctl_path)
    conns: list[MiniNbd] = []
    started = added = detached = False
    try:
        vm.detach_guest(q)  # outside the clock; see BenchVM.detach_guest
        detached = True
        t0 = time.perf_counter()
        q.execute("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        started = True
        q.execute("block-export-add", type="nbd", id=exp_id, **{"node-name": "disk0"}, name=name, writable=False)
        added = True
        conns = [MiniNbd(sock, name) for _ in range(readers)]
        setup = time.perf_counter() - t0
        free: "queue.Queue[MiniNbd]" = queue.Queue()
        for c in conns:
            free.put(c)
        hc = HashCompress()

        with ThreadPoolExecutor(readers) as rpool, ThreadPoolExecutor(threads) as cpool:
            def read_then_hand_off(job):
                a, b = job
                c = free.get()
                try:
                    data = c.read(a * BLOCK, (b - a) * BLOCK)
                finally:
                    free.put(c)
                return cpool.submit(hc, a, data)

            for p in (rpool, cpool):  # threads exist before the clock starts
                list(p.map(lambda _: None, range(p._max_workers)))
            t0 = time.perf_counter()
            res = [f.result() for f in list(rpool.map(read_then_hand_off, jobs))]
            dt = time.perf_counter() - t0

            # for the reading only: the same reads again, without hashing/compression
            t1 = time.perf_counter()
            def read_only(job):
                a, b = job
                c = free.get()
                try:
                    return len(c.read(a * BLOCK, (b - a) * BLOCK))
                finally:
                    free.put(c)
            nread = sum(rpool.map(read_only, jobs))
            dt_read = time.perf_counter() - t1
        return {"s": dt, "read_only_s": dt_read, "setup_s": setup, "bytes_read": sum(r[0] for r in res),
                "compressed_bytes": sum(r[1] for r in res), "read_only_bytes": nread,
                "requests": len(jobs), "digests": hc.digests, "export_size": conns[0].size}
    finally:
        for c in conns:
            c.close()
        try:
            if added:
                q.execute("block-export-del", id=exp_id)
            if started:
                q.execute("nbd-server-stop")  # closes every NBD export and waits for them
            if added:
                vm.wait_export_gone(q, exp_id)
            if detached:
                vm.attach_guest(q)
        finally:
            q.close()
            if os.path.exists(sock):
                os.unlink(sock)


def warm(path: str) -> None:
    vmimage.page_cache(path)


# --------------------------------------------------------------------------------------
# pyvbak runs
# --------------------------------------------------------------------------------------


def run_pyvbak(args: list[str], env: dict) -> tuple[float, dict | None, str]:
    t0 = time.perf_counter()
    p = subprocess.run(pyvbak_cmd() + args, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"pyvbak {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    try:
        doc = json.loads(p.stdout) if "--json" in args else None
    except ValueError:
        doc = None
    return dt, doc, p.stderr


def startup_times(env: dict, n: int = 5) -> dict:
    def best(cmd):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, env=env, check=True)
            ts.append(time.perf_counter() - t0)
        return min(ts), statistics.median(ts)

    h = best(pyvbak_cmd() + ["--help"])
    py = best([sys.executable, "-c", "pass"])
    imp = best([sys.executable, "-c", "import pyvbak.cli.main"])
    impb = best([sys.executable, "-c", "import pyvbak.engine.backup, pyvbak.hypervisors.qemu, pyvbak.sources.nbd"])
    return {"pyvbak_help_s": h[0], "pyvbak_help_median_s": h[1], "python_bare_s": py[0],
            "python_import_cli_s": imp[0], "python_import_cli_plus_backup_path_s": impb[0]}


def settle(seconds: float) -> None:
    """The rewrite's writes on the disk before anything is timed (see the docstring, 3.)."""
    os.sync()
    time.sleep(seconds)


def in_process_rounds(n: int, vm: "BenchVM", rawcopy: str, size: int, repo: str, workdir: str, threads: int,
                      readers: int, seed0: int, settle_s: float) -> dict:
    """``n`` rounds of rewrite + the backup command run in a started worker + both
    baselines (order alternating); medians of the times and of the per-round ratios.  The
    worker runs one untimed backup first (nothing changed since the last one): what a
    process pays once - its lazy imports, thread pools, the digest-index cache's first
    build - is not any round's."""
    worker = PyvbakWorker(os.path.join(HERE, ".."), ["backup", vm.uri, "--repo", repo, "--vm", "bench", "--json"],
                          dict(os.environ, PYVBAK_WORK_DIR=workdir))
    rounds = []
    try:
        if worker.run()[1] != 0:
            raise RuntimeError("the in-process worker's warm-up backup failed")
        rounds = _in_process_rounds(n, worker, vm, rawcopy, size, threads, readers, seed0, settle_s)
    finally:
        worker.close()
    med = lambda k: statistics.median(x[k] for x in rounds)  # noqa: E731
    return {"main_s": med("main_s"), "engine_duration_s": med("engine_duration_s"),
            "baseline_read_compress_s": med("baseline_read_compress_s"), "baseline_qemu_nbd_s": med("baseline_qemu_nbd_s"),
            "ratio": med("ratio"), "ratio_vs_qemu_read": med("ratio_vs_qemu_read"), "rounds": rounds,
            "runner": "a worker process that imported pyvbak once; main() timed inside it"}


def _in_process_rounds(n, worker, vm, rawcopy, size, threads, readers, seed0, settle_s) -> list[dict]:
    rounds = []
    for r in range(n):
        rw = rewrite([vm.guest, rawcopy], size, seed0 + r)
        warm(rawcopy)
        settle(settle_s)
        first = r % 2 == 1
        if first:
            base_s, _, _, dig = baseline(rawcopy, rw["blocks"], threads)
            qn = baseline_qemu_nbd(vm, rw["blocks"], threads, readers)
            settle(settle_s)  # as in the CLI rounds
        dt, code, res = worker.run()
        if code != 0 or res.get("cbt") is not True:
            raise RuntimeError(f"in-process incremental failed (exit {code}) or did not use the bitmap: {res}")
        if not first:
            settle(settle_s)
            base_s, _, _, dig = baseline(rawcopy, rw["blocks"], threads)
            qn = baseline_qemu_nbd(vm, rw["blocks"], threads, readers)
        rounds.append({"main_s": round(dt, 4), "engine_duration_s": round(res["duration"], 4),
                       "baseline_read_compress_s": round(base_s, 4), "baseline_qemu_nbd_s": round(qn["s"], 4),
                       "ratio": round(dt / base_s, 2), "ratio_vs_qemu_read": round(dt / qn["s"], 2),
                       "bitmap_exact": res["changed_bytes"] == len(rw["blocks"]) * BLOCK})
        log(f"in-process round {r}: main() {dt:.3f}s (engine {res['duration']:.3f}s), ratio {dt / base_s:.1f}, "
            f"vs qemu read {dt / qn['s']:.2f}")
    return rounds


def profiled_backup(repo: str, uri: str, workdir: str, cprofile: str | None = None) -> dict:
    """The incremental backup in-process, with timers around each phase (cheap: a
    wrapper per call, no sampling profiler)."""
    os.environ["PYVBAK_WORK_DIR"] = workdir
    t_imp = time.perf_counter()
    from pyvbak.cli import main as climain
    from pyvbak.engine import backup as eng
    from pyvbak.hypervisors import SessionSource
    from pyvbak.hypervisors.qemu import cleanup as qcleanup
    from pyvbak.hypervisors.qemu import hot
    from pyvbak.hypervisors.qemu.qmp import QmpClient
    from pyvbak.repo import packer
    from pyvbak.repo.repository import Repository
    from pyvbak.sources import nbd
    imp = time.perf_counter() - t_imp

    phases: dict[str, list] = {}
    undo = []

    def wrap(owner, name, label):
        orig = getattr(owner, name)

        def w(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                v = phases.setdefault(label, [0.0, 0])
                v[0] += time.perf_counter() - t
                v[1] += 1
        setattr(owner, name, w)
        undo.append((owner, name, orig))

    wrap(Repository, "open", "repo open")
    wrap(Repository, "lock", "repo lock (acquire)")
    wrap(Repository, "recover_leftovers", "repo recover_leftovers")
    wrap(Repository, "latest", "repo latest (snapshot list)")
    wrap(Repository, "load_snapshot_index", "load parent index")
    wrap(Repository, "load_digest_index", "load digest index")
    wrap(Repository, "write_pack_index", "write pack index")
    wrap(Repository, "commit_snapshot", "commit snapshot")
    wrap(packer.PackWriter, "finish", "pack finish (flush + wait uploads)")
    wrap(QmpClient, "connect", "QMP connect + capabilities")
    wrap(hot.QemuHotBackup, "_setup", "QEMU session setup (total)")
    wrap(hot.QemuHotBackup, "_create_fleece_file", "  fleecing file (raw; a qcow2 from a template before QEMU 8.0)")
    wrap(qcleanup, "clean_leftovers", "  leftover scan")
    wrap(hot.QemuHotBackup, "_teardown", "QEMU session teardown (total)")
    wrap(qcleanup, "remove_export", "  block-export-del + wait")
    wrap(qcleanup, "stop_nbd_server", "  nbd-server-stop")
    wrap(qcleanup, "cancel_job", "  block-job-cancel + wait")
    wrap(qcleanup, "remove_node", "  blockdev-del fleece node")
    wrap(hot, "_settle_bitmaps", "  settle bitmaps")
    wrap(nbd.NbdClient, "connect", "NBD connect + handshake")
    wrap(nbd.NbdClient, "close", "NBD close")
    wrap(SessionSource, "change_tracking", "dirty bitmap block status")
    wrap(eng, "_zero_extent_blocks", "base:allocation block status (whole disk)")
    wrap(nbd.NbdClient, "read", "NBD reads (summed over worker threads)")
    wrap(eng, "run_backup", "run_backup (total)")

    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    try:
        prof = None
        if cprofile:  # main thread only; distorts the timings above, for where-not-how-much
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        with redirect_stdout(buf):
            code = climain.main(["backup", uri, "--repo", repo, "--vm", "bench", "--json"])
        total = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
            prof.dump_stats(cprofile)
    finally:
        for owner, name, orig in reversed(undo):
            setattr(owner, name, orig)
    if code != 0:
        raise RuntimeError(f"in-process pyvbak backup failed with exit code {code}")
    res = json.loads(buf.getvalue())
    return {"imports_s": imp, "main_s": total, "result": {k: res[k] for k in ("cbt", "bytes_read", "changed_bytes", "stored_bytes", "duration")},
            "phases": {k: {"s": round(v[0], 4), "calls": v[1]} for k, v in phases.items()}}


# --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3, help="rewrite + incremental + baseline rounds (median reported)")
    ap.add_argument("--in-process-rounds", type=int, default=3,
                    help="rounds with the backup command run in this process (no start-up), median reported")
    ap.add_argument("--no-profile", action="store_true", help="skip the in-process per-phase round")
    ap.add_argument("--cprofile", metavar="FILE", help="also dump a cProfile of the in-process round to FILE")
    ap.add_argument("--nbd-readers", type=int, default=4,
                    help="connections (= requests in flight) of the QEMU NBD baseline's reader")
    ap.add_argument("--max-run-pages", type=int, default=64,
                    help="longest run of 4 KiB pages a rewrite writes (default 64, the issue's clustered runs; "
                         "1: scattered single pages, a database's writes: ~10x the dirty blocks, one run each)")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds to wait (after a sync) between a round's rewrite and its timed steps")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    global MAX_RUN_PAGES
    MAX_RUN_PAGES = max(1, a.max_run_pages)
    ensure_bytecode()  # time pyvbak as installed: see benchutil.ensure_bytecode

    for tool in ("qemu-storage-daemon", "qemu-img", "fusermount3"):
        if not shutil.which(tool):
            print(f"missing {tool}: apt-get install qemu-system-common qemu-utils fuse3", file=sys.stderr)
            return 2

    size = a.size_mib * MiB
    threads = os.cpu_count() or 1
    data = os.path.join(vmimage.DATA, "qemu_incr")
    os.makedirs(data, exist_ok=True)
    pristine = os.path.join(data, f"vm-{a.size_mib}MiB-s1.img")
    t = time.perf_counter()
    vmimage.ensure_image(pristine, a.size_mib, 1)
    log(f"image ready ({time.perf_counter() - t:.1f}s)")

    run = tempfile.mkdtemp(prefix="run-", dir=data)
    qcow = os.path.join(run, "disk.qcow2")
    rawcopy = os.path.join(run, "raw-copy.img")
    repo = os.path.join(run, "repo")
    work = os.path.join(run, "work")
    vmdir = os.path.join(run, "vm")
    os.makedirs(vmdir)
    # the checkout this bench lives in, not whatever an editable install points at
    root = os.path.abspath(os.path.join(HERE, ".."))
    env = dict(os.environ, PYVBAK_WORK_DIR=work,
               PYTHONPATH=os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    vm = BenchVM(vmdir, qcow)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    out: dict = {"command": " ".join(["python", "bench/qemu_incremental.py"] + sys.argv[1:]),
                 "cpu": cpu_model(), "cores": threads, "size_mib": a.size_mib, "block_size": BLOCK,
                 "python": platform.python_version(), "zstandard": zstandard.__version__}
    try:
        t = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", pristine, qcow], check=True)
        shutil.copyfile(pristine, rawcopy)
        log(f"qcow2 + raw copy ({time.perf_counter() - t:.1f}s)")
        ver = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        out["qemu"] = ver
        vm.start()

        _, doc, _ = run_pyvbak(["init", repo], env)
        full_s, full, _ = run_pyvbak(["backup", vm.uri, "--repo", repo, "--vm", "bench", "--json"], env)
        out["full"] = {"wall_s": round(full_s, 3), **{k: full[k] for k in ("cbt", "bytes_read", "stored_bytes", "duration")}}
        log(f"full backup {full_s:.2f}s")

        out["startup"] = {k: round(v, 4) for k, v in startup_times(env).items()}
        rounds = []
        for r in range(a.rounds):
            rw = rewrite([vm.guest, rawcopy], size, 100 + r)
            warm(rawcopy)  # the baseline reads from the page cache
            settle(a.settle)

            def baselines():
                b = baseline(rawcopy, rw["blocks"], threads)
                qn = baseline_qemu_nbd(vm, rw["blocks"], threads, a.nbd_readers)
                return b, qn

            baseline_first = r % 2 == 1  # the NBD baseline only reads: the bitmap is untouched
            if baseline_first:
                (base_s, base_read, base_comp, dig), qn = baselines()
                settle(a.settle)  # the guest export's re-attach flushes QEMU's image: not on pyvbak's clock
            inc_s, inc, _ = run_pyvbak(["backup", vm.uri, "--repo", repo, "--vm", "bench", "--json"], env)
            if inc.get("cbt") is not True:
                raise RuntimeError(f"incremental backup did not use the dirty bitmap: {inc.get('fallback_reason')}")
            if not baseline_first:
                settle(a.settle)  # pyvbak's writes (packs, index) not on the baselines' clock
                (base_s, base_read, base_comp, dig), qn = baselines()
            exp_bytes = len(rw["blocks"]) * BLOCK
            rounds.append({
                "order": "baselines first" if baseline_first else "pyvbak first",
                "incremental_s": round(inc_s, 4),
                "incremental_engine_duration_s": round(inc["duration"], 4),
                "baseline_read_compress_s": round(base_s, 4),
                "ratio": round(inc_s / base_s, 2),
                "baseline_qemu_nbd_s": round(qn["s"], 4),
                "ratio_vs_qemu_read": round(inc_s / qn["s"], 2),
                "qemu_nbd_read_only_s": round(qn["read_only_s"], 4),
                "qemu_nbd_setup_s": round(qn["setup_s"], 4),
                "qemu_nbd_requests": qn["requests"],
                "qemu_nbd_bytes_read": qn["bytes_read"],
                "qemu_nbd_matches_raw_copy": qn["digests"] == dig and qn["bytes_read"] == base_read,
                "rewritten_pages": rw["pages"], "rewrite_runs": rw["runs"],
                "changed_blocks_expected": int(len(rw["blocks"])),
                "bytes_read": inc["bytes_read"], "changed_bytes": inc["changed_bytes"],
                "stored_bytes": inc["stored_bytes"], "baseline_bytes_read": base_read,
                "baseline_compressed_bytes": base_comp,
                "bitmap_exact": inc["changed_bytes"] == exp_bytes,
            })
            log(f"round {r} ({rounds[-1]['order']}): incremental {inc_s:.3f}s (engine {inc['duration']:.3f}s), "
                f"baseline {base_s:.4f}s, ratio {inc_s / base_s:.1f}; qemu nbd baseline {qn['s']:.4f}s "
                f"(read only {qn['read_only_s']:.4f}s), ratio {inc_s / qn['s']:.1f}; read {inc['bytes_read']} "
                f"changed {inc['changed_bytes']} (expected {exp_bytes}); same bytes {rounds[-1]['qemu_nbd_matches_raw_copy']}")
        out["rounds"] = rounds
        med = lambda k: statistics.median(x[k] for x in rounds)  # noqa: E731
        out["incremental_s"] = med("incremental_s")
        out["baseline_read_compress_s"] = med("baseline_read_compress_s")
        out["ratio"] = round(statistics.median(x["ratio"] for x in rounds), 2)
        out["baseline_qemu_nbd_s"] = med("baseline_qemu_nbd_s")
        out["qemu_nbd_read_only_s"] = med("qemu_nbd_read_only_s")
        out["ratio_vs_qemu_read"] = round(statistics.median(x["ratio_vs_qemu_read"] for x in rounds), 2)
        out["qemu_nbd_reader"] = f"own minimal NBD client (bench), {a.nbd_readers} connections, simple replies"
        out["target_ratio"] = 2.0
        out["meets_target"] = out["ratio"] <= 2.0
        out["meets_target_vs_qemu_read"] = out["ratio_vs_qemu_read"] <= 2.0
        out["startup_share_of_incremental"] = round(out["startup"]["pyvbak_help_s"] / out["incremental_s"], 2)

        if a.in_process_rounds:
            out["in_process"] = in_process_rounds(a.in_process_rounds, vm, rawcopy, size, repo, work, threads,
                                                  a.nbd_readers, seed0=1000, settle_s=a.settle)

        if not a.no_profile:
            rw = rewrite([vm.guest, rawcopy], size, 100 + a.rounds)
            warm(rawcopy)
            settle(a.settle)
            prof = profiled_backup(repo, vm.uri, work, a.cprofile)
            base_s, _, _, dig = baseline(rawcopy, rw["blocks"], threads)
            qn = baseline_qemu_nbd(vm, rw["blocks"], threads, a.nbd_readers)
            prof["baseline_read_compress_s"] = round(base_s, 4)
            prof["baseline_qemu_nbd_s"] = round(qn["s"], 4)
            prof["qemu_nbd_matches_raw_copy"] = qn["digests"] == dig
            prof["in_process_ratio"] = round(prof["main_s"] / base_s, 2)
            prof["in_process_ratio_vs_qemu_read"] = round(prof["main_s"] / qn["s"], 2)
            rb = prof["phases"].get("run_backup (total)", {}).get("s")
            if rb:
                prof["run_backup_ratio"] = round(rb / base_s, 2)
                prof["run_backup_ratio_vs_qemu_read"] = round(rb / qn["s"], 2)
            out["profile"] = prof
            log(f"profile: in-process {prof['main_s']:.3f}s (run_backup {rb}s), baseline {base_s:.4f}s, "
                f"qemu nbd baseline {qn['s']:.4f}s")
        out["bitmaps_after"] = vm.bitmaps()
    finally:
        vm.stop()
        for s, h in old.items():
            signal.signal(s, h)
        if vm.mounted():
            log(f"warning: {vm.guest} still mounted")
        else:
            shutil.rmtree(run, ignore_errors=True)

    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"incremental {out['incremental_s']:.3f}s  baseline {out['baseline_read_compress_s']:.4f}s  "
              f"ratio {out['ratio']} (target <= 2.0)  qemu nbd baseline {out['baseline_qemu_nbd_s']:.4f}s  "
              f"ratio_vs_qemu_read {out['ratio_vs_qemu_read']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A stand-in for a running QEMU VM, for control-plane tests.

``qemu-storage-daemon`` plays the VM: it opens a qcow2 disk as nodes ``disk0-file`` (file)
and ``disk0`` (qcow2), offers two QMP monitors — ``qmp.sock`` for pyvbak and
``ctl.sock`` for the test itself (a QMP socket serves one client at a time, just as a
real VM under libvirt would need a dedicated monitor for pyvbak) — and a writable FUSE
export of ``disk0`` onto a regular file ``guest.img``.  Writing to that file is what the
guest does: the writes enter the block graph above ``disk0`` and therefore pass through
pyvbak's copy-before-write filter, while QEMU's NBD server stays free for pyvbak.

Teardown always kills the daemon and unmounts the FUSE file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import require_tool, wait_until
from images import untokened

MiB = 1 << 20


class Qmp:
    """Minimal test-side QMP client (independent of the code under test)."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX)
        # a reply took more than 10 s once, in a full suite run on this shared machine while
        # other jobs loaded its disk (QEMU's main loop flushes synchronously, e.g. in
        # blockdev-del of a fleecing image)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, /, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"{name}: {msg['error']['desc']}")

    def close(self):
        try:
            self.f.close()
        finally:
            self.sock.close()


class FakeVM:
    def __init__(self, tmp: Path, size: int = 16 * MiB, extra_monitors: int = 0, disks: int = 1, fmt: str = "qcow2"):
        """``fmt``: the disks' image format, "qcow2" or "raw" (a raw disk's dirty bitmaps
        can only live in QEMU's memory)."""
        require_tool("qemu-storage-daemon", "qemu-system-common")
        require_tool("qemu-img", "qemu-utils")
        require_tool("fusermount3", "fuse3")
        tmp.mkdir(parents=True, exist_ok=True)
        self.dir = tmp
        self.size = size
        self.fmt = fmt
        self.image = tmp / f"disk.{fmt}"
        # more disks: node diskI on diskI.FMT, guest view guestI.img (export id guestI)
        self.extra_disks = [(f"disk{i}", tmp / f"disk{i}.{fmt}", tmp / f"guest{i}.img") for i in range(1, disks)]
        self.qmp_path = tmp / "qmp.sock"
        self.ctl_path = tmp / "ctl.sock"
        self.guest_path = tmp / "guest.img"
        # more QMP sockets for pyvbak (a VM managed by several tools has several monitors)
        self.extra_qmp_paths = [tmp / f"qmp{i + 2}.sock" for i in range(extra_monitors)]
        self.proc: subprocess.Popen | None = None
        self._ctl: Qmp | None = None

    @property
    def uri(self) -> str:
        return f"qemu://{self.qmp_path}?node=disk0"

    @property
    def all_disks_uri(self) -> str:
        return f"qemu://{self.qmp_path}?" + "&".join(f"node={n}" for n in self.node_names)

    @property
    def node_names(self) -> list[str]:
        return ["disk0"] + [n for n, _, _ in self.extra_disks]

    def _guest(self, disk: int) -> Path:
        return self.guest_path if disk == 0 else self.extra_disks[disk - 1][2]

    def start(self, create: bool = True) -> "FakeVM":
        if create:
            for img in [self.image] + [img for _, img, _ in self.extra_disks]:
                subprocess.run(["qemu-img", "create", "-q", "-f", self.fmt, str(img), str(self.size)], check=True)
        for g in [self.guest_path] + [g for _, _, g in self.extra_disks]:
            g.touch()
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=disk0-file,filename={self.image}",
             "--blockdev", f"driver={self.fmt},node-name=disk0,file=disk0-file",
             "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=qmp0",
             "--monitor", "chardev=qmp0",
             "--chardev", f"socket,path={self.ctl_path},server=on,wait=off,id=ctl0",
             "--monitor", "chardev=ctl0",
             *[a for i, p in enumerate(self.extra_qmp_paths)
               for a in ("--chardev", f"socket,path={p},server=on,wait=off,id=qmpx{i}", "--monitor", f"chardev=qmpx{i}")],
             "--export", f"type=fuse,id=guest,node-name=disk0,mountpoint={self.guest_path},writable=on",
             *[a for i, (node, img, guest) in enumerate(self.extra_disks, 1)
               for a in ("--blockdev", f"driver=file,node-name={node}-file,filename={img}",
                         "--blockdev", f"driver={self.fmt},node-name={node},file={node}-file",
                         "--export", f"type=fuse,id=guest{i},node-name={node},mountpoint={guest},writable=on")]],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.proc.poll() is not None or (self.ctl_path.exists() and self._all_mounted()),
                   timeout=15, what="qemu-storage-daemon to start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"qemu-storage-daemon failed: {self.proc.stdout.read().decode()}")
        return self

    def __enter__(self) -> "FakeVM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _mounted(self, path: Path | None = None) -> bool:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == str(path or self.guest_path) for line in f)

    def _all_mounted(self) -> bool:
        return all(self._mounted(g) for g in [self.guest_path] + [g for _, _, g in self.extra_disks])

    @property
    def ctl(self) -> Qmp:
        if self._ctl is None:
            self._ctl = Qmp(self.ctl_path)
        return self._ctl

    # --- guest I/O through the FUSE export ---------------------------------------
    def write(self, offset: int, data: bytes, disk: int = 0) -> None:
        fd = os.open(self._guest(disk), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, offset: int, length: int, disk: int = 0) -> bytes:
        fd = os.open(self._guest(disk), os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    # --- state inspection ----------------------------------------------------------
    def node(self, name: str = "disk0") -> dict:
        for n in self.ctl.cmd("query-named-block-nodes", flat=True):
            if n["node-name"] == name:
                return n
        raise KeyError(name)

    def bitmaps(self, node: str = "disk0") -> dict[str, dict]:
        """The node's dirty bitmaps by name, pyvbak's without their random token
        (``pyvbak-gen-N``; each entry's "name" is the real one)."""
        return untokened({b["name"]: b for b in self.node(node).get("dirty-bitmaps", []) if "name" in b})

    def pyvbak_nodes(self) -> list[str]:
        return [n["node-name"] for n in self.ctl.cmd("query-named-block-nodes", flat=True)
                if n["node-name"].startswith("pyvbak-")]

    def pyvbak_objects(self) -> list[str]:
        """QOM objects pyvbak made (the per-VM session locks)."""
        return sorted(o["name"] for o in self.ctl.cmd("qom-list", path="/objects") if o["name"].startswith("pyvbak-"))

    def exports(self) -> list[str]:
        return [e["id"] for e in self.ctl.cmd("query-block-exports")]

    def jobs(self) -> list[str]:
        return [j["id"] for j in self.ctl.cmd("query-jobs")]

    # --- teardown ------------------------------------------------------------------
    def stop(self) -> None:
        stop_qemu(self.proc, self._ctl)
        self._ctl = None
        for g in [self.guest_path] + [g for _, _, g in self.extra_disks]:
            if self._mounted(g):
                subprocess.run(["fusermount3", "-u", str(g)], check=False)
        self.proc = None


def stop_qemu(proc: subprocess.Popen | None, ctl: Qmp | None) -> None:
    """Close the test's monitor, SIGTERM the QEMU process (SIGKILL after 10 s), reap it."""
    if ctl is not None:
        try:
            ctl.close()
        except OSError:
            pass
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc is not None and proc.stdout:
        proc.stdout.close()


def hard_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_eof(stream, timeout: float, what: str) -> bytes:
    """Read ``stream`` (a pipe) to its end of file - every process holding its write end
    gone, e.g. a killed pyvbak and the watchdog it left (which inherits its stderr) -
    within ``timeout`` seconds; what it carried."""
    import selectors

    out = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(stream.fileno(), selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what}: still open after {timeout:g} s")
            if sel.select(left):
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    return out
                out += chunk


def now() -> float:
    return time.monotonic()


# -- pyvbak's hot sessions against the stand-in ------------------------------------------

def assert_clean(vm: FakeVM, work: Path):
    assert vm.exports() == ["guest"]
    assert vm.pyvbak_nodes() == []
    assert vm.pyvbak_objects() == []  # the session lock is released
    assert vm.jobs() == []
    assert not work.exists() or list(work.iterdir()) == []


def backup(vm, work, previous_state=None, **kw):
    """One committed backup; returns (session, dirty extents or None)."""
    from pyvbak.hypervisors.qemu import QemuHotBackup
    from pyvbak.sources.nbd import NbdSource

    with QemuHotBackup(vm.uri, previous_state=previous_state, work_dir=work, **kw) as s:
        with NbdSource(s.nbd_uri, dirty_bitmap=s.dirty_bitmap) as src:
            ct = src.change_tracking(previous_state) if s.dirty_bitmap else None
        s.commit()
    return s, (ct.extents if ct else None)


#: ``python -c HOT_SESSION_CHILD URI WORK_DIR PREVIOUS_STATE_JSON FORM``: a hot session (the
#: view FORM, "snapshot-access" or "qcow2") that prints "READY <nbd uri>" once it serves,
#: then sleeps - to be killed
HOT_SESSION_CHILD = r"""
import sys, time, json
from pyvbak.errors import Interrupted, PyvbakError
from pyvbak.hypervisors.qemu import QemuHotBackup, hot
uri, work, prev = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
hot.SNAPSHOT_ACCESS_SINCE = {"qcow2": (99, 0), "snapshot-access": (7, 1)}[sys.argv[4]]  # as the fleecing fixture
try:
    with QemuHotBackup(uri, previous_state=prev, work_dir=work) as s:
        print("READY", s.nbd_uri, flush=True)
        time.sleep(60)
except (PyvbakError, Interrupted) as e:  # (a stop request is no Exception, like Ctrl-C)
    print("ERR", e, flush=True)
    sys.exit(e.exit_code)
"""

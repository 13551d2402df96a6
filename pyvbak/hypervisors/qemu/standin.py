"""A running VM stood in for by ``qemu-storage-daemon``, for the demo and the benchmarks.

The daemon opens each qcow2 image as node ``disk<i>``, offers a QMP socket (what pyvbak
backs up through: ``qemu:///<work>/qmp.sock?node=disk<i>``) and a writable FUSE export
of each node onto a regular file, ``guest<i>.img`` - the guest's view of its running
disk: writes to it enter the block graph above the node, so they pass through pyvbak's
copy-before-write filter and are recorded by its dirty bitmaps, as a guest's would.
(The test suite keeps its own, independent stand-in: tests/qemu_vm.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

from pyvbak.errors import SourceError
from pyvbak.processes import spawned_helper

#: Debian packages of the programs the stand-in needs
PACKAGES = {"qemu-storage-daemon": "qemu-system-common", "qemu-img": "qemu-utils", "fusermount3": "fuse3"}


def missing_tools() -> list[str]:
    """'program (Debian package)' for each program the stand-in needs and PATH lacks."""
    return [f"{tool} (Debian package {pkg})" for tool, pkg in PACKAGES.items() if not shutil.which(tool)]


class StandInVM:
    """``StandInVM(work_dir, [qcow2, ...]).start()``; ``qmp``, ``guests``, ``uri(i)``;
    ``stop()`` ends the daemon and unmounts the views (idempotent).  ``work_dir`` must be
    short: UNIX socket paths hold at most 107 bytes."""

    def __init__(self, work_dir: str, images: list[str]):
        self.images = list(images)
        self.qmp = os.path.join(work_dir, "qmp.sock")
        self.guests = [os.path.join(work_dir, f"guest{i}.img") for i in range(len(self.images))]
        self.proc: subprocess.Popen | None = None

    def uri(self, *disks: int) -> str:
        """The qemu:// URI of the given disks (all of them by default)."""
        return f"qemu://{self.qmp}?" + "&".join(f"node=disk{i}" for i in (disks or range(len(self.images))))

    def start(self, timeout: float = 30.0) -> "StandInVM":
        missing = missing_tools()
        if missing:
            raise SourceError(f"the stand-in VM needs {', '.join(missing)}: install them")
        args = ["qemu-storage-daemon", "--chardev", f"socket,path={self.qmp},server=on,wait=off,id=qmp0",
                "--monitor", "chardev=qmp0"]
        for i, (image, guest) in enumerate(zip(self.images, self.guests)):
            open(guest, "wb").close()
            args += ["--blockdev", f"driver=file,node-name=disk{i}-file,filename={image}",
                     "--blockdev", f"driver=qcow2,node-name=disk{i},file=disk{i}-file",
                     "--export", f"type=fuse,id=guest{i},node-name=disk{i},mountpoint={guest},writable=on"]
        # Its own session: a terminal's Ctrl-C goes to the foreground process group, and the
        # daemon dying first (under the backup, its FUSE mounts with it) is not a clean stop;
        # stop() ends it, on any exit of its owner - and a SIGTERM from the kernel if its
        # owner dies without one (kill -9), instead of an orphan serving the demo's disks.
        try:
            with spawned_helper(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True) as proc:
                self.proc = proc
            deadline = time.monotonic() + timeout
            while not (os.path.exists(self.qmp) and all(self._mounted(g) for g in self.guests)):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    out = self.proc.stdout.read().decode(errors="replace") if self.proc.poll() is not None else "timed out"
                    raise SourceError(f"qemu-storage-daemon did not start: {out.strip()[-300:]}")
                time.sleep(0.02)
        except BaseException:  # Ctrl-C while it starts included: no daemon or mount left behind
            self.stop()
            raise
        return self

    @staticmethod
    def _mounted(path: str) -> bool:
        # mountinfo names the resolved path, with space, tab, newline and backslash as
        # octal escapes (a work dir under a symlink never matched: the start timed out)
        real = os.path.realpath(path)
        with open("/proc/self/mountinfo") as f:
            return any(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) == real
                       for line in f)

    def state(self, disk: int = 0) -> str:
        """What QEMU holds, from its own QMP answers: exports, jobs, pyvbak's nodes and the
        dirty bitmaps of ``disk<disk>``."""
        from .qmp import QmpClient

        with QmpClient(self.qmp, timeout=10).connect() as q:
            exports = [e["id"] for e in q.execute("query-block-exports")]
            jobs = [j["id"] for j in q.execute("query-jobs")]
            named = q.execute("query-named-block-nodes", flat=True)
        nodes = [n["node-name"] for n in named if n.get("node-name", "").startswith("pyvbak-")]
        bitmaps = [f"{b['name']}{' (recording)' if b.get('recording') else ''}"
                   for n in named if n.get("node-name") == f"disk{disk}" for b in n.get("dirty-bitmaps", [])]
        return (f"exports {exports or 'none'}, block jobs {jobs or 'none'}, pyvbak nodes {nodes or 'none'}, "
                f"dirty bitmaps on disk{disk} {bitmaps or 'none'}")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(15)
            if self.proc.stdout:
                self.proc.stdout.close()
        for g in self.guests:
            if self._mounted(g):
                subprocess.run(["fusermount3", "-u", g], check=False, capture_output=True)

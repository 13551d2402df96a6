"""A real QEMU virtual machine (``qemu-system-x86_64``), for tests of what only a VM has:
guest devices.

The machine is a q35 PC with guest disks attached the two ways VMs are defined:

* ``virtio-disk0``: ``-blockdev`` nodes (``disk0-file``, ``disk0``) behind
  ``-device virtio-blk-pci,id=virtio-disk0`` — how libvirt defines disks;
* ``data``: ``-drive if=none,id=drive-data`` behind ``-device virtio-blk-pci,id=data`` —
  the older form, whose block nodes get generated names (``#block123``);
* ``cd0``: an empty IDE CD-ROM drive (removable: not one of "every disk");
* ``pflash0``: read-only firmware code in a pflash drive, as UEFI VMs have (read-only:
  not one of "every disk" either);
* ``pflash1``: the writable UEFI variable store beside it (raw: one of "every disk", its
  dirty bitmap in QEMU's memory).

It is started paused (``-S``: no firmware or guest code runs, no KVM needed).  What the
guest would write reaches the disks through their devices: the HMP ``qemu-io -d`` command
writes through the device's own block backend, so the writes enter the block graph where
a guest's do, above pyvbak's copy-before-write filter.  Two QMP sockets: ``qmp.sock`` for
pyvbak, ``ctl.sock`` for the test.  ``spare_drives`` adds unattached drives first, which
shifts the generated node names (what a changed VM definition does across a restart).

Given a kernel (``kernel``, ``initrd``, ``append``: ``tests/guest_linux.py`` builds them)
the machine instead boots that Linux guest: 256 MiB, no firmware flash (it would replace
the BIOS that loads the kernel), each disk's virtio serial number set to its device id
(how the guest finds its disks), the serial port on ``serial.sock``.  It is still started
paused: ``start`` connects ``console`` (a ``SerialConsole``) first, so not a line of the
guest's is lost, and only then lets the guest run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import require_tool, unix_listening, wait_until
from images import untokened
from guest_linux import SerialConsole
from qemu_vm import Qmp, stop_qemu

MiB = 1 << 20
DEVICES = ("virtio-disk0", "data")
VARS_SIZE = 256 * 1024


class QemuSystemVM:
    def __init__(self, tmp: Path, size: int = 8 * MiB, *, kernel: Path | None = None,
                 initrd: Path | None = None, append: str = ""):
        require_tool("qemu-system-x86_64", "qemu-system-x86")
        require_tool("qemu-img", "qemu-utils")
        self.dir = tmp
        self.size = size
        self.images = {"virtio-disk0": tmp / "disk0.qcow2", "data": tmp / "data.qcow2"}
        self.firmware = tmp / "code.fd"
        self.uefi_vars = tmp / "vars.fd"  # a UEFI VM's writable variable store: pflash1, raw
        self.qmp_path = tmp / "qmp.sock"
        self.ctl_path = tmp / "ctl.sock"
        self.serial_path = tmp / "serial.sock"
        self.kernel, self.initrd, self.append = kernel, initrd, append
        self.proc: subprocess.Popen | None = None
        self._ctl: Qmp | None = None
        self.console: SerialConsole | None = None

    @property
    def uri(self) -> str:
        return f"qemu://{self.qmp_path}"

    def start(self, *, create: bool = True, spare_drives: int = 0) -> "QemuSystemVM":
        booting = self.kernel is not None
        if create and not booting:
            with open(self.firmware, "wb") as f:
                f.truncate(2 * MiB)
            with open(self.uefi_vars, "wb") as f:
                f.truncate(VARS_SIZE)
        if create:
            for img in self.images.values():
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(self.size)], check=True)
        spares = []
        for i in range(spare_drives):
            img = self.dir / f"spare{i}.qcow2"
            if not img.exists():
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
            spares += ["-drive", f"file={img},format=qcow2,if=none,id=spare{i}"]
        if booting:
            machine = ["-m", "256", "-no-reboot", "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                       "-append", self.append,
                       "-chardev", f"socket,path={self.serial_path},server=on,wait=off,id=ser0",
                       "-serial", "chardev:ser0"]
            firmware = []
            serial = {d: f",serial={d}" for d in DEVICES}
        else:
            machine = ["-m", "32"]
            firmware = ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={self.firmware}",
                        "-drive", f"if=pflash,format=raw,unit=1,file={self.uefi_vars}"]
            serial = {d: "" for d in DEVICES}
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-nodefaults", "-no-user-config",
             "-display", "none", *machine, "-S",
             "-chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=qmp0", "-mon", "chardev=qmp0,mode=control",
             "-chardev", f"socket,path={self.ctl_path},server=on,wait=off,id=ctl0", "-mon", "chardev=ctl0,mode=control",
             *spares,
             "-blockdev", f"driver=file,node-name=disk0-file,filename={self.images['virtio-disk0']}",
             "-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
             "-device", f"virtio-blk-pci,drive=disk0,id=virtio-disk0{serial['virtio-disk0']}",
             "-drive", f"file={self.images['data']},format=qcow2,if=none,id=drive-data",
             "-device", f"virtio-blk-pci,drive=drive-data,id=data{serial['data']}",
             "-device", "ide-cd,id=cd0",
             *firmware],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        sockets = (self.ctl_path, self.qmp_path) + ((self.serial_path,) if booting else ())
        # listening, not merely bound: a connect between the two is refused (a flaky test)
        wait_until(lambda: self.proc.poll() is not None or all(unix_listening(p) for p in sockets),
                   timeout=20, what="qemu-system-x86_64 to start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"qemu-system-x86_64 failed: {self.proc.stdout.read().decode()}")
        if booting:
            self.console = SerialConsole(self.serial_path)
            self.ctl.cmd("cont")
        return self

    @property
    def ctl(self) -> Qmp:
        if self._ctl is None:
            self._ctl = Qmp(self.ctl_path)
        return self._ctl

    # --- the guest's writes, through the device ------------------------------------
    def write_pattern(self, device: str, offset: int, length: int, byte: int) -> None:
        """Write through the device's block backend (a flash drive: by its drive name)."""
        target = device if device.startswith("pflash") else f"-d /machine/peripheral/{device}/virtio-backend"
        out = self.ctl.cmd("human-monitor-command", **{"command-line": (
            f'qemu-io {target} "write -P {byte} {offset} {length}"')})
        if out.strip():
            raise RuntimeError(f"qemu-io on {device}: {out.strip()}")

    def node_of(self, device: str) -> str:
        for b in self.ctl.cmd("query-block"):
            if b.get("qdev", "").startswith(f"/machine/peripheral/{device}/") or b["device"] == device:
                return b["inserted"]["node-name"]
        raise KeyError(device)

    def read_disk(self, device: str, out: Path) -> bytes:
        """The disk's content as the guest sees it now: a read-only NBD export of the
        device's node (the test's own, on the control monitor), copied by qemu-img."""
        sock = self.dir / "test-nbd.sock"
        self.ctl.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        try:
            self.ctl.cmd("block-export-add", type="nbd", id="test-read", **{"node-name": self.node_of(device)},
                         name="test-read", writable=False)
            try:
                subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                f"nbd+unix:///test-read?socket={sock}", str(out)], check=True, timeout=60)
            finally:
                self.ctl.cmd("block-export-del", id="test-read")
                wait_until(lambda: not self.ctl.cmd("query-block-exports"), timeout=10, what="the test export to go")
        finally:
            self.ctl.cmd("nbd-server-stop")
        return out.read_bytes()

    # --- state inspection ----------------------------------------------------------
    def bitmaps(self, device: str) -> dict[str, dict]:
        node = self.node_of(device)
        for n in self.ctl.cmd("query-named-block-nodes", flat=True):
            if n["node-name"] == node:
                return untokened({b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b})
        raise KeyError(node)

    def pyvbak_traces(self) -> list[str]:
        """Everything of pyvbak's QEMU holds outside the disks' bitmaps: nodes, jobs,
        exports, session-lock objects."""
        nodes = [n["node-name"] for n in self.ctl.cmd("query-named-block-nodes", flat=True)
                 if n["node-name"].startswith("pyvbak-")]
        jobs = [j["id"] for j in self.ctl.cmd("query-jobs")]
        exports = [e["id"] for e in self.ctl.cmd("query-block-exports")]
        objects = [o["name"] for o in self.ctl.cmd("qom-list", path="/objects") if o["name"].startswith("pyvbak-")]
        return nodes + jobs + exports + objects

    # --- teardown ------------------------------------------------------------------
    def quit(self) -> None:
        """Shut QEMU down the orderly way (persistent bitmaps are written to the images)."""
        self.ctl.cmd("quit")
        self.proc.wait(20)
        self.stop()

    def stop(self) -> None:
        stop_qemu(self.proc, self._ctl)
        if self.console is not None:
            self.console.close()  # QEMU is gone: its reader thread has seen the end
        self._ctl = None
        self.proc = None
        self.console = None
        for p in (self.qmp_path, self.ctl_path, self.serial_path):
            p.unlink(missing_ok=True)

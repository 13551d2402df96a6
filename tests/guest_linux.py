"""A tiny Linux guest for ``QemuSystemVM``: a distribution kernel, an initramfs built here
(busybox and the script below as ``/init``), and the guest's serial console.

Nothing is downloaded here: the kernel comes from Debian's ``linux-image-cloud-amd64`` and
busybox from ``busybox-static``, as the README's test command unpacks them into
``tests/.guest/`` (``apt-get download`` + ``dpkg-deb -x`` + ``depmod -b``: never installed
on the host, whose boot loader a kernel package would change); else any installed
``/boot/vmlinuz-VERSION`` with its ``/lib/modules/VERSION``, and ``/bin/busybox`` if static.  The virtio drivers the guest needs (``virtio_pci``, ``virtio_blk``)
are modules in Debian's kernels: they are put into the initramfs with what they depend
on (``modules.dep``), decompressed, and loaded by ``/init`` in dependency order; were
they built in (``=y`` in ``/boot/config-VERSION``, hence listed in ``modules.builtin``),
nothing would be loaded.

The guest is a *writer* on the disk whose virtio serial number is ``guest_disk`` (the
device id: ``QemuSystemVM`` sets ``serial=ID``): it writes fixed 4 KiB records
synchronously, one after another, and is steered through its console — see ``INIT``.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import IN_CI

RECORD = 4096
_LINE = "pyvbak-guest rec {:010d} ok.\n"  # 32 bytes; a record is 128 of them
assert len(_LINE.format(0)) * 128 == RECORD


def record(seq: int) -> bytes:
    """Record ``seq`` as the guest writes it (``record`` in ``INIT``): its sequence number
    and the marker in every 32-byte line, so a torn or stale record never compares equal."""
    return _LINE.format(seq).encode() * (RECORD // 32)


# The guest's /init.  Its parameters come from the kernel command line (name=value without
# a dot: the kernel hands them to init as environment variables): guest_disk (virtio
# serial of the disk to write), guest_base (byte offset of record 0), guest_max (records
# at most).  Console protocol, one word a line from the test:
#   go    start the writer: record i at guest_base + i*4096, each written with O_DIRECT and
#         flushed (dd oflag=direct conv=fsync: dd returns only when the disk acknowledged
#         it) before record i+1 is issued; after each record it prints "rec N" (N records
#         done)
#   mark  the writer prints "mark N" before it issues record N: everything it issues from
#         then on is issued after the test sent "mark"
#   stop  the writer finishes the record it is writing and stops ("stopped N"); then every
#         record is read back from the disk (O_DIRECT) and compared with what was written,
#         and the record after the last must still be zeros: "verify ok N" or
#         "verify FAILED N"
# Whatever goes wrong before that prints "guest: ERROR ..." and powers the VM off.
INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
fail() { echo "guest: ERROR $*"; poweroff -f; }
while read -r m; do
  insmod "/lib/modules/$m" || fail "insmod $m"
done < /lib/modules/load-order
disk=
tries=0
while [ -z "$disk" ]; do
  for s in /sys/block/vd*/serial; do
    [ -e "$s" ] && [ "$(cat "$s")" = "$guest_disk" ] && { d=${s%/serial}; disk=/dev/${d##*/}; }
  done
  [ -n "$disk" ] && [ -b "$disk" ] && break
  disk=
  tries=$((tries + 1))
  [ $tries -gt 200 ] && fail "no virtio disk with serial $guest_disk"
  sleep 0.05
done
first=$((guest_base / 4096))
record() {  # record $1 on stdout: 128 lines of 32 bytes, no process started
  p=0000000000$1
  p=${p#${p%??????????}}
  r="pyvbak-guest rec $p ok.
"
  for _ in 1 2 3 4 5 6 7; do r=$r$r; done
  printf %s "$r"
}
writer() {
  i=0
  while [ $i -lt $guest_max ] && [ ! -e /tmp/stop ]; do
    if [ -e /tmp/mark ]; then rm -f /tmp/mark; echo "mark $i"; fi
    record $i > /tmp/rec
    dd if=/tmp/rec of=$disk bs=4096 seek=$((first + i)) count=1 oflag=direct conv=notrunc,fsync 2>/dev/null \
      || { echo "guest: ERROR write of record $i"; break; }
    i=$((i + 1))
    echo "rec $i"
  done
  echo $i > /tmp/count
}
verify() {
  n=$(cat /tmp/count)
  rm -f /tmp/expected
  i=0
  while [ $i -lt $n ]; do record $i >> /tmp/expected; i=$((i + 1)); done
  dd if=/dev/zero bs=4096 count=1 >> /tmp/expected 2>/dev/null
  dd if=$disk of=/tmp/actual bs=4096 skip=$first count=$((n + 1)) iflag=direct 2>/dev/null
  if cmp -s /tmp/expected /tmp/actual; then echo "verify ok $n"; else echo "verify FAILED $n"; fi
}
stty -echo 2>/dev/null
echo "guest: ready $disk"
wpid=
while read -r cmd; do
  case "$cmd" in
    go) [ -z "$wpid" ] && { writer & wpid=$!; } ;;
    mark) : > /tmp/mark ;;
    stop) : > /tmp/stop; [ -n "$wpid" ] && wait $wpid; echo "stopped $(cat /tmp/count)"; verify ;;
  esac
done
fail "console closed"
"""


def skip_or_fail(hint: str):
    """What ``require_tool`` does for a missing program: skip, or fail in CI."""
    if IN_CI:
        pytest.fail(hint)
    pytest.skip(hint)


# --- what the host has ---------------------------------------------------------------
#: where tests/run.sh unpacks the guest's kernel and busybox (a file system root of their own)
UNPACKED = Path(__file__).resolve().parent / ".guest"


def find_kernel() -> tuple[str, Path]:
    """(version, vmlinuz) of a kernel with its modules (in ``ROOT/boot`` and
    ``ROOT/lib/modules/VERSION``), the unpacked one first, else an installed one; cloud
    kernels first (small, and made for virtio), the newest of each kind first."""
    for root in (UNPACKED, Path("/")):
        candidates = []
        for vmlinuz in (root / "boot").glob("vmlinuz-*"):
            version = vmlinuz.name[len("vmlinuz-"):]
            if _modules_dir(vmlinuz, version) is not None and os.access(vmlinuz, os.R_OK):
                candidates.append((version.endswith("-cloud-amd64"), version, vmlinuz))
        if candidates:
            candidates.sort(key=lambda c: (c[0], [int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", c[1])]))
            _, version, vmlinuz = candidates[-1]
            return version, vmlinuz
    skip_or_fail(f"no kernel with its modules in {UNPACKED} or /boot: run the README's test command "
                 f"(sh tests/run.sh), which unpacks Debian's linux-image-cloud-amd64 there")


def _modules_dir(vmlinuz: Path, version: str) -> Path | None:
    """ROOT/lib/modules/VERSION, or ROOT/usr/lib/modules/VERSION (merged /usr), with its
    modules.dep; ROOT is the one ``vmlinuz``'s boot/ is in."""
    root = vmlinuz.parent.parent
    for base in (root / "lib" / "modules" / version, root / "usr" / "lib" / "modules" / version):
        if (base / "modules.dep").is_file():
            return base
    return None


def find_static_busybox() -> Path:
    for p in (UNPACKED / "bin" / "busybox", UNPACKED / "usr" / "bin" / "busybox", Path("/bin/busybox"),
              Path("/usr/bin/busybox")):
        if p.is_file() and _is_static_elf(p.read_bytes()):
            return p
    skip_or_fail(f"no statically linked busybox in {UNPACKED}/bin or on this host: run the README's test "
                 f"command (sh tests/run.sh), which unpacks Debian's busybox-static there")


def _is_static_elf(data: bytes) -> bool:
    """An ELF64 little-endian executable without a PT_INTERP program header."""
    if data[:6] != b"\x7fELF\x02\x01":
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    return all(int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little") != 3
               for i in range(phnum))


def modules_to_load(version: str, vmlinuz: Path, wanted=("virtio_pci", "virtio_blk")) -> list[Path]:
    """The module files for ``wanted`` and what they depend on, in an order insmod can
    load them; a module the kernel has built in (``modules.builtin``) needs no file.
    The modules are beside ``vmlinuz``'s ``boot/``: ``ROOT/lib/modules/VERSION``."""
    base = _modules_dir(vmlinuz, version)
    def name(path: str) -> str:
        return Path(path).name.split(".ko")[0].replace("-", "_")

    builtin_list = base / "modules.builtin"
    builtin = {name(line) for line in builtin_list.read_text().split()} if builtin_list.is_file() else set()
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[name(mod)] = mod
    order: list[str] = []

    def add(mod: str) -> None:
        if mod in order:
            return
        for dep in reversed(deps.get(mod, [])):  # modules.dep lists a module's deps last-loaded first
            add(dep)
        order.append(mod)

    for module in wanted:
        if module in builtin:
            continue
        if module not in by_name:
            skip_or_fail(f"kernel {version} has no module {module} and does not build it in")
        add(by_name[module])
    return [base / m for m in order]


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return data


# --- the initramfs: cpio "newc", gzip ------------------------------------------------
class Cpio:
    def __init__(self):
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        blob = header + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self.parts.append(blob)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


@dataclass(frozen=True)
class LinuxGuest:
    kernel: Path
    initrd: Path
    version: str
    modules: tuple[str, ...]

    def append(self, disk: str, base: int, max_records: int) -> str:
        return (f"console=ttyS0 quiet panic=-1 no_timer_check tsc=reliable i8042.noaux i8042.nokbd "
                f"guest_disk={disk} guest_base={base} guest_max={max_records}")


def build_guest(dest: Path) -> LinuxGuest:
    """The installed kernel and an initramfs written to ``dest`` (~1.2 MB, built in well
    under a second; a session fixture builds it once)."""
    version, vmlinuz = find_kernel()
    busybox = find_static_busybox()
    modules = modules_to_load(version, vmlinuz)
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", INIT.encode(), 0o755)
    names = []
    for m in modules:
        name = m.name.split(".ko")[0] + ".ko"
        cpio.file(f"lib/modules/{name}", module_bytes(m))
        names.append(name)
    cpio.file("lib/modules/load-order", "".join(n + "\n" for n in names).encode())
    dest.mkdir(parents=True, exist_ok=True)
    initrd = dest / "initramfs.gz"
    initrd.write_bytes(gzip.compress(cpio.bytes(), compresslevel=1))
    return LinuxGuest(vmlinuz, initrd, version, tuple(names))


# --- the serial console ----------------------------------------------------------------
class SerialConsole:
    """The guest's serial port (a QEMU ``socket`` chardev, QEMU the server): a thread
    collects the lines the guest prints; ``send`` types a line."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.lines: list[str] = []
        self._partial = b""
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="guest-console", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._closed = True
                    self._cond.notify_all()
                    return
                *done, self._partial = (self._partial + chunk).split(b"\n")
                self.lines += [line.decode(errors="replace").strip("\r") for line in done]
                self._cond.notify_all()

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """The first line from index ``start`` on that matches ``pattern`` fully; fails
        the test (with the console's last lines) after ``timeout`` or on a guest error."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                for i in range(i, len(self.lines)):
                    if self.lines[i].startswith("guest: ERROR"):
                        pytest.fail(f"the guest failed: {self.lines[i]}\n{self.tail()}")
                    m = rx.fullmatch(self.lines[i])
                    if m:
                        return m
                i = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    why = "the console closed" if self._closed else f"timed out after {timeout}s"
                    pytest.fail(f"{why} waiting for the guest to print /{pattern}/\n{self.tail()}")
                self._cond.wait(left)

    def last(self, pattern: str) -> re.Match | None:
        """The last line so far that matches ``pattern``."""
        rx = re.compile(pattern)
        with self._cond:
            for line in reversed(self.lines):
                m = rx.fullmatch(line)
                if m:
                    return m
        return None

    def tail(self, n: int = 30) -> str:
        with self._cond:
            return "guest console, last lines:\n" + "\n".join(self.lines[-n:])

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(10)

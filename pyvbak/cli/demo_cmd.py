"""pyvbak demo: the main job end to end on a built-in VM-like disk.

Makes a disk image holding a real ext4 filesystem (``mkfs.ext4 -d``), backs it up,
changes files inside the filesystem (``debugfs -w``, no mount needed), backs up again
(only the changed blocks are stored), restores both snapshots and checks them
byte for byte and with ``e2fsck``.  Uses the default repository unless --repo is given.

``--hot`` does the same to a *running* VM: the disk becomes a qcow2 served by
``qemu-storage-daemon`` (standing in for QEMU: a QMP socket, and a writable FUSE export
as the guest's view of its disk), the backups go through ``qemu:///…?node=disk0`` (a
point-in-time fleecing view, a persistent dirty bitmap) and the files change through
the guest's view while the VM runs; the demo then shows QEMU holds nothing of pyvbak's
but the bitmap.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from typing import TYPE_CHECKING, Optional

import typer

from .. import interrupts
from ..errors import SourceError
from .common import RepoOption, human_bytes, open_repository, say

if TYPE_CHECKING:  # imported where it is used (start-up time)
    import random


def _tool(name: str) -> str:
    import shutil

    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)
    if not path:
        raise SourceError(f"the demo needs {name}: install the Debian package 'e2fsprogs'")
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _populate(root: str, rng: random.Random) -> None:
    words = "disk block snapshot backup restore kernel guest volume cluster datastore nightly incremental".split()
    for d in ("etc", "var/log", "home/alice", "srv/data"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in range(40):
        with open(os.path.join(root, "var/log", f"app{i}.log"), "w") as f:
            for j in range(800):
                f.write(f"2026-11-25T02:{j % 60:02d}:00 host{i} {' '.join(rng.choices(words, k=8))}\n")
    for i in range(6):
        with open(os.path.join(root, "srv/data", f"blob{i}.bin"), "wb") as f:
            f.write(rng.randbytes(2 << 20))
    with open(os.path.join(root, "etc", "hostname"), "w") as f:
        f.write("demo-vm\n")


#: the largest demo disk: the demo reads its image whole once per check (a 64 GiB one took
#: 6 minutes here), and mkfs.ext4 failed far beyond it (16 TiB: the file system's file size)
MAX_SIZE_MIB = 16384


def demo(
    repo: Optional[str] = RepoOption,
    size_mib: int = typer.Option(64, "--size-mib", min=32, max=MAX_SIZE_MIB, help=f"Size of the demo disk (its files take ~15 MiB; at most {MAX_SIZE_MIB})."),
    keep: bool = typer.Option(False, "--keep", help="Keep the demo work directory."),
    hot: bool = typer.Option(False, "--hot", help="Back up a running VM instead (qemu-storage-daemon stands in for QEMU; needs qemu-utils, qemu-system-common, fuse3)."),
) -> None:
    """Run the main job on a built-in demo disk: backup, change, backup, restore, check."""
    import random
    import shutil
    import tempfile

    from ..processes import run_helper
    from ..repo.restore import restore_snapshot

    mkfs, debugfs, fsck = _tool("mkfs.ext4"), _tool("debugfs"), _tool("e2fsck")
    if hot:
        from ..hypervisors.qemu.standin import StandInVM, missing_tools

        if missing_tools():
            raise SourceError(f"demo --hot needs {', '.join(missing_tools())}: install them (or run the demo without --hot)")
    r = open_repository(repo, create_default=True)
    # early, without the lock: a repository whose packs are gone is said before a disk
    # image is made and a VM stand-in started for nothing; each backup checks
    # again under its lock
    r.check_pack_storage()
    say(f"repository: {r.location}")
    # under /tmp: the QMP and NBD sockets must fit a UNIX socket path
    work = tempfile.mkdtemp(prefix="pyvbak-demo-", dir="/tmp" if hot else None)
    rng = random.Random(2026)
    vm = None
    try:
        tree, image = os.path.join(work, "tree"), os.path.join(work, "demo-vm-disk0.img")
        _populate(tree, rng)
        made = run_helper([mkfs, "-q", "-F", "-t", "ext4", "-d", tree, image, f"{size_mib}M"], text=True)
        if made.returncode != 0:
            # its whole message on one line (the last line alone was a wrapped fragment: "\ta
            # filesystem using a blocksize of 4096.")
            said = " ".join((made.stderr or made.stdout).split()) or "(no message)"
            raise SourceError(f"demo: mkfs.ext4 could not make the {size_mib} MiB disk image in "
                              f"{os.path.dirname(work)}: {said}")
        say(f"made a {size_mib} MiB disk image with an ext4 filesystem: {image}")
        source = image
        from .backup_cmd import backup_source

        if hot:
            qcow2 = os.path.join(work, "demo-vm-disk0.qcow2")
            run_helper(["qemu-img", "convert", "-O", "qcow2", image, qcow2]).check_returncode()
            os.unlink(image)
            vm = StandInVM(work, [qcow2])  # assigned first: the finally below stops it
            vm.start()
            image = vm.guests[0]  # the guest's view of its running disk: what is checked and changed
            source = vm.uri()
            say(f"started the VM stand-in (qemu-storage-daemon) on {qcow2}; backing up {source}")

        def backup_once(label: str):
            # (what 'pyvbak backup' does: the checks, the clean-up, the pack-storage mark)
            (res,), _ = backup_source(r, source, vm="demo-vm", disk="disk0", show_progress=False,
                                      work_dir=os.path.join(work, "pyvbak-work") if hot else None)
            how = ""
            if hot:
                how = (f", read {human_bytes(res.bytes_read)} of {human_bytes(res.size)}"
                       + (" via the dirty bitmap" if res.cbt else f" (full scan: {res.fallback_reason})"))
            if label == "full backup" and res.parent:  # a demo run again in the same repository
                label = f"backup (incremental of the earlier demo's {res.parent})"
            say(
                f"{label}: snapshot {res.snapshot_id}: changed {human_bytes(res.changed_bytes)}, "
                f"new {human_bytes(res.new_bytes)}, stored {human_bytes(res.stored_bytes)} in {res.duration:.2f}s{how}"
            )
            return res, _sha256(image)

        first, first_sum = backup_once("full backup")
        # Change files inside the guest filesystem: append to a log, replace a data file.
        new_log = os.path.join(work, "new.log")
        with open(new_log, "w") as f:
            f.write("".join(f"2026-11-26T02:00:{i % 60:02d} nightly change {i}\n" for i in range(5000)))
        new_blob = os.path.join(work, "new.bin")
        with open(new_blob, "wb") as f:
            f.write(rng.randbytes(1 << 20))
        cmds = f"rm /srv/data/blob0.bin\nwrite {new_blob} /srv/data/blob0.bin\nwrite {new_log} /var/log/nightly.log\n"
        run_helper([debugfs, "-w", "-f", "-", image], input=cmds.encode()).check_returncode()
        say("changed files inside the filesystem (debugfs): /srv/data/blob0.bin, /var/log/nightly.log"
              + (" - through the running VM's disk" if hot else ""))
        second, second_sum = backup_once("incremental backup")
        if hot:
            say(f"QEMU after the backups: {vm.state()}")
            if not second.cbt:
                raise SourceError(f"demo check failed: the incremental did not use the dirty bitmap: {second.fallback_reason}")

        for res, expected in ((first, first_sum), (second, second_sum)):
            out = os.path.join(work, f"restored-{res.snapshot_id}.img")
            with r.lock(purpose="demo restore"):
                restore_snapshot(r, r.resolve(res.snapshot_id), out)
            same = _sha256(out) == expected
            fsck_ok = run_helper([fsck, "-fn", out]).returncode == 0
            say(f"restored {res.snapshot_id}: byte-identical={same}, e2fsck clean={fsck_ok}")
            if not (same and fsck_ok):
                raise SourceError(f"demo check failed for snapshot {res.snapshot_id}: see {work}")
            os.unlink(out)
        # a line to paste into a shell: the repository's directory (not a file: URI), quoted
        # (so printed as it is, not escaped like the lines above: a newline in quotes is one word)
        kit = os.path.join(getattr(r.backend, "root", None) or r.location, "restore.sh")
        print(f"restore without pyvbak: sh {shlex.quote(kit)} {second.snapshot_id} OUTPUT.img")
        print("demo OK")
        # the demo's work is done: a signal from here on is only noted, and said (it was
        # deferred below and dropped: exit 0 and no word)
        interrupts.begin_finishing()
    finally:
        # Not cut short by a second Ctrl-C (a terminal sends it to the whole group): the
        # daemon, its FUSE mount and the work directory go in any case.
        from ..hypervisors.resources import TerminationGuard

        with TerminationGuard() as guard, guard.deferred():
            if vm is not None:
                vm.stop()
            if keep:
                say(f"kept the work directory {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)

"""A powered-off VM disk image (qcow2, vmdk, vhdx, vdi, raw, ...) served by ``qemu-nbd``.

The image is opened read-only (``qemu-nbd -r``) so pyvbak cannot change the guest's data;
``-t`` keeps the server up across the engine's several connections.  The format is always
named to QEMU (``-f``: by the file name's suffix or ``backup --format``), never probed from
the header - a guest's raw disk may begin with any image header, naming host files as its
backing file or extents - and a backing file is read only in the format the image records
for it (one without a recorded format is refused: QEMU would probe it).

Change tracking for qcow2: persistent dirty bitmaps live inside the image.  Because the
VM is off, nothing writes between two ``qemu-img bitmap`` calls, so the rotation needs no
transaction: before serving, ``pyvbak-gen-<N+1>`` is added (enabled, empty: the VM will
fill it when it next runs) and ``pyvbak-gen-<N>`` disabled; the latter is exported with
``-B`` so its ``qemu:dirty-bitmap`` context lists what the VM wrote since the previous
backup.  On exit after ``commit()`` the old generation is removed; otherwise it is
re-enabled with the new one merged in and the new one removed.  Other formats have no
bitmaps: ``fallback_reason`` says so and the engine scans.  A qcow2 whose bitmap cannot be
rotated (a read-only file, a qcow2 v2 or ``corrupt`` image, one another process holds
open) is left as it is: a previous bitmap that can be trusted is used by this backup (with
a warning), but the snapshot records no bitmap - the next backup scans - since a name that
vouched for two snapshots could be found again in an older copy of the image, with fewer
writes in it; without one the backup scans.  ``fallback_reason`` and the snapshot's state
(``bitmap_problem``) name the cause for this and later backups.
"""

from __future__ import annotations

from contextlib import nullcontext

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

from pyvbak import interrupts
from pyvbak.errors import SourceError
from pyvbak.processes import identity, run_helper, spawn_record, spawned_helper

from .session import ExportSession, backing_chain_changed, outside_data
from ..image_formats import (SUFFIX_FORMATS, container_format, format_of_name, name_for_qemu,
                             vmdk_descriptor_problem, vmdk_extent_problem, vmdk_sparse_problem)
from ..resources import TerminationGuard, remove_files
from . import cleanup, naming
from .naming import PREFIX, bitmap_name, check_socket_path, generation_of, new_run_id

STATE_KIND = "qemu-image-bitmap"
EXPORT_NAME = "pyvbak"


def _run(args: list[str], what: str, timeout: float = 60, *, writes: bool = False) -> str:
    """Run a qemu-img command; ``writes``: it changes the image, so it runs to its end
    whatever signal comes: in a session of its own (a terminal's Ctrl-C goes to the whole
    foreground process group, and killed mid-write ``qemu-img bitmap`` leaked clusters in
    the user's image), and with pyvbak's signals noted until it is done and the caller
    has recorded it (a bitmap it was disabling stayed disabled, its evidence gone with
    the journal)."""
    try:
        r = run_helper(args, text=True, timeout=timeout, start_new_session=writes)
    except FileNotFoundError:
        raise SourceError(f"{args[0]} not found: install the Debian package 'qemu-utils'") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"{what} timed out after {timeout}s") from None
    if r.returncode != 0:
        raise SourceError(f"{what} failed: {_one_line(r.stderr or r.stdout)}")
    return r.stdout


def _one_line(text: str) -> str:
    """QEMU's message on one line (its lock error is two: '... lock' / 'Is another process ...?')."""
    return " ".join(text.split())


def _check_file_type(path: Path, shown: str | None = None) -> None:
    """An image is a regular file or a block device (as for raw images, ``FileSource``): a
    FIFO hung ``qemu-img`` for its timeout, a character device became an empty snapshot.
    ``shown``: the name the user gave, if ``path`` is what it resolved to."""
    shown = f"{path}" if shown in (None, str(path)) else f"{shown} (-> {path})"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"disk image {shown} does not exist") from None
    except OSError as e:
        raise SourceError(f"cannot open disk image {shown}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{shown} is a directory, not a disk image: give an image file or block device")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise SourceError(f"{shown} is neither a regular file nor a block device: give a disk image file or block device")


def image_info(path: Path, *, running_vm_hint: str | None = None, image_format: str | None = None) -> dict:
    """``qemu-img info`` of ``path``: the format QEMU finds, or checked as ``image_format``.
    (Only ``cbt-off`` of an image file asks QEMU to find it, and acts on qcow2 alone; a
    backup names the format: ``QemuOfflineImage._image_chain``.)"""
    return image_chain(path, running_vm_hint=running_vm_hint, image_format=image_format)[0]


def image_chain(path: Path, *, running_vm_hint: str | None = None, image_format: str | None = None,
                backing_chain: bool = True) -> list[dict]:
    """``qemu-img info --backing-chain`` of ``path``: the image first, then each backing
    file it reads through (one qemu-img run either way); ``backing_chain=False``: the image
    alone."""
    _check_file_type(path)
    fmt_args = ["-f", image_format] if image_format else []
    chain_args = ["--backing-chain"] if backing_chain else []
    try:
        out = _run(["qemu-img", "info", *chain_args, "--output=json", *fmt_args, str(path)],
                   f"qemu-img info {path}")
    except SourceError as e:
        if "lock" in str(e).lower():
            hint = running_vm_hint or ("back up a running VM through its QMP socket with a "
                                       "qemu:///PATH/TO/QMP.SOCK?node=NODE URI instead")
            raise SourceError(f"disk image {path} is in use (locked, probably by the running VM): {hint}") from None
        raise
    chain = json.loads(out)
    return chain if isinstance(chain, list) and chain else [chain]


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def _check_backing_format(link: dict, image: Path) -> None:
    """QEMU probes a backing file whose format its image does not record: a guest's raw
    base disk could then be read as any image its guest wrote a header for."""
    backing = link.get("backing-filename")
    if backing and not link.get("backing-filename-format"):
        raise SourceError(f"{link.get('filename') or image} names its backing file {backing} without its format, "
                          f"and pyvbak never lets QEMU guess a format from a file's header: record it with "
                          f"'qemu-img rebase -u -b {backing} -F FORMAT {link.get('filename') or image}' "
                          f"(a qcow or qed image, which can record no format but raw for it: convert it to "
                          f"qcow2 with 'qemu-img convert -O qcow2')")


def _disabled_by(dead_files: list[Path], image: Path) -> set[tuple[str, str]]:
    """(bitmap disabled, bitmap made) that dead runs of ``image`` say they rotated: the
    running VMs' rule and journal shape (cleanup.bitmaps_disabled_by), this image's runs."""
    mine = [p for p in dead_files if p.name.endswith(".json")
            and (cleanup.read_journal(p) or {}).get("image") == str(image)]
    return cleanup.bitmaps_disabled_by(mine)


class QemuOfflineImage(ExportSession):
    """Serve one powered-off image read-only over NBD.  Context manager; same attributes
    as ``QemuHotBackup``: nbd_uri, dirty_bitmap, size, change_tracking_state,
    fallback_reason, cleaned_leftovers; ``commit()`` after the backup is durable."""

    def __init__(self, path: str | os.PathLike, *, previous_state: dict | None, work_dir: str | os.PathLike,
                 verify_cbt: bool = False, start_timeout: float = 30.0, image_format: str | None = None):
        """``image_format``: read the image as this format (``backup --format``); None: the
        format its name's suffix names (``image_formats.SUFFIX_FORMATS``; a name without one
        is refused: QEMU would probe the header)."""
        self.path = Path(path).resolve()
        self._given = os.path.abspath(path)
        # QEMU opens the image by the name given, not its symlink's target (name_for_qemu)
        self.qemu_path = Path(name_for_qemu(path))
        # by the name the user gave: a symlink's target may have no image suffix
        self.format_from_name = image_format is None
        self.image_format = image_format or format_of_name(str(path))
        if self.image_format is None:
            raise SourceError(f"{path} has no image suffix naming its format "
                              f"({', '.join(SUFFIX_FORMATS)}): give it with --format FORMAT")
        self.previous_state = dict(previous_state) if previous_state else None
        self.work_dir = Path(work_dir).absolute()  # qemu-nbd is told paths in it
        self.verify_cbt = verify_cbt
        self.start_timeout = start_timeout
        self.run = new_run_id()
        self.socket_path = self.work_dir / f"{PREFIX}{self.run}-nbd.sock"
        self.pid_file = self.work_dir / f"{PREFIX}{self.run}-qemu-nbd.pid"
        self.journal = self.work_dir / f"{PREFIX}{self.run}.json"
        self.description = f"image:{self.path}"

        self.format: str = ""
        self.nbd_uri: str | None = None
        self.dirty_bitmap: str | None = None
        self.size = 0
        self.change_tracking_state: dict = {}
        self.fallback_reason: str | None = None
        self.cleaned_leftovers: list[str] = []
        self.source_warnings: list[str] = []  # reported with the backup's (SessionSource)

        self._proc: subprocess.Popen | None = None
        self._journal: dict = {}
        self._guard: TerminationGuard | None = None
        self._committed = False
        self._old: str | None = None  # the previous generation, once this run disabled it
        self._old_disabled = False
        self._new: str | None = None
        self._rotated = False  # gen-N+1 added and (if trusted) gen-N disabled
        self._retire: str | None = None  # the bitmap a committed, rotated run removes
        self._bitmap_problem: str | None = None  # why no bitmap is left for the next backup
        self._no_prev_bitmap = False
        self._disabled_by_dead_runs: set[tuple[str, str]] = set()
        self.backing_chain: list[dict] | None = []
        self._never_trusted: str | None = None

    def __enter__(self) -> "QemuOfflineImage":
        naming.begin_run(self.run)  # live for this process's other sessions until the teardown ends
        self._guard = TerminationGuard().__enter__()
        try:
            self._setup()
        except BaseException as e:
            errors = self._teardown(failed=True, raise_errors=False)
            if errors and isinstance(e, SourceError):
                kept = (f"; the next backup of {self.path} settles them ({self.journal} is kept for it)"
                        if self.journal.exists() else "")
                raise SourceError(f"{e}; and the cleanup was incomplete: {'; '.join(errors)}{kept}") from None
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._teardown(failed=exc_type is not None or not self._committed, raise_errors=exc_type is None)

    # -- setup -------------------------------------------------------------------

    def _setup(self) -> None:
        check_socket_path(self.socket_path)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        dead = cleanup.dead_run_files(self.work_dir, self.run, image=str(self.path))
        # which bitmaps a killed run had disabled itself (read before its journal goes)
        self._disabled_by_dead_runs = _disabled_by(dead, self.path)
        self.cleaned_leftovers = cleanup.clean_files(cleanup.keep_other_disks_journals(dead, "image", str(self.path)))
        self.cleaned_leftovers += cleanup.drop_old_journals(self.work_dir, self.run)
        self.cleaned_leftovers += cleanup.drop_dead_journal_temps(self.work_dir)
        # who runs this run, before any other file of it (and before the image's bitmaps
        # change): another pyvbak sharing the work dir judges it by this, not by its pid
        self._write_journal()
        chain = self._image_chain()
        info = chain[0]
        self.backing_chain, self._never_trusted = outside_data(chain)
        self.format = info["format"]
        self.size = int(info["virtual-size"])
        specific = info.get("format-specific", {}).get("data", {}) or {}
        bitmaps = {}
        if self.format == "qcow2":
            for b in specific.get("bitmaps", []) or []:
                bitmaps[b["name"]] = b
        prev_name = (self.previous_state or {}).get("bitmap")
        # generations only grow, also past the ones cleaned away now: a name is never reused
        max_gen = max([generation_of(b) or 0 for b in bitmaps], default=0)
        # why no bitmap of this image can be written (it is then left as it is), or None
        problem = self._cannot_write_bitmaps(specific) if self.format == "qcow2" else None
        # Leftovers first, then the check (as for running VMs): a run killed after it
        # disabled the previous generation left that one whole, and it is merged back and
        # enabled again here - checked before, it looked disabled and forced a full scan.
        if self.format == "qcow2" and problem is None:
            try:
                self._settle_leftover_bitmaps(bitmaps, prev_name)
            except SourceError as e:  # (the trust check below sees what is left)
                problem = self._rotation_problem(e)
        self.fallback_reason, old = self._check_cbt(bitmaps)
        if specific.get("corrupt"):
            old = None  # (fallback_reason: below, with the problem)
        if self.verify_cbt and self.fallback_reason is None:
            self.fallback_reason = "verify-cbt requested: the whole disk is scanned and compared with the dirty bitmap"

        generation = None
        if self.format == "qcow2" and problem is None:
            gens = [max_gen, int((self.previous_state or {}).get("generation") or 0)]
            generation = max(gens) + 1
            new = bitmap_name(generation)
            try:
                with interrupts.held():  # each step and its record, whatever signal comes
                    self._bitmap_op("--add", new)
                    self._new = new
                if old is not None:
                    # first the evidence: a run killed after the disable has its bitmap
                    # enabled again by the next run only if its journal says it disabled it
                    self._write_journal(disks=[{"disables": old, "new_bitmap": new}])
                    with interrupts.held():
                        self._bitmap_op("--disable", old)
                        self._old, self._old_disabled = old, True
                self._rotated = True
                # the commit removes the previous generation, trusted or not: gen-N+1 replaces it
                self._retire = prev_name if prev_name in bitmaps else None
            except SourceError as e:
                generation = None
                problem = self._rotation_problem(e)
                if self._new is not None:  # added, not rotated: the image as it was
                    try:
                        with interrupts.held():
                            self._bitmap_op("--remove", self._new)
                            self._new = None
                    except SourceError:
                        pass  # the teardown tries again (and the next run drops it as stale)
        if problem is not None:
            if old is not None:
                # Not rotated, and the previous bitmap is trusted: this backup uses it, but
                # its snapshot records no bitmap.  Recorded again, the same name vouched for
                # two snapshots, and an image put back to a copy made between them (a
                # restored file, a storage snapshot's rollback) still held that name, with
                # fewer writes in it: the next backup trusted it and missed blocks.  A
                # rotation makes a new name no copy can hold.
                self._bitmap_problem = problem
                self.source_warnings.append(
                    f"cannot rotate the dirty bitmap {old} in {self.path}: {problem}; this backup used it, the "
                    f"next one scans the whole disk")
            else:
                self._bitmap_problem = problem
                cause = f"no dirty bitmap can be kept in {self.path} for the next backup: {problem}"
                if self.fallback_reason is None or self._no_prev_bitmap or specific.get("corrupt"):
                    self.fallback_reason = cause  # (the real cause, not "the previous backup left none")
                else:
                    self.fallback_reason = f"{self.fallback_reason}; and {cause}"
        self.dirty_bitmap = old

        # --shared 2: the engine's connection, and one for the dirty bitmap's status alone
        args = ["qemu-nbd", "-t", "-r", "--shared=2", "-f", self.format, f"--socket={self.socket_path}",
                "-x", EXPORT_NAME, f"--pid-file={self.pid_file}"]
        if old is not None:
            args += ["-B", old]
        args.append(str(self.qemu_path))
        try:
            with spawned_helper(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
                self._proc = proc
                # which process the pid is, so that a later cleanup never signals another one
                self._write_journal(qemu_nbd=spawn_record(proc.pid))
        except FileNotFoundError:
            raise SourceError("qemu-nbd not found: install the Debian package 'qemu-utils'") from None
        deadline = time.monotonic() + self.start_timeout
        while not (self.socket_path.exists() and self.pid_file.exists()):
            if self._proc.poll() is not None:
                err = _one_line(self._proc.stderr.read().decode(errors="replace"))
                if "lock" in err.lower():
                    raise SourceError(f"qemu-nbd could not serve {self.path}: it is in use (locked, probably by a "
                                      f"VM starting): back it up when the VM is off, or through its QMP socket "
                                      f"(qemu:///PATH/TO/QMP.SOCK) while it runs: {err}")
                raise SourceError(f"qemu-nbd could not serve {self.path}: {err}")
            if time.monotonic() > deadline:
                raise SourceError(f"qemu-nbd did not start serving {self.path} within {self.start_timeout}s")
            time.sleep(0.01)
        from pyvbak.sources.nbd import nbd_unix_uri  # (the data plane: imported late, as in session.py)

        self.nbd_uri = nbd_unix_uri(EXPORT_NAME, self.socket_path)
        self.change_tracking_state = {
            "kind": STATE_KIND, "bitmap": self._new if self._rotated else None, "generation": generation,
            "image": str(self.path), "format": self.format, "size": self.size,
            "backing_chain": self.backing_chain,
        }
        if self._bitmap_problem:  # the next backup's fallback_reason names it
            self.change_tracking_state["bitmap_problem"] = self._bitmap_problem

    def _image_chain(self) -> list[dict]:
        """``qemu-img info`` of the image read as ``image_format`` and of each backing file
        in the format the image above it records: nothing is probed (a backing file whose
        format is not recorded is refused, before QEMU would probe it)."""
        fmt, path = self.image_format, self.qemu_path
        _check_file_type(self.path, self._given)
        if fmt == "vmdk":
            extent = vmdk_extent_problem(str(path), by_name=self.format_from_name)
            if extent:
                raise SourceError(f"{path} is an extent of a VMware disk, not a disk of its own: {extent}; back up "
                                  f"the descriptor .vmdk that names it, or this file with --format raw")
            problem = vmdk_descriptor_problem(str(path))
            header = container_format(str(path)) if problem else None
            if header not in (None, "vmdk"):
                said = "which its name says it is" if self.format_from_name else "as --format says"
                raise SourceError(f"{path} is not a vmdk image, {said}: its header is a {header} "
                                  f"image's; if it is one (not a guest's raw disk), give its format with --format "
                                  f"{header} (--format raw backs up the file's bytes as the disk)")
            if problem:
                raise SourceError(f"{path} is not a vmdk image: {problem} (a raw extent such as NAME-flat.vmdk holds "
                                  f"a disk's data): back up the descriptor .vmdk that names it, or this file with "
                                  f"--format raw")
        try:
            top = image_chain(path, image_format=fmt, backing_chain=False)[0]
        except SourceError as e:
            if self.format_from_name and _readable(path) and container_format(str(path)) != fmt:
                qemu = str(e).split(" failed: ", 1)[-1]
                raise SourceError(f"{path} is not a {fmt} image, which its name says it is ({qemu}): give its "
                                  f"format with --format FORMAT (--format raw backs up the file's bytes as "
                                  f"the disk)") from None
            raise
        if fmt == "vmdk":
            problem = vmdk_sparse_problem(str(path), top)
            if problem:
                raise SourceError(f"{path} is not a vmdk disk of its own: {problem} (a guest's raw disk may hold "
                                  f"such a header): back up the descriptor .vmdk of the disk, or this file with "
                                  f"--format raw")
        if not top.get("backing-filename"):
            return [top]
        _check_backing_format(top, path)
        chain = image_chain(path, image_format=fmt)
        for link in chain:
            _check_backing_format(link, path)
        return chain

    def _cannot_write_bitmaps(self, specific: dict) -> str | None:
        """What the qcow2 header or the file says against writing a bitmap, or None."""
        if specific.get("compat") == "0.10":
            return ("qcow2 v2 (compat 0.10) images cannot store dirty bitmaps: upgrade it with "
                    f"'qemu-img amend -f qcow2 -o compat=1.1 {self.path}' while its VM is off")
        if specific.get("corrupt"):
            return ("the image is marked corrupt (its bitmaps are not trusted either): check and repair it with "
                    f"'qemu-img check -r all {self.path}' while its VM is off")
        if not os.access(self.path, os.W_OK):
            return ("the image file is read-only (its mode, chattr +i, or a read-only mount): make it writable "
                    "to the user running pyvbak")
        return None

    def _rotation_problem(self, e: SourceError) -> str:
        text = str(e)
        if not os.access(self.path, os.W_OK):
            return "the image file is read-only (its mode, chattr +i, or a read-only mount): " + text
        if "lock" in text.lower():
            return "another process has the image open (a VM, a copy job): " + text
        return text

    def _write_journal(self, **more) -> None:
        """``W/pyvbak-R.json``: the run, its owner's identity (``processes.identity()``) and,
        once started, its qemu-nbd (``processes.spawn_record``).  Leftover cleanup judges
        the run's files by the owner (``cleanup.dead_run_files``: another pid namespace or
        machine is live) and signals a leftover qemu-nbd only if it is the recorded one
        (``cleanup.stop_leftover_qemu_nbd``)."""
        if not self._journal:
            self._journal = {"run": self.run, "pid": os.getpid(), "owner": identity(), "image": str(self.path),
                             "nbd_socket": str(self.socket_path), "pid_file": str(self.pid_file)}
        self._journal.update(more)
        tmp = naming.journal_temp(self.journal)
        try:
            tmp.write_text(json.dumps(self._journal))
            os.replace(tmp, self.journal)
        except OSError as e:
            raise SourceError(f"cannot write {self.journal} in the work dir: {e.strerror}") from None

    def _check_cbt(self, bitmaps: dict[str, dict]) -> tuple[str | None, str | None]:
        prev = self.previous_state
        if self.format != "qcow2":
            return f"image format '{self.format}' cannot store persistent dirty bitmaps (qcow2 can)", None
        if not prev:
            self._no_prev_bitmap = True
            return "no dirty bitmap of an earlier backup of this disk (its first backup through QEMU)", None
        name = prev.get("bitmap")
        if prev.get("kind") not in (None, STATE_KIND) or not name:
            self._no_prev_bitmap = True
            if prev.get("kind") == STATE_KIND and prev.get("bitmap_problem"):
                return f"the previous backup could not keep a dirty bitmap in {self.path}: {prev['bitmap_problem']}", None
            return "the previous backup recorded no dirty bitmap for this image", None
        if prev.get("image") not in (None, str(self.path)):
            return f"the previous backup read image {prev.get('image')}, not {self.path}", None
        if self._never_trusted:
            return self._never_trusted, None
        changed = backing_chain_changed(prev, self.backing_chain, str(self.path))
        if changed:
            return changed, None
        b = bitmaps.get(name)
        if b is None:
            return f"dirty bitmap {name} is gone from {self.path} (deleted by someone else?)", None
        flags = b.get("flags", [])
        if "in-use" in flags:
            return f"dirty bitmap {name} is marked in-use/inconsistent (the VM stopped without saving it)", None
        if "auto" not in flags:
            return f"dirty bitmap {name} is disabled, so it missed writes", None
        if prev.get("generation") != generation_of(name):
            return f"bitmap generation mismatch: previous backup recorded {prev.get('generation')}, bitmap is {name}", None
        if int(prev.get("size", -1)) != self.size:
            return f"disk resized from {prev.get('size')} to {self.size} bytes since the previous backup", None
        return None, name

    def _settle_leftover_bitmaps(self, bitmaps: dict[str, dict], prev_name: str | None) -> None:
        """Same rule as for running VMs (cleanup.settle_bitmaps): a newer generation than
        the previous backup's is an unfinished run's and is merged back; older ones and,
        without a previous backup, all pyvbak generations are dropped."""
        prev_gen = generation_of(prev_name) if prev_name in bitmaps else None
        for name in sorted(bitmaps, key=lambda n: generation_of(n) or 0):
            gen = generation_of(name)
            if gen is None or name == prev_name:
                continue
            prev_flags = bitmaps[prev_name].get("flags", []) if prev_gen is not None else []
            flags = bitmaps[name].get("flags", [])
            if prev_gen is not None and gen > prev_gen and ("in-use" in prev_flags or "in-use" in flags):
                # inconsistent (its writer crashed): never trusted, and qemu-img refuses to
                # merge it - the next backup scans the whole disk and replaces both
                self.cleaned_leftovers.append(f"dirty bitmap {name} of an unfinished backup (inconsistent, "
                                              f"or the previous one, {prev_name}, is)")
            elif prev_gen is not None and gen > prev_gen:
                self._bitmap_op("--merge", name, prev_name)
                if ("auto" not in prev_flags and (prev_name, name) in self._disabled_by_dead_runs
                        and "auto" in flags):
                    # that run disabled it as it made this one, which kept recording since
                    # (its journal says so; cleanup.settle_bitmaps): whole again with the merge
                    self._bitmap_op("--enable", prev_name)
                    bitmaps[prev_name]["flags"] = ["auto"]
                # else it was disabled before that run: it missed writes, and stays so
                self.cleaned_leftovers.append(f"dirty bitmap {name} of an unfinished backup merged back into {prev_name}")
            else:
                self.cleaned_leftovers.append(f"stale dirty bitmap {name} in {self.path}")
            self._bitmap_op("--remove", name)
            del bitmaps[name]

    def _bitmap_op(self, *ops: str) -> None:
        *flags, name = ops
        with interrupts.held():  # the image is written: never stopped halfway (see _run)
            _run(["qemu-img", "bitmap", *flags, "-f", "qcow2", str(self.qemu_path), name],
                 f"qemu-img bitmap {' '.join(flags)} {name} on {self.path}", writes=True)

    # -- teardown ----------------------------------------------------------------

    def _teardown(self, *, failed: bool, raise_errors: bool) -> list[str]:
        """Stop serving and settle the bitmaps; the journal goes last, and only once both
        are done (else the next run needs it: which bitmap this run disabled)."""
        errors: list[str] = []
        guard = self._guard
        try:
            with (guard.deferred() if guard else nullcontext()):
                server_left = not self._stop_server(errors)
                settled = True
                try:
                    if not failed and self._rotated:
                        if self._retire is not None:
                            self._bitmap_op("--remove", self._retire)
                    else:  # failed, or not rotated (then only an added gen-N+1 is undone)
                        if self._new is not None and self._old is not None and self._old_disabled:
                            self._bitmap_op("--merge", self._new, "--enable", self._old)
                        elif self._old is not None and self._old_disabled:
                            self._bitmap_op("--enable", self._old)
                        if self._new is not None:
                            self._bitmap_op("--remove", self._new)
                except SourceError as e:
                    errors.append(str(e))
                    settled = False
                if not server_left and settled:
                    # last: until now another pyvbak on this work dir sees a live run
                    remove_files((self.journal, naming.journal_temp(self.journal)), errors)
        finally:
            if guard:
                guard.__exit__(None, None, None)
            naming.end_run(self.run)
        if errors and raise_errors:
            raise SourceError("cleanup after the backup was incomplete: " + "; ".join(errors))
        return errors

    def _stop_server(self, errors: list[str]) -> bool:
        """Stop qemu-nbd and remove its socket and pid file; False if a file stayed."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            if proc.stderr:
                proc.stderr.close()
        return remove_files((self.socket_path, self.pid_file), errors)




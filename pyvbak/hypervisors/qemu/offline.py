"""A powered-off VM disk image (qcow2, vmdk, vhdx, vdi, raw, ...) served by ``qemu-nbd``.

The image is opened read-only (``qemu-nbd -r``) so pyvbak cannot change the guest's data;
``-t`` keeps the server up across the engine's several connections.  The format is taken
from ``qemu-img info`` (never guessed by qemu-nbd: probing a raw image is unsafe).

Change tracking for qcow2: persistent dirty bitmaps live inside the image.  Because the
VM is off, nothing writes between two ``qemu-img bitmap`` calls, so the rotation needs no
transaction: before serving, ``pyvbak-gen-<N+1>`` is added (enabled, empty: the VM will
fill it when it next runs) and ``pyvbak-gen-<N>`` disabled; the latter is exported with
``-B`` so its ``qemu:dirty-bitmap`` context lists what the VM wrote since the previous
backup.  On exit after ``commit()`` the old generation is removed; otherwise it is
re-enabled with the new one merged in and the new one removed.  Other formats (and qcow2
images pyvbak cannot write, e.g. read-only files) have no bitmaps: ``fallback_reason``
says so and the engine scans.
"""

from __future__ import annotations

from contextlib import nullcontext

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from pyvbak import interrupts
from pyvbak.errors import SourceError
from pyvbak.processes import die_with_parent, identity, spawn_record

from .session import ExportSession, backing_chain_changed, outside_data
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
    has recorded it (the session-14 signal audit: a bitmap it was disabling stayed
    disabled, its evidence gone with the journal)."""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, start_new_session=writes)
    except FileNotFoundError:
        raise SourceError(f"{args[0]} not found: install the Debian package 'qemu-utils'") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"{what} timed out after {timeout}s") from None
    if r.returncode != 0:
        raise SourceError(f"{what} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def image_info(path: Path, *, running_vm_hint: str | None = None, image_format: str | None = None) -> dict:
    """``qemu-img info`` of ``path``: the format QEMU finds, or checked as ``image_format``."""
    return image_chain(path, running_vm_hint=running_vm_hint, image_format=image_format)[0]


def image_chain(path: Path, *, running_vm_hint: str | None = None, image_format: str | None = None) -> list[dict]:
    """``qemu-img info --backing-chain`` of ``path``: the image first, then each backing
    file it reads through (one qemu-img run either way)."""
    if not path.exists():
        raise SourceError(f"disk image {path} does not exist")
    fmt_args = ["-f", image_format] if image_format else []
    try:
        out = _run(["qemu-img", "info", "--backing-chain", "--output=json", *fmt_args, str(path)],
                   f"qemu-img info {path}")
    except SourceError as e:
        if "lock" in str(e).lower():
            hint = running_vm_hint or ("back up a running VM through its QMP socket with a "
                                       "qemu:///PATH/TO/QMP.SOCK?node=NODE URI instead")
            raise SourceError(f"disk image {path} is in use (locked, probably by the running VM): {hint}") from None
        raise
    chain = json.loads(out)
    return chain if isinstance(chain, list) and chain else [chain]


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
        """``image_format``: read the image as this format (``backup --format``); None: as
        ``qemu-img info`` finds it."""
        self.path = Path(path).resolve()
        self.image_format = image_format
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

        self._proc: subprocess.Popen | None = None
        self._journal: dict = {}
        self._guard: TerminationGuard | None = None
        self._committed = False
        self._old: str | None = None
        self._old_disabled = False
        self._new: str | None = None
        self._disabled_by_dead_runs: set[tuple[str, str]] = set()
        self.backing_chain: list[dict] | None = []
        self._never_trusted: str | None = None

    def __enter__(self) -> "QemuOfflineImage":
        naming.begin_run(self.run)  # live for this process's other sessions until the teardown ends
        self._guard = TerminationGuard().__enter__()
        try:
            self._setup()
        except BaseException:
            self._teardown(failed=True, raise_errors=False)
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
        chain = image_chain(self.path, image_format=self.image_format)
        info = chain[0]
        self.backing_chain, self._never_trusted = outside_data(chain)
        self.format = info["format"]
        self.size = int(info["virtual-size"])
        bitmaps = {}
        if self.format == "qcow2":
            for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []) or []:
                bitmaps[b["name"]] = b
        prev_name = (self.previous_state or {}).get("bitmap")
        # generations only grow, also past the ones cleaned away now: a name is never reused
        max_gen = max([generation_of(b) or 0 for b in bitmaps], default=0)
        # Leftovers first, then the check (as for running VMs): a run killed after it
        # disabled the previous generation left that one whole, and it is merged back and
        # enabled again here - checked before, it looked disabled and forced a full scan.
        if self.format == "qcow2" and os.access(self.path, os.W_OK):
            self._settle_leftover_bitmaps(bitmaps, prev_name)
        self.fallback_reason, old = self._check_cbt(bitmaps)
        if self.verify_cbt and self.fallback_reason is None:
            self.fallback_reason = "verify-cbt requested: the whole disk is scanned and compared with the dirty bitmap"
        self._old = prev_name if prev_name in bitmaps else None

        generation = None
        if self.format == "qcow2" and os.access(self.path, os.W_OK):
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
                        self._old_disabled = True
            except SourceError as e:
                generation = None
                if self.fallback_reason is None:
                    self.fallback_reason = f"cannot rotate the dirty bitmap in {self.path}: {e}"
                old = None
        self.dirty_bitmap = old

        # --shared 2: the engine's connection, and one for the dirty bitmap's status alone
        args = ["qemu-nbd", "-t", "-r", "--shared=2", "-f", self.format, f"--socket={self.socket_path}",
                "-x", EXPORT_NAME, f"--pid-file={self.pid_file}"]
        if old is not None:
            args += ["-B", old]
        args.append(str(self.path))
        try:
            self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          preexec_fn=die_with_parent)
        except FileNotFoundError:
            raise SourceError("qemu-nbd not found: install the Debian package 'qemu-utils'") from None
        # which process the pid is, so that a later cleanup never signals another one
        self._write_journal(qemu_nbd=spawn_record(self._proc.pid))
        deadline = time.monotonic() + self.start_timeout
        while not (self.socket_path.exists() and self.pid_file.exists()):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace").strip()
                raise SourceError(f"qemu-nbd could not serve {self.path}: {err}")
            if time.monotonic() > deadline:
                raise SourceError(f"qemu-nbd did not start serving {self.path} within {self.start_timeout}s")
            time.sleep(0.01)
        self.nbd_uri = f"nbd+unix:///{EXPORT_NAME}?socket={self.socket_path}"
        self.change_tracking_state = {
            "kind": STATE_KIND, "bitmap": self._new, "generation": generation,
            "image": str(self.path), "format": self.format, "size": self.size,
            "backing_chain": self.backing_chain,
        }

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
            return "no dirty bitmap of an earlier backup of this disk (its first backup through QEMU)", None
        name = prev.get("bitmap")
        if prev.get("kind") not in (None, STATE_KIND) or not name:
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
            _run(["qemu-img", "bitmap", *flags, "-f", "qcow2", str(self.path), name],
                 f"qemu-img bitmap {' '.join(flags)} {name} on {self.path}", writes=True)

    # -- teardown ----------------------------------------------------------------

    def _teardown(self, *, failed: bool, raise_errors: bool) -> None:
        errors: list[str] = []
        guard = self._guard
        try:
            with (guard.deferred() if guard else nullcontext()):
                server_left = not self._stop_server(errors)
                try:
                    if not failed:
                        if self._old is not None:
                            self._bitmap_op("--remove", self._old)
                    else:
                        if self._new is not None and self._old is not None and self._old_disabled:
                            self._bitmap_op("--merge", self._new, "--enable", self._old)
                        elif self._old is not None and self._old_disabled:
                            self._bitmap_op("--enable", self._old)
                        if self._new is not None:
                            self._bitmap_op("--remove", self._new)
                except SourceError as e:
                    errors.append(str(e))
                if not server_left:
                    # last: until now another pyvbak on this work dir sees a live run
                    remove_files((self.journal, naming.journal_temp(self.journal)), errors)
        finally:
            if guard:
                guard.__exit__(None, None, None)
            naming.end_run(self.run)
        if errors and raise_errors:
            raise SourceError("cleanup after the backup was incomplete: " + "; ".join(errors))

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




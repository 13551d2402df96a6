"""Restore one snapshot to a file or block device, checking every block's digest.

A snapshot's index is complete, so nothing but its own index and the packs it names is
read.  Files are written to a recognisable temporary name beside the target
(``.NAME.pyvbak-restore-*``), made sparse (zero blocks stay holes), fsynced, then renamed
over the target: an existing file is replaced only by a complete, verified restore (its
mode, owner and extended attributes kept); without ``force`` a target that appeared while
the restore ran is never replaced (the commit is a hard link, not a rename).  A target
inside the repository is refused.  Block devices are written in place (opened O_EXCL and
flock'ed); zero runs are zeroed so the device ends up exactly equal to the snapshot.

Full blocks are written with O_DIRECT when the target allows it (see ``_Target``); the
partial last block, and everything when O_DIRECT is refused, through the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import secrets
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import interrupts
from ..errors import IntegrityError, Interrupted, OutOfSpace, PyvbakError, TargetExists, UsageError
from ..processes import scope_token, start_time, temp_writer_alive
from . import digest_sets
from . import format as fmt
from .pack_storage import misplaced_packs_problem, pack_storage_problem
from .reader import BlockSink, ScratchBuffers, group_members, read_blocks, sort_for_reading

TEMP_MARK = ".pyvbak-restore-"


class RestoreError(PyvbakError):
    """Writing the restore target failed (I/O error on the target)."""


ZERO_WRITE_BYTES = 4 * 1024 * 1024
#: a zero run of a block device is zeroed by the device (BLKZEROOUT) this much per call:
#: a signal is acted on between two (about a second where the kernel writes the zeros)
ZEROOUT_BYTES = 256 * 1024 * 1024
#: "0" forces page-cache writes (bench/restore_paths.py times both paths in one run);
#: anything else, or unset, uses O_DIRECT where the target supports it.
DIRECT_ENV = "PYVBAK_RESTORE_DIRECT"
#: largest O_DIRECT write (a run of consecutive blocks) and threads writing them; see _Target
DIRECT_WRITE_BYTES = 4 * 1024 * 1024
DIRECT_WRITERS = 2


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _Stage:
    """One worker thread's run of consecutive full blocks, not yet handed to a writer."""

    def __init__(self):
        self.buf: memoryview | None = None
        self.offset = 0
        self.fill = 0


class _Target:
    """Writes blocks to the restore target.

    Full blocks (``bs`` bytes at multiples of ``bs``: 64 KiB+, a power of two, so aligned
    for any device) go through a second descriptor opened with O_DIRECT.  Each worker
    thread copies its blocks into a page-aligned staging buffer and hands a run of
    consecutive blocks (blocks come in pack order, which for a full backup is disk order)
    of up to ``DIRECT_WRITE_BYTES`` to ``DIRECT_WRITERS`` writer threads, which write it
    with one pwrite; buffers are recycled through a small pool, so the memory is faulted
    in once.  Measured on this project's VMs (2 cores, ext4, 1 GiB from 2 threads):
    page-cache writes cost 0.5-3 s of system CPU per GiB (fresh page-cache pages are
    expensive), O_DIRECT 0.07 s with 1-4 MiB writes but 0.55 s (and 1.4 s wall) with
    64 KiB writes, hence the runs.  An O_DIRECT write blocks until the disk has the data
    (~0.45 s per GiB here): done by the workers themselves it left the cores idle (1.2 s
    of 1.7 s restore wall in pwrite), hence the writer threads.

    The partial last block goes through the buffered ``fd``.  When the target refuses
    O_DIRECT (EINVAL at open or at a write, e.g. some filesystems) everything goes through
    ``fd``: O_DIRECT is a speed-up, never a reason to fail.  ``fd`` is the descriptor that
    is fsynced (fsync covers the whole file).  ``flush()`` must run after the last block
    (it raises a writer's error); ``close()`` always, it waits for writes in flight.
    """

    def __init__(self, path: str, fd: int, bs: int, *, direct: bool, threads: int):
        self.fd = fd
        self.bs = bs
        self.dfd = -1
        self.local = threading.local()
        self.stages: list[_Stage] = []
        self.lock = threading.Lock()
        self.zeros = None
        self.zeroout = True  # until the device refuses BLKZEROOUT (write_zeros)
        self.sector: int | None = None  # the device's logical block size, asked once
        self.writers = None
        self.error: BaseException | None = None
        # runs handed to the writers and not yet done: waited for with a condition, not by
        # joining threads (an interrupted Thread.join() marks a thread that still runs as
        # stopped in CPython 3.11, and the next join returns at once)
        self.in_flight = 0
        self.idle = threading.Condition()
        self.closing = False  # close() before flush(): the runs still queued are not written
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                pass  # EINVAL: no O_DIRECT here; anything else: the buffered fd still works
        self.direct = self.dfd >= 0
        if self.direct:
            self.writers = ThreadPoolExecutor(max_workers=DIRECT_WRITERS, thread_name_prefix="pyvbak-restore-writer")
            self.free: queue.SimpleQueue = queue.SimpleQueue()
            # each worker fills one buffer while the others wait for or sit in a writer
            self.buffers_left = threads + DIRECT_WRITERS + 2
            self.run_bytes = max(bs, DIRECT_WRITE_BYTES)

    def _write_direct(self, buf: memoryview, offset: int) -> None:
        """Write the aligned ``buf`` at ``offset`` with O_DIRECT, or buffered if refused."""
        done = 0
        if self.direct:
            try:
                done = os.pwrite(self.dfd, buf, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False  # the fd stays open (a write may be in flight) until close()
        if done < len(buf):  # refused, or short (then the rest is no longer aligned)
            _pwrite_all(self.fd, buf[done:], offset + done)

    def _buffer(self) -> memoryview:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        with self.lock:
            new = self.buffers_left > 0
            self.buffers_left -= new
        if new:  # page-aligned
            return memoryview(mmap.mmap(-1, self.run_bytes))
        return self.free.get()  # all in flight: wait for a writer (back-pressure)

    def _stage(self) -> "_Stage":
        stage = getattr(self.local, "stage", None)
        if stage is None:
            stage = self.local.stage = _Stage()
            with self.lock:
                self.stages.append(stage)
        return stage

    def write_block(self, data, offsets) -> None:
        """Write one block's bytes at each of ``offsets`` (dedup: one block, many places)."""
        if self.error is not None:
            raise self.error
        n = len(data)
        if self.writers is not None and n == self.bs:
            stage = self._stage()
            for off in offsets:
                self._continue_run(stage, off, n)
                stage.buf[stage.fill : stage.fill + n] = data
                stage.fill += n
        else:
            for off in offsets:
                _pwrite_all(self.fd, data, off)

    def _continue_run(self, stage: "_Stage", off: int, n: int) -> None:
        """Make ``stage`` the run that goes on at disk offset ``off`` with ``n`` more bytes:
        a run that does not continue there, or has no room for them, goes to a writer; an
        empty stage gets a buffer and starts at ``off``."""
        if stage.fill and (off != stage.offset + stage.fill or stage.fill + n > len(stage.buf)):
            self._submit(stage)
        if not stage.fill:
            if stage.buf is None:
                stage.buf = self._buffer()
            stage.offset = off

    def reserve_run(self, first_offsets: np.ndarray, ulens: np.ndarray) -> tuple[memoryview, np.ndarray] | None:
        """Room in this thread's staging buffer for the leading records that continue one
        run of full blocks (record i goes to disk offset ``first_offsets[i]``): ``(buffer,
        offsets in it)`` for at least the first record, or None when it cannot be staged
        (not a full block, or no O_DIRECT).  Blocks are decoded straight into that room
        (no copy); the run is handed to a writer only by a later reserve or ``flush``, so
        after the caller has filled it."""
        bs = self.bs
        if self.writers is None or int(ulens[0]) != bs:
            return None
        if self.error is not None:
            raise self.error
        stage = self._stage()
        off0 = int(first_offsets[0])
        self._continue_run(stage, off0, bs)
        room = min(len(ulens), (len(stage.buf) - stage.fill) // bs)
        steps = np.arange(room, dtype=np.int64) * bs
        fits = (first_offsets[:room] == off0 + steps) & (ulens[:room] == bs)
        m = room if fits.all() else int(np.argmin(fits))  # fits[0] holds: m >= 1
        offsets = stage.fill + steps[:m]
        stage.fill += m * bs
        return stage.buf, offsets

    def _submit(self, stage: "_Stage") -> None:
        if stage.fill:
            buf, fill, offset = stage.buf, stage.fill, stage.offset
            stage.buf, stage.fill = None, 0
            with self.idle:
                self.in_flight += 1
            try:
                self.writers.submit(self._write_run, buf, fill, offset)
            except BaseException:
                self._run_done()
                raise

    def _run_done(self) -> None:
        with self.idle:
            self.in_flight -= 1
            self.idle.notify_all()

    def _write_run(self, buf: memoryview, fill: int, offset: int) -> None:
        try:
            if self.error is None and not self.closing:
                self._write_direct(buf[:fill], offset)
        except BaseException as exc:
            self.error = self.error or exc
        finally:
            self.free.put(buf)
            self._run_done()

    def _wait_for_writers(self) -> None:
        with self.idle:
            while self.in_flight > 0:
                self.idle.wait()

    def flush(self) -> None:
        """Write what the worker threads staged and wait for the writers; call when the
        workers are done.  Raises the first write error."""
        if self.writers is not None:
            for stage in self.stages:
                self._submit(stage)
            self._wait_for_writers()  # interrupted: close() waits again
            self.writers.shutdown(wait=True)  # idle threads: they exit at once
            self.writers = None
        if self.error is not None:
            raise self.error

    def write_zeros(self, start: int, end: int) -> None:
        """Zeros over [start, end) of a block device; ``start`` is a multiple of bs.

        The device zeroes the range itself when it can (``BLKZEROOUT``: a WRITE ZEROES
        command without unmap, or the kernel's own zero pages; a loop device zeroes its
        file's range with FALLOC_FL_ZERO_RANGE, which keeps it allocated), so no zeros
        cross from user space; where it refuses, they are written."""
        if self.zeroout:
            # whole logical blocks (a 4Kn device refuses 512-byte steps: then the whole
            # run was written from user space); a snapshot's size may end inside one
            if self.sector is None:  # once: a fragmented thin disk has 10^5-10^6 zero runs
                self.sector = _logical_block_size(self.fd)
            aligned_end = end - end % self.sector
            # in pieces: one ioctl is not interrupted by Ctrl-C or SIGTERM, and a device
            # without WRITE ZEROES has the kernel write the zeros (a TiB run: many minutes)
            while self.zeroout and start < aligned_end:
                n = min(ZEROOUT_BYTES, aligned_end - start)
                if _block_zeroout(self.fd, start, start + n):
                    start += n
                else:
                    self.zeroout = False
            if start >= end:
                return
        if self.direct:
            aligned_end = start + (end - start) // self.bs * self.bs
            if self.zeros is None:  # never written: anonymous memory reads as zeros
                self.zeros = memoryview(mmap.mmap(-1, ZERO_WRITE_BYTES))
            buf = self.zeros
            while start < aligned_end:
                n = min(len(buf), aligned_end - start)
                self._write_direct(buf[:n], start)
                start += n
        buf = memoryview(bytes(min(ZERO_WRITE_BYTES, end - start)))
        while start < end:
            n = min(len(buf), end - start)
            _pwrite_all(self.fd, buf[:n], start)
            start += n

    def close(self) -> None:
        """Wait for writes in flight (never close an fd under a writer), drop the rest.
        Interrupted meanwhile (a second Ctrl-C), it still waits, closes, then raises."""
        interrupted = None
        if self.writers is not None:
            self.closing = True
            self.writers.shutdown(wait=False)
            while True:
                try:
                    self._wait_for_writers()
                    break
                except BaseException as exc:
                    interrupted = interrupted or exc
            self.writers = None
        if self.dfd >= 0:
            dfd, self.dfd = self.dfd, -1  # released even when close fails: never closed twice
            os.close(dfd)
        if interrupted is not None:
            raise interrupted


def _locate(repo, snap, nonzero: np.ndarray, digests: np.ndarray):
    """(unique records to read, ``blocks``, ``bounds``, the digest index): the disk block
    indices of unique record u are ``blocks[bounds[u] : bounds[u + 1]]``.  Flat arrays: a
    Python list of one small array per unique block cost 3.2 s and ~700 MiB at 4 M blocks
    (a 256 GiB disk)."""
    uniq, inverse = digest_sets.unique_inverse(digests.view("S32"))
    index = repo.load_digest_index()
    pos = index.locate(uniq)
    if (pos < 0).any():
        missing = int((pos < 0).sum())
        # restore.sh counts the disk's blocks, repeats included: both numbers, so the two
        # agree (session 27's audit: 215 here, 220 there, for one repository)
        places = int(np.count_nonzero((pos < 0)[inverse]))
        also = f" (at {places} places on its disk)" if places != missing else ""
        raise IntegrityError(
            f"snapshot {snap.id} references {missing} distinct block(s){also} missing from {repo.location}: "
            "run 'pyvbak verify' to see which snapshots are affected"
        )
    recs = index.records_at(pos)
    flagged = repo.flagged_copies()
    if len(flagged):
        # a block stored again after verify flagged its copy: read the good copy first
        # (the flagged one would fail its check, then be read past with a warning)
        for i in np.flatnonzero(digest_sets.isin(digest_sets.copy_keys(recs), flagged)).tolist():
            alts = index.copies(bytes(recs["digest"][i]).ljust(32, b"\0"))
            unflagged = alts[~digest_sets.isin(digest_sets.copy_keys(alts), flagged)]
            if len(unflagged):
                recs[i] = unflagged[0]
    order, bounds = group_members(inverse.reshape(-1), len(uniq))
    return recs, nonzero[order], bounds, index


def _umask() -> int:
    """This process's umask, read without changing it (/proc; else the usual 0o022)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _take_over_file_attributes(fd: int, st, old_path: str | None = None) -> None:
    """The restored file gets the mode, owner and group of the file it replaces (``st``),
    or, for a new file, the mode any new file gets (0666 less the umask), as ``cp`` would
    do: a libvirt image restored by root over ``libvirt-qemu:kvm 0660`` became ``root
    0600`` and the VM could no longer open it.  The temp file is 0600 while it is written.
    Extended attributes of the replaced file (``old_path``) come along too, best effort:
    its SELinux label and POSIX ACLs decide whether the VM may open it."""
    if st is None:
        os.fchmod(fd, 0o666 & ~_umask())
        return
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except PermissionError:  # not root: the file stays the caller's, as a copy would
        pass
    os.fchmod(fd, stat.S_IMODE(st.st_mode))  # after chown, which may clear set-id bits
    if old_path is not None and hasattr(os, "listxattr"):
        try:
            names = os.listxattr(old_path)
        except OSError:
            names = []
        for name in names:
            try:
                os.setxattr(fd, name, os.getxattr(old_path, name))
            except OSError:  # a namespace this process may not set (trusted.*), or none here
                pass


def commit_restored(pending: list[tuple[str, str]], *, finish: bool = False, force: bool = True) -> None:
    """Rename restored temp files over their targets (``(temp, target)`` pairs, from
    ``restore_snapshot(..., replace=False)``), then make the renames durable.  ``finish``:
    the restore is then done - a signal from the renames on is only noted
    (pyvbak/interrupts.py), for a CLI command that ends with its output.  Without
    ``force`` no target is replaced: one that appeared while the restore ran (a VM
    manager, another restore) raises TargetExists, and none of ``pending`` is put in
    place (the temp files stay for ``discard_restored``)."""
    dirs = []
    # every rename or none: Ctrl-C or SIGTERM between two of them put some disks of a
    # group in place and discarded the others (a directory of two instants)
    with _signals_deferred():
        linked = set() if force else _link_new(pending)
        for temp, target in pending:
            if target in linked:
                os.unlink(temp)  # its data is the target now
            else:
                os.replace(temp, target)
            d = os.path.dirname(os.path.abspath(target))
            if d not in dirs:
                dirs.append(d)
        if finish:
            interrupts.begin_finishing()
    for d in dirs:
        # the new names durable too: after a power loss the restore is there (or the old
        # file is, never neither) once the command said it succeeded
        try:
            dfd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except PermissionError:
            # a directory this user may write but not read (a drop directory): no
            # descriptor to fsync it through, so every file system is synced instead
            os.sync()
            continue
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _link_new(pending: list[tuple[str, str]]) -> set[str]:
    """Each temp file hard-linked as its target, which must not exist (the check at the
    start is minutes old for a large disk): all of them or none (TargetExists).  Where
    the filesystem has no hard links, the target is checked and left for the rename (as
    restore.sh does).  The targets linked."""
    linked: list[str] = []
    try:
        for temp, target in pending:
            try:
                os.link(temp, target)
            except FileExistsError:
                raise _appeared(target) from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                    raise
                if os.path.lexists(target):
                    raise _appeared(target) from None
                continue
            linked.append(target)
    except BaseException:
        for target in linked:  # ours: the same inodes as the temp files, which stay
            try:
                os.unlink(target)
            except OSError:
                pass
        raise
    return set(linked)


def _appeared(target: str) -> TargetExists:
    return TargetExists(f"restore target {target} was created by something else while the restore ran: left "
                        f"alone; restore again with --force to replace it, or elsewhere")


class _signals_deferred:
    """SIGINT, SIGTERM and SIGHUP noted, not acted on, inside the block; the first one noted is
    handed to its previous handler at the end.  Only in the main thread (the only one
    Python signal handlers run in); elsewhere a no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self.previous, self.got = {}, []
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is not None:  # None: a handler Python cannot put back
                    self.previous[s] = signal.signal(s, lambda signum, frame: self.got.append(signum))
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.got:
            s = self.got[0]
            handler = self.previous[s]
            if callable(handler):
                handler(s, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), s)
        return False


def refuse_inside_repository(repo, output: str) -> None:
    """A restore target inside a local repository's directory (its config, a pack, or a
    new file among its objects) is refused: ``restore X REPO/config --force`` replaced the
    repository's id and hash key with a disk image and pyvbak could no longer open it."""
    root = getattr(repo.backend, "root", None)
    if not root:
        return
    try:
        root_id = (lambda st: (st.st_dev, st.st_ino))(os.stat(root))
    except OSError:
        return
    # by identity, not by path: a bind mount or a second mount of the same directory is
    # another string for it.  The target itself (a directory), then each existing ancestor.
    d = os.path.realpath(os.path.abspath(output))
    while True:
        try:
            st = os.stat(d)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == root_id:
            raise UsageError(f"restore target {output} is inside the repository {repo.location}: restore it elsewhere")
        parent = os.path.dirname(d)
        if parent == d:
            return
        d = parent


def discard_restored(pending: list[tuple[str, str]]) -> None:
    """Remove restored temp files that will not be committed."""
    for temp, _ in pending:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass


def restore_snapshot(repo, snap, output: str, *, force: bool = False, threads: int | None = None, progress=None,
                     replace: bool = True, finish_on_commit: bool = False, flag_bad_copies=False) -> dict:
    """Restore ``snap`` to ``output`` (a file or block device).  A file is written under a
    temp name and renamed over ``output`` when complete; with ``replace=False`` the
    complete, synced temp file is left for the caller (``report["pending"]``: ``(temp,
    output)``, for ``commit_restored`` or ``discard_restored``), so several disks can be
    put in place together.  ``flag_bad_copies``: the repository lock the caller holds (or
    True to vouch for one): copies found corrupt or missing are flagged in a ``lost/``
    marker, as a plain verify flags them (``report["flagged_copies"]``; _flag_failed_copies)."""
    # One worker per core: the backend prefetches the pack ranges ahead of them (packs are
    # written with O_DIRECT, so a restore reads them cold).  2 GiB bench image, 2 cores,
    # in-process: warm packs 2 threads 1.18 s, 3 threads 1.29 s, 4 threads 1.58 s;
    # dropped caches 2 threads 1.54-1.61 s, 4 threads 1.65-1.83 s (more threads only add
    # hand-offs once reads no longer block them).
    run = _RestoreRun(repo, snap, output, threads or (os.cpu_count() or 1))
    run.prepare(force)
    run.order_reads()
    run.create_target()
    # from the target's creation on, everything is inside the try: its clean-up removes it
    try:
        run.write_blocks(progress)
        run.reread_failed_blocks()
        run.settle_failures(flag_bad_copies)
        run.sync_and_commit(replace=replace, finish_on_commit=finish_on_commit, force=force)
    except BaseException as failure:
        run.abandon(failure)
    return run.report()


class _RestoreRun:
    """One restore of one snapshot, in the three phases of its report's ``phases``:

    ``prepare``: the snapshot's data blocks, the target checked (nothing is written to a
    target that cannot take the restore), each block located in the packs;
    ``data``: the reads ordered (``order_reads``), the target created (``create_target``),
    every block read, checked and written (``write_blocks``), the blocks whose copy failed
    read again or from another copy (``reread_failed_blocks``), then what the failures
    that remain mean (``settle_failures``);
    ``sync``: ``sync_and_commit`` - the file's attributes, fsync, the rename into place.
    Once the target exists, a failure goes through ``abandon``: the temp file removed, the
    failure said as the user is told it.

    The per-record arrays the phases share, in reading order: ``recs_sorted`` (the pack
    index records, ``ulen`` set from each block's place), ``starts`` / ``stops`` (the
    record's disk blocks are ``blocks[starts[k] : stops[k]]``), ``firsts`` (the disk
    offset of its first place) and ``copies`` (how many places it has).

    Every attribute is declared in ``__init__``, with the phase that sets it."""

    def __init__(self, repo, snap, output: str, threads: int):
        self.t0 = time.monotonic()  # when the restore began: its duration and phases count from here
        self.repo, self.snap, self.output, self.threads = repo, snap, output, threads
        self.bs, self.size = snap.meta["block_size"], snap.meta["size"]
        self.nblocks = -(-self.size // self.bs)
        # -- set by prepare
        self.data_idx: np.ndarray | None = None  # the snapshot's non-zero blocks (disk block indices)
        self.recs: np.ndarray | None = None  # the unique pack index records to read (_locate)
        self.blocks: np.ndarray | None = None  # the records' disk blocks, flat: record u's are blocks[bounds[u] : bounds[u + 1]]
        self.bounds: np.ndarray | None = None  # len(recs) + 1 offsets into blocks
        self.index = None  # the repository's digest index (the other copies of a failed block)
        self.t_data = 0.0  # when the data phase began (time.monotonic)
        # -- set by _check_target (``output`` too: a symbolic link is followed)
        self.st: os.stat_result | None = None  # the target's stat, None for a new file
        self.is_device = False  # the target is a block device (written in place)
        self.parent_dir: str | None = None  # the target's directory (a file's temp file goes there)
        # -- set by order_reads: the per-record arrays in reading order (see above)
        self.recs_sorted: np.ndarray | None = None
        self.starts: np.ndarray | None = None
        self.stops: np.ndarray | None = None
        self.firsts: np.ndarray | None = None
        self.copies: np.ndarray | None = None
        # -- set by create_target
        self.path: str | None = None  # what is written: the device, or the temp file beside the target
        self.fd = -1  # its descriptor (-1: none open)
        # -- set by write_blocks
        self.target: _Target | None = None  # the writer to ``fd`` (None: not created yet)
        self.written = 0  # bytes written (reread_failed_blocks adds its own)
        self.failed: list[tuple[int, str]] = []  # (record in reading order, why its copy is bad)
        # -- set by reread_failed_blocks
        self.from_copies: list[str] = []  # digests restored from another copy than the index's first
        self.errors: list[str] = []  # why, per block lost
        self.bad_copies: list = []  # the copies read back missing or not intact, twice (what a restore flags)
        self.unread_lost = 0  # lost blocks with a copy that could not be read (never flagged)
        # -- set by settle_failures
        self.flagged_copies = 0  # copies this restore flagged
        # -- set by sync_and_commit
        self.direct = False  # the writes bypassed the page cache (O_DIRECT)
        self.t_sync = 0.0  # when the sync phase began (time.monotonic)
        self.pending: tuple[str, str] | None = None  # (temp file, target) left for the caller to rename
        self.cleaned_leftovers: list[str] = []  # what this restore removed of killed restores (their temp files)
        self.t_end = 0.0  # when the restore ended (time.monotonic)

    # -- prepare ---------------------------------------------------------------------------

    def prepare(self, force: bool) -> None:
        """The snapshot's data blocks (its index checked against its metadata), the target
        (``_check_target``), then where each block is stored: all before anything is
        written."""
        repo, snap = self.repo, self.snap
        self.data_idx, data_digests = repo.data_blocks(snap)  # checked against the metadata too
        self._check_target(force)
        # before anything is written: a block device was zeroed where the snapshot has zero
        # blocks before the restore failed; two stats when the packs are there.  A
        # missing mark is no refusal while the snapshot's packs are all there: a restore checks
        # every block it reads, and reads what is there
        problem = pack_storage_problem(repo) if len(self.data_idx) else None
        not_restored = f"snapshot {snap.id} was not restored, and nothing was written or flagged"
        if problem and problem.kind in ("no packs", "foreign"):
            raise problem.error(not_restored)
        try:
            self.recs, self.blocks, self.bounds, self.index = _locate(repo, snap, self.data_idx, data_digests)
        except IntegrityError:
            if problem:  # (blocks missing from the index: index/ not mounted either)
                raise problem.error(not_restored) from None
            raise
        del data_digests
        if problem:  # the mark missing or damaged: are this snapshot's packs there?
            packs = digest_sets.unique(self.recs["pack"].view("S32"))
            if not all(repo.backend.exists(fmt.pack_name(bytes(p).ljust(32, b"\0").hex())) for p in packs):
                raise problem.error(not_restored)
        self.t_data = time.monotonic()

    def _check_target(self, force: bool) -> None:
        """The target is a new file in an existing directory, or an existing regular file
        or block device (with ``force``), not inside the repository; a symbolic link is
        followed."""
        output = self.output
        if not output:
            raise UsageError("restore target is empty: give the file or block device to restore to")
        self.st = st = _stat_target(output)
        self.is_device = is_device = st is not None and stat.S_ISBLK(st.st_mode)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UsageError(f"restore target {output} is a directory: give a file or block device path")
        if st is not None and not (is_device or stat.S_ISREG(st.st_mode)):
            # A file restore replaces its target by rename: over a character device, FIFO or
            # socket that would replace the device node itself (e.g. /dev/null).
            kind = ("character device" if stat.S_ISCHR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "socket" if stat.S_ISSOCK(st.st_mode) else "special file")
            raise UsageError(f"restore target {output} is a {kind}: give a regular file path or a block device")
        if not is_device and os.path.islink(output):
            # restore to the file the link names (as cp does), not over the link itself
            self.output = output = os.path.realpath(output)
        refuse_inside_repository(self.repo, output)
        if st is not None and not force:
            raise TargetExists(f"restore target {output} already exists: pass --force to overwrite it")
        self.parent_dir = parent_dir = os.path.dirname(os.path.abspath(output))
        try:
            os.stat(parent_dir)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:  # (os.path.isdir said "does not exist" for it)
                raise UsageError(f"the path of the restore target {output} is too long for this system "
                                 f"({len(os.fsencode(parent_dir))} bytes): restore to a shorter path") from None
        if not os.path.isdir(parent_dir):
            raise UsageError(f"directory {parent_dir} for the restore target does not exist: create it first, or choose "
                             f"another path")

    # -- data --------------------------------------------------------------------------------

    def order_reads(self) -> None:
        """The unique records in reading order (pack by pack), each with its length and
        its places on the disk."""
        recs, blocks, bounds, bs, size = self.recs, self.blocks, self.bounds, self.bs, self.size
        order = sort_for_reading(recs, disk_pos=blocks[bounds[:-1]])
        self.recs_sorted = recs_sorted = recs[order]
        self.starts, self.stops = starts, stops = bounds[order], bounds[order + 1]  # per record in reading order
        # A block's length is its place's - a full block, or the disk's partial tail - not what
        # its pack index record says: a record claiming a full block for the tail was staged as
        # one, and its failed room written past the snapshot's end (the SHA-256 proves the bytes).
        recs_sorted["ulen"] = np.minimum(bs, size - blocks[starts] * bs)
        self.firsts = blocks[starts] * bs  # per record in reading order: the disk offset of its first copy
        self.copies = stops - starts

    def create_target(self) -> None:
        """The block device opened (``_open_device``), or a new temp file beside the
        target created (``_create_temp_file``): ``path`` and ``fd``."""
        if self.is_device:
            self.path = self.output
            self.fd = self._open_device()
        else:
            self.path = os.path.join(self.parent_dir, temp_name(self.output))
            self.fd = self._create_temp_file()

    def _open_device(self) -> int:
        """The device opened for writing, exclusively and under its advisory lock, and at
        least the snapshot's size."""
        output, path, size = self.output, self.path, self.size
        try:
            # O_EXCL on a block device (Linux): fails with EBUSY while it is mounted or
            # held by another exclusive user (device mapper, RAID, a running restore)
            fd = os.open(path, os.O_WRONLY | os.O_EXCL)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise UsageError(f"block device {output} is in use (mounted, or held by device mapper, RAID or "
                                 "another restore): unmount or release it first") from None
            raise RestoreError(f"cannot open block device {output}: {exc.strerror}") from None
        # and its advisory lock, the convention of tools that write whole disks (udev,
        # systemd-repart): restore.sh takes it, and O_EXCL is only seen by O_EXCL openers
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UsageError(f"block device {output} is locked by another program (a restore.sh, or a tool "
                                 "partitioning it): wait for it to finish") from None
            raise RestoreError(f"cannot lock block device {output}: {exc.strerror}") from None
        dev_size = os.lseek(fd, 0, os.SEEK_END)
        if dev_size < size:
            os.close(fd)
            raise UsageError(f"block device {output} has {dev_size} bytes, the snapshot needs {size}: restore onto a "
                             f"device of at least {size} bytes, or to a file")
        return fd

    def _create_temp_file(self) -> int:
        """The temp file created (0600, empty), after the leftovers of killed restores in
        its directory are removed."""
        parent_dir, path = self.parent_dir, self.path
        try:
            self.cleaned_leftovers += [f"removed {os.path.join(parent_dir, name)}, the temp file of a restore that "
                                       f"was killed" for name in cleanup_restore_leftovers(parent_dir)]
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"no space left in {parent_dir} for the restore: free space there, or restore elsewhere") from None
            raise RestoreError(f"cannot create the restored file in {parent_dir}: {exc.strerror}; "
                               "restore into a directory you can write") from None
        except BaseException:
            # a stop request as the file was created: it may exist, empty (else "no partly
            # restored file was left behind" would be said beside one)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise

    def write_blocks(self, progress) -> None:
        """Every block read, checked against its digest and written to its places: a file
        sized first (blocks never written stay holes), a device's zero runs zeroed.  The
        records whose copy failed are left in ``failed`` for ``reread_failed_blocks``."""
        self.target = target = _Target(self.path, self.fd, self.bs, direct=os.environ.get(DIRECT_ENV, "1") != "0",
                                       threads=self.threads)
        if not self.is_device:
            os.ftruncate(self.fd, self.size)  # sparse: blocks never written stay holes
        else:
            _zero_device_runs(target, self.data_idx, self.nblocks, self.bs, self.size)
        sink = _RestoreSink(target, self.blocks, self.starts, self.stops, self.firsts, self.copies,
                            bs=self.bs, size=self.size, progress=progress)
        read_blocks(self.repo, self.recs_sorted, sink, threads=self.threads)
        target.flush()  # every staged run written: what follows overwrites them, never races them
        self.written, self.failed = sink.written, sink.failed

    def reread_failed_blocks(self) -> None:
        """Each block whose copy failed, read again from that copy (a passing failure),
        else from another copy, and written over its places.  What is left: ``errors``
        (why, per block lost), ``bad_copies`` (the copies read back missing or not intact,
        twice: what a restore flags) and ``unread_lost`` (lost blocks with a copy that
        could not be read: never flagged, a backup may reuse it)."""
        repo, index, recs_sorted, blocks, starts, stops, bs = (self.repo, self.index, self.recs_sorted, self.blocks,
                                                               self.starts, self.stops, self.bs)
        target, errors, bad_copies, from_copies = self.target, [], [], self.from_copies
        unread_lost = 0
        for k, reason in sorted(self.failed):
            ulen = int(recs_sorted[k]["ulen"])
            # the same copy once more first: a passing failure (a storage blip, a short read)
            # must neither fail the restore nor flag a good copy
            data, kind = repo.check_block_copy(recs_sorted[k], ulen)
            if kind == "bad":
                bad_copies.append(recs_sorted[k])
            unreadable = kind == "unreadable"
            if data is None:
                data, bad_others, unreadable_others = _other_copy(repo, index, recs_sorted[k], ulen)
                bad_copies.extend(bad_others)  # (every bad copy: one left unflagged was deduplicated against)
                unreadable = unreadable or unreadable_others
            if data is None:
                errors.append(reason)
                unread_lost += unreadable
                continue
            places = (blocks[starts[k] : stops[k]] * bs).tolist()
            target.write_block(data, places)
            self.written += len(data) * len(places)
            if kind != "ok":
                from_copies.append(bytes(recs_sorted[k]["digest"]).hex())
        self.errors, self.bad_copies, self.unread_lost = errors, bad_copies, unread_lost

    def settle_failures(self, flag_bad_copies) -> None:
        """The blocks still lost: storage not mounted is said as such (nothing flagged),
        else the bad copies are flagged (under the lock ``flag_bad_copies``) and a lost
        block fails the restore."""
        repo, snap, errors = self.repo, self.snap, self.errors
        all_flagged = False
        # every pack gone, or packs/ without its mark: storage not mounted far more often
        # than data lost - said so, and nothing flagged (flags let backups store every
        # block again, into an empty mount point a remount then hides)
        problem = (pack_storage_problem(repo) or misplaced_packs_problem(repo)) if errors else None
        if problem:
            raise problem.error(f"snapshot {snap.id} was not restored and nothing was flagged")
        if flag_bad_copies:
            self.flagged_copies, all_flagged = _flag_failed_copies(repo, self.bad_copies, flag_bad_copies)
        if errors:
            if all_flagged and not self.unread_lost:  # (else a backup may deduplicate against the unreadable copy)
                raise IntegrityError(f"restore of snapshot {snap.id} failed: {errors[0]} ({len(errors)} bad block(s)); "
                                     f"the bad copies are flagged, so the next backup of a disk that still holds "
                                     f"those blocks stores them again: run 'pyvbak verify' to see which snapshots they "
                                     f"affect")
            raise IntegrityError(f"restore of snapshot {snap.id} failed: {errors[0]} ({len(errors)} bad block(s)); run 'pyvbak verify': "
                                 f"it names the snapshots affected and flags the bad copies, so that the next backup of "
                                 f"a disk still holding those blocks stores them again")

    # -- sync --------------------------------------------------------------------------------

    def sync_and_commit(self, *, replace: bool, finish_on_commit: bool, force: bool) -> None:
        """The writes waited for, the file given the replaced one's attributes, fsynced and
        closed, then renamed over the target (``replace``; else left in ``pending`` for
        the caller).  ``finish_on_commit``: a signal from the commit on is only noted."""
        self.direct = self.target.direct
        self.target.close()
        self.t_sync = time.monotonic()
        if not self.is_device:
            _take_over_file_attributes(self.fd, self.st, self.output if self.st is not None else None)
        os.fsync(self.fd)
        # released even when close fails (EIO: a network file system's write-back): the
        # clean-up must not close the number again (another thread's file by then)
        closing, self.fd = self.fd, -1
        os.close(closing)
        self.pending = None
        if not self.is_device:
            if replace:
                commit_restored([(self.path, self.output)], finish=finish_on_commit, force=force)
            else:
                self.pending = (self.path, self.output)
        elif finish_on_commit:  # written in place, and synced: done
            interrupts.begin_finishing()
        self.t_end = time.monotonic()

    def abandon(self, failure: BaseException) -> None:
        """After ``failure`` (raised once the target existed): writes waited for, the temp
        file removed, then ``failure`` raised as the user is told it (for a device: that
        it was partly overwritten).  Called in the ``except`` that caught ``failure``."""
        output, is_device = self.output, self.is_device
        if self.target is not None:
            try:
                self.target.close()
            except BaseException:  # interrupted again while it waited for the writers (they are
                pass  # done now): finish the clean-up and report the first failure
        # The failure above is what is reported: a close or unlink failing now (EIO on a
        # network file system) must not replace it (a temp file left is recognisable by
        # its name, and the next restore to this directory removes it).
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
        if not is_device:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        # A file target is untouched (the temp file is gone); a device was written in place.
        note = f"; block device {output} was partly overwritten: restore it again before using it" if is_device else ""
        if isinstance(failure, OSError):
            if failure.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"no space left writing {output}: free space there, or restore elsewhere{note}") from None
            raise RestoreError(f"writing {output} failed: {failure.strerror or failure}{note}") from None
        if note and isinstance(failure, KeyboardInterrupt):
            raise Interrupted(f"restore interrupted (Ctrl-C){note}") from None
        if note and isinstance(failure, Interrupted):
            # not the CLI's "no partly restored file was left behind" (a file target's)
            raise Interrupted(f"restore {str(failure).split(':', 1)[0]}{note}") from None
        if note and isinstance(failure, PyvbakError):
            raise type(failure)(f"{failure}{note}") from None
        raise  # ``failure`` itself, as it was raised (the caller's except is handling it)

    def report(self) -> dict:
        """What ``restore_snapshot`` returns (the CLI prints it for ``--json``)."""
        return {
            "snapshot": self.snap.id,
            "output": self.output,
            "size": self.size,
            "bytes_written": self.written,
            "blocks": int(self.nblocks),
            "unique_blocks_read": int(len(self.recs)),
            "write_mode": "direct" if self.direct else "buffered",
            # blocks whose first copy was missing or damaged, restored from another copy
            # ('pyvbak verify --repair' drops the bad one from the index)
            "blocks_from_other_copies": len(self.from_copies),
            # copies found corrupt or missing that this restore flagged (flag_bad_copies)
            "flagged_copies": self.flagged_copies,
            # seconds per phase: index loading and block lookup; reading, checking and
            # writing the blocks; fsync and rename (where a slow restore's time went)
            "phases": {"prepare": self.t_data - self.t0, "data": self.t_sync - self.t_data, "sync": self.t_end - self.t_sync},
            "duration": self.t_end - self.t0,
            # temp files of killed restores removed from the target's directory (as a
            # backup reports what it cleaned up after a killed run)
            "cleaned_leftovers": list(self.cleaned_leftovers),
            **({"pending": self.pending} if self.pending is not None else {}),
        }


def _stat_target(output: str):
    """``os.stat`` of the restore target, None when it does not exist; a path that cannot
    name a file is a UsageError with advice."""
    try:
        return os.stat(output)
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # a path through a file (disk.img/out): say so, with advice
        raise UsageError(f"restore target {output}: a part of its path is a file, not a directory; "
                         f"give a path in an existing directory") from None
    except OSError as exc:
        # a symbolic link loop, a name over NAME_MAX, a directory this user may not search:
        # the path itself is what is wrong, not pyvbak (the catch-all said "unexpected")
        advice = {
            errno.ELOOP: "too many levels of symbolic links (a link loop?); give the path of the file itself",
            errno.ENAMETOOLONG: "too long for this system (a name over 255 bytes, or the whole path over "
                                "4096); give a shorter name",
            errno.EACCES: "permission denied on a directory of its path; restore elsewhere, or as a user "
                          "who may enter it",
        }.get(exc.errno, f"{exc.strerror or exc}; give another path")
        raise UsageError(f"restore target {output}: {advice}") from None


class _RestoreSink(BlockSink):
    """Full blocks are decoded straight into the O_DIRECT staging runs (``reserve_run``);
    the partial last block, and every block when writes are buffered, into a scratch
    buffer and written from there.  Counts the bytes written (``written``, for
    ``progress``) and keeps each record whose copy failed (``failed``: (record, why)).
    The per-record arrays are ``_RestoreRun``'s, in reading order."""

    def __init__(self, target: _Target, blocks, starts, stops, firsts, copies, *, bs: int, size: int, progress):
        self.target, self.blocks, self.starts, self.stops = target, blocks, starts, stops
        self.firsts, self.copies, self.bs, self.size, self.progress = firsts, copies, bs, size, progress
        self.scratch = ScratchBuffers(bs)
        self.local = threading.local()  # whether this thread's reservation is staged
        self.failed: list[tuple[int, str]] = []  # (record in reading order, why its copy is bad)
        self.written = 0
        self.count_lock = threading.Lock()

    def reserve(self, k, ulens):
        room = self.target.reserve_run(self.firsts[k : k + len(ulens)], ulens)
        self.local.staged = room is not None
        return room if room is not None else self.scratch.reserve(ulens)

    def filled(self, k, buffer, offsets, ulens, ok):
        n = len(offsets)
        staged = self.local.staged
        # locals: the loops below run per block
        target, blocks, starts, stops, bs, copies = self.target, self.blocks, self.starts, self.stops, self.bs, self.copies
        if staged:
            # Staged blocks are in place already.  Those with more places (dedup inside
            # the disk) are all copied out before the first write_block: it may submit
            # the staging buffer, and a writer then hands it on to be overwritten.
            more = np.flatnonzero(ok & (copies[k : k + n] > 1)).tolist()
            extra = [(bytes(buffer[offsets[i] : offsets[i] + ulens[i]]),
                      (blocks[starts[k + i] + 1 : stops[k + i]] * bs).tolist()) for i in more]
            for data, places in extra:
                target.write_block(data, places)
        else:  # the scratch buffer is this thread's alone: written from in place
            for i in np.flatnonzero(ok).tolist():
                target.write_block(buffer[offsets[i] : offsets[i] + ulens[i]],
                                   (blocks[starts[k + i] : stops[k + i]] * bs).tolist())
        done_bytes = int((ulens * copies[k : k + n])[ok].sum())
        with self.count_lock:
            self.written += done_bytes
            done = self.written
        if self.progress is not None:
            self.progress(done, max(1, self.size))

    def error(self, k, reason):
        self.failed.append((k, reason))


def _flag_failed_copies(repo, records: list, under) -> tuple[int, bool]:
    """Flag ``records`` (pack index records of copies read back missing or not intact,
    twice: never those a read error kept from being read) in a ``lost/`` marker, as a
    plain verify does (Repository.write_flag_marker): the next backup of each disk that
    still holds those blocks stores them again, with no verify run first (before, every
    backup went on deduplicating against the bad copy, and a nightly test-restore that
    found it changed nothing).  Copies flagged already are flagged again only while a
    verify runs, which may clear the earlier flag (it may have read the copy intact just
    before it went bad, as for verify).  ``under``: the lock the
    restore holds (True: the caller vouches for one) - a lock removed meanwhile
    ('unlock --all') flags nothing: a prune may have moved the blocks.  Best
    effort: the restore's own outcome stands whatever happens here.  (copies flagged now,
    whether every one of ``records`` is flagged after this)."""
    from ..backends import BackendError, ObjectExists
    from .locks import other_verifies

    if not records:
        return 0, False
    try:
        if hasattr(under, "check_held"):
            under.check_held()
    except PyvbakError:
        return 0, False
    copies = sorted({(bytes(r["digest"]).ljust(32, b"\0"), bytes(r["pack"]).ljust(32, b"\0"), int(r["offset"]))
                     for r in records})
    try:
        keys = np.array([digest_sets.copy_key(*c) for c in copies], "S72")
        flagged_before = digest_sets.isin(keys, repo.flagged_copies()).tolist()
        if not other_verifies(repo.backend, under):
            copies = [c for c, before in zip(copies, flagged_before) if not before]
        if not copies:
            return 0, True
        repo.write_flag_marker(copies)
    except (BackendError, ObjectExists, OutOfSpace, OSError):  # (read-only storage, a full disk)
        return 0, False
    return len(copies), True


def _other_copy(repo, index, record, ulen: int):
    """(the ``ulen``-byte block of ``record`` read and checked from another stored copy of
    it, or None when there is none that is intact; the other copies read back bad on the
    way; whether one could not be read).  A digest is stored more than once when backups wrote it at the same time: the
    second copy is what saves a restore from a damaged or lost pack (verify names the bad
    one; 'verify --repair' drops it).  ``ulen`` comes from the block's place on the disk,
    not from a pack index record (a wrong one may be why the first copy failed); the
    SHA-256 proves the bytes either way."""
    bad, unreadable = [], False
    for alt in index.copies(bytes(record["digest"])):
        if bytes(alt["pack"]) == bytes(record["pack"]) and int(alt["offset"]) == int(record["offset"]):
            continue
        data, kind = repo.check_block_copy(alt, ulen)  # (missing, unreadable, damaged: the next copy)
        if data is not None:
            return data, bad, unreadable
        if kind == "bad":
            bad.append(alt)
        unreadable = unreadable or kind == "unreadable"
    return None, bad, unreadable


#: ``_IO(0x12, 127)`` from <linux/fs.h>: zero a byte range of a block device
_BLKZEROOUT = 0x127F


#: ``_IO(0x12, 104)``: a block device's logical block size
_BLKSSZGET = 0x1268


def _logical_block_size(fd: int) -> int:
    """The device's logical block size (the unit BLKZEROOUT takes), else 512."""
    import fcntl
    import struct

    try:
        size = struct.unpack("=i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
    except OSError:
        return 512
    return size if size >= 512 and size & (size - 1) == 0 else 512


def _block_zeroout(fd: int, start: int, end: int) -> bool:
    """``BLKZEROOUT`` over [start, end) (512-byte aligned, as a device's sizes are); False
    when the device or kernel does not take it, or the range is not aligned."""
    if start % 512 or end % 512 or end <= start:
        return False
    import fcntl
    import struct

    try:
        fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("=QQ", start, end - start))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EACCES):
            return False
        raise
    return True


def _zero_device_runs(target: _Target, data_idx: np.ndarray, nblocks: int, bs: int, size: int) -> None:
    """Zeros over every run of blocks between the data blocks (``data_idx``, ascending)."""
    edges = np.concatenate(([-1], data_idx, [nblocks]))
    for g in np.flatnonzero(np.diff(edges) > 1).tolist():
        a, b = int(edges[g]) + 1, int(edges[g + 1])
        target.write_zeros(a * bs, min(b * bs, size))


#: a file name's limit on Linux filesystems, in bytes (NAME_MAX)
NAME_MAX_BYTES = 255


def temp_name(output: str) -> str:
    """``.NAME.pyvbak-restore-PID-RANDOM-START-SCOPE``: recognisable, unique, and saying
    which process owns it (START: the process's start time, so a later process that got
    the pid does not keep a killed restore's file alive; SCOPE: processes.scope_token, so
    a restore in another container or on another host sharing the directory is not taken
    for a dead one of ours).  NAME is cut to fit NAME_MAX: an output name of 216-255 bytes
    is valid, but its temp name was not ("File name too long")."""
    start = start_time(os.getpid()) or 0
    tail = f"{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}-{start}-{scope_token()}"
    name = os.path.basename(output).encode("utf-8", "surrogateescape")
    room = NAME_MAX_BYTES - 1 - len(tail.encode())
    return "." + name[:room].decode("utf-8", "ignore") + tail


def cleanup_restore_leftovers(directory: str) -> list[str]:
    """Remove temp files of restores killed with SIGKILL: recognised by their mark, and
    only when the process named in them no longer runs (a concurrent restore keeps its
    own; one of another scope is left alone for a day: processes.temp_writer_alive).
    Names without a start time or scope (older pyvbak) are judged by the pid alone."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed  # best effort: a drop directory (writable, not listable) still takes the restore
    for name in names:
        if not (name.startswith(".") and TEMP_MARK in name):
            continue
        parts = name.rsplit(TEMP_MARK, 1)[1].split("-")
        try:
            pid = int(parts[0])
            start = int(parts[2]) if len(parts) > 2 else None
        except ValueError:
            continue
        scope = parts[3] if len(parts) > 3 else None
        path = os.path.join(directory, name)
        try:
            if temp_writer_alive(pid, scope, os.lstat(path).st_mtime, start):
                continue  # its restore is still running
            os.unlink(path)
            removed.append(name)
        except OSError:
            pass
    return removed

"""Restore one snapshot to a file or block device, checking every block's digest.

A snapshot's index is complete, so nothing but its own index and the packs it names is
read.  Files are written to a recognisable temporary name beside the target
(``.NAME.pyvbak-restore-*``), made sparse (zero blocks stay holes), fsynced, then renamed
over the target: an existing file is replaced only by a complete, verified restore.
Block devices are written in place; zero runs are written as zeros so the device ends up
exactly equal to the snapshot.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time

import numpy as np

from ..errors import IntegrityError, OutOfSpace, PyvbakError, TargetExists, UsageError
from .reader import read_blocks, sort_for_reading

TEMP_MARK = ".pyvbak-restore-"


class RestoreError(PyvbakError):
    """Writing the restore target failed (I/O error on the target)."""
ZERO_WRITE_BYTES = 4 * 1024 * 1024


def _locate(repo, snap, records: np.ndarray):
    """(unique records to read, block indices per unique record)."""
    nonzero = np.flatnonzero(records["digest"].view("S32") != b"")
    digests = records["digest"][nonzero]
    uniq, inverse = np.unique(digests.view("S32"), return_inverse=True)
    index = repo.load_digest_index()
    pos = index.locate(uniq)
    if (pos < 0).any():
        missing = int((pos < 0).sum())
        raise IntegrityError(
            f"snapshot {snap.id} references {missing} block(s) missing from {repo.location}: "
            "run 'pyvbak verify' to see which snapshots are affected"
        )
    recs = index.records[pos]
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    targets = [nonzero[order[bounds[k] : bounds[k + 1]]] for k in range(len(uniq))]
    return recs, targets


def restore_snapshot(repo, snap, output: str, *, force: bool = False, threads: int | None = None, progress=None) -> dict:
    t0 = time.monotonic()
    threads = threads or os.cpu_count() or 1
    bs, size, records = repo.load_snapshot_index(snap)
    try:
        st = os.stat(output)
    except FileNotFoundError:
        st = None
    is_device = st is not None and stat.S_ISBLK(st.st_mode)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"restore target {output} is a directory: give a file or block device path")
    if st is not None and not force:
        raise TargetExists(f"restore target {output} already exists: pass --force to overwrite it")
    parent_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent_dir):
        raise UsageError(f"directory {parent_dir} for the restore target does not exist")

    recs, targets = _locate(repo, snap, records)
    order = sort_for_reading(recs)
    recs_sorted = recs[order]
    targets_sorted = [targets[k] for k in order]

    if is_device:
        path = output
        fd = os.open(path, os.O_WRONLY)
        dev_size = os.lseek(fd, 0, os.SEEK_END)
        if dev_size < size:
            os.close(fd)
            raise UsageError(f"block device {output} has {dev_size} bytes, the snapshot needs {size}")
    else:
        cleanup_restore_leftovers(parent_dir)
        path = os.path.join(parent_dir, f".{os.path.basename(output)}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    errors: list[str] = []
    written = [0]

    def on_block(k: int, data: bytes) -> None:
        for i in targets_sorted[k].tolist():
            os.pwrite(fd, data, i * bs)
        written[0] += len(data) * len(targets_sorted[k])
        if progress is not None:
            progress(written[0], max(1, size))

    def on_error(k: int, reason: str) -> None:
        errors.append(reason)

    try:
        if not is_device:
            os.ftruncate(fd, size)  # sparse: blocks never written stay holes
        else:
            _zero_device_runs(fd, records, bs, size)
        read_blocks(repo, recs_sorted, on_block, on_error, threads=threads)
        if errors:
            raise IntegrityError(f"restore of snapshot {snap.id} failed: {errors[0]} ({len(errors)} bad block(s)); run 'pyvbak verify'")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if not is_device:
            os.replace(path, output)
    except BaseException as exc:
        failure = exc
        if fd >= 0:
            os.close(fd)
        if not is_device:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if isinstance(failure, OSError):
            if failure.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"no space left writing {output}: free space there, or restore elsewhere") from None
            raise RestoreError(f"writing {output} failed: {failure.strerror or failure}") from None
        raise
    return {
        "snapshot": snap.id,
        "output": output,
        "size": size,
        "bytes_written": written[0],
        "blocks": int(len(records)),
        "unique_blocks_read": int(len(recs)),
        "duration": time.monotonic() - t0,
    }


def _zero_device_runs(fd: int, records: np.ndarray, bs: int, size: int) -> None:
    zero_idx = np.flatnonzero(records["digest"].view("S32") == b"")
    if not len(zero_idx):
        return
    buf = bytes(ZERO_WRITE_BYTES)
    breaks = np.flatnonzero(np.diff(zero_idx) != 1) + 1
    for run in np.split(zero_idx, breaks):
        start = int(run[0]) * bs
        end = min((int(run[-1]) + 1) * bs, size)
        while start < end:
            n = min(len(buf), end - start)
            os.pwrite(fd, memoryview(buf)[:n], start)
            start += n


def cleanup_restore_leftovers(directory: str) -> list[str]:
    """Remove temp files of restores killed with SIGKILL: recognised by their mark, and
    only when the pid in their name no longer runs (a concurrent restore keeps its own)."""
    removed = []
    for name in os.listdir(directory):
        if not (name.startswith(".") and TEMP_MARK in name):
            continue
        try:
            pid = int(name.split(TEMP_MARK, 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
            continue  # its restore is still running
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed

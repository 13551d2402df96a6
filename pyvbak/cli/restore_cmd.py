"""pyvbak restore SNAPSHOT OUTPUT|DIR/ [--repo REPO] [--force] [--no-lock] [--json] [--threads N]"""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import IntegrityError, PyvbakError
from .common import MAX_THREADS, JsonOption, NoLockOption, RepoOption, emit_json, human_bytes, info, maybe_lock, open_repository, progress_bar, say


def restore(
    snapshot: str = typer.Argument(..., metavar="SNAPSHOT", help="Snapshot id (or unique prefix), or VM@latest, or VM/DISK@latest; into a directory: its whole consistency group."),
    output: str = typer.Argument(..., metavar="OUTPUT", help="File or block device to restore to (or a file:/// URI of one); a directory (one that exists, or a path ending in /) restores every disk of the snapshot's consistency group (or VM@latest's newest) as DIR/DISK.img."),
    repo: Optional[str] = RepoOption,
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help=f"Worker threads (default: all cores; at most {MAX_THREADS}: memory grows with them)."),
    json_out: bool = JsonOption,
    no_lock: bool = NoLockOption,
) -> None:
    """Restore a snapshot byte-identical, checking every block's digest."""
    from ..backends import file_uri_path, is_file_uri
    from ..repo.restore import restore_snapshot

    if is_file_uri(output):  # as for --repo and SOURCE: the file: URI's path (it was ./file:/...)
        output = file_uri_path(output, "restore output")
    r = open_repository(repo)
    group = _vm_group(r, snapshot, output)
    if group is not None:
        _restore_group(r, group, output, force=force, threads=threads, json_out=json_out, no_lock=no_lock)
        return
    from ..errors import UsageError
    from ..repo.snapshots import SeveralDisks

    try:
        snap = r.resolve(snapshot)
    except SeveralDisks as exc:
        raise UsageError(f"{exc}, or restore every disk of its newest consistency group into a directory: "
                         f"pyvbak restore {exc.vm}@latest DIR/") from None
    if output.endswith("/"):  # a directory meant, for one disk: say so, not "Not a directory"
        raise UsageError(f"{output} names a directory, but {snapshot} is one disk: give the file or block "
                         f"device to restore it to (e.g. {output}{snap.disk}.img)")
    with maybe_lock(r, no_lock, f"restore of {snap.id}") as lock:
        with progress_bar(f"restore {snap.id}", not json_out) as update:
            try:
                report = restore_snapshot(r, snap, output, force=force, threads=threads, progress=update,
                                          finish_on_commit=True, flag_bad_copies=lock)
            except IntegrityError as exc:
                _blame_a_removed_lock(lock, exc)
                raise
    _warn_other_copies(report)
    for line in report.get("cleaned_leftovers", ()):
        info(f"cleanup: {line}")
    if json_out:
        emit_json(report)
    else:
        say(f"restored snapshot {snap.id} ({snap.vm}/{snap.disk}, {human_bytes(report['size'])}) to {output} in {report['duration']:.2f}s")


def _blame_a_removed_lock(lock, exc) -> None:
    """A restore whose blocks went missing while its lock was gone ('pyvbak unlock --all'
    and a prune meanwhile) reported a missing pack, as if the repository were damaged:
    say what happened instead (IntegrityError from the lock's LockedError message)."""
    if lock is None:
        return
    try:
        lock.check_held()
    except PyvbakError:
        raise IntegrityError(f"{exc} - and this restore's lock on the repository was removed while it ran "
                             f"('pyvbak unlock --all' or a prune elsewhere?): a prune may have moved the blocks "
                             f"it was reading; run the restore again") from exc


def _warn_other_copies(report: dict) -> None:
    n = report.get("blocks_from_other_copies", 0)
    if n:
        info(f"warning: {n} block(s) of snapshot {report['snapshot']} had a copy that did not read back intact "
             "(missing, damaged or unreadable) and were restored from another (the restore is complete and checked); "
             "run 'pyvbak verify': it tells which, and 'pyvbak verify --repair' drops the bad ones")


def _vm_group(r, spec: str, output: str):
    """The snapshots to restore into a directory: for ``VM@latest`` of a VM with several
    disks its newest complete consistency group (with one disk, that disk's newest
    snapshot), for a snapshot id the whole group that snapshot belongs to; None for a
    single restore (OUTPUT not a directory)."""
    import os

    from ..errors import SnapshotNotFound

    if not (os.path.isdir(output) or output.endswith("/")):
        return None
    if not spec.endswith("@latest"):
        from ..repo.snapshots import consistency_groups

        snap = r.resolve(spec)
        group = next((g for g in consistency_groups(r.snapshots(snap.vm)) if snap.id in {s.id for s in g.ordered()}), None)
        if group is None:
            # a snapshot of one disk (backed up alone): into DIR/DISK.img, as VM@latest
            # DIR/ does for a VM of one disk (it was refused as "a directory", even where
            # DIR did not exist yet)
            return [snap]
        missing = [d for d in group.disks if d not in group.snaps]
        if missing:
            raise SnapshotNotFound(f"consistency group {group.id} of {snap.id} lacks the snapshot(s) of "
                                   f"{', '.join(missing)} (a failed run, or forgotten): restore the disks one by one")
        return group.ordered()
    if "/" in spec[: -len("@latest")]:
        return None
    vm = spec[: -len("@latest")]
    if not vm:
        return None  # resolve() says what is wrong with it
    snaps = r.snapshots(vm)
    disks = {s.disk for s in snaps}
    if len(disks) <= 1:
        # One disk: VM@latest DIR/ means every disk of the VM into DIR, as for several
        # (scripts need not know how many a VM has): DIR/DISK.img.
        if snaps:
            r.check_no_damaged_after(snaps[-1], spec)
        return [snaps[-1]] if snaps else None  # none: resolve() says there is no such snapshot
    group = r.latest_group(vm)
    if group is None:
        raise SnapshotNotFound(f"VM {vm} has several disks ({', '.join(sorted(disks))}) but no backup that froze them "
                               f"together (qemu:///SOCK?node=A&node=B): restore each with {vm}/DISK@latest")
    r.check_no_damaged_after(max(group, key=lambda x: x.id), spec)
    return group


def _restore_group(r, group, outdir: str, *, force: bool, threads, json_out: bool, no_lock: bool) -> None:
    """Every disk of one consistency group to OUTDIR/DISK.img, in the group's order."""
    import os

    from ..errors import TargetExists, UsageError
    from ..repo.restore import commit_restored, discard_restored, refuse_inside_repository, restore_snapshot
    from .common import info

    for s in group:  # the metadata names the files: a name with a '/' would write outside DIR
        if not s.disk or "/" in s.disk or "\0" in s.disk or s.disk in (".", ".."):
            raise UsageError(f"snapshot {s.id} names its disk {s.disk!r}, which cannot name a file in {outdir} "
                             f"(an older pyvbak allowed '/' in disk names): restore it alone, to a file you name: "
                             f"pyvbak restore {s.id} FILE")
    refuse_inside_repository(r, outdir)
    # the directories this restore makes, deepest first: removed again if it fails
    made, d = [], os.path.abspath(outdir)
    while not os.path.lexists(d):
        made.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the restore directory {outdir}: {exc.strerror}") from None
    targets = [os.path.join(outdir, f"{s.disk}.img") for s in group]
    if not force:  # refuse before writing anything, not half-way through the VM
        existing = [t for t in targets if os.path.lexists(t)]
        if existing:
            raise TargetExists(f"restore target(s) {', '.join(existing)} already exist: pass --force to overwrite them")
    directories = [t for t in targets if os.path.isdir(t)]
    if directories:
        raise UsageError(f"restore target(s) {', '.join(directories)} are directories: remove them or restore elsewhere")
    reports, pending, done = [], [], []
    try:
        with maybe_lock(r, no_lock, f"restore of {group[0].vm} ({len(group)} disks)") as lock:
            # Every disk's index read (and checked against its metadata) before the first
            # disk is written, and every disk written to its temp file before any is put
            # in place: with --force, a group restore that failed at its second disk left
            # a directory of disks from two different instants.
            for snap in group:
                r.load_snapshot_index(snap)
            for snap, target in zip(group, targets):
                with progress_bar(f"restore {snap.vm}/{snap.disk}", not json_out) as update:
                    report = restore_snapshot(r, snap, target, force=force, threads=threads, progress=update,
                                              replace=False, flag_bad_copies=lock)
                if "pending" in report:
                    pending.append(report.pop("pending"))
                else:  # a block device behind DIR/DISK.img: written in place
                    done.append(f"{snap.disk} to {target}")
                reports.append(report)
                _warn_other_copies(report)
                for line in report.get("cleaned_leftovers", ()):
                    info(f"cleanup: {line}")
            commit_restored(pending, finish=True, force=force)
            pending = []
    except BaseException:
        discard_restored(pending)
        if done:
            info("written in place before the failure (block devices): " + ", ".join(done))
        for d in made:  # nothing is left behind: the directories it made either
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    group_meta = group[0].meta.get("consistency_group") or {}  # none: a VM's one disk
    group_id = group_meta.get("id")
    if json_out:
        emit_json([{**rep, "consistency_group": group_id} for rep in reports])
        return
    for snap, target, report in zip(group, targets, reports):
        say(f"restored snapshot {snap.id} ({snap.vm}/{snap.disk}, {human_bytes(report['size'])}) to {target} "
              f"in {report['duration']:.2f}s")
    if group_id:
        say(f"consistency group {group_id}: {len(group)} disks of {group[0].vm} as they were at one instant "
              f"({group_meta.get('time', '?')})")

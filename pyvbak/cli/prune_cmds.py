"""Maintenance commands: forget (delete snapshots) and prune (free what nothing uses)."""

from __future__ import annotations

from typing import List, Optional

import typer

from .. import interrupts
from .common import JsonOption, RepoOption, emit_json, human_bytes, info, open_repository, say

DryRunNoLockOption = typer.Option(
    False, "--no-lock",
    help="With --dry-run: take no lock, for a repository on read-only storage (the preview may be "
    "out of date if a backup or prune runs meanwhile).",
)


def _lock(r, *, dry_run: bool, no_lock: bool, **kw):
    """The lock forget or prune takes; a dry run may take none (--no-lock), and one that
    cannot write its lock says --no-lock would do."""
    from contextlib import nullcontext

    from ..errors import UsageError

    if no_lock and not dry_run:
        raise UsageError("--no-lock only goes with --dry-run: forget and prune change the repository and need its lock")
    return nullcontext() if no_lock else r.lock(reader=dry_run, **kw)


def forget(
    snapshots: Optional[List[str]] = typer.Argument(None, metavar="[SNAPSHOT]...", help="Snapshot ids (or unique prefixes), VM@latest or VM/DISK@latest."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", min=1, help="Forget all but the N newest snapshots of each VM disk (and of each VM's N newest complete consistency groups)."),
    vm: Optional[str] = typer.Option(None, "--vm", help="With --keep-last: only this VM's disks."),
    prune_after: bool = typer.Option(False, "--prune", help="Prune right after (needs the repository to itself)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be forgotten (and pruned); change nothing."),
    repo: Optional[str] = RepoOption,
    json_out: bool = JsonOption,
    no_lock: bool = DryRunNoLockOption,
) -> None:
    """Delete snapshots.  Their blocks stay until 'pyvbak prune' (or --prune)."""
    from ..errors import UsageError
    from ..repo.pack_storage import misplaced_packs_problem, pack_storage_problem
    from ..repo.prune import forget_snapshots, keep_last_selection
    from ..repo.snapshots import SnapshotInfo

    if not snapshots and keep_last is None:
        raise UsageError("forget needs snapshot ids, VM[/DISK]@latest or --keep-last N: list snapshots with 'pyvbak snapshots'")
    if vm is not None and keep_last is None:
        raise UsageError("--vm only goes with --keep-last; name snapshots by id or VM[/DISK]@latest instead")
    if snapshots and keep_last is not None:
        # both forgot the union: a snapshot named "to be sure" beside --keep-last 1 was
        # forgotten although --keep-last kept it (session 27's docs audit)
        raise UsageError(f"give snapshots to forget or --keep-last N, not both ({snapshots[0]} and --keep-last "
                         f"{keep_last}): run 'pyvbak forget' once for each")
    r = open_repository(repo)
    # With --prune the exclusive lock comes first: forgetting under a shared lock and then
    # failing to get the exclusive one (a backup running) forgot snapshots while saying
    # only that the repository was locked, and a retry forgot the next ones.
    # clean_stale=False otherwise: a stale lock is the evidence the next backup adopts a
    # killed backup's unindexed packs by; forget deletes no data and must not erase it.
    if dry_run:  # (else a stop says "some of the snapshots may be forgotten already")
        from .main import set_after_interrupt

        set_after_interrupt("a dry run changes nothing: nothing was forgotten or pruned")
    if prune_after:  # (stale locks go after the pack-storage check, as in _prune)
        lock = _lock(r, dry_run=dry_run, no_lock=no_lock, exclusive=True, purpose="forget and prune",
                     clean_stale=False)
    else:
        lock = _lock(r, dry_run=dry_run, no_lock=no_lock, purpose="forget", clean_stale=False)
    with lock as held:
        if prune_after:
            problem = pack_storage_problem(r) or misplaced_packs_problem(r)  # (see _prune)
            if problem:
                raise problem.error("nothing was forgotten or pruned")
            if held is not None and not dry_run:
                held.remove_stale()
        # A snapshot whose metadata is damaged can be named by its exact id only (nothing
        # else of it is readable); forgetting it is how a prune becomes possible again.
        r.snapshots()
        damaged = {n[len("snapshots/") : -len(".json")] for n in r.damaged_snapshots}
        chosen = {spec: SnapshotInfo(spec, {"time": ""}) for spec in snapshots or [] if spec in damaged}
        chosen.update({s.id: s for s in (r.resolve(spec) for spec in snapshots or [] if spec not in damaged)})
        if keep_last is not None:
            if vm is not None and not r.snapshots(vm):  # a typo kept everything, silently
                info(f"warning: no snapshot of VM {vm} in {r.location}: nothing to keep or forget "
                     "(list them with 'pyvbak snapshots')")
            for s in keep_last_selection(r.snapshots(vm), keep_last):
                chosen.setdefault(s.id, s)
        targets = sorted(chosen.values(), key=lambda s: (s.time, s.id))
        broken = _groups_left_incomplete(r, targets)
        forgotten = [s.id for s in targets] if dry_run else forget_snapshots(r, targets)
        result = {"forgotten": forgotten, "dry_run": dry_run}
        if prune_after:
            from ..repo.prune import prune_repository
            from .main import set_after_interrupt

            if not dry_run:  # (it said "some of the snapshots may be forgotten already")
                set_after_interrupt(f"the {len(forgotten)} snapshot(s) are forgotten and the prune stopped before "
                                    f"it finished, leaving the repository consistent: run 'pyvbak prune' to finish it")
            # a dry run forgot nothing: its prune preview leaves the chosen snapshots out itself
            try:
                result["prune"] = prune_repository(r, dry_run=dry_run,
                                                   without=frozenset(forgotten) if dry_run else frozenset())
            finally:
                if not dry_run:
                    _remember_pack_indexes(r)
        # done: a stop request from here on is noted (it said "run the command again", which
        # then found the snapshots gone, exit 5)
        interrupts.begin_finishing()
    for line in broken:
        info(f"warning: {line}")
    if json_out:
        emit_json(result)
        return
    verb = "would forget" if dry_run else "forgot"
    say(f"{verb} {len(forgotten)} snapshot(s)" + (": " + ", ".join(forgotten) if forgotten else ""))
    if prune_after:
        _print_prune(result["prune"])


def prune(
    repo: Optional[str] = RepoOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted; change nothing."),
    json_out: bool = JsonOption,
    no_lock: bool = DryRunNoLockOption,
) -> None:
    """Delete blocks no snapshot references; repack mostly-unused packs (exclusive lock)."""
    r = open_repository(repo)
    report = _prune(r, dry_run, no_lock=no_lock)
    if json_out:
        emit_json(report)
    else:
        _print_prune(report)


def _prune(r, dry_run: bool, without: frozenset[str] = frozenset(), *, no_lock: bool = False) -> dict:
    from ..repo.pack_storage import misplaced_packs_problem, pack_storage_problem
    from ..repo.prune import prune_repository

    # A dry run changes nothing, stale locks included (they are what the next backup
    # adopts a killed backup's packs by).
    with _lock(r, dry_run=dry_run, no_lock=no_lock, exclusive=True, purpose="prune", clean_stale=False) as lock:
        # Packs all gone is storage not mounted far more often than data lost: a prune
        # then dropped every record from the index, and the backups after it stored every
        # block again into the empty mount point, hidden once the storage is mounted back
        # (a nightly 'backup; prune' job did that on the first night it was unmounted).
        # Checked before stale locks go: the exclusive lock's clean-up after them would
        # take a damaged pack index whose packs it cannot see for garbage.
        # (a pack under another packs/HH/ reads as missing: prune dropped its records as
        # lost, with a marker, and its snapshots no longer restored)
        problem = pack_storage_problem(r) or misplaced_packs_problem(r)
        if problem:
            raise problem.error("nothing was pruned")
        if lock is not None and not dry_run:
            lock.remove_stale()
        try:
            report = prune_repository(r, dry_run=dry_run, without=without)
        finally:
            if not dry_run:
                _remember_pack_indexes(r)
        interrupts.begin_finishing()  # done: a stop request from here on is noted
        return report


def _print_prune(rep: dict) -> None:
    verb = "would free" if rep["dry_run"] else "freed"
    say(
        f"{verb} {human_bytes(rep['bytes_freed'])}: {rep['packs_deleted']} pack(s) deleted, "
        f"{rep['packs_repacked']} repacked into {rep['packs_written']}, {rep['blocks_removed']} unused block(s) removed; "
        f"{rep['snapshots']} snapshot(s) keep {rep['referenced_blocks']} block(s)"
    )
    done = "would remove" if rep["dry_run"] else "removed"
    for what in ("orphan_snapshot_indexes", "temp_objects_removed"):
        for name in rep[what]:
            info(f"cleanup: {done} {name} ({what.replace('_', ' ').replace(' removed', '')})")
    for line in rep["adopted"]:  # packs no index named: indexed first, then judged like the rest
        info(f"cleanup: {line}" if not rep["dry_run"] else f"cleanup: would have {line}")
    for line in rep.get("moves_finished", ()):
        info(f"cleanup: {line}")
    for p in rep["problems"]:
        info(f"warning: {p}")
    if rep["missing_blocks"]:
        info(f"warning: {rep['missing_blocks']} referenced block(s) are in no pack: run 'pyvbak verify'")


def _groups_left_incomplete(r, targets) -> list[str]:
    """Consistency groups (disks frozen at one instant) that forgetting ``targets`` leaves
    with some disks but not all: their snapshots still restore one by one, but no longer
    as the VM's consistent set."""
    from ..repo.snapshots import consistency_groups

    going = {s.id for s in targets}
    out = []
    for g in consistency_groups(r.snapshots()):
        staying = [s for s in g.ordered() if s.id not in going]
        if staying and len(staying) < len(g.snaps):
            out.append(f"consistency group {g.id} keeps {', '.join(f'{s.vm}/{s.disk}' for s in staying)} without "
                       f"the other disks frozen with them: 'restore {g.vm}@latest DIR/' will use an "
                       "older complete group")
    return out


def _remember_pack_indexes(r) -> None:
    """After a prune, finished or stopped: the pack indexes it removed are no loss for the
    next backup here to look into (a stopped prune's made it warn of a pack index "lost
    from storage").  Best effort: never the prune's outcome."""
    try:
        r.remember_pack_indexes()
    except Exception:  # noqa: BLE001 - a cache that cannot be written is only slower
        pass

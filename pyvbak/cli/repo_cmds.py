"""Repository commands: init, snapshots, verify."""

from __future__ import annotations

import os
import secrets
from typing import List, Optional

import typer

from .. import interrupts
from ..repo.repository import DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION
from .common import (JsonOption, NoLockOption, RepoOption, checked_default_repository_path, emit_json, human_bytes, info,
                     maybe_lock, open_repository, refuse_memory, say)


def init(
    repo_arg: Optional[str] = typer.Argument(None, metavar="[REPO]", help="Directory for the new repository (must be empty or absent); else --repo, PYVBAK_REPO, or the default repository in your data directory."),
    repo_opt: Optional[str] = RepoOption,
    block_size: str = typer.Option(f"{DEFAULT_BLOCK_SIZE // 1024}K", "--block-size", help="Block size, a power of two from 64K to 16M."),
    compression: str = typer.Option(DEFAULT_COMPRESSION, "--compression", help="zstd:LEVEL, LEVEL -7..22 (a bare 'zstd', like zstd:0, is zstd's own default, level 3)."),
    json_out: bool = JsonOption,
) -> None:
    """Create a repository."""
    from ..repo.repository import Repository, parse_size

    # REPO as every other command takes it too (--repo, PYVBAK_REPO), and like them the
    # default repository without either: an operator who exported PYVBAK_REPO as the
    # README says got "Missing argument 'REPO'" from the very first command.  The one
    # named on the command line comes first.
    if repo_arg == "" or (repo_arg is None and repo_opt == ""):
        from ..errors import UsageError

        raise UsageError("the repository path is empty: give REPO (or --repo REPO)")
    if (repo_arg and repo_opt and os.path.abspath(repo_arg) != os.path.abspath(repo_opt)
            and os.environ.get("PYVBAK_REPO") != repo_opt):
        # (an explicit --repo beside REPO was ignored without a word; PYVBAK_REPO from a
        # profile gives way to REPO, as documented)
        from ..errors import UsageError

        raise UsageError(f"init was given two repositories, {repo_arg} and --repo {repo_opt}: give one")
    repo = repo_arg or repo_opt or checked_default_repository_path()
    refuse_memory(repo)
    r = Repository.init(repo, block_size=parse_size(block_size), compression=compression)
    interrupts.begin_finishing()  # made: a stop request from here on is noted
    if json_out:
        emit_json({"repository": repo, "id": r.config.repo_id, "block_size": r.config.block_size})
    else:
        say(f"created pyvbak repository {r.config.repo_id[:12]} at {repo} (block size {human_bytes(r.config.block_size)})")


def snapshots(
    repo: Optional[str] = RepoOption,
    vm: Optional[str] = typer.Option(None, "--vm", help="Only snapshots of this VM."),
    disk: Optional[str] = typer.Option(None, "--disk", help="Only snapshots of this disk."),
    json_out: bool = JsonOption,
) -> None:
    """List snapshots, oldest first."""
    r = open_repository(repo)
    snaps = r.snapshots(vm, disk)
    for name in r.damaged_snapshots:
        info(f"warning: snapshot metadata {name} is corrupt and was left out: run 'pyvbak verify'")
    if json_out:
        emit_json([s.summary() for s in snaps])
        return
    if not snaps:
        info("no snapshots")
        return
    rows = [s.summary() for s in snaps]
    for m in rows:  # names from the repository's metadata: no terminal control sequences from them
        m["vm"], m["disk"] = _printable(m["vm"]), _printable(m["disk"])
        m["time"] = _printable(str(m.get("time", "")))
    wv = max([16] + [len(m["vm"]) for m in rows])  # columns as wide as the longest name
    wd = max([12] + [len(m["disk"]) for m in rows])
    # disks frozen together by one run share a group: its id's random part names it here
    grouped = any(m.get("consistency_group") for m in rows)
    print(f"{'ID':<26} {'VM':<{wv}} {'DISK':<{wd}} {'TIME':<20} {'SIZE':>10}  CBT" + ("  GROUP" if grouped else ""))
    for m in rows:
        group = (m.get("consistency_group") or {}).get("id", "")
        cbt = "yes" if m["cbt"] else "no"
        if grouped:
            cbt = f"{cbt:<3}  {group.rsplit('-', 1)[-1] if group else '-'}"
        say(f"{m['id']:<26} {m['vm']:<{wv}} {m['disk']:<{wd}} {_utc(m['time']):<20} {human_bytes(m['size']):>10}  {cbt}")


def verify(
    snapshots: Optional[List[str]] = typer.Argument(None, metavar="[SNAPSHOT]...", help="Only the blocks of these snapshots (ids, VM/DISK@latest); default: every snapshot."),
    repo: Optional[str] = RepoOption,
    sample_arg: Optional[str] = typer.Option(None, "--sample", metavar="PERCENT", help="Check only this PERCENT of blocks (10 or 10%), chosen at random."),
    json_out: bool = JsonOption,
    no_lock: bool = NoLockOption,
    repair: bool = typer.Option(False, "--repair", help="Repair what verify found (exclusive lock): drop bad copies from the index (the next backups store those blocks again), re-index packs from their tables of contents, rebuild damaged tables of contents; exit 0 when nothing found is left."),
    drop_unreadable: bool = typer.Option(False, "--drop-unreadable", help="With --repair: also remove copies that could not be read at all (I/O errors, twice), which --repair keeps: a read error may pass."),
) -> None:
    """Re-read stored blocks, check their digests and their packs' tables of contents, name the snapshots any bad block affects."""
    from contextlib import nullcontext

    from ..errors import UsageError
    from ..repo.locks import other_verifies
    from ..repo.pack_storage import misplaced_packs_problem, pack_storage_problem
    from ..repo.repair import RepairOptions, repair_repository, start_repair
    from ..repo.verify import flag_bad_copies, lost_blocks_not_on_disks, verify_repository

    sample = _percent(sample_arg)
    if repair and no_lock:
        raise UsageError("--repair changes the index and needs the repository lock: drop --no-lock")
    if drop_unreadable and not repair:
        raise UsageError("--drop-unreadable is a choice of --repair: add --repair")
    r = open_repository(repo)
    # --repair holds the exclusive lock from the start: taken only after a long verify, it
    # failed ("locked by backup") whenever a backup had started meanwhile, the work lost
    recheck_report = None  # the check after a repair that adopted packs
    with (r.lock(exclusive=True, purpose="verify --repair", clean_stale=False) if repair else nullcontext()) as lock:
        if repair:
            for line in r.settle_config_copy():  # (config put back from its copy, or the copy written)
                info(f"repair: {line}")
            repair_problem = start_repair(r, lock, partial=bool(snapshots) or sample is not None, say=info)
        with (nullcontext() if repair else maybe_lock(r, no_lock, "verify")) as verify_lock:
            chosen = None
            if snapshots:
                chosen = {s.id: s for s in (r.resolve(spec) for spec in snapshots)}.values()
            # Packs all gone is storage not mounted far more often than data lost: a plain
            # verify says so and flags nothing (its flags let the next backups store every
            # block again, into the empty mount point, where a remount hides them).
            # --repair is the user's word that they are lost (the way on
            # PackStorageProblem.error gives): it checked above, before any clean-up.
            read_problem = None if repair else pack_storage_problem(r)
            if read_problem and read_problem.kind in ("no packs", "foreign"):
                raise read_problem.error("nothing was checked or flagged")
            if read_problem:  # (the mark: verify checks every block it reads, and reads what is there)
                way = (" (or 'pyvbak verify --repair' marks it, if it is the storage)"
                       if read_problem.kind in ("missing", "damaged") else "")
                info(f"warning: {read_problem.summary()}: verify reads the packs there, but flags nothing, and "
                     f"backups and prune refuse this repository until the storage is mounted{way}")
            # one sample for the check and the re-check after a repair (a new draw could
            # miss the blocks the first found lost, and say "repair: complete")
            seed = secrets.randbits(64) if sample is not None else None
            verified = verify_repository(r, sample_percent=sample, snapshots=chosen, seed=seed)
            report, findings = verified.report, verified.findings
            problem = (pack_storage_problem(r) or misplaced_packs_problem(r)
                       if not repair and findings.bad_copies else None)
            if problem:  # (the mark, the packs gone while it ran, or some only misplaced)
                raise problem.error("nothing was flagged")
            # (--repair drops the bad copies' records instead of flagging them)
            report["flagged"] = flag_bad_copies(r, findings, flag_bad=not repair, no_lock=no_lock,
                                                beside=other_verifies(r.backend, verify_lock))
        # (only a verify of every block of every snapshot knows what the newest ones use)
        report["lost_blocks_not_on_disks"] = chosen is None and sample is None and lost_blocks_not_on_disks(r, report)
        if repair:
            repaired = repair_repository(r, lock, repair_problem, verified,
                                         RepairOptions(snapshots=chosen, sample_percent=sample, seed=seed,
                                                       drop_unreadable=drop_unreadable))
            report["repair"], recheck_report = repaired.report, repaired.recheck_report
            if report["repair"]["complete"]:
                # repaired, a success: a stop request from here on is noted (one that leaves
                # damage is a failure, exit 6, whatever comes while it is said)
                interrupts.begin_finishing()
    bad_packs = findings.bad_packs()  # (packs of which a copy read back bad)
    failure = _verify_failure(r, report, recheck_report, read_problem, repair=repair, drop_unreadable=drop_unreadable,
                              bad_packs=bad_packs)
    if json_out:
        # (a pack storage problem fails the command, exit 6, whatever the blocks: the report
        # says so too, for a script that reads "ok"; "error": the line verify ends with, what
        # it found and the next step, or null)
        doc = report if read_problem is None else {**report, "ok": False, "pack_storage_problem": read_problem.summary()}
        emit_json({**doc, "error": str(failure) if failure is not None else None})
    else:
        _print_verify_report(report, bad_packs, repair=repair, drop_unreadable=drop_unreadable)
    if report.get("repair", {}).get("complete") and not report["ok"]:
        # exit 0: what verify found is gone and every snapshot reads back whole (the damage
        # was in redundant copies or pack indexes only); the lines above said what was done
        info("repair: complete - every snapshot restores from intact copies; 'pyvbak verify' confirms it")
    if failure is not None:
        raise failure


def _print_verify_report(report: dict, bad_packs: set, *, repair: bool, drop_unreadable: bool) -> None:
    """Verify's report as text: what it checked on stdout, what it found and what the
    repair did on stderr (``bad_packs``: the packs, hex, some of whose copies read back
    bad)."""
    sampled = (f" - a random {report['sampled_percent']:g} % sample of their blocks: the others were not read"
               if report["sampled_percent"] is not None else "")
    say(
        f"checked {report['blocks_checked']} blocks ({human_bytes(report['bytes_checked'])}) "
        f"of {report['snapshots']} snapshot(s) in {report['duration']:.1f}s{sampled}"
    )
    for d in report["damaged_pack_indexes"]:
        info(f"pack index {d['name']}: {d['reason']}")
    for a in report["affected_snapshots"]:
        info(f"snapshot {a['id']}: {a['reason']}")
    for t in report["damaged_pack_trailers"]:
        if t["pack"] in bad_packs:  # (cut short, or damaged inside: not only its table of contents)
            info(f"pack {t['pack'][:16]}…: {t['reason']}; some of its block copies do not read back either")
            continue
        info(f"pack {t['pack'][:16]}…: {t['reason']}: its blocks read back through the pack index, but the pack "
             f"could not be indexed again from itself if that index were lost; "
             + ("repaired below, if it can be" if repair else "'pyvbak verify --repair' rebuilds it from the pack index"))
    for line in report.get("repair", {}).get("trailers_rebuilt", []) + report.get("repair", {}).get("trailers_not_rebuilt", []):
        info(f"repair: {line}")
    if report.get("damaged_copy_count"):
        c = report["damaged_copies"][0]
        info(f"{report['damaged_copy_count']} damaged copy(ies) of blocks that have a good copy too (e.g. "
             f"{c['digest'][:16]}… in pack {c['pack'][:16]}…: {c['reason']}): no snapshot loses data; "
             + ("removed below" if repair else "'pyvbak verify --repair' removes them from the index"))
    for name in report["orphan_snapshot_indexes"]:
        info(f"note: {name} has no metadata (a killed backup's, or a snapshot whose metadata was "
             f"lost); prune removes it")
    for line in report.get("packs_left_alone") or ():
        info(f"note: {line}")
    if report.get("unindexed_packs") and not report.get("repair"):
        u = report["unindexed_packs"]
        # (prune stops on a damaged pack index: then only the repair)
        also = "" if report["damaged_pack_indexes"] else " (or 'pyvbak prune')"
        info(f"{u['packs']} pack(s) holding {u['blocks']} block(s) are named by no pack index (one lost from "
             f"storage?): 'pyvbak verify --repair'{also} indexes them again from their own tables of contents")
    recheck = report.get("repair", {}).get("recheck")
    for line in report.get("repair", {}).get("adopted", []):
        info(f"repair: {line}" + ("; run 'pyvbak verify' again to check its blocks"
                                  if line.kind == "adopted" and recheck is None else ""))
    if recheck is not None:
        info(f"repair: checked again after adopting packs: {recheck['blocks_checked']} blocks, "
             + ("all good" if recheck["ok"] else f"{recheck['problem_count']} bad block(s) affecting "
                f"{len(recheck['affected_snapshots'])} snapshot(s)"))
    if report.get("unreadable_copy_count"):
        n = report["unreadable_copy_count"]
        if repair and drop_unreadable:
            info(f"{n} block copy(ies) could not be read (I/O errors, twice): removed below with the bad ones")
        else:
            info(f"{n} block copy(ies) could not be read (I/O errors, twice), which says nothing about the data: "
                 + ("--repair kept their records (" if repair else "'verify --repair' keeps their records (")
                 + "a read error may pass: a network file system, an outage); if verify keeps finding them, "
                 "'pyvbak verify --repair --drop-unreadable' removes them (and the next backups store again the "
                 "blocks that have no other good copy)")
    flagged = report.get("flagged")
    if flagged and flagged["marker"] and (flagged["copies"] or flagged["again"]):
        again = f" (and {flagged['again']} flagged before)" if flagged["copies"] and flagged["again"] else ""
        what = (f"flagged {flagged['copies']} bad block copy(ies){again}" if flagged["copies"]
                else f"flagged again {flagged['again']} bad block copy(ies) flagged before")
        info(f"{what} ({flagged['marker']}): backups no longer deduplicate against them, so the next backup of "
             f"each disk that still holds those blocks stores them again")
    if flagged and flagged["marker"] and flagged["cleared"]:
        info(f"cleared {flagged['cleared']} flagged block copy(ies) that read back intact now "
             f"({flagged['marker']})")
    if flagged and flagged["error"]:
        info(f"the bad block copies were not flagged for the next backups ({flagged['error']})" if not report["ok"]
             else f"flagged block copies that read back intact now were not cleared ({flagged['error']})")
    if report.get("repair", {}).get("records_removed"):
        info(f"repair: removed {report['repair']['records_removed']} bad block record(s) from the index "
             f"({report['repair']['lost_marker']}): the next backup of each disk that still holds those "
             f"blocks stores them again")


def _verify_failure(r, report: dict, recheck_report, read_problem, *, repair: bool, drop_unreadable: bool,
                    bad_packs: set) -> Exception | None:
    """The error verify ends with (exit 6: what it found and the next step), or None."""
    from ..errors import IntegrityError

    if not report["ok"] and report.get("repair", {}).get("complete"):
        return None
    if not report["ok"] and report.get("repair", {}).get("recheck"):
        recheck = report["repair"]["recheck"]
        what = (f"{recheck['problem_count']} bad block(s) affecting {len(recheck['affected_snapshots'])} snapshot(s)"
                if recheck["problem_count"] else f"{len(recheck['affected_snapshots'])} damaged snapshot(s)")
        # the step from what the check after the repair found (it said "back up" of copies
        # the repair keeps, and of damaged snapshot files, which no backup heals): a bad
        # copy in a pack it adopted just now is still indexed (not "the repair dropped");
        # blocks no index names are those whose records it dropped, or which a marker
        # covers (not "after one 'pyvbak verify --repair'": this was it)
        return IntegrityError(f"after repair, {what} remain in {r.location}: "
                              f"{_next_step(recheck_report, repaired_unindexed=True, dropped_unreadable=drop_unreadable)}")
    if not report["ok"]:
        n = len(report["affected_snapshots"])
        damaged = len(report["damaged_pack_indexes"])
        unread = len(report.get("snapshots_unread") or ())
        files = len(report.get("snapshots_damaged") or ())
        # (the snapshots a damaged file of their own hurts are counted apart from those
        # with bad blocks: the advice for the two differs, and one is no loss of data)
        found = (f"{report['problem_count']} bad block(s) affecting {n - files - unread} snapshot(s)"
                 + (f" and {files} damaged snapshot(s)" if files else "")
                 + (f" and {unread} snapshot(s) whose index could not be read" if unread else "")
                 if report["problem_count"]
                 else f"{n - unread} damaged snapshot(s)" if n > unread
                 else f"{n} snapshot(s) whose index could not be read" if n else "")
        if damaged:
            found = f"{found} and {damaged} damaged pack index(es)" if found else f"{damaged} damaged pack index(es)"
        if report.get("damaged_copy_count"):
            more = f"{report['damaged_copy_count']} damaged redundant block copy(ies)"
            found = f"{found} and {more}" if found else more
        if report.get("unreadable_redundant_copy_count"):
            more = f"{report['unreadable_redundant_copy_count']} redundant block copy(ies) that could not be read"
            found = f"{found} and {more}" if found else more
        if report["damaged_pack_trailers"]:
            more = f"{len(report['damaged_pack_trailers'])} pack(s) with a damaged table of contents"
            found = f"{found} and {more}" if found else more
        if read_problem is not None:
            # (its advice, "verify --repair, then back up", would mark the mount point and
            # fill it): the storage first
            return read_problem.error(f"verify found {found}, and nothing was flagged")
        return IntegrityError(f"verify found {found} in {r.location}: "
                              f"{_next_step(report, repaired=repair, dropped_unreadable=repair and drop_unreadable, bad_packs=bad_packs)}")
    if read_problem is not None:
        # every block it read is intact, but backups, prune and forget --prune refuse this
        # repository until the storage is back or marked: exit 0 told a monitor that
        # watches verify's exit code the repository was healthy
        return read_problem.error("every block verify read is intact, but backups refuse this repository")
    return None


def _next_step(report: dict, *, repaired: bool = False, repaired_unindexed: bool = False,
               dropped_unreadable: bool = False, bad_packs: set = frozenset()) -> str:
    """What to do about what verify found (it used to say only what: the backups after it
    kept deduplicating against the bad copies, every new snapshot unrestorable, and
    nothing sent the user to the repair).  Built from
    the causes, so that it is true for each: ``repaired``: this run was ``--repair``;
    ``repaired_unindexed``: the report is the check after a repair, which dealt with the
    blocks no index names but not with the bad copies it found in packs it adopted;
    ``bad_packs``: the packs (hex) some of whose copies read back bad."""
    lost = report.get("lost_blocks_by_cause") or {}
    again = "a backup stores again the blocks a disk still holds (those no disk holds any more are lost)"
    steps = []
    bad, unread, unindexed = lost.get("bad_copy", 0), lost.get("unreadable", 0), lost.get("not_indexed", 0)
    if dropped_unreadable:
        bad, unread = bad + unread, 0
    flagged = report.get("flagged") or {}
    if unindexed and any("belongs at" in ln for ln in report.get("packs_left_alone") or ()) and not repaired:
        # (a misplaced pack: the repair would give its blocks up; a damaged one left alone
        # in its own place has nowhere to go back to)
        steps.append("first look at the objects under packs/ named above: one moved back where the note says holds "
                     "blocks again (then run 'pyvbak verify' once more)")
    if (bad or unindexed) and report.get("lost_blocks_not_on_disks"):
        steps.append("the affected disks were backed up since and no longer hold those blocks (their newest snapshots "
                     "do not use them): they are lost to the snapshots with bad blocks named above - restore another snapshot, or "
                     "forget those ('pyvbak forget ID')")
        bad = unindexed = 0
    if bad and not repaired and report.get("sampled_percent") is not None:
        # a sample read some copies: those it did not read may be as bad (a pack cut short
        # past the sampled frames), and backups go on deduplicating against them
        steps.append("run 'pyvbak verify' without --sample, then back up the affected disks: the sample read only "
                     "part of the blocks, and flagged only the bad copies it read")
    elif bad and not repaired and not dropped_unreadable and flagged and not flagged.get("error"):
        # (flagged now, or by an earlier verify: backups store these blocks again)
        steps.append(f"back up the affected disks: the bad copies are flagged, so {again}, and every snapshot that "
                     f"names them restores again")
    elif bad and not repaired:
        steps.append("run 'pyvbak verify --repair', then back up the affected disks: until the repair, backups of "
                     "the same data reuse the bad copies and cannot be restored either")
    elif bad or (unindexed and (repaired or repaired_unindexed)):
        steps.append(f"back up the affected disks: the repair dropped the lost blocks' records, and {again}")
    elif unindexed:
        steps.append(f"back up the affected disks after one 'pyvbak verify --repair' (once is enough): {again}")
    if unread:
        steps.append("check the storage and run verify again (the only copies of some blocks could not be read); "
                     "if they keep failing, 'pyvbak verify --repair --drop-unreadable' drops them, then back up "
                     "the affected disks")
    if not repaired:
        if report.get("damaged_copy_count") and not bad:
            steps.append("'pyvbak verify --repair' drops the damaged copies (every snapshot still restores from "
                         "the good ones)")
        if report["damaged_pack_indexes"]:
            steps.append("the next backup or 'pyvbak verify --repair' rebuilds the damaged pack index(es) from "
                         "the packs")
        if any(t["pack"] not in bad_packs for t in report["damaged_pack_trailers"]):
            # (a pack with bad blocks too is the bad copies' advice above: its records go)
            steps.append("'pyvbak verify --repair' rebuilds the damaged tables of contents (no snapshot loses data)")
        if report.get("unindexed_packs"):
            also = "" if report["damaged_pack_indexes"] else " (or 'pyvbak prune')"  # (prune stops on one)
            steps.append(f"'pyvbak verify --repair'{also} indexes the packs no index names")
    if report.get("unreadable_redundant_copy_count") and not unread and not dropped_unreadable:
        steps.append("check the storage: some redundant copies could not be read (every snapshot still restores); "
                     "if they keep failing, 'pyvbak verify --repair --drop-unreadable' drops them")
    if report.get("snapshots_damaged"):
        steps.append("put the damaged snapshot files named above back from a copy of the repository, or forget "
                     "those snapshots ('pyvbak forget ID')")
    if report.get("snapshots_unread"):
        steps.append(f"check the storage and run verify again (the index of {len(report['snapshots_unread'])} "
                     f"snapshot(s) could not be read)")
    return "; ".join(steps) or "see the lines above"


def _percent(text: str | None) -> float | None:
    """--sample's PERCENT: 10, 2.5 or 10% (the help says PERCENT: '10%' was refused as
    "not a valid float")."""
    if text is None:
        return None
    from ..errors import UsageError

    try:
        return float(text.strip().removesuffix("%"))
    except ValueError:
        raise UsageError(f"--sample {text!r} is not a percentage: give one such as 10 or 2.5%") from None


def _utc(iso: str) -> str:
    """A snapshot time to the second, marked UTC as stored (a listing read as local time
    was hours off)."""
    return iso[:19] + "Z" if len(iso) >= 19 and iso.endswith("Z") else iso[:19]


def _printable(text: str) -> str:
    """``text`` with control characters shown as escapes (a hostile repository's VM name
    could set the terminal's title, clear the screen or fake listing lines)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def unlock(
    repo: Optional[str] = RepoOption,
    all_locks: bool = typer.Option(False, "--all", help="Remove every lock, also those of other hosts (only when no pyvbak uses the repository)."),
) -> None:
    """Remove stale locks (of processes that no longer run on this host)."""
    from ..repo.locks import remove_locks
    from ..repo.pack_storage import pack_storage_problem

    r = open_repository(repo)
    removed = remove_locks(r.backend, all_hosts=all_locks)
    if not removed:  # nothing more to do: a stop from here on (the line waiting on a full pipe) is noted
        interrupts.begin_finishing()
    say(f"removed {len(removed)} lock(s)" + (": " + ", ".join(removed) if removed else ""))
    if removed:  # what the removed locks' processes may have left: adopt it now
        with r.lock(purpose="unlock"):
            # ... unless the packs are all gone (storage not mounted?): the clean-up would
            # take a damaged pack index whose packs it cannot see for garbage.
            # Left to the backup or prune after the packs are back: backups re-index a
            # damaged pack index's packs, prune adopts what a killed backup left unindexed.
            missing = pack_storage_problem(r)
            cleaned = [] if missing else r.recover_leftovers()
            interrupts.begin_finishing()  # done: a stop request from here on is noted
        if missing:
            info(f"warning: {missing.error('no clean-up after the removed locks was done')}")
        for line in cleaned:
            say(f"cleanup: {line}")

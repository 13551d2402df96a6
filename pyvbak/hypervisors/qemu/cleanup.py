"""Find and remove what an earlier, killed pyvbak run left in a VM and its work dir.

A ``kill -9`` (or a power cut of the backup host) skips every ``finally``.  What can be
left behind, all named with ``pyvbak-<run>`` (see ``naming``):

* an NBD export (and the NBD server pyvbak started for it),
* the fleecing backup job and its copy-before-write filter (slowing every guest write),
* the fleecing qcow2 node and its file in the work dir,
* a socket and a journal file in the work dir; offline, a qemu-nbd pid file (and the
  qemu-nbd still serving, if ``PR_SET_PDEATHSIG`` did not stop it),
* a rotated-but-not-settled dirty bitmap pair: the previous generation disabled and the
  next one recording.  The newer one is merged back into the one the last good backup
  recorded, so no guest write is forgotten.

A run is pyvbak's when its session lock object is in the VM or its files are in the work
dir (a name alone is no evidence: an admin's ``pyvbak-4242-abcd`` export is left alone).
A run is only cleaned when the process that created it is gone (``run_alive``): its pid
is in the run id, and the identity its session lock in the VM (or else its journal in the
work dir) recorded - machine, pid namespace, boot, process start time - tells whether
this process can judge that pid at all (a pyvbak in another container or on another
machine sharing the QMP socket or work dir: never cleaned) and whether the pid now runs
another process.  A run without a recorded identity (older pyvbak, or only files without
a journal) is judged by its pid alone.  A live one means two pyvbak sessions on one VM,
which is refused.  A dead run's qemu-nbd is signalled only when its pid still runs that
very process (``stop_leftover_qemu_nbd``), never because a pid file names it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from pyvbak.errors import SourceError

from pyvbak.processes import can_judge, cmdline, owner_alive, running, same_process

from .naming import PREFIX, generation_of, pid_of_run, run_of, running_here
from .qmp import QmpClient, QmpError
from .session_lock import release as release_lock
from .session_lock import is_live as lock_is_live
from .session_lock import lock_info, owner_identity, session_locks


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SourceError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def named_nodes(qmp: QmpClient) -> list[dict]:
    return qmp.execute("query-named-block-nodes", flat=True)


def node_info(qmp: QmpClient, node: str) -> dict | None:
    for n in named_nodes(qmp):
        if n.get("node-name") == node:
            return n
    return None


def pyvbak_exports(qmp: QmpClient) -> list[str]:
    return [e["id"] for e in qmp.execute("query-block-exports") if e.get("id", "").startswith(PREFIX)]


def pyvbak_jobs(qmp: QmpClient) -> list[str]:
    return [j["id"] for j in qmp.execute("query-jobs") if j.get("id", "").startswith(PREFIX)]


def remove_export(qmp: QmpClient, export_id: str, timeout: float = 30.0) -> None:
    ok, err = qmp.try_execute("block-export-del", id=export_id, mode="hard")
    if not ok and "not found" not in err.desc.lower():
        raise err
    wait_for(lambda: export_id not in [e["id"] for e in qmp.execute("query-block-exports")], timeout,
             f"export {export_id} to go away")


def cancel_job(qmp: QmpClient, job_id: str, timeout: float = 30.0) -> None:
    ok, err = qmp.try_execute("block-job-cancel", device=job_id, force=True)
    if not ok and "not found" not in err.desc.lower() and "no active block job" not in err.desc.lower():
        # a job that concluded but was not dismissed: dismiss it
        qmp.try_execute("job-dismiss", id=job_id)

    def gone() -> bool:
        for j in qmp.execute("query-jobs"):
            if j["id"] == job_id:
                if j.get("status") == "concluded":
                    qmp.try_execute("job-dismiss", id=job_id)
                return False
        return True

    wait_for(gone, timeout, f"backup job {job_id} to end")


def remove_node(qmp: QmpClient, node: str) -> None:
    ok, err = qmp.try_execute("blockdev-del", **{"node-name": node})
    if not ok and "find" not in err.desc.lower() and "not found" not in err.desc.lower():
        raise err


def socket_listening(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def stop_nbd_server(qmp: QmpClient) -> None:
    ok, err = qmp.try_execute("nbd-server-stop")
    if not ok and "not running" not in err.desc.lower():
        raise err


def gen_bitmaps(node: dict) -> dict[str, dict]:
    """pyvbak's generation bitmaps of a node (``pyvbak-gen-N`` exactly: a bitmap of the
    admin's named ``pyvbak-gen-old`` is not one, and is never settled or removed)."""
    return {b["name"]: b for b in node.get("dirty-bitmaps", []) if generation_of(b.get("name", "")) is not None}


def run_alive(run: str, owner: dict | None) -> bool:
    """Whether the process that created run's resources may still run
    (``processes.owner_alive``).  ``owner``: the identity recorded for the run (its session
    lock's, else its journal's), None when unknown: judged by pid.  A run with this
    process's pid and an identity this process can judge is live while it is in progress
    (``naming.running_here``: another session of this process)."""
    pid = pid_of_run(run)
    if pid == os.getpid() and can_judge(owner or {}):
        return running_here(run)
    return owner_alive(pid, owner)


def journal_owners(files: list[Path]) -> dict[str, dict]:
    """run -> the owner identity its work-dir journal ``pyvbak-<run>.json`` recorded (runs
    whose journal is missing, unreadable or without one are left out)."""
    owners = {}
    for p in files:
        if p.suffix != ".json":
            continue
        journal = read_journal(p)
        owner = owner_identity(journal.get("owner")) if journal is not None else None
        if owner is not None:
            owners[run_of(p.name)] = owner
    return owners


def clean_leftovers(qmp: QmpClient, work_dir: Path, node: str | None, previous_bitmap: str | None,
                    own_run: str | None = None, node_infos: list[dict] | None = None,
                    this_vm: str | None = None) -> list[str]:
    """Remove every pyvbak resource of a dead run; return one line per thing cleaned.

    ``previous_bitmap`` is the bitmap the last good backup recorded: other
    ``pyvbak-gen-N`` bitmaps on ``node`` are either merged into it (newer: a run that
    rotated and died) or dropped (older: a run that committed and died before deleting it).
    ``node_infos``: ``named_nodes(qmp)`` as the caller asked it moments ago, if it did (one
    QMP round trip less on every backup).  ``this_vm``: the QMP socket of a backup session:
    dead runs' journals stay - other VMs' for theirs (keep_other_disks_journals), this
    VM's until the session has settled its disks' bitmaps (drop_settled_journals).
    """
    cleaned: list[str] = []
    work_dir = Path(work_dir)

    exports = pyvbak_exports(qmp)
    jobs = pyvbak_jobs(qmp)
    nodes = [n["node-name"] for n in (named_nodes(qmp) if node_infos is None else node_infos)
             if n.get("node-name", "").startswith(PREFIX)]
    files = sorted(p for p in work_dir.glob(f"{PREFIX}*") if run_of(p.name)) if work_dir.is_dir() else []

    # who made each run: the identity its session lock in the VM recorded, else its journal's
    locks = {lock: run_of(lock) for lock in session_locks(qmp)}
    # A run is pyvbak's only with evidence besides a name: its session lock in the VM (a
    # run makes it before anything else and removes it last, so every leftover of a
    # killed run comes with it) or its files in this work dir.  An export, job or node
    # of the admin's that merely looks like a run's (``pyvbak-4242-abcd``) is left alone:
    # it was removed, and the NBD server it was served on stopped under another tool.
    evidence = {run for run in locks.values() if run is not None} | {run_of(p.name) for p in files}
    runs = ({run_of(x) for x in exports + jobs + nodes + [p.name for p in files]} & evidence) - {None, own_run}
    owners = journal_owners(files)
    for lock, run in locks.items():
        if run is not None and run != own_run:
            owner = owner_identity(lock_info(qmp, lock))
            if owner is not None:
                owners[run] = owner
    in_vm = {run_of(x) for x in exports + jobs + nodes} | set(locks.values())  # runs with something here
    if this_vm is not None:
        # a run whose journal names another VM or an image, with nothing in this VM, is
        # no session on it: while it may run it is left alone, not a reason to refuse
        # (other_disks_runs)
        runs -= {r for r in other_disks_runs(files, "qmp", this_vm) - in_vm if run_alive(r, owners.get(r))}
    for run in sorted(runs):  # type: ignore[arg-type]
        pid = pid_of_run(run)
        if run_alive(run, owners.get(run)):
            raise SourceError(
                f"another pyvbak session (pid {pid}, run {run}) is active on this VM or work dir "
                f"{work_dir}; wait for it to finish (QEMU serves one NBD server per VM)"
            )
    def mine(name: str) -> bool:
        r = run_of(name)
        return r is not None and r in runs

    server_was_ours = False
    for e in exports:
        if mine(e):
            remove_export(qmp, e)
            cleaned.append(f"NBD export {e}")
            server_was_ours = True  # pyvbak only exports on a server it started itself
    # A dead run's socket that still answers: its NBD server is still up - in this VM only
    # when the run was this VM's (something of it here, or its journal names this VM).  A
    # live run's socket, or another VM's or a qemu-nbd's, says nothing of this VM's server:
    # taken for it, another VM's live backup made this one stop its NBD server, an admin's
    # too.
    sockets = [p for p in files if p.name.endswith("-nbd.sock") and mine(p.name)]
    if sockets and this_vm is not None:
        this_vms = in_vm | {run_of(j.name) for j in files
                            if j.name.endswith(".json") and str((read_journal(j) or {}).get("qmp")) == this_vm}
        sockets = [p for p in sockets if run_of(p.name) in this_vms]
    if any(socket_listening(p) for p in sockets):
        server_was_ours = True
    if server_was_ours:
        stop_nbd_server(qmp)
        cleaned.append("NBD server started by pyvbak")
    for n in nodes:  # the frozen views, before the jobs whose filters they read
        if mine(n) and n.endswith("-acc"):
            remove_node(qmp, n)
            cleaned.append(f"snapshot-access node {n}")
    for j in jobs:
        if mine(j):
            cancel_job(qmp, j)
            cleaned.append(f"fleecing backup job {j}")
    # top-level nodes only: the -cbw filter disappeared with its job; inline children with the parent
    for n in nodes:
        if mine(n) and n.endswith("-fl"):
            remove_node(qmp, n)
            cleaned.append(f"fleecing node {n}")
    leftover_files = [p for p in files if mine(p.name)]
    if this_vm is not None:
        leftover_files = [p for p in keep_other_disks_journals(leftover_files, "qmp", this_vm)
                          if not (p.name.endswith(".json") and str((read_journal(p) or {}).get("qmp")) == this_vm)]
    if leftover_files:  # (the common case has none: no query then)
        still_open = {str(n.get("file", "")) for n in named_nodes(qmp)}
        cleaned += clean_files([p for p in leftover_files if str(p) not in still_open])
    # Session locks of dead runs go last: a lock is the evidence that a run's leftovers
    # are pyvbak's, and a cleanup interrupted before it removed them must leave the next
    # one (from any work dir) that evidence.  A live lock is a session that is about to
    # back off (session_lock orders them), never a reason to stop this one.
    for lock, run in locks.items():
        if run is None or run == own_run:
            continue
        if lock_is_live(run, owners.get(run)):
            continue
        release_lock(qmp, lock)
        cleaned.append(f"session lock {lock} of a dead run")

    if node is not None:
        cleaned += settle_bitmaps(qmp, node, previous_bitmap)
    return cleaned


def bitmaps_disabled_by(files: list[Path]) -> set[tuple[str, str]]:
    """(bitmap disabled, bitmap made) for each disk whose run's journal among ``files``
    (work-dir files) says its rotating transaction disabled a bitmap (``disables``) as it
    made a new one (``new_bitmap``): the evidence on which a dead run's disabled bitmap is
    enabled again.  Not keyed by node: a restart may rename a disk's node, and the made
    bitmap's random token already names the disk and the run.  Read before the files are
    cleaned away."""
    out: set[tuple[str, str]] = set()
    for p in files:
        if not p.name.endswith(".json"):
            continue
        for disk in journal_disks(read_journal(p) or {}):
            if all(isinstance(disk.get(k), str) for k in ("disables", "new_bitmap")):
                out.add((disk["disables"], disk["new_bitmap"]))
    return out


def journal_disks(journal: dict) -> list[dict]:
    """A journal's ``disks`` entries that are objects (a damaged journal has none)."""
    disks = journal.get("disks")
    return [d for d in disks if isinstance(d, dict)] if isinstance(disks, list) else []


def settle_bitmaps(qmp: QmpClient, node: str, previous_bitmap: str | None, info: dict | None = None,
                   disabled_by_runs: set[tuple[str, str]] | frozenset = frozenset()) -> list[str]:
    """Merge a dead run's newer bitmap generations of ``node`` into ``previous_bitmap`` and
    drop stale ones (see clean_leftovers); ``info``: the node's current query-named-block-
    nodes entry, if the caller has it.  ``previous_bitmap`` is enabled again only when a
    run's journal says that run disabled it as it made one of the bitmaps merged back now
    (``disabled_by_runs``, from bitmaps_disabled_by): one disabled before
    the run missed writes, and enabled it would be trusted (a silently wrong incremental -
    also on the evidence of a stale journal, or of another disk's bitmap of the same old,
    token-less name)."""
    info = info if info is not None else node_info(qmp, node)
    if info is None:
        return []
    bitmaps = gen_bitmaps(info)
    prev = bitmaps.get(previous_bitmap) if previous_bitmap else None
    prev_gen = generation_of(previous_bitmap) if prev else None
    cleaned = []
    newer = [b for b in bitmaps if b != previous_bitmap and prev_gen is not None
             and (generation_of(b) or 0) > prev_gen and not bitmaps[b].get("busy")]
    others = [b for b in bitmaps if b != previous_bitmap and b not in newer and not bitmaps[b].get("busy")]
    if newer and prev is not None and (prev.get("inconsistent") or any(bitmaps[b].get("inconsistent") for b in newer)):
        # QEMU refuses to merge an inconsistent bitmap (a crash): every backup failed on it.
        # None of them can be trusted anyway: the newer ones go, the previous one stays for
        # the check that makes this backup a full scan (and is retired when it commits).
        others += newer
    elif newer and prev is not None and not prev.get("busy"):
        actions = [{"type": "block-dirty-bitmap-merge",
                    "data": {"node": node, "target": previous_bitmap, "bitmaps": newer}}]
        # ... and only when every generation merged back kept recording since: one disabled
        # after the run died (by someone else) missed writes too
        enable = (not prev.get("recording") and any((previous_bitmap, b) in disabled_by_runs for b in newer)
                  and all(bitmaps[b].get("recording") for b in newer))
        if enable:
            actions.append({"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": previous_bitmap}})
        actions += [{"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": b}} for b in newer]
        qmp.execute("transaction", actions=actions)
        cleaned.append(f"dirty bitmap(s) {', '.join(newer)} of an unfinished backup merged back into "
                       f"{previous_bitmap}" + (f" and {previous_bitmap} re-enabled" if enable else ""))
    else:
        others += newer
    for b in others:
        try:
            qmp.execute("block-dirty-bitmap-remove", node=node, name=b)
            cleaned.append(f"stale dirty bitmap {b} on {node}")
        except QmpError:
            pass
    return cleaned


def read_journal(path: Path) -> dict | None:
    """A run's work-dir journal ``pyvbak-<run>.json``, or None (missing, unreadable)."""
    try:
        journal = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return journal if isinstance(journal, dict) else None


def serves_run(pid: int, run: str) -> bool:
    """Whether ``pid`` runs a ``qemu-nbd`` serving ``run``'s socket (``--socket=…/pyvbak-
    <run>-nbd.sock``, as ``offline`` starts it)."""
    args = cmdline(pid)
    if not args or os.path.basename(args[0]) != "qemu-nbd":
        return False
    want = f"{PREFIX}{run}-nbd.sock"
    sockets = [a.split("=", 1)[1] for a in args if a.startswith("--socket=")]
    sockets += [b for a, b in zip(args, args[1:]) if a in ("-k", "--socket")]
    return any(os.path.basename(x) == want for x in sockets)


def stop_leftover_qemu_nbd(run: str, work_dir: Path) -> list[str]:
    """Stop the qemu-nbd a dead run started, if it still runs; one line per process
    stopped or left alone.  Its pid comes from the pid file and from the run's journal,
    which recorded the child at its spawn (``processes.spawn_record``); a pid is signalled
    only when it still is THAT child: same boot and start time as recorded, and a
    ``qemu-nbd`` serving the run's socket (a run without the record - older pyvbak, or
    killed right at the spawn - by the socket alone).  A pid now running another process
    (pid reuse) is left running, and so is anything of a run whose owner this process
    cannot judge (another machine or pid namespace: its pids mean nothing here)."""
    pidfile = work_dir / f"{PREFIX}{run}-qemu-nbd.pid"
    journal_path = work_dir / f"{PREFIX}{run}.json"
    journal = read_journal(journal_path) or {}
    record = journal.get("qemu_nbd") if isinstance(journal.get("qemu_nbd"), dict) else None
    owner = owner_identity(journal.get("owner"))
    pids: dict[int, Path] = {}
    try:
        pids[int(pidfile.read_text().strip())] = pidfile
    except (OSError, ValueError):
        pass
    if record is not None and isinstance(record.get("pid"), int):
        pids.setdefault(record["pid"], journal_path)
    lines = []
    for pid, source in sorted(pids.items()):
        if pid <= 0 or pid == os.getpid() or not running(pid):
            continue
        try:  # held across the checks: the signal cannot reach a process that got the pid since
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except OSError:  # a kernel without pidfds (< 5.3)
            pidfd = None
        try:
            line = _stop_if_ours(pid, pidfd, source, run, owner, record)
        finally:
            if pidfd is not None:
                os.close(pidfd)
        if line:
            lines.append(line)
    return lines


def _stop_if_ours(pid: int, pidfd: int | None, source: Path, run: str, owner: dict | None,
                  record: dict | None) -> str | None:
    if owner is not None and not can_judge(owner):
        return (f"process {pid} named by {source}: not killed (run {run} belongs to a pyvbak of "
                f"another machine or pid namespace)")
    def ours() -> bool:
        if record is not None:
            return record.get("pid") == pid and same_process(record) and serves_run(pid, run)
        return serves_run(pid, run)

    if not ours():
        return (f"process {pid} named by {source} is not run {run}'s qemu-nbd (its pid went to "
                f"another process): not killed")
    try:
        _signal(pid, pidfd, signal.SIGTERM)
    except ProcessLookupError:
        return None
    except PermissionError as e:
        raise SourceError(f"cannot stop qemu-nbd process {pid} left by run {run}: {e.strerror}") from None
    if _stopped_within(pid, STOP_WAIT_S):
        return f"qemu-nbd process {pid}"
    # it ignored SIGTERM (stuck in I/O, or not the qemu-nbd it claims): it holds the image
    # open and its socket bound, so it is not left running while said to be stopped
    if pidfd is None and not ours():
        # no pidfd: it exited during the wait and the pid went to another process since
        # (the wait watches the pid): that one is not SIGKILLed
        return f"qemu-nbd process {pid}"
    try:
        _signal(pid, pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return f"qemu-nbd process {pid}"
    if _stopped_within(pid, STOP_WAIT_S):
        return f"qemu-nbd process {pid} (killed: it ignored SIGTERM for {STOP_WAIT_S:g}s)"
    return (f"qemu-nbd process {pid} of run {run}: still running after SIGTERM and SIGKILL (stuck in the "
            f"kernel?); stop it by hand")


def _signal(pid: int, pidfd: int | None, sig: int) -> None:
    """Through the pidfd when there is one: it cannot reach a process that got the pid since."""
    if pidfd is not None:
        signal.pidfd_send_signal(pidfd, sig)
    else:
        os.kill(pid, sig)


#: how long a leftover qemu-nbd gets to exit after SIGTERM, and again after SIGKILL
STOP_WAIT_S = 5.0


def _stopped_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


#: a dead run's journal of another VM or image is kept this long for that disk's next run
OTHER_JOURNAL_KEEP_S = 30 * 86400


def _other_disks_journal(p: Path, key: str, value: str, suffixes: tuple[str, ...] = (".json",)) -> bool:
    """``p`` is a journal of a run on another disk: ``journal[key]`` ("qmp" for running
    VMs, "image" for offline ones) not ``value``, or a journal of the other kind."""
    if not p.name.endswith(suffixes):
        return False
    journal = read_journal(p) or {}
    other_kind = any(k in journal for k in ("qmp", "image") if k != key)  # a hot run's, an offline one's
    return (key in journal and str(journal[key]) != value) or other_kind


def other_disks_runs(files: list[Path], key: str, value: str) -> set[str]:
    """Runs whose work-dir journal names another disk (``_other_disks_journal``).  The
    work dir is shared by every VM and image: such a run, while it may still run (or
    cannot be judged from here: another container), is left alone by this disk's
    sessions - before, a live backup of one VM made every other VM's and image's backup
    refuse ("another pyvbak session is active"), and a run known only by its journal did
    too.  A dead one's files go, but its journal stays
    for its own disk's next run (keep_other_disks_journals; any goes after
    OTHER_JOURNAL_KEEP_S: drop_settled_journals, drop_old_journals).  A run writes its
    journal before anything else in the work dir and removes it last, so a run with
    files has one - except an older pyvbak's, judged by its pid as before.  (Journals are
    written as ``.pyvbak-<run>.json.tmp``, which these scans do not see, and renamed; an
    older pyvbak wrote ``pyvbak-<run>.tmp``, read here too.)"""
    return {r for p in files
            if _other_disks_journal(p, key, value, (".json", ".tmp")) and (r := run_of(p.name)) is not None}


def drop_old_journals(work_dir: Path, own_run: str | None) -> list[str]:
    """Journals older than OTHER_JOURNAL_KEEP_S of runs known by nothing else (but the NBD
    socket kept with one): their own disk's next run never came (a VM deleted, a
    container gone)."""
    files = sorted(work_dir.glob(f"{PREFIX}*")) if work_dir.is_dir() else []
    by_run: dict[str, list[Path]] = {}
    for p in files:
        r = run_of(p.name)
        if r is not None and r != own_run:
            by_run.setdefault(r, []).append(p)
    now = time.time()
    dropped = []
    for ps in by_run.values():
        # a journal, with the NBD socket kept beside it (keep_other_disks_journals)
        journals = [p for p in ps if p.name.endswith(".json")]
        if len(journals) == 1 and all(p.name.endswith(("-nbd.sock", ".json")) for p in ps):
            try:
                if now - journals[0].stat().st_mtime < OTHER_JOURNAL_KEEP_S:
                    continue
            except OSError:
                continue
            for p in sorted(ps, key=lambda p: p.name.endswith(".json")):  # the journal last
                try:
                    p.unlink()
                    dropped.append(f"file {p}")
                except FileNotFoundError:
                    pass
                except OSError:
                    break
    return dropped


def drop_dead_journal_temps(work_dir: Path) -> list[str]:
    """Journals a killed run was writing (``naming.journal_temp``: ``.pyvbak-<run>.json.tmp``,
    which the ``pyvbak-*`` scans do not see) whose run is gone."""
    dropped = []
    for p in work_dir.glob(f".{PREFIX}*.tmp") if work_dir.is_dir() else []:
        run = run_of(p.name[1:])
        if run is None or run_alive(run, None):
            continue
        try:
            p.unlink()
            dropped.append(f"file {p}")
        except OSError:
            pass
    return dropped


def keep_other_disks_journals(paths: list[Path], key: str, value: str) -> list[Path]:
    """``paths`` (a dead run's work-dir files) less the journals of runs on another disk
    (``journal[key]`` - "qmp" for running VMs, "image" for offline ones - not ``value``,
    or a journal of the other kind),
    younger than OTHER_JOURNAL_KEEP_S: the work dir is shared by every VM, and a journal
    is the evidence on which that disk's next run enables again the bitmap the dead run
    disabled - one VM's backup removing another's turned that VM's next incremental into a
    full scan.  Its NBD socket stays with it: when the run died
    between removing its last export and stopping its NBD server, the socket is the only
    evidence that its VM's server is pyvbak's, and one VM's cleanup removing it left the
    other VM's server running, failing that VM's next backups (the watchdogs of a killed
    job runner's two VMs, cleaning at once).  Its other files go
    (a fleecing file is the size of the guest's writes); the journal and socket go with
    its own disk's next run, or with age."""
    out, kept_runs = [], set()
    now = time.time()
    for p in paths:
        if _other_disks_journal(p, key, value):
            try:
                if now - p.stat().st_mtime < OTHER_JOURNAL_KEEP_S:
                    kept_runs.add(run_of(p.name))
                    continue
            except OSError:
                pass
        out.append(p)
    return [p for p in out if not (p.name.endswith("-nbd.sock") and run_of(p.name) in kept_runs)]


def drop_settled_journals(work_dir: Path, own_run: str, this_vm: str, nodes: set[str]) -> list[str]:
    """Dead runs' journals of this VM whose every disk this session has settled: their
    evidence is used.  One naming a disk this session does not back up (a run of some of
    a killed multi-disk run's disks) stays for that disk's next run (drop_old_journals
    removes any after OTHER_JOURNAL_KEEP_S)."""
    dropped = []
    for p in work_dir.glob(f"{PREFIX}*.json"):
        run = run_of(p.name)
        if run is None or run == own_run:
            continue
        journal = read_journal(p) or {}
        named = {str(d.get("node")) for d in journal_disks(journal)}
        try:
            if str(journal.get("qmp")) == this_vm and named <= nodes:
                p.unlink()
                dropped.append(f"file {p}")
        except OSError:
            pass
    return dropped


def clean_files(paths: list[Path]) -> list[str]:
    """Remove leftover work-dir files of dead runs, stopping the qemu-nbd a run's pid file
    (or journal) names first (``stop_leftover_qemu_nbd``)."""
    cleaned = []
    stopped: set[str] = set()
    for p in sorted(paths, key=lambda p: not p.name.endswith(".pid")):
        run = run_of(p.name)
        if run is not None and run not in stopped and p.name.endswith((".pid", ".json")):
            stopped.add(run)
            cleaned += stop_leftover_qemu_nbd(run, p.parent)
        try:
            p.unlink()
            cleaned.append(f"file {p}")
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SourceError(f"cannot remove leftover {p}: {e.strerror}") from None
    return cleaned


def dead_run_files(work_dir: Path, own_run: str | None, image: str | None = None) -> list[Path]:
    """Work-dir files of pyvbak runs whose process is gone (``run_alive``, with the identity
    a run's journal recorded); SourceError if one is alive.  ``image``: an offline session's
    image - live runs of other disks are left out (other_disks_runs)."""
    if not work_dir.is_dir():
        return []
    out = []
    files = sorted(work_dir.glob(f"{PREFIX}*"))
    owners = journal_owners(files)
    others = other_disks_runs(files, "image", image) if image is not None else set()
    for p in files:
        run = run_of(p.name)
        if run is None or run == own_run:
            continue
        pid = pid_of_run(run)
        if run_alive(run, owners.get(run)):
            if run in others:
                continue
            same_image = image is not None and (read_journal(work_dir / f"{PREFIX}{run}.json") or {}).get("image") == image
            what = (f"is backing up {image} (its files are in work dir {work_dir})" if same_image
                    else f"is using work dir {work_dir}")
            raise SourceError(f"another pyvbak session (pid {pid}) {what}; wait for it to finish")
        out.append(p)
    return out

"""Hot backup of a running QEMU VM's disks: image fleecing + dirty bitmaps.

See docs/QEMU.md for the full sequence.  In short, ``QemuHotBackup.__enter__`` (for every
disk the URI means — ``vm_disks``: named nodes, guest devices, or all of the VM's disks;
step 4 holds all disks' actions in one transaction, step 5 exports each disk on the one
NBD server):

1. connects to QMP, takes the VM's session lock, cleans what a killed earlier run left
   (``cleanup.clean_leftovers``), then resolves the URI's devices to block nodes;
2. checks whether the dirty bitmap recorded by the previous backup can be trusted;
3. creates the fleecing file (raw, sparse; QEMU < 8.0: a qcow2 backed by the live node);
4. in ONE ``transaction``: adds the next bitmap ``pyvbak-gen-<N+1>`` (persistent in a
   qcow2; in QEMU's memory on any other format),
   disables ``pyvbak-gen-<N>`` and starts ``blockdev-backup sync=none`` live → fleecing,
   which inserts a copy-before-write filter: from that instant a guest write first copies
   the old data into the fleecing file, and the new bitmap records exactly the writes
   after it; then a ``snapshot-access`` node over the filter is the disk at that instant;
5. starts QEMU's NBD server on a unix socket in the work dir and exports the view
   read-only, offering ``qemu:dirty-bitmap:pyvbak-gen-<N>``.

``release_view()`` (a disk's reads are done) undoes 5..3 for that disk early, while its
data is made durable; ``__exit__`` undoes whatever of 5..3 is left, in reverse order, and
settles the bitmaps: after ``commit()`` the old generation is deleted; otherwise the new
one is merged back into the old one.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import json
import os
import socket
from pathlib import Path
from typing import Any

from pyvbak import interrupts
from pyvbak.errors import Interrupted, PyvbakError, SourceError, UsageError
from pyvbak.processes import identity

from .session import ExportSession, backing_chain_changed, outside_data
from ..resources import TerminationGuard, remove_files
from . import cleanup
from . import fleece_guard, fleece_image, naming, session_lock, watchdog
from .vm_disks import FILTER_DRIVERS, MAX_DISKS, VmDisk, check_guest_view, device_id, parse_qemu_uri_disks, resolve
from .naming import GEN_PREFIX, PREFIX, RunNames, bitmap_name, check_socket_path, generation_of, new_run_id, run_of
from .qmp import QmpClient, QmpError

STATE_KIND = "qemu-dirty-bitmap"
#: QEMU from which the frozen view is a snapshot-access node over the copy-before-write
#: filter, with a raw fleecing file of the copies alone, exported with the disk's bitmap
#: named by node; before it, a qcow2 fleecing image backed by the disk, which qemu-img
#: has to create (~10 ms per disk; bench/RESULTS.md, "Snapshot-access").  The node exists
#: from 7.0 and bitmaps named by node from 7.1, but up to 7.2 a read of the view that
#: starts in a block the filter has copied aside and goes past the copied run is served
#: from the live disk for that block (QEMU's hbitmap_status() said "not copied": fixed in
#: 8.0, commit a4d5224c2c, not in Debian 12's 7.2): the guest's writes made after the
#: instant - data, zeroes, discards - got into the backup, silently (the block status of
#: those blocks was wrong the same way).  The
#: qcow2 image reads them right.
SNAPSHOT_ACCESS_SINCE = (8, 0)
#: formats that store dirty bitmaps in the image, so they outlive the QEMU process; on
#: any other node (raw files, LVM or Ceph volumes, vmdk...) pyvbak's bitmap lives in QEMU's
#: memory: change tracking holds while the VM's QEMU runs, and the first backup after a
#: restart finds the bitmap gone and scans (as Proxmox Backup Server does for every disk)
_BITMAP_FORMATS = {"qcow2"}


def parse_qemu_uri(uri: str) -> tuple[str, str]:
    """``qemu:///PATH/TO/QMP.SOCK?node=NODE`` (or ``?device=ID``) → (socket path, the
    node or device named): a URI that names exactly one disk."""
    path, selectors = parse_qemu_uri_disks(uri)
    if len(selectors) != 1:
        raise UsageError(f"qemu URI {uri!r} names {len(selectors) or 'every'} disk(s) where one is expected")
    return path, selectors[0].value


class HotDisk(ExportSession):
    """One disk of a hot backup session: what the engine reads (``nbd_uri``,
    ``dirty_bitmap``), what its snapshot records (``change_tracking_state``) and what
    the session undoes for it.  ``commit()`` once this disk's snapshot is durable:
    only then is its old bitmap generation retired."""

    def __init__(self, session: "QemuHotBackup", disk: VmDisk, names: RunNames, previous_state: dict | None):
        self.session = session
        self.name = disk.name          # the disk's name in the repository
        self.node = disk.node          # the block node pyvbak works on
        self.device = disk.device      # the guest device it was found through, if any
        self.names = names
        self.previous_state = dict(previous_state) if previous_state else None
        self.verify_cbt = session.verify_cbt
        self.description = f"qemu:{session.qmp_path}?{disk.selector}"
        self.size: int = 0
        self.change_tracking_state: dict = {}
        self.fallback_reason: str | None = None
        self.nbd_uri: str | None = None
        self.dirty_bitmap: str | None = None
        # what this run created for the disk, so cleanup undoes exactly that
        self.fleece_path = names.fleece_file  # the qcow2 one under QEMU < 8.0
        self.fleece_file_created = False
        self.fleece_node_added = False
        self.access_node_added = False
        self.job_started = False
        self.job_cancelled = False      # by release_view, before the teardown
        self.export_added = False
        self.old_bitmap: str | None = None       # previous generation, if present on the node
        self.old_disabled_by_us = False
        #: the bitmap the rotating transaction disables (the trusted previous one), in the
        #: journal before it runs: a dead run's is enabled again only on that evidence
        self.disables: str | None = None
        self.new_bitmap: str | None = None
        self.bitmap_persistent = True            # False: kept in QEMU's memory only

    @property
    def broken(self) -> str | None:  # the frozen view of every disk breaks together
        return self.session.broken

    def release_view(self) -> None:
        """Everything this disk's backup reads has been read: its export and point-in-time
        view go now (see ``QemuHotBackup.release_view``)."""
        self.session._release_view(self)

    @property
    def committed(self) -> bool:
        return self._committed


class QemuHotBackup(ExportSession):
    """One hot backup session of one or more disks of a running VM, all frozen at the
    same instant (one QMP ``transaction``).  A context manager.

    ``disks``: one ``HotDisk`` per ``?node=`` of the URI, in order.  With one disk the
    session also answers for it directly (the attributes below, ``commit()``,
    ``open_source()``); valid inside the ``with`` block:
      ``nbd_uri``             nbd+unix:///EXPORT?socket=PATH — the frozen view, read-only
      ``dirty_bitmap``        name of the bitmap offered as ``qemu:dirty-bitmap:NAME`` on
                              the export (changes since the previous backup) or None
      ``size``                disk size in bytes
      ``change_tracking_state`` dict to store in this backup's snapshot metadata and pass
                              back as ``previous_state`` next time
      ``fallback_reason``     None when the dirty bitmap can be trusted, else why not
    and for the whole session ``cleaned_leftovers`` (what was cleaned from an earlier
    killed run) and ``run`` (the run id, shared by the disks' snapshots).
    """

    def __init__(self, uri: str, *, previous_state: dict | None = None, work_dir: str | os.PathLike,
                 verify_cbt: bool = False, qmp_timeout: float = 30.0,
                 previous_states: Mapping[str, dict | None] | None = None, disk_names: list[str] | None = None,
                 bitmap_owner=None):
        """``previous_states``: {disk name: change-tracking state of its latest snapshot},
        asked (``.get``) only once this session holds the VM, so a caller may read them
        then (``previous_state`` alone: the one disk's); ``disk_names``: the names the caller
        expects, in order (from ``vm_disks.query_disk_names``; one name renames one disk);
        ``bitmap_owner(name)``: which snapshot of the repository recorded dirty bitmap
        ``name`` ("VM/DISK (ID)"), or None - to say so when another name's backup moved
        this disk's bitmap on."""
        self.uri = uri
        self.qmp_path, self.selectors = parse_qemu_uri_disks(uri)
        if previous_states is None and previous_state is not None and len(self.selectors) != 1:
            raise ValueError("several disks: pass previous_states={disk name: state}")
        self._previous_states = previous_states
        self._previous_state = previous_state
        self._expected_names = list(disk_names) if disk_names is not None else None
        self.bitmap_owner = bitmap_owner
        self.work_dir = Path(work_dir).absolute()  # QEMU opens what is named in it from its own cwd
        self.verify_cbt = verify_cbt
        self.qmp_timeout = qmp_timeout
        self.names = RunNames(new_run_id(), self.work_dir)
        self.run = self.names.run
        #: one HotDisk per disk, in URI order (every disk of the VM: by name); set up
        #: by __enter__, which asks QEMU which nodes the URI's devices are
        self.disks: list[HotDisk] = []
        self.description = f"qemu:{self.qmp_path}" + ("?" + "&".join(map(str, self.selectors)) if self.selectors else "")
        self.cleaned_leftovers: list[str] = []

        self._qmp: QmpClient | None = None
        self._guard: TerminationGuard | None = None
        self._journal: dict[str, Any] = {}
        self._server_started = False
        #: set by the teardown when QEMU died under the run: what to tell the user instead
        self.qemu_gone: str | None = None
        self.snapshot_access = True  # decided from QEMU's version once connected
        self._lock: str | None = None             # the VM's session lock object, once held
        self._space_guard: fleece_guard.FleeceSpaceGuard | None = None
        self._watchdog: watchdog.Watchdog | None = None

    # -- one disk: the session answers for it --------------------------------------

    def _only(self) -> HotDisk:
        if len(self.disks) != 1:
            raise AttributeError("this session has several disks: use session.disks")
        return self.disks[0]

    node = property(lambda self: self._only().node)
    nbd_uri = property(lambda self: self._only().nbd_uri)
    dirty_bitmap = property(lambda self: self._only().dirty_bitmap)
    size = property(lambda self: self._only().size)
    change_tracking_state = property(lambda self: self._only().change_tracking_state)
    fallback_reason = property(lambda self: self._only().fallback_reason)
    previous_state = property(lambda self: self._only().previous_state)

    def commit(self) -> None:
        """One disk's backup is durable (see HotDisk.commit)."""
        self._only().commit()

    def release_view(self) -> None:
        """The one disk's reads are done (see ``_release_view``)."""
        self._release_view(self._only())

    def open_source(self):
        return self._only().open_source()

    # -- context manager -------------------------------------------------------------

    def __enter__(self) -> "QemuHotBackup":
        naming.begin_run(self.names.run)  # live for this process's other sessions until the teardown ends
        # before anything is made in the VM: it cleans up if this process dies without the teardown.
        # A stop request while it starts is raised once it is recorded, and it is told the
        # session ended (it swallowed the signal, and the orphaned watchdog took the live
        # backup for dead)
        try:
            with interrupts.held():
                self._watchdog = (watchdog.Watchdog(self.qmp_path, self.work_dir, self.names.run,
                                                    self.qmp_timeout).start() if watchdog.enabled() else None)
        except BaseException:
            if self._watchdog is not None:
                self._watchdog.done()
            naming.end_run(self.names.run)
            raise
        self._guard = TerminationGuard().__enter__()
        try:
            self._setup()
        except BaseException as exc:
            self._teardown(failed=True, exc=exc)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._teardown(failed=exc_type is not None, exc=exc)

    # -- setup -------------------------------------------------------------------

    def _setup(self) -> None:
        check_socket_path(self.names.nbd_socket)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        qmp = self._qmp = QmpClient(self.qmp_path, timeout=self.qmp_timeout).connect()
        self.snapshot_access = qmp.version_tuple >= SNAPSHOT_ACCESS_SINCE
        # one pyvbak session per VM, whatever work dir or repository the other one uses
        # its id recorded before it exists: a signal after its creation, before acquire
        # returned, left it in the VM; an absent one is released
        # without complaint
        self._lock = session_lock.lock_id(self.names.run)
        session_lock.acquire(qmp, self.names.run)

        # which bitmaps dead runs disabled themselves: their journals, before cleanup removes them
        disabled_by_runs = cleanup.bitmaps_disabled_by(
            [p for p in self.work_dir.glob(f"{PREFIX}*.json") if run_of(p.name) not in (None, self.names.run)])
        node_infos = cleanup.named_nodes(qmp)
        infos = {n["node-name"]: n for n in node_infos if n.get("node-name")}
        # generations only grow, also past the ones cleaned away now: a name is never reused
        bitmaps_before = {node: cleanup.gen_bitmaps(info) for node, info in infos.items()}
        # (a) leftovers of a killed run, before anything else
        self.cleaned_leftovers = cleanup.clean_leftovers(qmp, self.work_dir, None, None, own_run=self.names.run,
                                                         node_infos=node_infos, this_vm=str(self.qmp_path))
        if self.cleaned_leftovers:  # nodes may have gone: ask again
            infos = {n["node-name"]: n for n in cleanup.named_nodes(qmp) if n.get("node-name")}
        # devices are resolved to nodes now, with no leftover filter above a disk's node
        resolved = resolve(qmp, self.qmp_path, self.selectors, set(infos))
        try:  # (QEMU's debug command, there since 4.0: the file names are the fallback)
            graph = qmp.execute("x-debug-query-block-graph")
        except QmpError:
            graph = None
        check_guest_view(resolved, infos, self.qmp_path, graph)
        self.disks = [HotDisk(self, vd, self.names.for_disk(i), self._previous_for(vd.name))
                      for i, vd in enumerate(self._named(resolved))]
        max_gen = {d.node: max([generation_of(b) or 0 for b in bitmaps_before.get(d.node, {})], default=0)
                   for d in self.disks}
        bitmaps_before = {d.node: bitmaps_before.get(d.node, {}) for d in self.disks}
        settled = []
        for d in self.disks:
            settled += cleanup.settle_bitmaps(qmp, d.node, (d.previous_state or {}).get("bitmap"), infos.get(d.node),
                                              disabled_by_runs)
        # the evidence is used: this VM's dead journals whose every disk was settled now go
        self.cleaned_leftovers += cleanup.drop_settled_journals(self.work_dir, self.names.run, str(self.qmp_path),
                                                                {d.node for d in self.disks})
        self.cleaned_leftovers += cleanup.drop_old_journals(self.work_dir, self.names.run)
        self.cleaned_leftovers += cleanup.drop_dead_journal_temps(self.work_dir)
        fleece_image.drop_old_templates()
        if settled:  # bitmaps were merged or removed: ask again
            self.cleaned_leftovers += settled
            infos = {n["node-name"]: n for n in cleanup.named_nodes(qmp) if n.get("node-name")}
        olds: dict[str, str | None] = {}
        # each disk's backing chain as QEMU's graph holds it (the flat list above names only
        # the file each header gives)
        graph = {n["node-name"]: n for n in qmp.execute("query-named-block-nodes", flat=False) if n.get("node-name")}
        for d in self.disks:
            self._prepare_disk(d, infos[d.node], max_gen[d.node], bitmaps_before[d.node], olds,
                               _disk_chain((graph.get(d.node) or {}).get("image", {})))

        # (c) the fleecing images - only with room for the copies the guest's writes cause
        free, fs_size = fleece_guard.free_bytes(str(self.work_dir))
        if free < fleece_guard.reserve_for(fs_size):
            raise SourceError("cannot start the backup: " + fleece_guard.low_space_message(
                str(self.work_dir), free, fleece_guard.reserve_for(fs_size), self._node_list()))
        self._write_journal()
        for d in self.disks:
            self._create_fleece_file(d, infos[d.node])
            # flags are set BEFORE each creating command: if a signal lands between sending
            # it and reading the reply, cleanup still tries (and tolerates "not found")
            d.fleece_node_added = True
            fleece = {"driver": "raw", "node-name": d.names.fleece_node,
                      "file": {"driver": "file", "filename": str(d.fleece_path)}, "discard": "unmap"}
            if not self.snapshot_access:
                fleece.update(driver="qcow2", backing=d.node)
            try:
                try_create(qmp, "blockdev-add", lambda d=d: setattr(d, "fleece_node_added", False), **fleece)
            except QmpError:
                if getattr(d, "fleece_from_template", False):  # made from a template: made anew next time
                    fleece_image.forget_template(d.size, int(infos[d.node].get("image", {}).get("cluster-size") or 65536))
                raise

        # (d) one transaction for every disk: bitmap rotation + point-in-time view, so
        # the VM's disks are frozen at the same instant (crash-consistent together)
        actions: list[dict] = []
        for d in self.disks:
            if d.new_bitmap:
                actions.append({"type": "block-dirty-bitmap-add",
                                "data": {"node": d.node, "name": d.new_bitmap, "persistent": d.bitmap_persistent}})
            if olds[d.node] is not None:
                actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": d.node, "name": olds[d.node]}})
            actions.append({"type": "blockdev-backup", "data": {
                "device": d.node, "target": d.names.fleece_node, "sync": "none",
                "job-id": d.names.job, "filter-node-name": d.names.cbw_node}})
            d.job_started = True
            d.old_disabled_by_us = olds[d.node] is not None
        try:
            qmp.execute("transaction", actions=actions)
        except QmpError as e:  # a transaction is all or nothing
            for d in self.disks:
                d.job_started = d.old_disabled_by_us = False
                d.new_bitmap = None
            raise SourceError(f"QEMU could not start the point-in-time view of {self._node_list()}: "
                              f"{e.error_class}: {e.desc}") from None
        for d in self.disks:
            d.dirty_bitmap = olds[d.node]
            if self.snapshot_access:
                # the frozen view: the filter's snapshot API (copied blocks from the
                # fleecing file, the others from the disk)
                d.access_node_added = True
                try_create(qmp, "blockdev-add", lambda d=d: setattr(d, "access_node_added", False),
                           driver="snapshot-access", **{"node-name": d.names.access_node}, file=d.names.cbw_node)

        # (e) NBD server + one export per disk
        sock = self.names.nbd_socket
        self._server_started = True
        try:
            qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        except QmpError as e:
            self._server_started = False
            if "already running" in e.desc.lower():
                raise SourceError(
                    f"the VM at {self.qmp_path} already runs an NBD server (QEMU runs one NBD server per "
                    f"process; another backup tool or a migration may be using it). Wait for it to finish or "
                    f"stop it ('nbd-server-stop' on the VM's monitor) and retry"
                ) from None
            raise
        self._write_journal()
        for d in self.disks:
            view = d.names.access_node if self.snapshot_access else d.names.fleece_node
            export: dict[str, Any] = {"type": "nbd", "id": d.names.export, "node-name": view,
                                      "name": d.names.export, "writable": False}
            if d.dirty_bitmap is not None:
                # the view is not a filter of the disk: name the bitmap's node (QEMU >= 7.1)
                export["bitmaps"] = ([{"node": d.node, "name": d.dirty_bitmap}] if self.snapshot_access
                                     else [d.dirty_bitmap])
            d.export_added = True
            try_create(qmp, "block-export-add", lambda d=d: setattr(d, "export_added", False), **export)
            from pyvbak.sources.nbd import nbd_unix_uri  # (the data plane: imported late, as in session.py)

            d.nbd_uri = nbd_unix_uri(d.names.export, sock)
        # from now on guest writes are copied into the work dir: never let that fill up
        self._space_guard = fleece_guard.FleeceSpaceGuard(str(self.work_dir), self._on_low_space).start()

    def _named(self, disks: list[VmDisk]) -> list[VmDisk]:
        """The resolved disks under the names the caller expects (it asked QEMU moments ago,
        or ``--disk`` renames the one disk)."""
        expected = self._expected_names
        if expected is None:
            return disks
        if len(expected) == 1 and len(disks) == 1:
            disks[0].name = expected[0]
            return disks
        found = [d.name for d in disks]
        if found != expected:
            raise SourceError(f"the disks of the VM at {self.qmp_path} changed while the backup started "
                              f"(expected {', '.join(expected)}; found {', '.join(found) or 'none'}): run it again")
        return disks

    def _previous_for(self, name: str) -> dict | None:
        if self._previous_states is not None:
            return self._previous_states.get(name)
        return self._previous_state

    def _prepare_disk(self, d: HotDisk, info: dict, max_gen: int, bitmaps_before: dict, olds: dict,
                      chain: list[dict]) -> None:
        """(b) for one disk: size, identity, whether its previous bitmap can be trusted,
        the name of its next generation.  ``chain``: the disk's image and the images it
        reads through (``_disk_chain``)."""
        image = info.get("image", {})
        d.size = int(image.get("virtual-size", 0))
        fmt = info.get("drv", "")
        identity = {"image": image.get("filename") or info.get("file"), "format": fmt,
                    "qemu": self._qmp.qemu_version}
        if d.device is not None:
            identity["device"] = d.device
        chain = chain or [image]
        identity["backing_chain"], never_trusted = outside_data(chain, data_files_from_headers=False)
        never_trusted = _unusual_graph(chain[0]) or never_trusted
        bitmaps = cleanup.gen_bitmaps(info)
        reason, old = _check_cbt(d, fmt, bitmaps, identity, bitmaps_before, never_trusted, self.bitmap_owner)
        prev_bitmap = (d.previous_state or {}).get("bitmap")
        d.old_bitmap = prev_bitmap if prev_bitmap in bitmaps and not bitmaps[prev_bitmap].get("busy") else None
        gens = [max_gen, *(generation_of(b) or 0 for b in bitmaps),
                int((d.previous_state or {}).get("generation") or 0)]
        generation = max(gens) + 1
        d.new_bitmap = bitmap_name(generation)
        d.bitmap_persistent = fmt in _BITMAP_FORMATS
        d.fallback_reason = reason
        if self.verify_cbt and reason is None:
            d.fallback_reason = "verify-cbt requested: the whole disk is scanned and compared with the dirty bitmap"
        olds[d.node] = d.disables = old
        d.change_tracking_state = {
            "kind": STATE_KIND,
            "bitmap": d.new_bitmap,
            "generation": generation,
            "persistent": d.bitmap_persistent,
            "node": d.node,
            "size": d.size,
            **identity,
        }

    def _node_list(self) -> str:
        return ", ".join(f"'{d.node}'" for d in self.disks)

    def _create_fleece_file(self, d: HotDisk, info: dict) -> None:
        """The file the guest's overwritten blocks are copied to while the view is open:
        a sparse raw file (snapshot-access), or a qcow2 whose backing is the disk."""
        if self.snapshot_access:
            path = d.fleece_path = d.names.fleece_file
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise SourceError(f"cannot create the fleecing file {path}: {e.strerror}") from None
            d.fleece_file_created = True
            try:
                os.ftruncate(fd, d.size)
            except OSError as e:
                raise SourceError(f"cannot size the fleecing file {path}: {e.strerror}") from None
            finally:
                os.close(fd)
            return
        cluster = int(info.get("image", {}).get("cluster-size") or 65536)
        path = d.fleece_path = d.names.fleece_qcow2
        d.fleece_file_created = True  # before: a signal while it is written may leave it (removing tolerates none)
        d.fleece_from_template = fleece_image.create(path, d.size, cluster)

    def _write_journal(self) -> None:
        """What this run creates, for a person looking at the work dir (leftover cleanup
        finds a run's resources by their names, which carry the run id, not by the
        journal), and who runs it:
        ``owner`` (``processes.identity()``) lets a later run tell a live session of
        another container or machine, or a pid reused since, from a dead one when the
        VM holds no session lock of this run."""
        self._journal = {
            "run": self.names.run, "pid": os.getpid(), "owner": identity(), "qmp": self.qmp_path,
            "nbd_socket": str(self.names.nbd_socket), "server_started": self._server_started,
            "disks": [{"node": d.node, "fleece_file": str(d.fleece_path), "new_bitmap": d.new_bitmap,
                       "old_bitmap": d.old_bitmap, "disables": d.disables} for d in self.disks],
        }
        tmp = naming.journal_temp(self.names.journal)
        tmp.write_text(json.dumps(self._journal))
        os.replace(tmp, self.names.journal)

    # -- teardown ----------------------------------------------------------------

    def _teardown(self, *, failed: bool, exc: BaseException | None) -> None:
        guard = self._guard
        errors: list[str] = []
        try:
            with (guard.deferred() if guard else nullcontext()):
                self._cleanup(failed, errors)
        finally:
            if guard:
                guard.__exit__(None, None, None)
            if self._qmp is not None:
                self._qmp.close()
            naming.end_run(self.names.run)
            if self._watchdog is not None:
                self._watchdog.done()
        pending = guard.pending if guard else None
        if self.qemu_gone and exc is not None and not isinstance(exc, KeyboardInterrupt):
            # (the disks committed before QEMU went are kept: the caller names them, and
            # this line must not say there is no snapshot - session 26's audit)
            unmade = [d.name for d in self.disks if not d.committed]
            what = ("no snapshot was made" if len(unmade) == len(self.disks) or not self.disks
                    else f"no snapshot of {', '.join(unmade)} was made")
            err = SourceError(f"{self.qemu_gone}: {what}"
                              + (f"; left in the work dir: {'; '.join(errors)}" if errors else "; nothing of this "
                                 "run is left in QEMU or the work dir (the next backup checks the VM's dirty bitmaps)"))
            err.exit_code = getattr(exc, "exit_code", SourceError.exit_code)
            raise err from exc
        if errors and isinstance(exc, (PyvbakError, Interrupted, KeyboardInterrupt)):
            # The user must hear that QEMU still holds something of pyvbak's, not only
            # why the backup failed: one message for both, the failure's exit code.
            what = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
            err = SourceError(f"{what}; cleanup after it was incomplete: " + "; ".join(errors)
                              + " (QEMU still holds pyvbak resources: the next pyvbak run on this VM removes them)")
            err.exit_code = getattr(exc, "exit_code", Interrupted.exit_code)
            raise err from exc
        if errors and exc is not None:  # a bug: its traceback shows the note
            exc.add_note("pyvbak cleanup was incomplete: " + "; ".join(errors))
        if errors and exc is None:
            raise SourceError(
                "cleanup after the backup was incomplete: " + "; ".join(errors)
                + " (the next pyvbak run on this VM removes what is left)"
            )
        if pending is not None and exc is None:
            guard.raise_pending()

    def _on_low_space(self, free: int, reserve: int) -> None:
        """Guard thread: break the backup, not the guest (see fleece_guard)."""
        # broken first: a read that completes from now on may see post-cancel data
        self.broken = "stopped the backup: " + fleece_guard.low_space_message(
            str(self.work_dir), free, reserve, self._node_list())
        for d in self.disks:
            if d.job_started:
                cleanup.cancel_job(self._qmp, d.names.job)

    def _release_view(self, d: HotDisk) -> None:
        """Remove ``d``'s export, snapshot-access node, copy-before-write job and fleecing
        node as soon as the engine has read what it needs, instead of at the session's
        end: from then on the guest's writes to this disk no longer pay a copy into the
        fleecing file while the backup makes its packs durable and commits (and the
        removal overlaps those writes instead of following them).  The bitmaps are not
        touched: they are settled at the end, once the snapshot is committed (or not).
        Never raises for a failed step: its flag stays set, so the teardown tries again
        and reports it.  A signal during the steps is taken after them."""
        qmp = self._qmp
        if qmp is None or qmp._sock is None:
            return
        guard = self._guard
        ended = None
        if d.job_started and not d.job_cancelled and not self.snapshot_access:
            # The qcow2 view reads every block the filter has not copied from the live
            # disk, through its backing: once the job is gone (cancelled by someone, or
            # ended by QEMU), such reads return what the guest wrote since.
            # (A snapshot-access view fails its reads instead.)  Asked after the last read.
            ended = _job_ended(qmp, d.names.job)
        with (guard.deferred() if guard else nullcontext()):
            try:  # in this order: a node still in use by the one before cannot go
                if d.export_added:
                    cleanup.remove_export(qmp, d.names.export)
                    d.export_added = False
                if d.access_node_added:
                    cleanup.remove_node(qmp, d.names.access_node)
                    d.access_node_added = False
                if d.job_started and not d.job_cancelled:
                    cleanup.cancel_job(qmp, d.names.job)
                    d.job_cancelled = True  # job_started stays: the bitmaps are settled at the end
                if d.fleece_node_added:
                    cleanup.remove_node(qmp, d.names.fleece_node)
                    d.fleece_node_added = False
                if self._server_started and not any(x.export_added for x in self.disks):
                    # the last export is gone: the server too, off the teardown's path
                    cleanup.stop_nbd_server(qmp)
                    self._server_started = False
            except Exception:  # noqa: BLE001 - the teardown tries the rest again and reports it
                pass
        if guard is not None:
            guard.raise_pending()
        if ended is not None:
            if self.broken is None and ended.startswith("could not"):
                self.broken = (f"the point-in-time view of disk '{d.node}' could not be confirmed whole after the "
                               f"backup read it (QEMU {ended}): unconfirmed, no snapshot was made; retry the backup")
            elif self.broken is None:  # (else the space guard ended it, and said why: its message stands)
                self.broken = (f"the point-in-time view of disk '{d.node}' ended before the backup had read it "
                               f"(QEMU {ended}): what was read may hold the guest's later writes, so no snapshot "
                               f"was made; retry the backup")
            raise SourceError(self.broken)

    def _cleanup(self, failed: bool, errors: list[str]) -> None:
        qmp = self._qmp
        if self._space_guard is not None:
            self._space_guard.stop()
            if self._space_guard.error is not None:
                errors.append(f"work-dir space guard: {self._space_guard.error}")

        def step(what: str, fn, *args) -> bool:
            if qmp is not None and qmp._sock is None and qmp._broken:
                return False  # the connection broke in an earlier step: said once, below
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - each step is attempted regardless
                if not (qmp is not None and qmp._sock is None and qmp._broken):
                    errors.append(f"{what}: {e}")
                return False
            return True

        # a fleecing file is only removed once its node is gone (QEMU may still write to it)
        fleece_in_use = {id(d) for d in self.disks if d.fleece_node_added}

        if qmp is not None and qmp._sock is not None:
            # each flag cleared once its step succeeded: what stays set is what QEMU still
            # holds (the session lock is kept as evidence for the next run if anything is)
            for d in self.disks:
                if d.export_added and step(f"removing export {d.names.export}", cleanup.remove_export, qmp,
                                           d.names.export):
                    d.export_added = False
            if self._server_started and step("stopping the NBD server", cleanup.stop_nbd_server, qmp):
                self._server_started = False
            for d in self.disks:
                if d.access_node_added and step(f"removing node {d.names.access_node}", cleanup.remove_node, qmp,
                                                d.names.access_node):
                    d.access_node_added = False
                if d.job_started and not d.job_cancelled and step(f"cancelling job {d.names.job}", cleanup.cancel_job,
                                                                  qmp, d.names.job):
                    d.job_cancelled = True
                if d.fleece_node_added and step(f"removing node {d.names.fleece_node}", cleanup.remove_node,
                                                qmp, d.names.fleece_node):
                    fleece_in_use.discard(id(d))
                    d.fleece_node_added = False
            for d in self.disks:
                if d.job_started:
                    # a disk whose snapshot is durable retires its old generation even if a
                    # later disk of the run failed
                    step(f"settling dirty bitmaps of '{d.node}'", _settle_bitmaps, qmp, d, not d.committed)
        holds = any(d.export_added or (d.job_started and not d.job_cancelled) or d.fleece_node_added
                    or d.access_node_added for d in self.disks)
        if qmp is not None and qmp._sock is None and qmp._broken:  # it broke under this run
            gone = _qemu_gone(self.qmp_path)
            if gone:
                # A dead QEMU holds nothing any more: its fleecing files can go now, and
                # the failure is said as what it is (it was a wall of QMP errors).
                self.qemu_gone = f"QEMU at {self.qmp_path} went away during the backup ({gone})"
                fleece_in_use.clear()
            elif holds:
                errors.append(f"QMP connection to {self.qmp_path} lost ({qmp._broken})")
        elif (qmp is None or qmp._sock is None) and holds:
            errors.append(f"QMP connection to {self.qmp_path} lost")
        paths = [d.fleece_path for d in self.disks if d.fleece_file_created and id(d) not in fleece_in_use]
        paths.append(self.names.nbd_socket)
        remove_files(paths, errors)
        if not errors:
            remove_files((self.names.journal, naming.journal_temp(self.names.journal)), errors)
        # Last, after the files too: another session may start once the lock is gone, and
        # one that found our files while we still run would refuse ("session active").
        # Kept when something of this run is left in QEMU: the lock is the evidence that
        # lets the next run (from any work dir) take those leftovers for pyvbak's and
        # remove them; without it they would be a stranger's, left for good.
        if self._lock is not None and qmp is not None and qmp._sock is not None and not (holds or self._server_started):
            step("releasing the session lock", session_lock.release, qmp, self._lock)
        elif self._lock is not None:
            session_lock.abandon(self.names.run)


def _job_ended(qmp: QmpClient, job_id: str) -> str | None:
    """How the copy-before-write job ``job_id`` ended (or that QEMU could not say), or None
    while it runs."""
    try:
        jobs = qmp.execute("query-jobs")
    except Exception as e:  # noqa: BLE001
        # not known to run is not running: a QEMU that did not answer here let a snapshot
        # holding the guest's later writes be committed
        return f"could not be asked whether its copy-before-write job {job_id} still runs ({e})"
    for j in jobs:
        if j.get("id") == job_id:
            if j.get("status") in ("created", "running", "paused", "ready", "standby"):
                return None
            why = f": {j['error']}" if j.get("error") else ""
            return f"ended its copy-before-write job {job_id}, now '{j.get('status')}'{why}"
    return f"no longer has its copy-before-write job {job_id}"


def _qemu_gone(qmp_path) -> str | None:
    """Why the QEMU behind ``qmp_path`` is no longer running (its socket is gone, or
    refuses connections), or None when something still listens there."""
    if not os.path.exists(qmp_path):
        return "its QMP socket is gone"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(qmp_path))
    except (ConnectionRefusedError, FileNotFoundError):
        return "its QMP socket refuses connections"
    except OSError:
        return None
    finally:
        probe.close()
    return None


def _disk_chain(image: dict) -> list[dict]:
    """The disk's own image and the images it reads through, nearest first, as QEMU's block
    graph holds them: the non-flat ``query-named-block-nodes`` nests each backing child's
    image info (``backing-image``: the file QEMU reads, its format and its extents or data
    file).  Not the names the images' headers give: libvirt's -blockdev attaches a backing
    node by name, whatever the header says, and a ``blockdev-snapshot`` overlay may name
    none - followed by header names, a write into the file QEMU really read went unseen
    (a silently wrong incremental).  Filter nodes are skipped, above the disk's image too
    (libvirt's copy-on-read or throttle node): QEMU nests a filter's child as its
    ``backing-image`` (the disk's own image was taken for a backing file, and its data
    file then went unchecked).  [] without nested
    information."""
    while isinstance(image, dict) and image.get("format") in FILTER_DRIVERS:
        image = image.get("backing-image")
    out: list[dict] = []
    while isinstance(image, dict) and len(out) < 256:  # (a graph has no loops; bounded anyway)
        if image.get("format") not in FILTER_DRIVERS:
            out.append(image)
        image = image.get("backing-image")
    return out


def _unusual_graph(image: dict) -> str | None:
    """Why the disk's image (``_disk_chain``'s first) may read other nodes than its image
    file and its backing chain, or None.  QEMU names a node whose children it cannot put
    in a plain file name ``json:{...}``: a format node whose ``file`` is itself a format
    node (a raw node over a qcow2's), a quorum's ``children``, a data file attached by
    node - none of which the backing chain shows, so a write under them went unseen
    (a silently wrong incremental).  Options without children (``encrypt.key-secret``) are fine."""
    name = image.get("filename") or ""
    if name.startswith(("blkdebug:", "blkverify:")):  # QEMU's debug drivers: plain names over other nodes
        return (f"the disk's node reads through QEMU's debug driver {name.split(':', 1)[0]}, which pyvbak "
                f"cannot see through")
    if not name.startswith("json:"):
        return None
    try:
        spec = json.loads(name[5:])
    except ValueError:
        spec = None
    if not isinstance(spec, dict):
        return f"QEMU describes the disk's node as {name[:120]}, which pyvbak cannot read"

    def is_node(v) -> bool:
        return isinstance(v, dict) and "driver" in v

    def has_children(node: dict) -> bool:
        return any(is_node(v) or isinstance(v, list) for v in node.values())

    file = spec.get("file")
    others = [k for k, v in spec.items() if k not in ("file", "backing") and (is_node(v) or isinstance(v, list))]
    if others or (is_node(file) and has_children(file)):
        return (f"the disk's node reads through other nodes than its image file and backing files "
                f"({', '.join(others) or 'its file is a ' + str(file.get('driver')) + ' node'}), so changes "
                f"under them cannot be ruled out")
    return None


def _check_cbt(d: HotDisk, fmt: str, bitmaps: dict[str, dict], identity: dict,
               bitmaps_before: dict[str, dict] | None = None,
               never_trusted: str | None = None, bitmap_owner=None) -> tuple[str | None, str | None]:
    """(fallback reason or None, bitmap to export or None) for one disk.
    ``bitmaps_before``: the node's generations before leftover cleanup (which removes
    stale ones); ``never_trusted``: why no bitmap of this disk can be (session.outside_data);
    ``bitmap_owner``: QemuHotBackup's."""
    prev, node = d.previous_state, d.node
    if not prev:
        return "no dirty bitmap of an earlier backup of this disk (its first backup through QEMU)", None
    name = prev.get("bitmap")
    if prev.get("kind") not in (None, STATE_KIND) or not name:
        return "the previous backup recorded no QEMU dirty bitmap", None
    if d.device is not None and prev.get("device"):
        # a device's node may have a generated name (#block123) that differs after a
        # restart; the bitmap lives in the image, which is checked next
        # (by the device's id: ``vda`` and its QOM path ``/machine/peripheral/vda/...``
        # name one device, and one disk name; each switch of spelling read the disk whole)
        if (device_id(prev["device"]) or prev["device"]) != (device_id(d.device) or d.device):
            return f"the previous backup was of device '{prev['device']}', not '{d.device}'", None
    elif prev.get("node") != node:
        return f"the previous backup was of node '{prev.get('node')}', not '{node}'", None
    if prev.get("image") and identity["image"] and prev["image"] != identity["image"]:
        return f"the node now holds image {identity['image']}, the previous backup read {prev['image']}", None
    if prev.get("format") and prev["format"] != fmt:
        return f"the disk's format changed from '{prev['format']}' to '{fmt}' since the previous backup", None
    if never_trusted:
        return never_trusted, None
    image = identity["image"]
    shown = image if image and not image.startswith("json:") else f"node '{node}'"  # (json: a graph built by hand)
    changed = backing_chain_changed(prev, identity.get("backing_chain"), shown)
    if changed:  # a backing file written while the VM was off: the overlay's bitmap did not see it
        return changed, None
    persistent = fmt in _BITMAP_FORMATS
    b = bitmaps.get(name)
    if b is None:
        newer = sorted(n for n in (bitmaps_before or bitmaps) if (generation_of(n) or 0) > (generation_of(name) or 0))
        if newer:  # a later backup rotated it away, and its snapshot is not the parent now
            owners = [o for o in map(bitmap_owner, newer) if o] if bitmap_owner is not None else []
            if owners:  # (else "not in this repository" would be said of a backup that is)
                return (f"dirty bitmap {name} of the previous snapshot was replaced by {', '.join(newer)} of the "
                        f"backup of {owners[-1]} in this repository: this disk is backed up under two names, and "
                        f"each moves its one bitmap on; back it up under one name (the same --vm and --disk, or always "
                        f"the whole VM) to keep change tracking"), None
            return (f"dirty bitmap {name} of the previous snapshot was replaced by {', '.join(newer)} of a "
                    f"newer backup that is not in this repository (forgotten, or made into another repository)"), None
        if not persistent:
            return (f"dirty bitmap {name} of node '{node}' is gone: a '{fmt}' disk's bitmap lives in QEMU's "
                    f"memory, so the VM's QEMU was restarted (or the bitmap deleted) since the previous backup "
                    f"(only qcow2 keeps bitmaps across restarts)"), None
        return (f"dirty bitmap {name} is gone from node '{node}' (deleted by someone else, or the "
                f"VM restarted from an image without it)"), None
    if b.get("inconsistent"):
        return f"dirty bitmap {name} is marked inconsistent (QEMU stopped without saving it)", None
    if b.get("busy"):
        return f"dirty bitmap {name} is in use by another operation", None
    if not b.get("recording"):
        return f"dirty bitmap {name} is disabled, so it missed writes", None
    if persistent and not b.get("persistent"):
        return f"dirty bitmap {name} is not persistent", None
    if generation_of(name) is None or prev.get("generation") != generation_of(name):
        return f"bitmap generation mismatch: previous backup recorded {prev.get('generation')}, bitmap is {name}", None
    newer = [n for n in bitmaps if (generation_of(n) or 0) > generation_of(name)]
    if newer:
        return f"a newer bitmap generation ({', '.join(newer)}) exists than the previous backup's {name}", None
    if int(prev.get("size", -1)) != d.size:
        return f"disk resized from {prev.get('size')} to {d.size} bytes since the previous backup", None
    return None, name


def _settle_bitmaps(qmp: QmpClient, d: HotDisk, failed: bool) -> None:
    """Decide from the bitmaps QEMU actually has (not from what we believe we did: a
    signal may have cut a command's reply short)."""
    node = d.node
    if not failed:
        # The new generation now tracks changes since this backup's instant; the old one
        # retires.  No need to ask first: the rotating transaction's reply was read (else
        # the backup failed), so the new one exists, and an old one gone already is fine.
        # (Without its new generation the next backup falls back to a full scan either way.)
        if d.old_bitmap is not None and d.new_bitmap is not None:
            ok, err = qmp.try_execute("block-dirty-bitmap-remove", node=node, name=d.old_bitmap)
            if not ok and "not found" not in err.desc.lower():
                raise err
        return
    info = cleanup.node_info(qmp, node) or {}
    present = cleanup.gen_bitmaps(info)
    old = d.old_bitmap if d.old_bitmap in present else None
    new = d.new_bitmap if d.new_bitmap in present else None
    actions: list[dict] = []
    if old is not None and d.old_disabled_by_us:
        if new is not None:
            actions.append({"type": "block-dirty-bitmap-merge",
                            "data": {"node": node, "target": old, "bitmaps": [new]}})
        if not present[old].get("recording"):
            actions.append({"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": old}})
    if new is not None:
        actions.append({"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": new}})
    if actions:
        qmp.execute("transaction", actions=actions)


def try_create(qmp: QmpClient, command: str, undo_flag, **args) -> None:
    """Run a creating command; on a QEMU error (nothing was created) clear its flag."""
    try:
        qmp.execute(command, **args)
    except QmpError:
        undo_flag()
        raise



__all__ = ["HotDisk", "QemuHotBackup", "parse_qemu_uri", "parse_qemu_uri_disks", "GEN_PREFIX", "MAX_DISKS"]

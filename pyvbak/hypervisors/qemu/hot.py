"""Hot backup of a running QEMU VM's disk: image fleecing + persistent dirty bitmaps.

See docs/QEMU.md for the full sequence.  In short, ``QemuHotBackup.__enter__``:

1. connects to QMP, cleans what a killed earlier run left (``cleanup.clean_leftovers``);
2. checks whether the dirty bitmap recorded by the previous backup can be trusted;
3. creates a temporary qcow2 (the fleecing image) whose backing is the live node;
4. in ONE ``transaction``: adds the next persistent bitmap ``pyvbak-gen-<N+1>``,
   disables ``pyvbak-gen-<N>`` and starts ``blockdev-backup sync=none`` live → fleecing,
   which inserts a copy-before-write filter: from that instant a guest write first copies
   the old data into the fleecing image, so the fleecing node reads as the disk at that
   instant, and the new bitmap records exactly the writes after it;
5. starts QEMU's NBD server on a unix socket in the work dir and exports the fleecing
   node read-only, offering ``qemu:dirty-bitmap:pyvbak-gen-<N>``.

``__exit__`` undoes 5..3 in reverse order and settles the bitmaps: after ``commit()``
the old generation is deleted; otherwise the new one is merged back into the old one.
"""

from __future__ import annotations

from contextlib import nullcontext

import json
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pyvbak.errors import Interrupted, SourceError, UsageError

from .session import ExportSession
from ..resources import TerminationGuard
from . import cleanup
from . import fleece_guard, session_lock
from .naming import GEN_PREFIX, RunNames, bitmap_name, check_socket_path, generation_of, new_run_id
from .qmp import QmpClient, QmpError

STATE_KIND = "qemu-dirty-bitmap"
_BITMAP_FORMATS = {"qcow2"}  # formats that can store persistent dirty bitmaps


def parse_qemu_uri(uri: str) -> tuple[str, str]:
    """``qemu:///PATH/TO/QMP.SOCK?node=NODE`` → (socket path, node name)."""
    parts = urlsplit(uri)
    if parts.scheme != "qemu":
        raise UsageError(f"not a qemu URI: {uri!r} (expected qemu:///PATH/TO/QMP.SOCK?node=NODE)")
    if parts.netloc:
        raise UsageError(
            f"qemu URI {uri!r} names a host ({parts.netloc!r}); only local QMP sockets are supported: "
            f"qemu:///PATH/TO/QMP.SOCK?node=NODE (three slashes)"
        )
    if not parts.path or parts.path == "/":
        raise UsageError(f"qemu URI {uri!r} has no QMP socket path: qemu:///PATH/TO/QMP.SOCK?node=NODE")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"node"}
    if unknown:
        raise UsageError(f"qemu URI {uri!r}: unknown parameter(s) {', '.join(sorted(unknown))}; only 'node' is accepted")
    nodes = query.get("node") or [""]
    if len(nodes) != 1 or not nodes[0]:
        raise UsageError(
            f"qemu URI {uri!r} needs exactly one ?node=NODE: the block node name of the disk "
            f"(see 'query-named-block-nodes', e.g. libvirt's libvirt-1-format)"
        )
    return parts.path, nodes[0]


class QemuHotBackup(ExportSession):
    """One hot backup session of one disk of a running VM.  A context manager.

    Attributes valid inside the ``with`` block:
      ``nbd_uri``             nbd+unix:///EXPORT?socket=PATH — the frozen view, read-only
      ``dirty_bitmap``        name of the bitmap offered as ``qemu:dirty-bitmap:NAME`` on
                              the export (changes since the previous backup) or None
      ``size``                disk size in bytes
      ``change_tracking_state`` dict to store in this backup's snapshot metadata and pass
                              back as ``previous_state`` next time
      ``fallback_reason``     None when the dirty bitmap can be trusted, else why not
      ``cleaned_leftovers``   what was cleaned from an earlier killed run

    The engine calls ``commit()`` once the snapshot metadata is durable; only then does
    the old bitmap generation get deleted.
    """

    def __init__(self, uri: str, *, previous_state: dict | None, work_dir: str | os.PathLike,
                 verify_cbt: bool = False, qmp_timeout: float = 30.0):
        self.uri = uri
        self.qmp_path, self.node = parse_qemu_uri(uri)
        self.previous_state = dict(previous_state) if previous_state else None
        self.work_dir = Path(work_dir)
        self.verify_cbt = verify_cbt
        self.qmp_timeout = qmp_timeout
        self.names = RunNames(new_run_id(), self.work_dir)

        self.nbd_uri: str | None = None
        self.dirty_bitmap: str | None = None
        self.size: int = 0
        self.change_tracking_state: dict = {}
        self.fallback_reason: str | None = None
        self.cleaned_leftovers: list[str] = []
        self.description = f"qemu:{self.qmp_path}?node={self.node}"

        self._qmp: QmpClient | None = None
        self._guard: TerminationGuard | None = None
        self._committed = False
        # what this run created, so cleanup undoes exactly that
        self._journal: dict[str, Any] = {}
        self._fleece_file_created = False
        self._fleece_node_added = False
        self._job_started = False
        self._server_started = False
        self._export_added = False
        self._old_bitmap: str | None = None       # previous generation, if present on the node
        self._old_disabled_by_us = False
        self._new_bitmap: str | None = None
        self._lock: str | None = None             # the VM's session lock object, once held
        self._space_guard: fleece_guard.FleeceSpaceGuard | None = None

    # -- public API --------------------------------------------------------------



    def __enter__(self) -> "QemuHotBackup":
        self._guard = TerminationGuard().__enter__()
        try:
            self._setup()
        except BaseException as exc:
            self._teardown(failed=True, exc=exc)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._teardown(failed=exc_type is not None or not self._committed, exc=exc)

    # -- setup -------------------------------------------------------------------

    def _setup(self) -> None:
        check_socket_path(self.names.nbd_socket)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        qmp = self._qmp = QmpClient(self.qmp_path, timeout=self.qmp_timeout).connect()
        # one pyvbak session per VM, whatever work dir or repository the other one uses
        self._lock = session_lock.acquire(qmp, self.names.run)
        prev_bitmap = (self.previous_state or {}).get("bitmap")

        info = cleanup.node_info(qmp, self.node)
        if info is None:
            self.cleaned_leftovers = cleanup.clean_leftovers(qmp, self.work_dir, None, None, own_run=self.names.run)
            known = sorted(n["node-name"] for n in cleanup.named_nodes(qmp)
                           if n.get("node-name") and not n["node-name"].startswith(("#", "pyvbak-")))
            raise SourceError(
                f"VM at {self.qmp_path} has no block node named '{self.node}'; "
                f"named nodes: {', '.join(known) or 'none'} (fix ?node= in the qemu:// URI)"
            )
        # generations only grow, also past the ones cleaned away now: a name is never reused
        bitmaps_before = cleanup.gen_bitmaps(info)
        max_gen = max([generation_of(b) or 0 for b in bitmaps_before], default=0)
        # (a) leftovers of a killed run, before anything else
        self.cleaned_leftovers = cleanup.clean_leftovers(qmp, self.work_dir, self.node, prev_bitmap,
                                                         own_run=self.names.run)
        info = cleanup.node_info(qmp, self.node) or info
        image = info.get("image", {})
        self.size = int(image.get("virtual-size", 0))
        fmt = info.get("drv", "")
        identity = {"image": image.get("filename") or info.get("file"), "format": fmt,
                    "qemu": qmp.qemu_version}
        bitmaps = cleanup.gen_bitmaps(info)

        # (b) can the previous bitmap be trusted?
        reason, old = self._check_cbt(fmt, bitmaps, identity, bitmaps_before)
        self._old_bitmap = prev_bitmap if prev_bitmap in bitmaps and not bitmaps[prev_bitmap].get("busy") else None
        if fmt in _BITMAP_FORMATS:
            gens = [max_gen, *(generation_of(b) or 0 for b in bitmaps),
                    int((self.previous_state or {}).get("generation") or 0)]
            generation = max(gens) + 1
            self._new_bitmap = bitmap_name(generation)
        else:
            generation = None
        self.fallback_reason = reason
        if self.verify_cbt and reason is None:
            self.fallback_reason = "verify-cbt requested: the whole disk is scanned and compared with the dirty bitmap"

        # (c) the fleecing image - only with room for the copies the guest's writes cause
        free, fs_size = fleece_guard.free_bytes(str(self.work_dir))
        if free < fleece_guard.reserve_for(fs_size):
            raise SourceError("cannot start the backup: " + fleece_guard.low_space_message(
                str(self.work_dir), free, fleece_guard.reserve_for(fs_size), self.node))
        self._write_journal()
        self._create_fleece_file(info)
        # flags are set BEFORE each creating command: if a signal lands between sending it
        # and reading the reply, cleanup still tries (and tolerates "not found")
        self._fleece_node_added = True
        try_create(qmp, "blockdev-add", lambda: setattr(self, "_fleece_node_added", False), **{
            "driver": "qcow2",
            "node-name": self.names.fleece_node,
            "file": {"driver": "file", "filename": str(self.names.fleece_file)},
            "backing": self.node,
            "discard": "unmap",
        })

        # (d) one transaction: bitmap rotation + point-in-time view
        actions: list[dict] = []
        if self._new_bitmap:
            actions.append({"type": "block-dirty-bitmap-add",
                            "data": {"node": self.node, "name": self._new_bitmap, "persistent": True}})
        if old is not None:
            actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": self.node, "name": old}})
        actions.append({"type": "blockdev-backup", "data": {
            "device": self.node, "target": self.names.fleece_node, "sync": "none",
            "job-id": self.names.job, "filter-node-name": self.names.cbw_node}})
        self._job_started = True
        self._old_disabled_by_us = old is not None
        try:
            qmp.execute("transaction", actions=actions)
        except QmpError as e:  # a transaction is all or nothing
            self._job_started = self._old_disabled_by_us = False
            self._new_bitmap = None
            raise SourceError(f"QEMU could not start the point-in-time view of '{self.node}': {e.error_class}: {e.desc}") from None
        self.dirty_bitmap = old

        # (e) NBD server + export
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
        export: dict[str, Any] = {"type": "nbd", "id": self.names.export, "node-name": self.names.fleece_node,
                                  "name": self.names.export, "writable": False}
        if old is not None:
            export["bitmaps"] = [old]
        self._export_added = True
        try_create(qmp, "block-export-add", lambda: setattr(self, "_export_added", False), **export)
        self.nbd_uri = f"nbd+unix:///{self.names.export}?socket={sock}"
        # from now on guest writes are copied into the work dir: never let that fill up
        self._space_guard = fleece_guard.FleeceSpaceGuard(str(self.work_dir), self._on_low_space).start()

        self.change_tracking_state = {
            "kind": STATE_KIND,
            "bitmap": self._new_bitmap,
            "generation": generation,
            "node": self.node,
            "size": self.size,
            **identity,
        }

    def _check_cbt(self, fmt: str, bitmaps: dict[str, dict], identity: dict,
                   bitmaps_before: dict[str, dict] | None = None) -> tuple[str | None, str | None]:
        """(fallback reason or None, bitmap to export or None).  ``bitmaps_before``: the
        node's generations before leftover cleanup (which removes stale ones)."""
        prev = self.previous_state
        if fmt not in _BITMAP_FORMATS:
            return (f"node '{self.node}' has format '{fmt}', which cannot store persistent dirty bitmaps "
                    f"(qcow2 can)"), None
        if not prev:
            return "no previous backup", None
        name = prev.get("bitmap")
        if prev.get("kind") not in (None, STATE_KIND) or not name:
            return "the previous backup recorded no QEMU dirty bitmap", None
        if prev.get("node") != self.node:
            return f"the previous backup was of node '{prev.get('node')}', not '{self.node}'", None
        if prev.get("image") and identity["image"] and prev["image"] != identity["image"]:
            return f"the node now holds image {identity['image']}, the previous backup read {prev['image']}", None
        b = bitmaps.get(name)
        if b is None:
            newer = sorted(n for n in (bitmaps_before or bitmaps) if (generation_of(n) or 0) > (generation_of(name) or 0))
            if newer:  # a later backup rotated it away, and its snapshot is not the parent now
                return (f"dirty bitmap {name} of the previous snapshot was replaced by {', '.join(newer)} of a "
                        f"newer backup that is not in this repository (forgotten, or made into another repository)"), None
            return (f"dirty bitmap {name} is gone from node '{self.node}' (deleted by someone else, or the "
                    f"VM restarted from an image without it)"), None
        if b.get("inconsistent"):
            return f"dirty bitmap {name} is marked inconsistent (QEMU stopped without saving it)", None
        if b.get("busy"):
            return f"dirty bitmap {name} is in use by another operation", None
        if not b.get("recording"):
            return f"dirty bitmap {name} is disabled, so it missed writes", None
        if not b.get("persistent"):
            return f"dirty bitmap {name} is not persistent", None
        if generation_of(name) is None or prev.get("generation") != generation_of(name):
            return f"bitmap generation mismatch: previous backup recorded {prev.get('generation')}, bitmap is {name}", None
        newer = [n for n in bitmaps if (generation_of(n) or 0) > generation_of(name)]
        if newer:
            return f"a newer bitmap generation ({', '.join(newer)}) exists than the previous backup's {name}", None
        if int(prev.get("size", -1)) != self.size:
            return f"disk resized from {prev.get('size')} to {self.size} bytes since the previous backup", None
        return None, name

    def _create_fleece_file(self, info: dict) -> None:
        cluster = int(info.get("image", {}).get("cluster-size") or 65536)
        path = self.names.fleece_file
        try:
            r = subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(path), str(self.size)],
                capture_output=True, text=True, timeout=60,
            )
        except FileNotFoundError:
            raise SourceError("qemu-img not found: install the Debian package 'qemu-utils'") from None
        except subprocess.TimeoutExpired:
            raise SourceError(f"qemu-img create {path} timed out") from None
        self._fleece_file_created = True
        if r.returncode != 0:
            raise SourceError(f"cannot create the fleecing image {path}: {r.stderr.strip()}")

    def _write_journal(self) -> None:
        self._journal = {
            "run": self.names.run, "pid": os.getpid(), "qmp": self.qmp_path, "node": self.node,
            "nbd_socket": str(self.names.nbd_socket), "server_started": self._server_started,
            "fleece_file": str(self.names.fleece_file), "new_bitmap": self._new_bitmap,
            "old_bitmap": self._old_bitmap,
        }
        tmp = self.names.journal.with_suffix(".tmp")
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
        pending = guard.pending if guard else None
        if errors and exc is not None:
            exc.add_note("pyvbak cleanup was incomplete: " + "; ".join(errors))
        if errors and exc is None:
            raise SourceError(
                "cleanup after the backup was incomplete: " + "; ".join(errors)
                + " (the next pyvbak run on this VM removes what is left)"
            )
        if pending is not None and exc is None:
            raise Interrupted("interrupted by a signal during cleanup; cleanup was completed first")

    def _on_low_space(self, free: int, reserve: int) -> None:
        """Guard thread: break the backup, not the guest (see fleece_guard)."""
        # broken first: a read that completes from now on may see post-cancel data
        self.broken = "stopped the backup: " + fleece_guard.low_space_message(str(self.work_dir), free, reserve, self.node)
        cleanup.cancel_job(self._qmp, self.names.job)

    def _cleanup(self, failed: bool, errors: list[str]) -> None:
        qmp = self._qmp
        n = self.names
        if self._space_guard is not None:
            self._space_guard.stop()
            if self._space_guard.error is not None:
                errors.append(f"work-dir space guard: {self._space_guard.error}")

        def step(what: str, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - each step is attempted regardless
                errors.append(f"{what}: {e}")

        if qmp is not None and qmp._sock is not None:
            if self._export_added:
                step(f"removing export {n.export}", cleanup.remove_export, qmp, n.export)
            if self._server_started:
                step("stopping the NBD server", cleanup.stop_nbd_server, qmp)
            if self._job_started:
                step(f"cancelling job {n.job}", cleanup.cancel_job, qmp, n.job)
            if self._fleece_node_added:
                step(f"removing node {n.fleece_node}", cleanup.remove_node, qmp, n.fleece_node)
            if self._job_started:
                step("settling dirty bitmaps", self._settle_bitmaps, qmp, failed)
            if self._lock is not None:  # last: another session may start once it is gone
                step("releasing the session lock", session_lock.release, qmp, self._lock)
        elif self._job_started or self._fleece_node_added:
            errors.append(f"QMP connection to {self.qmp_path} lost; QEMU still holds pyvbak resources")
        for p in (n.fleece_file, n.nbd_socket):
            if p == n.fleece_file and not self._fleece_file_created:
                continue
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                errors.append(f"removing {p}: {e.strerror}")
        if not errors:
            for p in (n.journal, n.journal.with_suffix(".tmp")):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    def _settle_bitmaps(self, qmp: QmpClient, failed: bool) -> None:
        """Decide from the bitmaps QEMU actually has (not from what we believe we did:
        a signal may have cut a command's reply short)."""
        node = self.node
        info = cleanup.node_info(qmp, node) or {}
        present = cleanup.gen_bitmaps(info)
        old = self._old_bitmap if self._old_bitmap in present else None
        new = self._new_bitmap if self._new_bitmap in present else None
        if not failed:
            # the new generation now tracks changes since this backup's instant
            if old is not None and new is not None:
                qmp.execute("block-dirty-bitmap-remove", node=node, name=old)
            return
        actions: list[dict] = []
        if old is not None and self._old_disabled_by_us:
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



__all__ = ["QemuHotBackup", "parse_qemu_uri", "GEN_PREFIX"]

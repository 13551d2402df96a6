"""Turning pyvbak's change tracking off: its dirty bitmaps removed from a VM's disks.

Between backups each disk keeps one ``pyvbak-gen-N`` bitmap on purpose: it records the
guest's writes for the next incremental.  A VM that is no longer backed up (or moves to
another tool) should not keep one: QEMU updates it on every guest write and a qcow2 image
stores it.  ``remove_change_tracking`` removes them - from a running VM through QMP, under
the VM's session lock and after cleaning what a killed run left (so no bitmap is busy);
from a qcow2 image that no VM runs with ``qemu-img bitmap --remove``.  The next backup of
such a disk finds its bitmap gone and reads the disk whole (never a wrong incremental).
"""

from __future__ import annotations

import os
from pathlib import Path

from pyvbak import interrupts
from pyvbak.errors import SourceError, UsageError

from . import cleanup, session_lock
from .naming import generation_of, new_run_id
from .qmp import QmpClient, QmpError
from .vm_disks import parse_qemu_uri_disks, resolve


def remove_change_tracking(spec: str, *, work_dir: str, qmp_timeout: float = 30.0,
                           image_format: str = "auto") -> list[str]:
    """Remove every ``pyvbak-gen-N`` bitmap (N a number) of the disks ``spec`` names (a ``qemu://``
    URI as for backups, or a qcow2 image file); one line per bitmap removed.  An image file
    is a qcow2 by its name (``.qcow2``) or ``image_format="qcow2"``, never by its header
    alone: a guest's raw disk may hold a qcow2 its guest wrote, bitmaps included, and
    removing them wrote into the guest's disk."""
    from .. import QEMU_IMAGE, QEMU_VM, UNSUPPORTED, source_kind
    from ..image_formats import container_format, name_for_qemu

    kind = source_kind(spec, image_format)  # what a backup of ``spec`` would read it as
    if kind is QEMU_VM:
        return _from_running_vm(spec, Path(work_dir), qmp_timeout)
    if kind is UNSUPPORTED:
        kind.refuse(spec)  # (``http://h/x.qcow2`` was taken for a missing image file)
    if kind is QEMU_IMAGE and (image_format == "qcow2" or spec.lower().endswith(".qcow2")):
        return _from_image(Path(name_for_qemu(spec)))
    if image_format == "auto" and container_format(spec) == "qcow2":
        raise UsageError(f"{spec} begins like a qcow2 image but is not named .qcow2: pyvbak does not go by a "
                         f"header alone (a guest's raw disk may hold one); if it is the VM's qcow2 image, pass "
                         f"--format qcow2")
    raise UsageError(f"{spec} has no change tracking of pyvbak's: only a running QEMU VM (qemu:///QMP.SOCK) "
                     "or a qcow2 image holds its dirty bitmaps")


def _from_running_vm(uri: str, work_dir: Path, timeout: float) -> list[str]:
    qmp_path, selectors = parse_qemu_uri_disks(uri)
    run = new_run_id()
    removed: list[str] = []
    with QmpClient(qmp_path, timeout=timeout).connect() as qmp:
        lock = session_lock.lock_id(run)  # (recorded first: see hot.py's _setup)
        try:
            session_lock.acquire(qmp, run)  # no pyvbak session runs on this VM meanwhile
            # a killed run's filters and exports first: they hold its bitmaps busy
            removed += [f"cleanup: {line}" for line in cleanup.clean_leftovers(qmp, work_dir, None, None, own_run=run,
                                                                               this_vm=str(qmp_path))]
            infos = {n["node-name"]: n for n in cleanup.named_nodes(qmp) if n.get("node-name")}
            for disk in resolve(qmp, qmp_path, selectors, set(infos)):
                for name in sorted(cleanup.gen_bitmaps(infos.get(disk.node) or {})):
                    try:
                        qmp.execute("block-dirty-bitmap-remove", node=disk.node, name=name)
                    except QmpError as e:
                        raise SourceError(f"QEMU could not remove dirty bitmap {name} from disk {disk.name} "
                                          f"(node '{disk.node}'): {e.desc}") from None
                    removed.append(f"removed dirty bitmap {name} from disk {disk.name} (node '{disk.node}')")
        except BaseException:
            try:
                session_lock.release(qmp, lock)
            except Exception:  # noqa: BLE001 - the first failure is the one to report (a lost connection's too)
                pass
            raise
        session_lock.release(qmp, lock)
    return removed


def _from_image(path: Path) -> list[str]:
    from .offline import _run, image_info

    if not path.exists():
        raise UsageError(f"image {path} does not exist")
    try:
        info = image_info(path, running_vm_hint="turn change tracking off through the VM's QMP socket: "
                          "pyvbak cbt-off 'qemu:///PATH/TO/QMP.SOCK?node=NODE'", image_format="qcow2")
    except SourceError as e:
        if "not in qcow2 format" in str(e) or "Image is not in qcow2 format" in str(e):
            raise UsageError(f"{path} is not a qcow2 image: it holds no dirty bitmaps") from None
        raise
    names = sorted(b["name"] for b in (info.get("format-specific", {}).get("data", {}).get("bitmaps") or [])
                   if generation_of(b.get("name", "")) is not None)
    if names and not os.access(path, os.W_OK):
        raise UsageError(f"image {path} is not writable: its dirty bitmaps cannot be removed")
    removed = []
    for name in names:
        with interrupts.held():  # never stopped halfway through the image (offline._run)
            _run(["qemu-img", "bitmap", "--remove", "-f", "qcow2", str(path), name],
                 f"qemu-img bitmap --remove {name} on {path}", writes=True)
            removed.append(f"removed dirty bitmap {name} from {path}")
    return removed

"""Which block nodes a ``qemu://`` URI means, and what each disk is called.

Three ways to name the disks of a running VM (docs/QEMU.md, "URI: choosing the disks"):

``?node=NODE``     a block node by name (``query-named-block-nodes``; libvirt's
                   ``libvirt-1-format``).  The disk is called NODE in the repository.
``?device=ID``     a guest disk by its device id (``-device virtio-blk-pci,id=ID``;
                   libvirt's ``virtio-disk0``) or drive name (``-drive id=ID``): QEMU is
                   asked which node the device reads from.  The way to name disks whose
                   nodes have generated names (``#block123``: every ``-drive`` disk).
                   The disk is called ID.
(neither)          every disk of the VM: each guest device with a medium that is neither
                   removable (CD-ROM and floppy drives) nor read-only (firmware code in
                   a pflash drive, an ISO attached as a disk), in the order of their names.
                   Such devices can still be named with ``?device=``.

``node`` and ``device`` may be repeated and mixed; all disks named in one URI are frozen
at one instant.  A device is resolved to its node again by every session, after the
leftovers of a killed run are cleaned (a leftover copy-before-write filter would
otherwise stand where the disk's node is).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from pyvbak.errors import SourceError, UsageError

from .qmp import QmpClient, QmpError

#: most disks one run freezes together (each takes a fleecing file, node, job and export)
MAX_DISKS = 64
_FORM = "qemu:///PATH/TO/QMP.SOCK[?node=NODE|?device=ID ...]"


@dataclass(frozen=True)
class DiskSelector:
    kind: str   # "node" or "device"
    value: str

    def __str__(self) -> str:
        return f"{self.kind}={self.value}"


@dataclass
class VmDisk:
    """One disk a URI names, resolved: ``name`` in the repository, the ``node`` pyvbak
    works on, the guest ``device`` it was found through (None for ``?node=``)."""

    name: str
    node: str
    device: str | None
    selector: DiskSelector


def parse_qemu_uri_disks(uri: str) -> tuple[str, list[DiskSelector]]:
    """``qemu:///SOCK[?node=A&device=B...]`` → (QMP socket path, selectors in URI order;
    an empty list means every disk of the VM).  Raises UsageError."""
    parts = urlsplit(uri)
    if parts.scheme != "qemu":
        raise UsageError(f"not a qemu URI: {uri!r} (expected {_FORM})")
    if parts.netloc:
        raise UsageError(f"qemu URI {uri!r} names a host ({parts.netloc!r}); only local QMP sockets are "
                         f"supported: {_FORM} (three slashes)")
    if not parts.path.strip("/"):  # ("", "/", "////")
        raise UsageError(f"qemu URI {uri!r} has no QMP socket path: {_FORM}")
    if parts.path.endswith("/"):  # (it was said not to exist: "is the VM running?")
        raise UsageError(f"qemu URI {uri!r}: the QMP socket path ends in '/'; name the socket itself, "
                         f"qemu://{parts.path.rstrip('/')}" + (f"?{parts.query}" if parts.query else ""))
    if parts.fragment:
        raise UsageError(f"qemu URI {uri!r} has a '#' in it: generated node names (#block123) cannot be "
                         f"named in a URI; name the disk by its guest device instead (?device=ID, see "
                         f"'query-block')")
    selectors: list[DiskSelector] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in ("node", "device"):
            raise UsageError(f"qemu URI {uri!r}: unknown parameter {key!r}; accepted: node=NODE, device=ID")
        if not value:
            raise UsageError(f"qemu URI {uri!r}: {key}= is empty (give a block node name, e.g. "
                             f"libvirt-1-format, or a guest device id, e.g. virtio-disk0)")
        selectors.append(DiskSelector(key, value))
    dup = sorted({str(s) for s in selectors if selectors.count(s) > 1})
    if dup:
        raise UsageError(f"qemu URI {uri!r} names {', '.join(dup)} more than once")
    if len(selectors) > MAX_DISKS:
        raise UsageError(f"qemu URI {uri!r} names {len(selectors)} disks; one run freezes at most {MAX_DISKS}")
    return parts.path, selectors


def selector_name(s: DiskSelector) -> str:
    """The disk name a selector gives: the node name, or the device's id (a QOM path
    ``/machine/peripheral/ID/...`` names device ID)."""
    return (device_id(s.value) or s.value) if s.kind == "device" else s.value


def static_names(selectors: list[DiskSelector]) -> list[str] | None:
    """The disks' names when the URI alone says them (None: ask QEMU for every disk)."""
    return [selector_name(s) for s in selectors] if selectors else None


def _check_distinct_names(disks: list, qmp_path: str) -> None:
    """Two disks of one run under one name would share a snapshot name, a parent and change
    tracking: the second disk's snapshot was made from the first's data."""
    names = [d.name for d in disks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        clash = "; ".join(f"{n!r}: " + ", ".join(f"node {d.node}" for d in disks if d.name == n) for n in dup)
        raise SourceError(f"the disks of the VM at {qmp_path} would share a name ({clash}): name them apart "
                          f"in the URI, e.g. ?node=NODE for each")


def device_id(qdev: str | None) -> str | None:
    """The id a guest device was given (``-device ...,id=ID``) from query-block's ``qdev``:
    the id itself, or a QOM path ``/machine/peripheral/ID/...`` (a device without an id
    lives under ``peripheral-anon`` and has none)."""
    if not qdev:
        return None
    if "/" not in qdev:
        return qdev
    parts = qdev.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "machine" and parts[1] == "peripheral":
        return parts[2]
    return None


def guest_disks(qmp: QmpClient) -> list[dict]:
    """query-block's devices as {"id", "backend", "qdev", "node", "removable", "medium",
    "read_only"}: every block device the guest has (a storage daemon has none)."""
    try:
        blocks = qmp.execute("query-block")
    except QmpError as e:
        if e.error_class == "CommandNotFound":
            return []
        raise
    out = []
    for b in blocks or []:
        inserted = b.get("inserted") or {}
        dev = device_id(b.get("qdev"))
        backend = b.get("device") or None
        if not b.get("qdev"):
            continue  # a drive no guest device uses (-drive if=none alone): not a disk of the VM
        out.append({"id": dev, "backend": backend, "qdev": b.get("qdev"), "node": inserted.get("node-name"),
                    "removable": bool(b.get("removable")), "medium": bool(inserted),
                    "read_only": bool(inserted.get("ro"))})
    return out


def resolve(qmp: QmpClient, qmp_path: str, selectors: list[DiskSelector], node_names: set[str]) -> list[VmDisk]:
    """The disks ``selectors`` name on this VM (``node_names``: its named block nodes).
    Raises SourceError naming what exists when something named is not there."""
    devices = guest_disks(qmp) if (not selectors or any(s.kind == "device" for s in selectors)) else []
    if not selectors:
        disks = [d for d in devices if d["medium"] and not d["removable"] and not d["read_only"] and d["node"]]
        if not disks:
            raise SourceError(
                f"the VM at {qmp_path} has no guest disks to back up (no writable block device with a medium that "
                f"is not removable); name the block nodes instead: qemu://{qmp_path}?node=NODE"
                + (f" (named nodes: {', '.join(_user_nodes(node_names))})" if _user_nodes(node_names) else ""))
        found = [VmDisk(d["id"] or d["backend"] or d["node"], d["node"], d["id"] or d["backend"],
                        DiskSelector("device", d["id"] or d["backend"] or d["node"])) for d in disks]
        _check_distinct_names(found, qmp_path)
        return sorted(found, key=lambda d: d.name)  # QEMU lists drives before -blockdev disks
    out: list[VmDisk] = []
    missing_nodes = [s.value for s in selectors if s.kind == "node" and s.value not in node_names]
    if missing_nodes:
        known = _user_nodes(node_names)
        guest = sorted({d["id"] or d["backend"] for d in (devices or guest_disks(qmp))
                        if (d["id"] or d["backend"]) and d["medium"] and not d["removable"] and not d["read_only"]})
        raise SourceError(
            f"VM at {qmp_path} has no block node named {', '.join(repr(m) for m in missing_nodes)}; "
            f"named nodes: {', '.join(known) or 'none'} (fix ?node= in the qemu:// URI"
            + (f", or name guest disks with ?device=ID: {', '.join(guest)})" if guest else ")"))
    for s in selectors:
        if s.kind == "node":
            out.append(VmDisk(s.value, s.value, None, s))
            continue
        match = [d for d in devices if s.value in (d["id"], d["backend"], d["qdev"])]
        if len(match) > 1:
            raise SourceError(f"device={s.value} of the VM at {qmp_path} matches several disks ("
                              + ", ".join(d["qdev"] or d["backend"] or "?" for d in match)
                              + "): name one by its QOM path or its node (?node=NODE)")
        if not match:
            names = sorted({d["id"] or d["backend"] for d in devices if d["id"] or d["backend"]})
            raise SourceError(f"VM at {qmp_path} has no disk device {s.value!r}; its block devices: "
                              f"{', '.join(names) or 'none'} (fix ?device= in the qemu:// URI)")
        d = match[0]
        if not d["medium"] or not d["node"]:
            raise SourceError(f"device {s.value!r} of the VM at {qmp_path} has no medium inserted: nothing to back up")
        out.append(VmDisk(selector_name(s), d["node"], s.value, s))
    _check_distinct_names(out, qmp_path)
    nodes = [d.node for d in out]
    dup = sorted({n for n in nodes if nodes.count(n) > 1})
    if dup:
        raise SourceError(f"qemu URI names node {', '.join(dup)} twice (once by ?node=, once through a ?device=): "
                          f"name each disk once")
    return out


def query_disk_names(qmp_path: str, selectors: list[DiskSelector], timeout: float = 30.0) -> list[str]:
    """The names of the disks ``selectors`` mean, asking QEMU when the URI names none
    (every disk of the VM).  Connects briefly; the session resolves them again."""
    names = static_names(selectors)
    if names is not None:
        return names
    qmp = QmpClient(qmp_path, timeout=timeout).connect()
    try:
        nodes = {n.get("node-name") for n in qmp.execute("query-named-block-nodes", flat=True) if n.get("node-name")}
        return [d.name for d in resolve(qmp, qmp_path, selectors, nodes)]
    finally:
        qmp.close()


def _user_nodes(node_names: set[str]) -> list[str]:
    return sorted(n for n in node_names if n and not n.startswith(("#", "pyvbak-")))


#: drivers that store a disk in their own layout: a protocol node under one of them holds
#: the container's bytes, not the guest's disk ("raw" passes the bytes through)
_CONTAINER_FORMATS = {"qcow2", "qed", "vmdk", "vdi", "vhdx", "vpc", "luks", "parallels"}


#: drivers of filter nodes: a filter in a backing chain (libvirt's throttle groups) passes
#: its child's data through and keeps none of its own
FILTER_DRIVERS = frozenset({"throttle", "copy-on-read", "preallocate", "compress", "copy-before-write",
                            "snapshot-access", "blkdebug", "blklogwrites", "blkreplay"})


def _reads(info: dict) -> tuple[list, str | None]:
    """(drivers from a node of the flat ``query-named-block-nodes`` down to its file, that
    file's name).  QEMU gives a node whose children it cannot put in a plain file name a
    ``json:{...}`` pseudo-filename nesting its ``file`` children: a qcow2 over a
    preallocate filter over the file is ``json:{"driver": "qcow2", "file": {"driver":
    "preallocate", "file": {"driver": "file", "filename": ...}}}``."""
    drivers, name = [info.get("drv")], info.get("file") or ""
    if not name.startswith("json:"):
        return drivers, name or None
    try:
        node = json.loads(name[5:])
    except ValueError:
        return drivers, None
    for _ in range(64):  # (nested as deep as the graph; bounded anyway)
        if not isinstance(node, dict):
            break
        drivers.append(node.get("driver"))
        child = node.get("file")
        if isinstance(child, dict):
            node = child
            continue
        name = child if isinstance(child, str) else node.get("filename")
        return drivers, name if isinstance(name, str) and name else None
    return drivers, None


def _container_above(graph: dict, node: str, infos: dict[str, dict]) -> str | None:
    """The container-format node (qcow2, vmdk, ...) whose ``file`` child ``node`` is, or
    lies under through more such edges (a filter between them), in QEMU's block graph
    (``x-debug-query-block-graph``), or None."""
    try:
        names = {n["id"]: n.get("name") for n in graph["nodes"]}
        parents: dict = {}
        for e in graph["edges"]:
            if e.get("name") in ("file", "image"):  # (blkdebug's child is its "image")
                parents.setdefault(e["child"], []).append(e["parent"])
        ids = [i for i, name in names.items() if name == node]
    except (KeyError, TypeError):
        return None
    seen = set(ids)
    while ids:
        nxt = []
        for i in ids:
            for p in parents.get(i, ()):
                if (infos.get(names.get(p)) or {}).get("drv") in _CONTAINER_FORMATS:
                    return names[p]
                if p not in seen:
                    seen.add(p)
                    nxt.append(p)
        ids = nxt
    return None


def check_guest_view(disks: list[VmDisk], infos: dict[str, dict], qmp_path: str, graph: dict | None = None) -> None:
    """SourceError for a disk named by the protocol node under a format node (``?node=
    disk0-file`` under qcow2 ``disk0``): its bytes are the image file's - qcow2 clusters,
    metadata and all - not what the guest sees, and change tracking would follow the file.
    And for a snapshot-access node: another backup's frozen view of a disk, whose bytes
    come partly from that backup's copy-before-write target, which no dirty bitmap of the
    disk sees."""
    reads = {n: _reads(i) for n, i in infos.items()}
    for d in disks:
        info = infos.get(d.node) or {}
        drivers, filename = reads.get(d.node) or ([], None)
        above = [n for n, (drv, f) in reads.items() if n != d.node and filename and f == filename
                 and any(x in _CONTAINER_FORMATS for x in drv)]
        # the container node itself first (a throttle filter above it reads through it too,
        # and was named as "the throttle container")
        above.sort(key=lambda n: infos[n].get("drv") not in _CONTAINER_FORMATS)
        if info.get("drv") == "snapshot-access":
            # (named after the disk image's file too: it was refused as that file's node,
            # which it is not)
            disk = f", ?node={above[0]}" if above else ""
            raise SourceError(f"node {d.node!r} of the VM at {qmp_path} is a snapshot-access node, another "
                              f"backup's frozen view of a disk, not a disk: back up the disk's own node{disk}")
        # the graph itself: QEMU cuts a json: pseudo-filename at 4095 bytes (a long backing
        # chain's), and blkdebug names its node plainly - by the file names alone such a
        # node's container bytes were backed up as the disk
        container = _container_above(graph, d.node, infos) if graph else None
        if container is not None and info.get("drv") in _CONTAINER_FORMATS:
            container = None  # (a format node over another's file: a container of its own)
        if not filename or any(x in _CONTAINER_FORMATS for x in drivers):
            if container is not None:
                _refuse_under(d.node, container, infos, qmp_path)
            continue  # (a node that reads through a container format: the guest's view)
        if above and info.get("drv") in FILTER_DRIVERS:
            # a filter node on the same image: above the format node (the guest's view
            # through it) or under it (over its file) - QEMU's flat listing does not say,
            # and only the format node is sure to be the guest's disk (a copy-before-write
            # filter was called "the file under" the qcow2)
            raise SourceError(f"node {d.node!r} of the VM at {qmp_path} is a {info.get('drv')} filter node on the "
                              f"{infos[above[0]].get('drv')} image of node {above[0]!r}: back up the disk's node, "
                              f"?node={above[0]}")
        if above and info.get("drv") not in ("file", "host_device", "host_cdrom"):
            # a filter between the format node and its file (preallocate, copy-on-read):
            # QEMU names both with json: pseudo-filenames, which never equalled the file
            # node's name - the container's bytes were backed up as the disk
            raise SourceError(f"node {d.node!r} of the VM at {qmp_path} reads the {infos[above[0]].get('drv')} "
                              f"image of node {above[0]!r} as raw bytes (a {info.get('drv')} node over its file): back "
                              f"up the guest's view, ?node={above[0]}")
        if above:
            fmt = infos[above[0]].get("drv")
            raise SourceError(f"node {d.node!r} of the VM at {qmp_path} is the file under the {fmt} node "
                              f"{above[0]!r}: back up the guest's view, ?node={above[0]} (the file node "
                              f"holds the {fmt} container's bytes)")
        if container is not None:
            _refuse_under(d.node, container, infos, qmp_path)


def _refuse_under(node: str, container: str, infos: dict[str, dict], qmp_path: str) -> None:
    fmt = infos[container].get("drv")
    raise SourceError(f"node {node!r} of the VM at {qmp_path} lies under the {fmt} node {container!r} (its file, "
                      f"or a node over its file): back up the guest's view, ?node={container} (the {fmt} "
                      f"container's bytes are not the guest's disk)")

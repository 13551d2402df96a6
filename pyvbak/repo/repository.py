"""The repository: configuration, snapshots, the digest index and crash-safe writing.

See docs/FORMAT.md for the bytes and the write-ordering invariants this code keeps:
packs, then the pack index that names them, then the snapshot's block index, then the
snapshot's metadata last.  Every object is written atomically by the backend, and a
snapshot is visible only through its metadata, so a crash at any instant leaves either
a complete snapshot or none.

Beside it: snapshots.py (snapshot descriptions, their order, new ids), markers.py (the
``lost/`` markers and their flags), pack_storage.py (whether ``packs/`` is this
repository's pack storage).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import __version__, interrupts
from ..backends import TEMP_PREFIX, BackendError, ObjectMissing, RangeBeyondEnd, open_backend
from ..errors import IntegrityError, OutOfSpace, PyvbakError, RepositoryError, SnapshotNotFound, UsageError
from . import digest_sets
from . import format as fmt
from . import markers
from .cache import SeenPackIndexes, SnapshotMetaCache, repo_cache_dir
from .digest_index import DigestIndex, ExcludingIndex, load_cached
from .locks import RepositoryLock
from .snapshots import (SNAPSHOT_ID_RE, SeveralDisks, SnapshotInfo, consistency_groups, now_iso, place_unnumbered,
                        snapshot_order, snapshot_sequence)

MIN_REPO_BLOCK = 64 * 1024
MAX_REPO_BLOCK = 16 * 1024 * 1024
# Chosen by measurement (bench/blocksize.py, bench/RESULTS.md, 2 GiB image): with 1 % of
# 4 KiB pages rewritten in runs of 1-64 pages, an incremental stores 1.43x the changed bytes
# at 64 KiB, 1.91x at 128K, 2.88x at 256K, 8.6x at 1M, 28x at 4M; with shorter runs (1-8
# pages) 64 KiB stores 4.3x and 128K already 7.7x, so 64 KiB is the size that stays near
# "<= 4x" when writes are short.  Its index costs 48 B per 64 KiB = 0.073 % of the disk
# raw, 0.048 % as stored (zstd), under the 0.1 % budget.
DEFAULT_BLOCK_SIZE = 64 * 1024
# zstd level 1 by measurement (a 512 MiB sample of bench/vmimage.py's VM-like image,
# 64 KiB blocks, one core): level 1 611 MB/s at ratio 0.700, level 3 427 MB/s at 0.691 —
# text blocks dominate (320 vs 228 MB/s).  1.3 % more stored bytes for 30 % less CPU in
# the step that bounds a full backup on few cores.
DEFAULT_COMPRESSION = "zstd:1"
#: what init writes before the config (a directory holding only these is not a repository yet)
INIT_HELPERS = ("restore.sh", "README-RESTORE.txt")
#: the "restore kit revision: N" line of restore.sh (none: revision 1, before the line existed)
_KIT_REVISION_RE = re.compile(rb"^# restore kit revision: (\d+)", re.M)
_README_FIRST_LINE = b"RESTORING FROM THIS pyvbak REPOSITORY"


def restore_kit_revision(script: bytes) -> int:
    m = _KIT_REVISION_RE.search(script[:4096])
    return int(m.group(1)) if m else 1
# Packs group blocks so backends see few large objects (object stores bill per request).
PACK_TARGET_BYTES = 16 * 1024 * 1024
#: referenced_digests folds per-snapshot digests into the union at least this many at a time
FOLD_MIN_DIGESTS = 1 << 20
#: flagged copies a backup reads (and packs it stats) to see whether they still read back
#: bad, when they are the only copies of their blocks (Repository.dedup_index); beyond it
#: they count as bad (stored again: costs room, never data)
FLAG_RECHECK_MAX = 64

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*$")


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UsageError(f"size '{text}' is not understood: use e.g. 64K, 1M, 4M")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def parse_compression(text: str) -> int:
    m = re.match(r"^zstd(?::(-?\d+))?$", text.strip())
    if not m:
        raise UsageError(f"compression '{text}' is not understood: use zstd:LEVEL, e.g. zstd:3")
    level = int(m.group(1) or 3)
    if not -7 <= level <= 22:
        raise UsageError(f"zstd level {level} is out of range: use -7..22")
    return level


@dataclass(frozen=True)
class RepoConfig:
    repo_id: str
    version: int
    block_size: int
    compression_level: int
    hash_key: bytes  # secret key of the native fast hash (16 bytes)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": "pyvbak-repository",
                "version": self.version,
                "id": self.repo_id,
                "block_size": self.block_size,
                "compression": f"zstd:{self.compression_level}",
                "fast_hash": "pyvbak-nh128-v1",
                "fast_hash_key": self.hash_key.hex(),
                "created": now_iso(),
                "created_by": f"pyvbak {__version__}",
            },
            indent=2,
        ).encode()


#: sequence numbers stay below this: 18 decimal digits, which restore.sh zero-pads and
#: sorts as text (a billion backups a second for 30 years would not reach it)
MAX_SEQUENCE = 10**18

#: what every snapshot description holds (docs/FORMAT.md, snapshot metadata)
_META_FIELDS = {"vm": str, "disk": str, "size": int, "block_size": int, "time": str, "status": str}


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _valid_snapshot_meta(meta, sid: str | None = None) -> bool:
    """A usable snapshot description; with ``sid``, also the one stored under that id (a
    description copied over another's names another snapshot: its VM, time and index)."""
    if sid is not None and isinstance(meta, dict) and (
            meta.get("id", sid) != sid or meta.get("index", fmt.snapshot_index_name(sid)) != fmt.snapshot_index_name(sid)):
        return False
    if not (isinstance(meta, dict) and all(isinstance(meta.get(k), t) and not isinstance(meta.get(k), bool)
                                           for k, t in _META_FIELDS.items())):
        return False
    if meta["status"] != "complete":
        # the only status pyvbak has ever written (a description is written once its
        # snapshot is whole): any other is damage - left out silently, as it was, VM@latest
        # took the older snapshot, verify passed and prune deleted its blocks (one
        # flipped bit)
        return False
    want = meta.get("index_sha256")  # optional: snapshots made before it existed have none
    if "index_sha256" in meta and not (isinstance(want, str) and _HEX64.fullmatch(want)):
        return False  # a damaged one turned the index check off
    seq = meta.get("sequence", 0)  # optional: snapshots made before it existed have none
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < MAX_SEQUENCE:
        return False
    bs = meta["block_size"]  # values too: restore divides by it, sizes arrays by size / bs
    # (names are not checked against today's rules: an older pyvbak allowed '/' in disk
    # names, and such snapshots restore; a group restore refuses to make files of them)
    return meta["size"] >= 0 and MIN_REPO_BLOCK <= bs <= MAX_REPO_BLOCK and not bs & (bs - 1)


class _ConfigDamaged(Exception):
    """A config object that is not a valid pyvbak configuration; ``how``: "not pyvbak's"
    (not even its header reads as one) or "damaged" (a field is wrong)."""

    def __init__(self, how: str):
        super().__init__(how)
        self.how = how


def _parse_config(raw: bytes, location: str) -> RepoConfig:
    """The configuration in a config object's bytes (config, or its copy).  Raises
    _ConfigDamaged, or RepositoryError for a format version newer than this pyvbak's."""
    try:
        doc = json.loads(raw)  # (RecursionError: JSON nested thousands deep)
        if not isinstance(doc, dict) or doc.get("format") != "pyvbak-repository":
            raise ValueError("format")
        version = doc["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError("version")
    except (ValueError, KeyError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _ConfigDamaged("not pyvbak's") from None
    if version > fmt.FORMAT_VERSION:
        raise RepositoryError(
            f"repository {location} has format version {version}, newer than this pyvbak supports "
            f"({fmt.FORMAT_VERSION}): upgrade pyvbak"
        )
    try:
        repo_id, block_size, compression, key = (doc[k] for k in ("id", "block_size", "compression", "fast_hash_key"))
        if not (isinstance(repo_id, str) and repo_id and isinstance(compression, str) and isinstance(key, str)):
            raise TypeError("field types")
        # the id names this repository's local cache directory: only what pyvbak writes
        # (token_hex(16)), never a path a hostile config chose ("/tmp/x", "../..")
        if not re.fullmatch(r"[0-9a-f]{32}", repo_id):
            raise ValueError("id")
        if (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < MIN_REPO_BLOCK
                or block_size > MAX_REPO_BLOCK or block_size & (block_size - 1)):
            raise ValueError("block size")
        config = RepoConfig(repo_id, version, block_size, parse_compression(compression), bytes.fromhex(key))
        if len(config.hash_key) != 16:
            raise ValueError("fast hash key")
    except (KeyError, ValueError, TypeError, UsageError):
        raise _ConfigDamaged("damaged") from None
    return config


class RecoveryLine(str):
    """One line of what a leftover recovery did (``recover_leftovers``,
    ``unindexed_pack_records``, a repair): printed and put in JSON as the text it is;
    ``kind`` and ``subject`` say what it is about for the code that decides on it, so that
    no caller parses the wording.  Kinds (subject): ``temp_removed`` (the temp object),
    ``adopted`` (the pack's hex id), ``left_alone`` (the object left unindexed),
    ``kept_out`` (copies a lost/ marker dropped that were not adopted again; no subject),
    ``index_removed`` / ``index_kept`` (a damaged pack index's name)."""

    kind: str
    subject: str

    def __new__(cls, kind: str, subject: str, text: str) -> "RecoveryLine":
        line = super().__new__(cls, text)
        line.kind, line.subject = kind, subject
        return line

    def __reduce__(self):  # (copied and pickled whole: results are deep-copied)
        return RecoveryLine, (self.kind, self.subject, str(self))


def _holds_repository_data(location: str) -> bool:
    """Snapshots as pyvbak writes them in ``location`` (whatever else is lost): a
    ``SNAPID.json`` beside its ``SNAPID.index`` - not merely a ``snapshots/`` folder with
    JSON in it, which another tool's directory may have."""
    try:
        names = set(os.listdir(os.path.join(location, "snapshots")))
    except OSError:
        return False
    return any(n.endswith(".json") and SNAPSHOT_ID_RE.fullmatch(n[:-5]) and n[:-5] + ".index" in names for n in names)


def _says_pyvbak_config(head: bytes) -> bool:
    """A config's first bytes name pyvbak's format (whatever else in it is damaged)."""
    return b'"pyvbak-repository"' in head[:4096]


def _pyvbak_config(path: str) -> bool:
    """The file at ``path`` is a pyvbak repository's config by its first bytes."""
    try:
        with open(path, "rb") as f:
            return _says_pyvbak_config(f.read(4096))
    except OSError:
        return True  # cannot tell: taken for one (init then refuses: nothing is overwritten)


def _is_pyvbak_directory(location: str) -> bool:
    """``location`` holds pyvbak's own files beside its config: the restore kit init writes,
    or pyvbak's snapshots.  An unreadable config elsewhere (~/.ssh, a git or restic
    directory) is not a damaged repository's."""
    return all(_init_leftover(location, n) for n in INIT_HELPERS) or _holds_repository_data(location)


class Repository:
    def __init__(self, backend, config: RepoConfig):
        self.backend = backend
        self.config = config
        self.location = backend.location
        #: metadata objects the last snapshots() call left out as damaged
        self.damaged_snapshots: list[str] = []
        #: pack index objects the last load_digest_index() left out as damaged
        self.damaged_pack_indexes: list[str] = []
        #: the highest sequence number the last snapshots() call listed (0: none)
        self.highest_sequence = 0
        # parsed snapshot metadata by object name, kept between snapshots() calls: the
        # objects are immutable (create-only, then only deleted), so an entry is right for
        # as long as its name is listed; the local cache file is read once per process
        self._meta_memo: dict[str, dict] | None = None
        #: locks taken through lock(): a commit checks that the held ones are still there
        self._locks: list[RepositoryLock] = []
        #: None, or why config was not read and its copy was ("missing", "damaged")
        self.config_problem: str | None = None
        #: the bytes the config was read from (what settle_config_copy writes; None: made
        #: here, not read - nothing to settle)
        self._config_bytes: bytes | None = None

    # -- creation / opening ---------------------------------------------------------
    @classmethod
    def init(cls, location: str, *, block_size: int = DEFAULT_BLOCK_SIZE, compression: str = DEFAULT_COMPRESSION) -> "Repository":
        if block_size < MIN_REPO_BLOCK or block_size > MAX_REPO_BLOCK or block_size & (block_size - 1):
            raise UsageError(
                f"block size {block_size} is invalid: use a power of two from 64K to 16M (default 64K)"
            )
        level = parse_compression(compression)
        path = local_path(location)
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise RepositoryError(f"{location} exists and is not a directory: choose another repository path")
        if path is not None and not os.path.exists(path):
            # (a file on the way said "an object exists where a directory is needed", of
            # restore.sh, at the first write)
            above = os.path.dirname(os.path.abspath(path))
            while not os.path.lexists(above) and os.path.dirname(above) != above:
                above = os.path.dirname(above)
            if os.path.lexists(above) and not os.path.isdir(above):
                raise RepositoryError(f"{above} is not a directory, so the repository {location} cannot be made "
                                      f"under it: choose another repository path")
        if path is not None and os.path.isdir(path):
            if any(os.path.exists(os.path.join(path, name)) and (
                    _is_pyvbak_directory(path) or _pyvbak_config(os.path.join(path, name)))
                   for name in (fmt.CONFIG_NAME, fmt.CONFIG_COPY_NAME)):
                raise RepositoryError(f"{location} already holds a pyvbak repository: use it as it is (--repo "
                                      f"{location}), or give another directory to create a new one (init never "
                                      f"replaces a repository's config, even a damaged one)")
            # What an init that failed or is running (config not written yet) leaves counts
            # as empty: the helpers are written again, and the create-only config decides
            # between two inits of one path.
            if not all(_init_leftover(path, name) for name in os.listdir(path)):
                if _holds_repository_data(path):
                    raise RepositoryError(f"{location} holds pyvbak snapshots whose config file is missing: put config "
                                          f"back from a copy of the repository (a new one could not read them)")
                raise RepositoryError(f"{location} is not empty: give an empty or new directory for the repository")
        from importlib import resources  # only init needs it (~8 ms of every start-up otherwise)

        backend = open_backend(location)
        config = RepoConfig(secrets.token_hex(16), fmt.FORMAT_VERSION, block_size, level, secrets.token_bytes(16))
        # Helpers first, then config: a directory without config is not a repository yet.
        # Its copy after it, by the init whose config was created (two inits of one path
        # write different ids); an init killed in between leaves no copy, which the first
        # backup writes (settle_config_copy).
        config_bytes = config.to_json()
        try:
            for name in INIT_HELPERS:
                data = resources.files("pyvbak.repo").joinpath(name).read_bytes()
                backend.replace(name, data)
            root = getattr(backend, "root", None)
            if root:  # a plain path or file://: the script runs as 'sh restore.sh' either way, but
                os.chmod(os.path.join(root, "restore.sh"), 0o755)  # ./restore.sh needs the bit
            created = backend.write_new(fmt.CONFIG_NAME, config_bytes)
            if created:
                backend.replace(fmt.CONFIG_COPY_NAME, config_bytes)
        except OutOfSpace:
            # The helpers written so far stay: they do not make a repository (no config),
            # and the next init of this directory writes them again.
            raise OutOfSpace(f"out of space creating the repository at {location}: no repository was "
                             f"created; free space there and run 'pyvbak init' again") from None
        if not created:
            raise RepositoryError(f"{location} already holds a pyvbak repository: use it as it is (--repo "
                                  f"{location}), or give another directory to create a new one")
        repo = cls(backend, config)
        repo._config_bytes = config_bytes
        return repo

    @classmethod
    def open(cls, location: str) -> "Repository":
        path = local_path(location)
        if path is not None and not os.path.isdir(path):
            if os.path.exists(path):
                raise RepositoryError(f"{location} is a file, not a pyvbak repository: give the repository's directory")
            raise RepositoryError(
                f"{location} is not a pyvbak repository (no such directory): create one with 'pyvbak init {location}'"
            )
        backend = open_backend(location)
        try:
            raw = backend.read(fmt.CONFIG_NAME)
        except ObjectMissing:
            raw = None
        try:
            config = _parse_config(raw, location) if raw is not None else None
            problem = None if raw is not None else "missing"
        except _ConfigDamaged as exc:
            config, problem = None, exc.how
        if config is None:
            # config alone lost or damaged: its copy, written beside it at init
            try:
                raw_copy = backend.read(fmt.CONFIG_COPY_NAME)
                copy = _parse_config(raw_copy, location)
            except (ObjectMissing, _ConfigDamaged):
                copy = None
            if copy is not None:
                repo = cls(backend, copy)
                repo.config_problem = "missing" if problem == "missing" else "damaged"
                repo._config_bytes = raw_copy
                return repo
        if raw is None:
            # 'pyvbak init' of a directory holding other files fails: say so, not "init it"
            empty = path is None or all(_init_leftover(path, name) for name in os.listdir(path))
            if not empty and _holds_repository_data(path):
                # (it said "not a pyvbak repository: check the path" of a repository whose
                # config alone was lost)
                raise RepositoryError(f"{location} holds pyvbak snapshots but its config file is missing: put config "
                                      f"back from a copy of the repository (its snapshots and blocks are untouched)"
                                      ) from None
            fix = (f"create one with 'pyvbak init {location}'" if empty else
                   "check the path (a repository holds config, restore.sh, packs/ …), or create one in a new directory")
            raise RepositoryError(f"{location} is not a pyvbak repository (no config file): {fix}") from None
        if problem == "not pyvbak's":
            if path is not None and (_is_pyvbak_directory(path) or _says_pyvbak_config(raw)):
                raise RepositoryError(f"{location}/config is damaged (not a pyvbak repository configuration): put "
                                      f"it back from a copy of the repository (its snapshots and blocks are "
                                      f"untouched)") from None
            raise RepositoryError(f"{location}/config is not a pyvbak repository configuration: check the path (a "
                                  f"repository holds config, restore.sh, packs/ …)") from None
        if problem is not None:
            raise RepositoryError(f"{location}/config is damaged: put it back from a copy of the repository (its "
                                  f"snapshots and blocks are untouched)") from None
        repo = cls(backend, config)
        repo._config_bytes = raw
        return repo

    def settle_config_copy(self) -> list[str]:
        """Writers only (a backup, a repair; under the repository lock): config put back
        from its copy when it was read from there, or the copy written when it is missing
        or damaged (repositories made before pyvbak kept one; an init killed between the
        two).  Both read as valid but different: neither is touched (which one is this
        repository's cannot be told from here).  Returns what was done, a line each."""
        data, was = self._config_bytes, self.config_problem
        if data is None:
            return []
        if was is not None:
            self.backend.replace(fmt.CONFIG_NAME, data)
            self.config_problem = None
            return [f"config was {was}: put back from its copy {fmt.CONFIG_COPY_NAME}"]
        try:
            copy = self.backend.read(fmt.CONFIG_COPY_NAME)
        except ObjectMissing:
            copy = None
        if copy == data:
            return []
        if copy is not None:
            try:
                other = _parse_config(copy, self.location)
            except (_ConfigDamaged, RepositoryError):
                other = None
            if other is not None and other != self.config:
                return [f"warning: {fmt.CONFIG_COPY_NAME} and config differ (both read as valid): left as they "
                        f"are; pyvbak reads config"]
        self.backend.replace(fmt.CONFIG_COPY_NAME, data)
        return [f"wrote {fmt.CONFIG_COPY_NAME}, the copy of config read when config is lost or damaged"
                + (" (the one there was damaged)" if copy is not None else "")]

    def lock(self, *, exclusive: bool = False, purpose: str = "backup", clean_stale: bool = True,
             reader: bool = False) -> RepositoryLock:
        # An exclusive lock that removes stale locks adopts what their processes left
        # (the stale lock was the evidence 'unlock' and the next backup would act on)
        lock = RepositoryLock(self.backend, exclusive=exclusive, purpose=purpose, clean_stale=clean_stale, reader=reader,
                              recover=self.recover_leftovers if exclusive else None)
        self._locks = [lk for lk in self._locks if lk.held] + [lock]
        return lock

    # -- snapshots ------------------------------------------------------------------
    def snapshots(self, vm: str | None = None, disk: str | None = None, *, cached: bool = True,
                  strict: bool = False) -> list[SnapshotInfo]:
        """Complete snapshots, oldest first.  Only metadata objects make a snapshot visible.
        Metadata comes from the local cache where it has it (repo/cache.py); ``cached=False``
        reads every object (verify: the repository itself is what is checked).

        A metadata object that is not a valid snapshot description is left out and its
        name recorded in ``damaged_snapshots`` (one damaged object must not stop backups
        of every other disk, nor the verify that reports it); ``strict`` raises
        IntegrityError instead (prune: deleting data such a snapshot may use is never
        safe).  Sets ``highest_sequence``: the highest sequence number among every
        readable description (a backup begun now takes the next one)."""
        cache = SnapshotMetaCache(self.config.repo_id)
        if cached:
            if self._meta_memo is None:
                self._meta_memo = cache.load()
            from_cache = self._meta_memo
        else:
            from_cache = {}
        metas: dict[str, dict] = {}
        self.damaged_snapshots = []
        for name in self.backend.list("snapshots/"):
            if not name.endswith(".json"):
                continue
            sid = name[len("snapshots/") : -len(".json")]
            meta = from_cache.get(name)
            if meta is None or meta.get("id", sid) != sid:
                try:
                    meta = json.loads(self.backend.read(name))
                except ObjectMissing:
                    continue
                except (ValueError, RecursionError):  # not JSON, or nested thousands deep
                    meta = None
                if not _valid_snapshot_meta(meta, sid):
                    if strict:
                        raise IntegrityError(f"snapshot metadata {name} is corrupt: run 'pyvbak verify'")
                    self.damaged_snapshots.append(name)
                    continue
            metas[name] = meta
        if metas.keys() != from_cache.keys():
            cache.save(metas)
        self._meta_memo = metas
        self.highest_sequence = max((snapshot_sequence(m) for m in metas.values()), default=0)
        found = []
        for name, meta in metas.items():
            if not _valid_snapshot_meta(meta, name[len("snapshots/"):-len(".json")]):
                # a cached description an older pyvbak read under older rules (a status
                # other than "complete", a malformed index_sha256)
                if strict:
                    raise IntegrityError(f"snapshot metadata {name} is corrupt: run 'pyvbak verify'")
                self.damaged_snapshots.append(name)
                continue
            if vm is not None and meta.get("vm") != vm:
                continue
            if disk is not None and meta.get("disk") != disk:
                continue
            found.append(SnapshotInfo(name[len("snapshots/") : -len(".json")], meta))
        place_unnumbered(found)
        found.sort(key=snapshot_order)
        return found

    def latest(self, vm: str, disk: str) -> SnapshotInfo | None:
        snaps = self.snapshots(vm, disk)
        return snaps[-1] if snaps else None

    def latest_group(self, vm: str) -> list[SnapshotInfo] | None:
        """The newest complete consistency group of ``vm`` (its disks frozen at one
        instant by one run), one snapshot per disk in the group's order; None if the VM
        has none.  A group a failed run left incomplete (a disk without its snapshot) is
        passed over: its snapshots are not from one instant with the others' latest."""
        complete = [g for g in consistency_groups(self.snapshots(vm)) if g.complete]
        return complete[-1].ordered() if complete else None

    def resolve(self, spec: str) -> SnapshotInfo:
        """A snapshot id (or unique prefix), or ``VM[/DISK]@latest``."""
        if spec.endswith("@latest"):
            target = spec[: -len("@latest")]
            vm, slash, disk = target.partition("/")
            if not vm or (slash and not disk):
                raise UsageError(f"'{spec}' names no {'VM' if not vm else 'disk'}: give VM@latest or "
                                 f"VM/DISK@latest (list them with 'pyvbak snapshots')")
            snaps = self.snapshots(vm, disk or None)
            if not snaps and self.damaged_snapshots:  # perhaps this VM's: their VM cannot be read
                raise IntegrityError(f"no readable snapshot of {target} in {self.location}, and snapshot metadata "
                                     f"{sorted(self.damaged_snapshots)[-1]} is damaged (it may be one): run 'pyvbak verify'")
            if not snaps:
                raise SnapshotNotFound(f"no snapshot of {target} in {self.location}: list them with 'pyvbak snapshots'")
            disks = {s.disk for s in snaps}
            if not disk and len(disks) > 1:
                raise SeveralDisks(vm, sorted(disks))
            self.check_no_damaged_after(snaps[-1], spec)
            return snaps[-1]
        if not re.fullmatch(r"[0-9A-Za-z-]+", spec):
            raise UsageError(f"'{spec}' is not a snapshot id or VM[/DISK]@latest: list them with 'pyvbak snapshots'")
        if SNAPSHOT_ID_RE.fullmatch(spec):
            # a whole id: its one description, not a listing of every snapshot (10 000
            # snapshots on a machine without a cache: 10 000 reads, or one)
            try:
                meta = json.loads(self.backend.read(f"snapshots/{spec}.json"))
            except (ObjectMissing, ValueError, RecursionError):
                meta = None  # (missing or damaged: the listing below says which)
            if _valid_snapshot_meta(meta, spec):
                return SnapshotInfo(spec, meta)
        snaps = self.snapshots()
        exact = [s for s in snaps if s.id == spec]
        if exact:
            return exact[0]
        matches = [s for s in snaps if s.id.startswith(spec)]
        # a damaged description's id counts too: the prefix may be meant for it (restore.sh
        # reads the file names alone, and says "ambiguous" the same way)
        damaged = [n for n in self.damaged_snapshots if n[len("snapshots/"):-len(".json")].startswith(spec)]
        if damaged and f"snapshots/{spec}.json" in damaged:
            damaged = [f"snapshots/{spec}.json"]  # the exact id of a damaged one
            matches = []
        if len(matches) + len(damaged) > 1:
            raise UsageError(f"snapshot id prefix {spec} is ambiguous ({len(matches) + len(damaged)} matches"
                             + (f", {len(damaged)} of them damaged" if damaged else "") + "): give more characters")
        if damaged:  # there, but unreadable: not "not found"
            raise IntegrityError(f"snapshot metadata {damaged[0]} is damaged: run 'pyvbak verify' "
                                 f"(restore.sh may still read it)")
        if not matches:
            if any(s.vm == spec for s in snaps):  # a VM's name, given where an id goes
                raise SnapshotNotFound(f"snapshot {spec} not found in {self.location}: {spec} is a VM; its newest "
                                       f"snapshot is {spec}@latest")
            raise SnapshotNotFound(f"snapshot {spec} not found in {self.location}: list them with 'pyvbak snapshots'")
        return matches[0]

    def check_no_damaged_after(self, chosen: SnapshotInfo, spec: str) -> None:
        """``VM@latest`` must not silently be an older snapshot than the newest: when any
        snapshot's metadata is damaged, it may be this VM's newest - its VM cannot be read,
        nor its sequence number, and the time in its id says nothing once a clock went
        back (a snapshot made after another may carry an older time) - so refuse, naming
        it.  This is when "latest" is asked for most: a recovery machine, no cache.  (By
        the time in the ids, a clock step back let VM@latest restore an older snapshot
        without a word.)"""
        if self.damaged_snapshots:
            damaged = sorted(self.damaged_snapshots)[-1]
            more = f" (and {len(self.damaged_snapshots) - 1} more)" if len(self.damaged_snapshots) > 1 else ""
            raise IntegrityError(
                f"snapshot metadata {damaged}{more} is damaged and may be newer than {chosen.id}, the newest "
                f"readable snapshot for {spec}: run 'pyvbak verify' (forget it by its id if it is lost), or give "
                f"a snapshot id to restore an older one ({chosen.id})")

    def load_snapshot_index(self, snap: SnapshotInfo, *, writable: bool = False) -> tuple[int, int, np.ndarray]:
        """(block size, disk size, records) of ``snap``; ``writable``: records the caller may
        change in place (the next backup of the disk starts from them)."""
        name = fmt.snapshot_index_name(snap.id)
        data = self._read_snapshot_index(snap, name)
        bs, size, records = fmt.decode_snapshot_index(data, f"snapshot index {name}", writable=writable,
                                                      expect=(snap.meta["block_size"], snap.meta["size"]))
        del data  # compressed bytes: not held while the caller works on the records
        return bs, size, records

    def _read_snapshot_index(self, snap: SnapshotInfo, name: str) -> bytes:
        """The index object's bytes, checked against the SHA-256 the metadata records
        (``index_sha256``; snapshots written before pyvbak recorded it have none and are
        not checked): an index copied over another's decodes fine and restores the
        other snapshot's disk, block digests and all."""
        try:
            data = self.backend.read(name)
        except ObjectMissing:
            raise IntegrityError(f"index of snapshot {snap.id} ({name}) is missing: put it back from a copy of the "
                                 f"repository, or forget the snapshot ('pyvbak forget {snap.id}')") from None
        want = snap.meta.get("index_sha256")
        if isinstance(want, str) and hashlib.sha256(data).hexdigest() != want:
            raise IntegrityError(f"index of snapshot {snap.id} ({name}) is corrupt or another snapshot's: its "
                                 f"SHA-256 is not the one the metadata records; put it back from a copy of the "
                                 f"repository, or forget the snapshot ('pyvbak forget {snap.id}')")
        return data

    # -- blocks lost from storage: the lost/ markers (markers.py) -------------------
    def lost_markers(self) -> list[str]:
        return markers.lost_markers(self.backend)

    def write_lost_marker(self, packs: list[str], records: int, *, moved_out: list[str] | None = None,
                          moved_to: list[str] | None = None) -> str:
        return markers.write_lost_marker(self.backend, packs, records, moved_out=moved_out, moved_to=moved_to)

    def write_flag_marker(self, flagged: list[tuple[bytes, bytes, int]],
                          cleared: list[tuple[bytes, bytes, int]] = (), seen: list[str] = ()) -> str:
        name = markers.write_flag_marker(self.backend, flagged, cleared, seen)
        self._dedup_index_cache = None
        return name

    def flagged_copies(self, *, strict: bool = False, names: list[str] | None = None) -> np.ndarray:
        """markers.flagged_copies of the ``lost/`` markers (``names``: listed just now),
        each read once per process.  ``self.flag_markers_seen``: the markers this answer
        is from."""
        read = self.__dict__.setdefault("_flag_markers_read", {})
        names = self.lost_markers() if names is None else names
        flagged, self.flag_markers_seen = markers.flagged_copies(self.backend, self.config.repo_id, names, read,
                                                                 strict=strict)
        return flagged

    def dedup_index(self):
        """The digest index as a backup deduplicates against it: a block whose every copy
        is flagged bad (``flagged_copies``) and still reads back bad is absent, so the
        backup stores it again.  Its records stay for restore and verify, which try every
        copy; once a good copy is stored, the block is present again.  A flagged copy is
        read (up to FLAG_RECHECK_MAX of them) when it is a block's only kind of copy: a
        pack put back, or re-cut under the same name by the backup that stored the blocks
        again, holds the good bytes under the flagged name.  ``.excluded``: the absent
        digests (S32, sorted), empty when none."""
        index = self.load_digest_index()
        names = tuple(self.lost_markers())
        if not names:  # (as a rule: no marker, nothing more to read)
            return index
        held = getattr(self, "_dedup_index_cache", None)
        if held is not None and held[0] == (id(index), names):
            return held[1]
        flagged = self.flagged_copies(strict=True, names=list(names))
        excluded = np.empty(0, "S32")
        if len(flagged):
            digests = digest_sets.unique(np.ascontiguousarray(
                flagged.view(np.uint8).reshape(-1, 72)[:, :32]).view("S32").reshape(-1))
            which, positions = index.locate_all(digests)
            recs = index.records_at(positions)
            good = ~digest_sets.isin(digest_sets.copy_keys(recs), flagged)
            has_good = np.zeros(len(digests), bool)
            has_good[which[good]] = True
            self._recheck_flagged(recs, which, has_good)
            # a block with no record left (a repair dropped the flagged copies) is no
            # flagged-only block: the lost/ markers' parent checks cover it
            indexed = np.zeros(len(digests), bool)
            indexed[which] = True
            excluded = digests[indexed & ~has_good]
        result = ExcludingIndex(index, excluded) if len(excluded) else index
        self._dedup_index_cache = ((id(index), names), result)
        return result

    def _recheck_flagged(self, recs: np.ndarray, which: np.ndarray, has_good: np.ndarray) -> None:
        """Read the flagged copies (``recs``, of digest ``which``) of blocks with no other
        copy (``~has_good``), to see whether they still read back bad; set ``has_good``
        for those that do not.  Bounded, since it runs on every backup while such a block
        stays (one no disk holds any more stays until a repair):
        one stat per pack (a missing pack's copies are not read; FLAG_RECHECK_MAX packs),
        FLAG_RECHECK_MAX frames.  A copy listed with differing records (a damaged pack
        index) is left bad: restore reads one of them, not the one that happens to read."""
        cand = np.flatnonzero(~has_good[which])
        if not len(cand):
            return
        keys = digest_sets.copy_keys(recs)
        order = np.argsort(keys[cand], kind="stable")
        cand, ck = cand[order], keys[cand][order]
        shape = (recs["clen"].astype(np.int64) << 32) + recs["ulen"].astype(np.int64)
        starts = np.flatnonzero(np.r_[True, ck[1:] != ck[:-1]])  # each key's records
        consistent = np.minimum.reduceat(shape[cand], starts) == np.maximum.reduceat(shape[cand], starts)
        cand = cand[starts[consistent]]
        packs_ok: dict[bytes, bool] = {}
        reads = 0
        for i in cand.tolist():
            if has_good[which[i]]:
                continue
            pack = bytes(recs["pack"][i]).ljust(32, b"\0")
            if pack not in packs_ok:
                if len(packs_ok) >= FLAG_RECHECK_MAX:
                    break
                try:
                    self.backend.stat(fmt.pack_name(pack.hex()))
                    packs_ok[pack] = True
                except (ObjectMissing, BackendError):
                    packs_ok[pack] = False
            if not packs_ok[pack]:
                continue
            if reads >= FLAG_RECHECK_MAX:
                break
            reads += 1
            if self._copy_reads_back(recs[i]):
                has_good[which[i]] = True

    def _copy_reads_back(self, record) -> bool:
        """Whether the copy of ``record`` decodes to its digest now."""
        return int(record["ulen"]) <= self.config.block_size and self.read_checked_block(record, int(record["ulen"])) is not None

    def read_checked_block(self, record, ulen: int) -> bytes | None:
        """The ``ulen``-byte block the copy of ``record`` holds, decoded and checked against
        its digest; None when the copy is missing, cannot be read, or is not intact (a
        record claiming a longer frame than a block's can be is not read)."""
        return self.check_block_copy(record, ulen)[0]

    def check_block_copy(self, record, ulen: int) -> tuple[bytes | None, str]:
        """(the block, "ok"), or (None, why): "bad" when the copy is missing or read back
        not intact (what verify and restore flag), "unreadable" when the storage could not
        be read (an I/O error: never flagged)."""
        from .reader import decode_block, max_frame_bytes

        if int(record["clen"]) > max_frame_bytes(self.config.block_size):
            return None, "bad"
        try:
            frame = memoryview(self.read_block_frame(record))
        except (ObjectMissing, RangeBeyondEnd):  # (a pack cut short is a fact about the data)
            return None, "bad"
        except BackendError:
            return None, "unreadable"
        import zstandard

        data, problem = decode_block(zstandard.ZstdDecompressor(), frame, ulen, bytes(record["digest"]).ljust(32, b"\0"))
        return (bytes(data), "ok") if problem is None else (None, "bad")

    def lost_blocks_of(self, snap: SnapshotInfo) -> int:
        """How many of ``snap``'s non-zero blocks a backup would not find: no longer in the
        digest index, or with every copy flagged bad."""
        _, digests = self.data_blocks(snap)
        if not len(digests):
            return 0
        return int(np.count_nonzero(self.dedup_index().locate(digests) < 0))

    def iter_snapshot_index(self, snap: SnapshotInfo):
        """``snap``'s records in chunks (format.iter_snapshot_index): for passes that need
        each record once, in constant memory."""
        name = fmt.snapshot_index_name(snap.id)
        data = self._read_snapshot_index(snap, name)
        yield from fmt.iter_snapshot_index(data, f"snapshot index {name}",
                                           expect=(snap.meta["block_size"], snap.meta["size"]))

    def data_blocks(self, snap: SnapshotInfo) -> tuple[np.ndarray, np.ndarray]:
        """(indices, digests V32) of ``snap``'s non-zero blocks, its index read in chunks: a
        thin disk's index is mostly zero markers (1 TiB: 800 MB decompressed, ~1 s and as
        much memory to hold whole; bench/RESULTS.md, "Thin disks of a terabyte")."""
        idx, digests, base = [], [], 0
        for chunk in self.iter_snapshot_index(snap):
            d = chunk["digest"]
            nz = np.flatnonzero(d.view("S32") != b"")
            idx.append(nz + base)
            digests.append(d[nz])  # a copy: the chunk's buffer is reused
            base += len(chunk)
        if not idx:
            return np.empty(0, np.int64), np.empty(0, "V32")
        return np.concatenate(idx), np.concatenate(digests)

    def snapshot_digests(self, snap: SnapshotInfo) -> np.ndarray:
        """Sorted unique digests (S32) of the non-zero blocks ``snap`` references."""
        return digest_sets.unique(self.data_blocks(snap)[1].view("S32"))

    def referenced_digests(self, snaps, on_unreadable=None) -> np.ndarray:
        """Sorted unique digests (S32) of the non-zero blocks ``snaps`` reference.

        Snapshots of one disk share most blocks, so each snapshot's unique digests are
        folded into the union once the pending ones outnumber it: memory stays ~2-3x the
        union instead of the sum over snapshots (365 nightly snapshots would hold 365
        copies of a disk's digests).  An unreadable snapshot index raises, or is passed to
        ``on_unreadable(snap, exc)`` and skipped."""
        referenced = np.empty(0, "S32")
        pending: list[np.ndarray] = []
        held = 0
        for snap in snaps:
            try:
                pending.append(self.snapshot_digests(snap))
            except PyvbakError as exc:
                if on_unreadable is None:
                    raise
                on_unreadable(snap, exc)
                continue
            held += len(pending[-1])
            if held > max(len(referenced), FOLD_MIN_DIGESTS):
                referenced = digest_sets.unique(np.concatenate([referenced, *pending]))
                pending, held = [], 0
        if pending:
            referenced = digest_sets.unique(np.concatenate([referenced, *pending]))
        return referenced

    # -- pack storage: whether packs/ is this repository's (pack_storage.py) ------------
    # (pack_storage.py builds on this class, so the backup's two steps import it where used)
    def pack_object_names(self) -> list[str]:
        """Every object under ``packs/`` but the pack-storage mark: the packs, and whatever
        else is there (a pack under the wrong ``HH/``, a file not pyvbak's)."""
        return [n for n in self.backend.list(fmt.PACKS_FOLDER) if n != fmt.PACK_STORAGE_MARK]

    def packs_location(self) -> str:
        """Where the packs are, for messages: REPO/packs."""
        return (local_path(self.location) or self.location).rstrip("/") + "/packs"

    def check_pack_storage(self) -> None:
        """A backup's first check, under its lock (pack_storage.check_pack_storage)."""
        from .pack_storage import check_pack_storage

        check_pack_storage(self)

    def mark_pack_storage(self) -> list[str]:
        """A backup's, once its checks passed (pack_storage.mark_pack_storage)."""
        from .pack_storage import mark_pack_storage

        return mark_pack_storage(self)

    # -- digest index ---------------------------------------------------------------
    def pack_index_names(self) -> list[str]:
        return list(self.backend.list("index/"))

    def load_digest_index(self) -> DigestIndex:
        """All pack indexes, merged (repo/digest_index.py: through the local cache when
        there is one, else in memory).  Kept per pack-index listing: a backup needs it
        twice (leftover adoption, then dedup)."""
        names = sorted(self.pack_index_names())
        key = tuple(names)
        held = getattr(self, "_digest_index_cache", None)
        if held is not None and held[0] == key:
            return held[1]

        damaged: list[str] = []
        decoded: set[str] = set()

        def read_index(name: str) -> np.ndarray:
            # A damaged pack index is left out rather than stopping every backup, restore
            # and verify: its packs still carry their tables of contents, and the next
            # backup re-indexes them (recover_leftovers).  Until then their blocks are
            # simply not found (stored again by backups, reported missing by restores).
            decoded.add(name)
            try:
                return fmt.decode_pack_index(self.backend.read(name), f"pack index {name}")
            except (IntegrityError, ObjectMissing):  # listed but unreadable (e.g. a dangling link)
                damaged.append(name)
                return np.empty(0, fmt.PACK_INDEX_RECORD)

        index = None
        cache_dir = repo_cache_dir(self.config.repo_id)
        if cache_dir is not None:
            try:
                index = load_cached(cache_dir, self.config.repo_id, names, read_index, self.pack_index_names)
            except (PyvbakError, BackendError):
                raise  # the repository's own problem: report it (a stop request is no Exception)
            except Exception:  # the cache's problem (disk full, permissions, damage): do without
                index = None
        if index is None:
            damaged.clear()
            parts = [read_index(n) for n in names]
            index = DigestIndex(np.concatenate(parts) if parts else np.empty(0, fmt.PACK_INDEX_RECORD))
        self.damaged_pack_indexes = sorted(set(damaged))
        self._pack_indexes_decoded = decoded
        self._digest_index_cache = (key, index)
        return index

    def damaged_pack_index_names(self) -> list[str]:
        """Pack index objects that do not decode, read one at a time (verify: the objects
        themselves, whatever the local cache holds, in the memory of the largest one).
        Objects the last load_digest_index() decoded itself are not read again: their
        damage is in ``damaged_pack_indexes`` (an index merged in memory decodes them all:
        4 M records, 0.27 s saved)."""
        damaged = []
        done = getattr(self, "_pack_indexes_decoded", set())
        for name in sorted(self.pack_index_names()):
            if name in done:
                damaged += [name] if name in self.damaged_pack_indexes else []
                continue
            try:
                fmt.decode_pack_index(self.backend.read(name), f"pack index {name}")
            except IntegrityError:
                damaged.append(name)
            except ObjectMissing:
                pass  # removed meanwhile (a repair by a backup)
        return damaged

    def pack_indexes_gone(self, names: list[str] | None = None) -> bool | None:
        """Whether a pack index this host listed before is not among ``names`` (the
        listing of ``index/``, made here if not given) (cache.SeenPackIndexes): a prune
        elsewhere, or a pack index lost from storage, whose packs are then unindexed; True
        when this host remembers none yet, None without a local cache."""
        return SeenPackIndexes(self.config.repo_id).gone(self.pack_index_names() if names is None else names)

    def remember_pack_indexes(self, *, add: bool = False) -> None:
        """Remember the pack indexes listed now: in place of the ones remembered after a
        look for unindexed packs (a backup's recovery, a prune, a repair of everything),
        beside them (``add``) after a backup wrote its own (the newest one lost went
        unnoticed when only the listing before it was remembered)."""
        seen = SeenPackIndexes(self.config.repo_id)
        (seen.add if add else seen.remember)(self.pack_index_names())

    def write_pack_index(self, records: np.ndarray) -> str | None:
        if not len(records):
            return None
        data = fmt.encode_pack_index(records)
        name = fmt.pack_index_name(fmt.pack_id_of([data]))
        self.backend.write_new(name, data)
        return name

    def read_block_frame(self, record) -> bytes:
        pack_hex = bytes(record["pack"]).hex()
        return self.backend.read_range(fmt.pack_name(pack_hex), int(record["offset"]), int(record["clen"]))

    # -- the restore kit (restore.sh, README-RESTORE.txt) --------------------------------
    def refresh_restore_kit(self) -> list[str]:
        """Replace the repository's ``restore.sh`` and ``README-RESTORE.txt`` by this
        pyvbak's when they are of an older revision (or restore.sh is missing): init is
        not the only time they are written, so repositories get the script's fixes.  A
        newer revision is left alone (an older pyvbak never downgrades it).  Each is an
        atomic replace: a restore.sh running meanwhile keeps reading its old file.
        Lines for the user; a failure is one such line, never the backup's failure."""
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            kit = {}
            for name in INIT_HELPERS:
                with open(os.path.join(here, name), "rb") as f:
                    kit[name] = f.read()
        except OSError:
            return []  # not installed as files: init's copies stay
        revision = restore_kit_revision(kit["restore.sh"])
        try:
            stored = self.backend.read("restore.sh")
        except ObjectMissing:
            stored = b""
        except PyvbakError as e:
            return [f"warning: could not read restore.sh to check its revision: {e}"]
        local = local_path(self.location)
        script = os.path.join(local, "restore.sh") if local is not None else None
        if stored and restore_kit_revision(stored) >= revision:
            # up to date, but a run killed between its replace and its chmod left it
            # without its x bit (the backend writes 0600): './restore.sh' is refused
            try:
                if script is not None and not os.stat(script).st_mode & 0o100:
                    os.chmod(script, 0o755)
                    return ["made restore.sh in the repository executable again"]
            except OSError as e:
                return [f"warning: could not make restore.sh in the repository executable: {e.strerror}"]
            return []
        try:
            for name in ("README-RESTORE.txt", "restore.sh"):
                self.backend.replace(name, kit[name])
            if script is not None:
                os.chmod(script, 0o755)
        except (PyvbakError, OSError) as e:
            return [f"warning: could not update restore.sh and README-RESTORE.txt in the repository: {e}"]
        return [f"updated restore.sh and README-RESTORE.txt in the repository to revision {revision}"
                + (" (restore.sh was missing)" if not stored else "")]

    # -- leftovers of interrupted runs ------------------------------------------------
    def recover_leftovers(self, *, after_crash: bool = True) -> list[str]:
        """Clean what a killed backup left: temp objects, and packs no index names.

        Finding temp objects and unindexed packs lists every object, which grows with the
        repository (a local walk of 125 000 packs: 0.08 s warm, 0.32 s cold, per backup;
        requests on object stores), so callers that know no writer died - no stale lock
        was found - pass ``after_crash=False`` and only a damaged pack index triggers the
        check (and temp objects are looked for in ``locks/`` alone).  That is enough:
        every writer (backup, prune) makes its lock durable before its first object and
        removes it after its last temp object is gone, so a writer that died after its
        lock existed always leaves a stale lock; one that died before leaves at most the
        lock's own temp object.  Temp objects a user stranded by deleting a stale lock by
        hand are invisible to readers and removed by prune.

        Such packs are complete (pack writes are atomic) but were never indexed because
        the backup died first.  They are *adopted* - indexed from their own trailer - not
        deleted: a concurrent backup may still be about to index them, and an extra
        index entry is harmless while a deleted pack would not be.  Unreferenced data is
        reclaimed by prune.
        """
        # Without a stale lock only locks/ is looked at: the one window in which a killed
        # writer leaves no lock is between writing its lock's temp object and linking it.
        report = [RecoveryLine("temp_removed", n, f"removed incomplete object {n}") for n in
                  self.backend.cleanup_incomplete(older_than_seconds=0, prefix="" if after_crash else "locks/")]
        index = self.load_digest_index()
        damaged = list(self.damaged_pack_indexes)
        if not (after_crash or report or damaged):
            return report
        adopted, found = self.unindexed_pack_records(index)
        report += found
        if len(adopted):
            # packs verify --repair or prune unindexed on purpose (a lost/ marker names
            # them) are adopted only where they read back intact: indexing their bad
            # copies again would have backups deduplicate against them
            from .repair import leave_out_damaged_lost_copies

            adopted, report, problems, _ = leave_out_damaged_lost_copies(self, adopted, report)
            report += [RecoveryLine("kept_out", "", line) for line in problems]
        # A damaged index goes before the adopted one is written: re-indexing a pack gives
        # the same records, so often the same (content-named, create-only) object name.  A
        # crash in between leaves unindexed packs, which the next backup adopts.  But not
        # while a pack could not be re-indexed: the damaged index may be the last trace of
        # its blocks (a partly readable object, for a repair by hand), and saying its packs
        # were re-indexed would be false.
        left = [ln for ln in found if ln.kind == "left_alone"]
        if damaged and left:
            report += [RecoveryLine("index_kept", name, f"kept damaged pack index {name}: a pack could not be "
                                    f"re-indexed from its own table of contents ({left[0]}); run 'pyvbak verify'")
                       for name in damaged]
            damaged = []
        for name in damaged:
            try:
                self.backend.delete(name)
            except ObjectMissing:
                pass
            # (with nothing to re-index, "its packs were re-indexed" would be untrue)
            report.append(RecoveryLine("index_removed", name, f"removed damaged pack index {name} (" + (
                "its packs were re-indexed from their own tables of contents)" if len(adopted) else
                "every pack here is indexed without it: packs only it named are gone; 'pyvbak verify' names "
                "the blocks lost with them)")))
        if len(adopted):
            self.write_pack_index(adopted)
        if len(adopted) or damaged:
            self._digest_index_cache = None
        return report

    def unindexed_pack_records(self, index=None) -> tuple[np.ndarray, list[str]]:
        """(pack index records, report lines) for the packs no pack index names, read from
        their own trailers (tables of contents); packs whose trailer does not match their
        name are left out and reported.  Writes nothing."""
        index = self.load_digest_index() if index is None else index
        # Unique packs first (vectorised: a Python set over every record's pack id took
        # minutes at 10^8 records).
        raw = digest_sets.unique(index.records["pack"].view("S32")).tobytes()
        indexed = {raw[i : i + 32].hex() for i in range(0, len(raw), 32)}
        report: list[str] = []
        adopted = []
        for name in self.pack_object_names():
            pack_hex = name.rsplit("/", 1)[-1]
            if pack_hex in indexed or not re.fullmatch(r"[0-9a-f]{64}", pack_hex):
                continue
            if name != fmt.pack_name(pack_hex):  # readers would look for it elsewhere
                report.append(RecoveryLine("left_alone", name,
                                           f"left {name} alone: a pack of that name belongs at {fmt.pack_name(pack_hex)}"))
                continue
            try:
                size = self.backend.stat(name)
                if size < 4:
                    report.append(RecoveryLine("left_alone", name,
                                               f"left {name} alone: {size} bytes cannot be a pack (not pyvbak's?)"))
                    continue
                tail = self.backend.read_range(name, size - 4, 4)
                tlen = fmt.trailer_length_from_tail(tail)
                if tlen > size:
                    report.append(RecoveryLine("left_alone", name, f"left pack {pack_hex[:16]}… alone: its last "
                                               f"bytes give no table of contents (damaged or not pyvbak's)"))
                    continue
                raw_trailer = self.backend.read_range(name, size - tlen, tlen)
                if fmt.pack_id(raw_trailer).hex() != pack_hex:
                    report.append(RecoveryLine("left_alone", name, f"left pack {pack_hex[:16]}… alone: its trailer "
                                               f"does not match its name (damaged or not pyvbak's)"))
                    continue
                trailer = fmt.decode_pack_trailer(raw_trailer, f"pack {name}")
            except ObjectMissing:  # gone since the listing (a prune), or not a regular file
                report.append(RecoveryLine("left_alone", name, f"left {name} alone: it is gone or not a regular file"))
                continue
            except IntegrityError as exc:  # one malformed object must not stop every prune and repair
                report.append(RecoveryLine("left_alone", name, f"left pack {pack_hex[:16]}… alone: {exc}"))
                continue
            recs = np.zeros(len(trailer), fmt.PACK_INDEX_RECORD)
            for field in ("digest", "offset", "clen", "ulen"):
                recs[field] = trailer[field]
            recs["pack"] = np.frombuffer(bytes.fromhex(pack_hex), "V32")[0]
            adopted.append(recs)
            report.append(RecoveryLine("adopted", pack_hex, f"adopted unindexed pack {pack_hex[:16]}… ({len(recs)} "
                                       f"blocks): indexed from its own table of contents"))
        return (np.concatenate(adopted) if adopted else np.empty(0, fmt.PACK_INDEX_RECORD)), report

    # -- snapshot writing (last step of a backup) -----------------------------------------
    def commit_snapshot(self, snapshot_id: str, meta: dict, records: np.ndarray,
                        known_zero: list[tuple[int, int]] | None = None,
                        base: tuple[SnapshotInfo, np.ndarray] | None = None,
                        on_commit: Callable[[], None] | None = None) -> None:
        """Block index first, metadata last: the metadata is what makes it visible.
        ``known_zero``: record ranges the caller knows are zero (encode_snapshot_index).
        ``base``: (snapshot, sorted block indices): ``records`` holds only those blocks'
        records; every other one is that snapshot's, read again in chunks
        (encode_snapshot_index_patched).  ``on_commit``: called once the metadata is
        written, with no signal heard between the two (``interrupts.held``)."""
        index_name = fmt.snapshot_index_name(snapshot_id)
        for lock in self._locks:
            if lock.held:
                lock.check_held()
        if base is not None:
            try:
                data = fmt.encode_snapshot_index_patched(meta["block_size"], meta["size"],
                                                         self.iter_snapshot_index(base[0]), records, base[1])
            except IntegrityError:
                if self.backend.exists(fmt.snapshot_meta_name(base[0].id)):
                    raise
                # forget (a shared lock: it runs beside backups) took the parent away
                raise RepositoryError(
                    f"snapshot {base[0].id}, this backup's parent, was forgotten while the backup ran: "
                    f"nothing was committed; run the backup again") from None
        else:
            data = fmt.encode_snapshot_index(meta["block_size"], meta["size"], records, known_zero=known_zero)
        meta = dict(meta, id=snapshot_id, status="complete", index=index_name,
                    index_sha256=hashlib.sha256(data).hexdigest(), pyvbak_version=__version__)
        ours = True  # the index name is this snapshot's own unless write_new finds it taken
        try:
            if not self.backend.write_new(index_name, data):
                ours = False
                raise RepositoryError(f"snapshot index {index_name} already exists (snapshot id collision): retry")
            with interrupts.held():
                created = self.backend.write_new(fmt.snapshot_meta_name(snapshot_id),
                                                 json.dumps(meta, indent=2).encode())
                if created and on_commit is not None:
                    on_commit()
        except BaseException:
            # No metadata, no snapshot: an index written (or half-written) here is nobody's.
            # Out of space, an I/O error, Ctrl-C or SIGTERM remove it; a kill -9 leaves it
            # to prune, which removes indexes without metadata.
            # (Only while the metadata is not there: an interrupt can land after its
            # object was published and before write_new returned.)
            if ours:
                try:
                    if not self.backend.exists(fmt.snapshot_meta_name(snapshot_id)):
                        self.backend.delete(index_name)
                except (PyvbakError, OSError):
                    pass
            raise
        if not created:
            raise RepositoryError(f"snapshot {snapshot_id} already exists: retry")


def local_path(location: str) -> str | None:
    """The directory of a repository on the local file system - a plain path, or
    ``file://PATH`` (both LocalBackend) - else None.  ``file://`` once skipped every check
    of init and open: a repository made in a non-empty directory, a user's restore.sh
    replaced."""
    from ..backends import file_uri_path, is_file_uri

    if is_file_uri(location):
        return file_uri_path(location)
    return None if "://" in location else location


def _init_leftover(directory: str, name: str) -> bool:
    """``name`` in ``directory`` is what an init that failed (or runs) leaves: a temp
    object, or pyvbak's own restore kit - recognised by its first line, not its name (a
    user's own restore.sh was replaced)."""
    if name.startswith(TEMP_PREFIX):
        return True
    if name not in INIT_HELPERS:
        return False
    try:
        with open(os.path.join(directory, name), "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if name == "restore.sh":  # (kits before the revision line had the same second line)
        return bool(_KIT_REVISION_RE.search(head)) or b"# restore.sh - restore a pyvbak snapshot" in head
    return head.startswith(_README_FIRST_LINE)


def default_repository_path() -> str:
    base = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative path is invalid and ignored
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "pyvbak", "repository")


"""Where every stored block is: digest -> (pack, offset, lengths), and its local cache.

The repository's pack index objects (``index/…``, docs/FORMAT.md) are the truth.  Merging
them means reading every one and sorting all records: 80 bytes per stored block in RAM and
an argsort per backup (4 M blocks = 256 GiB stored at 64 KiB: 0.94 s for the argsort alone
on the project's VM, growing n log n), for a backup that may look up a few hundred changed
blocks.  So the merged, sorted index is kept in a local cache directory as two flat files
(digests, records) that lookups memory-map: a binary search touches ~log2(n) pages, and
only the pack indexes written since the cache was last merged are read and sorted.

Safety: a cache that knows a digest the repository no longer stores would make a backup
skip a block it must write.  The cache therefore records the exact set of pack index
names it was built from; pack index objects are immutable (content-addressed names), so
entries are valid exactly as long as all of those names still exist.  When any of them
is gone (prune rewrote the indexes) the cache is rebuilt from scratch.  Any problem with
the cache (unwritable, damaged, concurrently replaced) falls back to merging in memory:
the cache can make pyvbak faster, never wrong.  Small repositories (under MERGE_MIN_RECORDS
records and MERGE_MAX_FILES pack indexes) are merged in memory and write no cache at all.
Layout: docs/ARCHITECTURE.md, "Local cache".
"""

from __future__ import annotations

import json
import os
import secrets
import time

import numpy as np

from . import digest_sets
from . import format as fmt
from .cache import make_private_dirs

CACHE_FORMAT = "pyvbak-digest-index-cache-v1"
MANIFEST = "digest-index.json"
#: the pack indexes read besides the cached base are merged into it once they hold more
#: than base/MERGE_FRACTION records (or MERGE_MIN_RECORDS, or MERGE_MAX_FILES objects):
#: geometric growth, so each record is rewritten O(log n) times over the repository's life
MERGE_FRACTION = 8
#: and a repository under this many records (256 MiB stored at 64 KiB blocks) stays in
#: memory.  Merging in memory costs every backup its pack indexes' read and sort (2 GiB
#: bench image, 21 k records: 4-9 ms per backup) against 0.2-0.3 ms from the cache, which
#: costs 13-17 ms to build once (bench/RESULTS.md, "Digest index at scale"): the cache pays
#: for itself from the second incremental.  Below this, there is little to save and no
#: reason for cache files.
MERGE_MIN_RECORDS = 1 << 12
MERGE_MAX_FILES = 64
#: records per step of the streaming merges (80 + 32 bytes each)
MERGE_CHUNK = 1 << 18
#: a (re)build sorts at most this many records in memory at a time (4 M: ~450 MiB with
#: the argsort); more are sorted in runs spilled to the cache directory and merged
BUILD_RUN_RECORDS = 1 << 22
#: cache files no manifest names are deleted once this old: younger ones may be a
#: concurrent writer's, still being written (a reader that loses its files to this falls
#: back to memory; a writer maps its files before installing them, so it keeps them)
STALE_SECONDS = 60


class DigestIndex:
    """Sorted parts (in memory or memory-mapped), each a digest array and a record array.

    A *position* numbers the records of all parts one after the other; ``locate`` returns
    positions and ``records_at`` turns them into records.  A digest stored more than once
    (two backups wrote it at the same time) has several entries; any of them will do.
    """

    def __init__(self, records: np.ndarray | None = None, *, parts: list | None = None):
        if parts is None:
            parts = [_sorted_part(records if records is not None else np.empty(0, fmt.PACK_INDEX_RECORD))]
        self._parts = [(d, r) for d, r in parts if len(d)]
        self._starts = np.cumsum([0] + [len(d) for d, _ in self._parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, digests: np.ndarray) -> np.ndarray:
        """Positions for an array of digests ('S32' or 'V32'); -1 where missing."""
        keys = digests.view("S32") if digests.dtype != np.dtype("S32") else digests
        out = np.full(len(keys), -1, dtype=np.int64)
        for (dig, _), start in zip(self._parts, self._starts):
            todo = np.flatnonzero(out < 0)
            if not len(todo):
                break
            k = keys[todo]
            pos = np.searchsorted(dig, k)
            pos_c = np.minimum(pos, len(dig) - 1)
            found = (pos < len(dig)) & (np.asarray(dig[pos_c]) == k)
            out[todo[found]] = start + pos_c[found]
        return out

    def copies(self, digest: bytes) -> np.ndarray:
        """Every record of ``digest`` (usually one; more when backups stored it at the
        same time, or prune adopted a killed backup's pack beside a live copy)."""
        key = np.array([digest], dtype="S32")
        out = []
        for dig, recs in self._parts:
            a, b = np.searchsorted(dig, key, side="left")[0], np.searchsorted(dig, key, side="right")[0]
            if b > a:
                out.append(np.asarray(recs[a:b]))
        return np.concatenate(out) if out else np.empty(0, fmt.PACK_INDEX_RECORD)

    def locate_all(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every copy of each digest: (which, positions), ``which[i]`` the index into
        ``digests`` of the record at ``positions[i]`` (digests not found do not appear),
        in no particular order."""
        keys = digests.view("S32") if digests.dtype != np.dtype("S32") else digests
        which, where = [], []
        # A part smaller than the query is searched the other way round - each of its
        # records in the sorted queries - which costs its own size, not the query's: the
        # small parts besides the cached base (up to MERGE_MAX_FILES of them) each cost
        # two full searches of every query otherwise (2 M queries, 10 small parts: 2.2 s
        # vs 0.66 s for ``locate``).  Only for unique queries (each record has one).
        if len(keys) < 2 or bool((keys[1:] > keys[:-1]).all()):  # sorted unique (verify's): no copy
            order, sk, unique = None, keys, True
        else:
            order = np.argsort(keys, kind="stable")
            sk = keys[order]
            unique = bool((sk[1:] != sk[:-1]).all())
        for (dig, _), start in zip(self._parts, self._starts):
            if unique and len(dig) < len(sk):
                pos = np.searchsorted(sk, dig)
                pos_c = np.minimum(pos, len(sk) - 1)
                hit = np.flatnonzero((pos < len(sk)) & (sk[pos_c] == dig))
                if len(hit):
                    which.append((pos_c[hit] if order is None else order[pos_c[hit]]).astype(np.int64))
                    where.append(start + hit.astype(np.int64))
                continue
            a = np.searchsorted(dig, keys, side="left")
            n = np.searchsorted(dig, keys, side="right") - a
            if not n.any():
                continue
            w = np.repeat(np.arange(len(keys), dtype=np.int64), n)
            # position of each copy: its run's start plus its rank within the run
            first = np.repeat(a - (np.cumsum(n) - n), n)
            which.append(w)
            where.append(start + first + np.arange(len(w), dtype=np.int64))
        if not which:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(which), np.concatenate(where)

    def find(self, digest: bytes) -> int:
        """Position of ``digest`` or -1."""
        return int(self.locate(np.array([digest], dtype="S32"))[0])

    def __contains__(self, digest: bytes) -> bool:
        return self.find(digest) >= 0

    def records_at(self, positions) -> np.ndarray:
        """The records at ``positions`` (all >= 0), in that order."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = np.empty(len(pos), fmt.PACK_INDEX_RECORD)
        which = np.searchsorted(self._starts, pos, side="right") - 1
        for p, (_, recs) in enumerate(self._parts):
            sel = np.flatnonzero(which == p)
            if len(sel):
                out[sel] = recs[pos[sel] - self._starts[p]]
        return out

    @property
    def records(self) -> np.ndarray:
        """Every record, in position order (reads all of a memory-mapped cache: tools,
        tests and crash recovery, not the per-backup paths)."""
        if not self._parts:
            return np.empty(0, fmt.PACK_INDEX_RECORD)
        return np.concatenate([np.asarray(r) for _, r in self._parts])


class ExcludingIndex:
    """A DigestIndex in which the ``excluded`` digests (sorted unique S32) are absent -
    for deduplication only (Repository.dedup_index): blocks whose every copy is flagged
    bad.  Only the lookups a backup makes."""

    def __init__(self, index: DigestIndex, excluded: np.ndarray):
        self._index, self.excluded = index, excluded

    def __len__(self) -> int:
        return len(self._index)

    def locate(self, digests: np.ndarray) -> np.ndarray:
        keys = digests.view("S32") if digests.dtype != np.dtype("S32") else digests
        out = self._index.locate(keys)
        out[digest_sets.isin(keys, self.excluded)] = -1
        return out

    def find(self, digest: bytes) -> int:
        return int(self.locate(np.array([digest], dtype="S32"))[0])

    def __contains__(self, digest: bytes) -> bool:
        return self.find(digest) >= 0


def _sorted_part(records: np.ndarray):
    digests = records["digest"].view("S32") if len(records) else np.empty(0, "S32")
    order = np.argsort(digests, kind="stable")
    return digests[order], records[order]


# ---- the cache ------------------------------------------------------------------------

def load_cached(directory: str, repo_id: str, names: list[str], read_index, relist=None) -> DigestIndex:
    """The digest index of the pack indexes ``names`` through the cache in ``directory``
    (created if needed); ``read_index(name)`` returns one pack index's records and
    ``relist()`` lists the pack indexes again.  Raises on any cache problem (the caller
    falls back to merging in memory)."""
    if not names:  # an empty repository: nothing worth a cache directory
        return DigestIndex()
    manifest = _read_manifest(directory, repo_id)
    wanted = set(names)
    if manifest is not None and not set(manifest["indexes"]) <= wanted and relist is not None:
        # a concurrent backup may have added (and cached) a pack index after our listing
        fresh = sorted(relist())
        if set(manifest["indexes"]) <= set(fresh):
            names, wanted = fresh, set(fresh)
    if manifest is not None and not set(manifest["indexes"]) <= wanted:
        # built from a pack index that is gone (prune rewrote them): never use it again
        _forget(directory)
        manifest = None
    if manifest is None:
        # The same rule as for the delta below, against an empty base: a small repository
        # stays in memory (MERGE_MIN_RECORDS), a larger one is built in bounded memory.
        first: dict[str, np.ndarray] = {}
        held = 0
        for name in names:
            first[name] = read_index(name)
            held += len(first[name])
            if held > MERGE_MIN_RECORDS or len(first) > MERGE_MAX_FILES:
                break
        else:
            return DigestIndex(np.concatenate(list(first.values())))
        make_private_dirs(directory)  # private, as the repository's objects (its parents too)
        chunks = _build_chunks(directory, names, lambda n: first.pop(n) if n in first else read_index(n))
        base = _write_base(directory, repo_id, names, None, chunks)
        return DigestIndex(parts=[base])
    base = _open_base(directory, manifest)
    new = sorted(wanted - set(manifest["indexes"]))
    delta = _sorted_part(_read_all(new, read_index))
    n_base, n_delta = len(base[0]), len(delta[0])
    if n_delta > max(n_base // MERGE_FRACTION, MERGE_MIN_RECORDS) or len(new) > MERGE_MAX_FILES:
        merged = _write_base(directory, repo_id, sorted(wanted), n_base + n_delta, _merge_chunks(base, delta))
        return DigestIndex(parts=[merged])
    return DigestIndex(parts=[base, delta])


def _build_chunks(directory: str, names: list[str], read_index):
    """All records of the pack indexes ``names`` as sorted chunks, in bounded memory: read
    and sorted in runs of at most BUILD_RUN_RECORDS; if there is more than one run, the
    runs are spilled to the cache directory and merged (k-way) chunk by chunk."""
    batch: list[np.ndarray] = []
    held = 0
    spilled: list[tuple[str, str, int]] = []
    token = f"{int(time.time())}-{secrets.token_hex(6)}"
    try:
        for name in names:
            recs = read_index(name)
            batch.append(recs)
            held += len(recs)
            if held >= BUILD_RUN_RECORDS:
                spilled.append(_spill(directory, f"run-{token}-{len(spilled)}", _sorted_part(np.concatenate(batch))))
                batch, held = [], 0
        if not spilled:
            yield _sorted_part(np.concatenate(batch) if batch else np.empty(0, fmt.PACK_INDEX_RECORD))
            return
        if batch:
            spilled.append(_spill(directory, f"run-{token}-{len(spilled)}", _sorted_part(np.concatenate(batch))))
        runs = [_map_part(d, r, n) for d, r, n in spilled]
        yield from _kway(runs)
    finally:
        _unlink_all([p for d, r, _ in spilled for p in (d, r)])


def _spill(directory: str, stem: str, part) -> tuple[str, str, int]:
    paths = (os.path.join(directory, stem + ".dig"), os.path.join(directory, stem + ".rec"))
    try:
        with open(paths[0], "wb") as fd, open(paths[1], "wb") as fr:
            _write_part(fd, fr, part)
    except BaseException:
        _unlink_all(paths)
        raise
    return paths[0], paths[1], len(part[0])


def _write_part(fd, fr, part) -> None:
    """Append sorted (digests, records) to the digest and record files, in the files'
    dtypes (np.concatenate may hand back records in native byte order)."""
    dig, rec = part
    fd.write(np.ascontiguousarray(dig, dtype="S32").tobytes())
    fr.write(np.ascontiguousarray(rec).astype(fmt.PACK_INDEX_RECORD, copy=False).tobytes())


def _map_part(dig_path: str, rec_path: str, n: int):
    """The (digests, records) files of n records, memory-mapped read-only."""
    if n == 0:
        return np.empty(0, "S32"), np.empty(0, fmt.PACK_INDEX_RECORD)
    return (
        np.memmap(dig_path, dtype="S32", mode="r", shape=(n,)),
        np.memmap(rec_path, dtype=fmt.PACK_INDEX_RECORD, mode="r", shape=(n,)),
    )


def _kway(runs):
    """Merge sorted (digests, records) runs: each step takes MERGE_CHUNK from every run,
    emits everything up to the smallest last digest among the runs that have more (all of
    that run's chunk, so every step makes progress), sorted."""
    pos = [0] * len(runs)
    while True:
        heads = []
        limit = None
        for i, (dig, _) in enumerate(runs):
            if pos[i] < len(dig):
                d = np.asarray(dig[pos[i] : pos[i] + MERGE_CHUNK])
                heads.append((i, d))
                if pos[i] + len(d) < len(dig) and (limit is None or d[-1] < limit):
                    limit = d[-1]
        if not heads:
            return
        digs, recs = [], []
        for i, d in heads:
            k = len(d) if limit is None else int(np.searchsorted(d, limit, side="right"))
            if k:
                digs.append(d[:k])
                recs.append(np.asarray(runs[i][1][pos[i] : pos[i] + k]))
                pos[i] += k
        dig = np.concatenate(digs)
        order = np.argsort(dig, kind="stable")
        yield dig[order], np.concatenate(recs)[order]


def forget_cached(directory: str | None) -> None:
    """Drop a repository's cached digest index (e.g. when verify found a damaged pack index
    the cache was built before: the next load reads the objects, finds the damage and
    the next backup repairs it)."""
    if directory is not None and os.path.isdir(directory):
        _forget(directory)


def _forget(directory: str) -> None:
    """Retire the cache's manifest (its files go with the stale ones)."""
    try:
        os.unlink(os.path.join(directory, MANIFEST))
    except FileNotFoundError:
        pass
    _drop_stale(directory, set())


def _read_all(names: list[str], read_index) -> np.ndarray:
    parts = [read_index(n) for n in names]
    return np.concatenate(parts) if parts else np.empty(0, fmt.PACK_INDEX_RECORD)


def _read_manifest(directory: str, repo_id: str) -> dict | None:
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # damaged: rebuild
    ok = (
        isinstance(doc, dict)
        and doc.get("format") == CACHE_FORMAT
        and doc.get("repository") == repo_id
        and isinstance(doc.get("indexes"), list)
        and isinstance(doc.get("count"), int)
        and isinstance(doc.get("digests"), str)
        and isinstance(doc.get("records"), str)
    )
    if not ok:
        return None
    for key, width in (("digests", 32), ("records", fmt.PACK_INDEX_RECORD.itemsize)):
        path = os.path.join(directory, os.path.basename(doc[key]))
        try:
            if os.path.getsize(path) != doc["count"] * width:
                return None
        except OSError:
            return None
    return doc


def _open_base(directory: str, manifest: dict):
    return _map_part(os.path.join(directory, manifest["digests"]), os.path.join(directory, manifest["records"]), manifest["count"])


def _merge_chunks(base, delta):
    """Sorted (digests, records) chunks of base and delta merged (delta is in memory)."""
    bdig, brec = base
    ddig, drec = delta
    ins = np.searchsorted(bdig, ddig)  # delta[j] goes before base[ins[j]]
    n = len(bdig)
    lo = 0
    for a in range(0, max(n, 1), MERGE_CHUNK):
        b = min(a + MERGE_CHUNK, n)
        last = b >= n
        hi = len(ddig) if last else int(np.searchsorted(ins, b, side="left"))
        at = ins[lo:hi] - a
        yield (np.insert(np.asarray(bdig[a:b]), at, ddig[lo:hi]), np.insert(np.asarray(brec[a:b]), at, drec[lo:hi]))
        lo = hi
        if last:
            break


def _write_base(directory: str, repo_id: str, names: list[str], count: int | None, chunks) -> tuple:
    """Write the sorted chunks as a new base, fsync it, install its manifest atomically,
    drop old bases; return the new base memory-mapped."""
    token = f"{int(time.time())}-{secrets.token_hex(6)}"
    files = {"digests": f"digests-{token}.bin", "records": f"records-{token}.bin"}
    paths = {k: os.path.join(directory, v) for k, v in files.items()}
    tmp = os.path.join(directory, f".{MANIFEST}.{token}.tmp")
    written = 0
    try:
        with open(paths["digests"], "wb") as fd, open(paths["records"], "wb") as fr:
            for part in chunks:
                _write_part(fd, fr, part)
                written += len(part[0])
            for f in (fd, fr):
                f.flush()
                os.fsync(f.fileno())
        if count is not None and written != count:
            raise RuntimeError(f"digest index cache: merged {written} records, expected {count}")
        manifest = {"format": CACHE_FORMAT, "repository": repo_id, "count": written, "indexes": names, **files}
        mapped = _open_base(directory, manifest)  # before anyone can see (and drop) them
        with open(tmp, "wb") as f:
            f.write(json.dumps(manifest).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, MANIFEST))
    except BaseException:
        _unlink_all([*paths.values(), tmp])
        raise
    _drop_stale(directory, set(files.values()))
    return mapped


def _unlink_all(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def _drop_stale(directory: str, keep: set[str]) -> None:
    now = time.time()
    for entry in os.scandir(directory):
        name = entry.name
        if name in keep or name == MANIFEST:
            continue
        if not (name.startswith(("digests-", "records-", "run-")) or name.startswith(f".{MANIFEST}.")):
            continue
        try:
            if now - entry.stat().st_mtime > STALE_SECONDS:
                os.unlink(entry.path)
        except OSError:
            pass

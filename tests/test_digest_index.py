"""The digest index and its local cache (pyvbak/repo/digest_index.py).

The cache may make lookups cheaper, never different: every test compares it with the
index merged in memory from the repository's pack indexes, and the safety test checks
that a block pruned from the repository is never reported as stored.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import pyvbak.repo.digest_index as dx
from pyvbak.engine.backup import run_backup
from pyvbak.repo import format as fmt
from pyvbak.repo.prune import forget_snapshots, prune_repository
from pyvbak.repo.repository import Repository
from pyvbak.sources.file import FileSource

BS = 64 * 1024


def backup(repo_path, img, vm="v", blocks=20, seed=None):
    rng = np.random.default_rng(seed)
    with open(img, "wb") as f:
        f.write(rng.bytes(blocks * BS))
    repo = Repository.open(repo_path)
    with FileSource(img) as src:
        return run_backup(repo, src, vm=vm, disk="d"), repo


def in_memory(repo) -> dx.DigestIndex:
    names = sorted(repo.pack_index_names())
    parts = [fmt.decode_pack_index(repo.backend.read(n), n) for n in names]
    return dx.DigestIndex(np.concatenate(parts) if parts else np.empty(0, fmt.PACK_INDEX_RECORD))


def cache_dir(repo) -> str:
    return os.path.join(os.environ["PYVBAK_CACHE_DIR"], repo.config.repo_id)


def assert_same(idx: dx.DigestIndex, ref: dx.DigestIndex, absent: int = 50):
    assert len(idx) == len(ref)
    want = ref.records
    pos = idx.locate(want["digest"])
    assert (pos >= 0).all()
    got = idx.records_at(pos)
    # the same digest may sit in two packs; then either entry is right, so compare per digest
    for g, w in zip(got, want):
        assert bytes(g["digest"]) == bytes(w["digest"])
        alts = ref.records_at(np.flatnonzero(ref.records["digest"] == w["digest"]))
        assert any(g.tobytes() == a.tobytes() for a in alts)
    missing = np.frombuffer(os.urandom(32 * absent), "S32")
    assert (idx.locate(missing) == -1).all()
    assert sorted(bytes(r) for r in idx.records) == sorted(bytes(r) for r in want)


@pytest.fixture
def small_merges(monkeypatch):
    """Merge the delta into the cached base after a few records, in chunks of 7."""
    monkeypatch.setattr(dx, "MERGE_MIN_RECORDS", 8)
    monkeypatch.setattr(dx, "MERGE_FRACTION", 2)
    monkeypatch.setattr(dx, "MERGE_CHUNK", 7)


def test_cached_index_equals_the_in_memory_merge_through_merges(tmp_path, small_merges):
    repo_path = str(tmp_path / "repo")
    Repository.init(repo_path)
    shapes = set()
    for i in range(7):
        _, _ = backup(repo_path, tmp_path / "img", vm=f"vm{i % 3}", blocks=5 + 7 * i, seed=i)
        repo = Repository.open(repo_path)  # a fresh process's view: no in-memory cache
        idx = repo.load_digest_index()
        shapes.add(tuple(len(d) for d, _ in idx._parts))
        assert_same(idx, in_memory(repo))
    # both states were exercised: a merged base alone, and base + unmerged delta
    assert any(len(s) == 1 for s in shapes) and any(len(s) == 2 for s in shapes)
    assert os.path.exists(os.path.join(cache_dir(repo), dx.MANIFEST))


def test_large_offsets_survive_the_cache_file_byte_order(tmp_path, small_merges):
    # records go through np.concatenate, which may return native byte order; the cache
    # file must still hold the index's big-endian layout (a mix-up gave 2**63-sized offsets)
    recs = np.zeros(40, fmt.PACK_INDEX_RECORD)
    recs["digest"] = np.frombuffer(os.urandom(32 * 40), "V32")
    recs["offset"] = np.arange(40, dtype=np.uint64) * (3 << 32) + 5
    recs["clen"] = 1234
    recs["ulen"] = BS
    halves = {"index/a": recs[:20], "index/b": recs[20:]}
    d = str(tmp_path / "cache")
    first = dx.load_cached(d, "r1", ["index/a"], halves.__getitem__)
    second = dx.load_cached(d, "r1", ["index/a", "index/b"], halves.__getitem__)
    assert len(second._parts) == 1  # merged into a new memory-mapped base
    assert isinstance(second._parts[0][1], np.memmap)
    pos = second.locate(recs["digest"])
    assert (second.records_at(pos)["offset"] == recs["offset"]).all()
    assert (first.records_at(first.locate(recs["digest"][:20]))["clen"] == 1234).all()


def test_pruned_blocks_are_never_reported_as_stored(tmp_path, small_merges):
    repo_path = str(tmp_path / "repo")
    Repository.init(repo_path)
    gone, repo = backup(repo_path, tmp_path / "a.img", vm="gone", blocks=30, seed=1)
    backup(repo_path, tmp_path / "b.img", vm="kept", blocks=30, seed=2)
    repo = Repository.open(repo_path)
    gone_digests = repo.load_snapshot_index(repo.resolve(gone.snapshot_id))[2]["digest"]
    assert (repo.load_digest_index().locate(gone_digests) >= 0).all()  # cached now

    forget_snapshots(repo, [repo.resolve(gone.snapshot_id)])
    prune_repository(Repository.open(repo_path))
    repo = Repository.open(repo_path)
    idx = repo.load_digest_index()
    assert (idx.locate(gone_digests) == -1).all(), "the cache still claims pruned blocks"
    assert_same(idx, in_memory(repo))
    # and a backup of the same data stores it again
    again, _ = backup(repo_path, tmp_path / "a.img", vm="back", blocks=30, seed=1)
    assert again.new_blocks == 30


@pytest.mark.parametrize(
    "damage",
    ["garbage manifest", "truncated digests", "missing records", "other repository", "empty files"],
)
def test_damaged_cache_is_rebuilt_or_bypassed(tmp_path, small_merges, damage):
    repo_path = str(tmp_path / "repo")
    Repository.init(repo_path)
    for i in range(3):
        backup(repo_path, tmp_path / "img", blocks=10, seed=10 + i)
    repo = Repository.open(repo_path)
    repo.load_digest_index()
    d = cache_dir(repo)
    manifest_path = os.path.join(d, dx.MANIFEST)
    import json

    doc = json.loads(open(manifest_path).read())
    if damage == "garbage manifest":
        open(manifest_path, "wb").write(b"\x00{not json")
    elif damage == "truncated digests":
        os.truncate(os.path.join(d, doc["digests"]), 32 * doc["count"] - 7)
    elif damage == "missing records":
        os.unlink(os.path.join(d, doc["records"]))
    elif damage == "other repository":
        doc["repository"] = "0" * 12
        open(manifest_path, "w").write(json.dumps(doc))
    elif damage == "empty files":
        for k in ("digests", "records"):
            open(os.path.join(d, doc[k]), "wb").close()
    repo = Repository.open(repo_path)
    assert_same(repo.load_digest_index(), in_memory(repo))
    res, _ = backup(repo_path, tmp_path / "img", blocks=10, seed=10)  # same data as backup 1
    assert res.new_blocks == 0


def test_unusable_cache_directory_falls_back_to_memory(tmp_path, monkeypatch):
    repo_path = str(tmp_path / "repo")
    Repository.init(repo_path)
    backup(repo_path, tmp_path / "img", blocks=10, seed=3)
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"x")
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(blocker))  # makedirs fails under a file
    repo = Repository.open(repo_path)
    assert_same(repo.load_digest_index(), in_memory(repo))
    res, _ = backup(repo_path, tmp_path / "img", blocks=10, seed=3)
    assert res.new_blocks == 0
    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")  # explicitly off
    repo = Repository.open(repo_path)
    assert_same(repo.load_digest_index(), in_memory(repo))


def test_damaged_pack_index_is_still_reported(tmp_path):
    # the cache must not swallow the repository's own errors: a damaged pack index is left
    # out of the index (so its packs get re-indexed, tests/test_cli_errors.py) and named
    repo_path = str(tmp_path / "repo")
    Repository.init(repo_path)
    backup(repo_path, tmp_path / "img", blocks=10, seed=4)
    repo = Repository.open(repo_path)
    name = sorted(repo.pack_index_names())[0]
    path = os.path.join(repo_path, name)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 8)
    reopened = Repository.open(repo_path)
    index = reopened.load_digest_index()
    assert reopened.damaged_pack_indexes == [name]
    assert len(index) == 0  # its records are not trusted


def test_stale_cache_files_are_removed(tmp_path, small_merges, monkeypatch):
    monkeypatch.setattr(dx, "STALE_SECONDS", 0)
    repo_path = str(tmp_path / "repo")
    Repository.init(repo_path)
    for i in range(5):
        backup(repo_path, tmp_path / "img", blocks=12, seed=20 + i)
        Repository.open(repo_path).load_digest_index()
    repo = Repository.open(repo_path)
    files = sorted(f for f in os.listdir(cache_dir(repo)) if f != "snapshots.json")
    # one manifest and the one base it names
    assert len(files) == 3 and dx.MANIFEST in files, files


@pytest.mark.parametrize("run_records,chunk", [(1, 1), (5, 3), (13, 64), (1000, 4)])
def test_build_in_spilled_runs_equals_in_memory_sort(tmp_path, monkeypatch, run_records, chunk):
    # a (re)build of a large repository sorts runs in bounded memory and merges them
    monkeypatch.setattr(dx, "BUILD_RUN_RECORDS", run_records)
    monkeypatch.setattr(dx, "MERGE_CHUNK", chunk)
    monkeypatch.setattr(dx, "MERGE_MIN_RECORDS", 8)  # this many records make a cache
    rng = np.random.default_rng(run_records)
    objects = {}
    for i in range(9):
        n = int(rng.integers(0, 30))
        recs = np.zeros(n, fmt.PACK_INDEX_RECORD)
        # few distinct digests: many duplicates within and across runs
        recs["digest"] = np.frombuffer(bytes(rng.integers(0, 4, size=32 * n, dtype=np.uint8)), "V32")
        recs["offset"] = rng.integers(0, 1 << 40, size=n)
        recs["clen"] = i
        objects[f"index/{i:02d}"] = recs
    d = str(tmp_path / "cache")
    idx = dx.load_cached(d, "rid", sorted(objects), objects.__getitem__)
    every = np.concatenate(list(objects.values()))
    ref = dx.DigestIndex(every)
    assert len(idx) == len(every)
    dig = idx._parts[0][0] if idx._parts else np.empty(0, "S32")
    assert (np.asarray(dig[1:]) >= np.asarray(dig[:-1])).all(), "merged digests are not sorted"
    assert sorted(bytes(r) for r in idx.records) == sorted(bytes(r) for r in ref.records)
    assert isinstance(idx._parts[0][0], np.memmap)  # served from the cache files
    assert not [f for f in os.listdir(d) if f.startswith("run-")], "spilled runs left behind"


def test_failed_build_leaves_no_runs_and_no_manifest(tmp_path, monkeypatch):
    from pyvbak.errors import IntegrityError

    monkeypatch.setattr(dx, "BUILD_RUN_RECORDS", 4)
    monkeypatch.setattr(dx, "MERGE_MIN_RECORDS", 8)

    def read_index(name):
        if name == "index/5":
            raise IntegrityError("pack index index/5 is truncated")
        recs = np.zeros(6, fmt.PACK_INDEX_RECORD)
        recs["digest"] = np.frombuffer(os.urandom(32 * 6), "V32")
        return recs

    d = tmp_path / "cache"
    with pytest.raises(IntegrityError, match="index/5"):
        dx.load_cached(str(d), "rid", [f"index/{i}" for i in range(8)], read_index)
    assert os.listdir(d) == []  # the build had started (spilled runs) and cleaned up


def test_small_repository_stays_in_memory(tmp_path):
    # below MERGE_MIN_RECORDS and MERGE_MAX_FILES no cache files are written at all
    repo_path = str(tmp_path / "repo")
    Repository.init(repo_path)
    for i in range(3):
        backup(repo_path, tmp_path / "img", blocks=10, seed=40 + i)
    repo = Repository.open(repo_path)
    idx = repo.load_digest_index()
    assert_same(idx, in_memory(repo))
    assert not os.path.exists(os.path.join(cache_dir(repo), dx.MANIFEST))
    assert not [f for f in os.listdir(cache_dir(repo)) if f.endswith(".bin")]


def test_concurrent_builders_and_readers_agree(tmp_path, monkeypatch):
    # several processes (threads here) building, merging and reading one cache directory:
    # each gets a correct index (through the cache or, if it lost a race, a fresh build)
    import threading

    monkeypatch.setattr(dx, "MERGE_MIN_RECORDS", 4)
    monkeypatch.setattr(dx, "MERGE_FRACTION", 1)
    monkeypatch.setattr(dx, "STALE_SECONDS", 0)  # replaced files go at once
    rng = np.random.default_rng(5)
    objects = {}
    for i in range(12):
        recs = np.zeros(10, fmt.PACK_INDEX_RECORD)
        recs["digest"] = np.frombuffer(rng.bytes(320), "V32")
        recs["offset"] = np.arange(10) + 1000 * i
        objects[f"index/{i:02d}"] = recs
    every = np.concatenate(list(objects.values()))
    d = str(tmp_path / "cache")
    errors, results, fallbacks = [], [], []

    def worker(k):
        try:
            for upto in range(2 + k % 3, 13, 3):
                names = sorted(objects)[:upto]
                idx = dx.load_cached(d, "rid", names, objects.__getitem__)
                want = np.concatenate([objects[n] for n in names])
                pos = idx.locate(want["digest"])
                results.append(bool((pos >= 0).all() and (idx.records_at(pos)["offset"] == want["offset"]).all()))
        except FileNotFoundError:
            fallbacks.append(k)  # files replaced under this reader: the caller falls back to memory
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert results and all(results), (results, fallbacks)  # every load that got an index got the right one
    final = dx.load_cached(d, "rid", sorted(objects), objects.__getitem__)
    pos = final.locate(every["digest"])
    assert (pos >= 0).all() and (final.records_at(pos)["offset"] == every["offset"]).all()


def test_an_older_listing_does_not_retire_a_newer_cache(tmp_path, monkeypatch):
    # process A listed the pack indexes, then B added one and cached it: A re-lists
    # instead of throwing away (and rebuilding) B's cache
    monkeypatch.setattr(dx, "MERGE_MIN_RECORDS", 4)
    objects = {}
    for i in range(3):
        recs = np.zeros(10, fmt.PACK_INDEX_RECORD)
        recs["digest"] = np.frombuffer(os.urandom(320), "V32")
        objects[f"index/{i}"] = recs
    d = str(tmp_path / "cache")
    dx.load_cached(d, "rid", sorted(objects), objects.__getitem__)  # B: cache of all three
    manifest = json_manifest(d)
    old_listing = sorted(objects)[:2]  # A's listing, from before B's third index
    idx = dx.load_cached(d, "rid", old_listing, objects.__getitem__, relist=lambda: sorted(objects))
    assert json_manifest(d) == manifest  # same cache, not rebuilt
    assert (idx.locate(objects["index/2"]["digest"]) >= 0).all()
    # without a way to re-list, or when the named index really is gone, it is retired
    del objects["index/2"]
    idx = dx.load_cached(d, "rid", sorted(objects), objects.__getitem__, relist=lambda: sorted(objects))
    assert json_manifest(d)["indexes"] == sorted(objects)
    assert len(idx) == 20


def json_manifest(d):
    import json

    with open(os.path.join(d, dx.MANIFEST)) as f:
        return json.load(f)


def test_an_interruption_while_building_the_cache_is_not_swallowed(tmp_path, small_merges, monkeypatch):
    # SIGTERM / Ctrl-C arrive as exceptions; the cache's fallback must not eat them
    from pyvbak.errors import Interrupted

    repo_path = str(tmp_path / "repo")
    Repository.init(repo_path)
    for i in range(2):
        backup(repo_path, tmp_path / "img", blocks=10, seed=60 + i)

    def interrupted(*a, **k):
        raise Interrupted("interrupted by SIGTERM")

    monkeypatch.setattr(dx, "_write_base", interrupted)
    with pytest.raises(Interrupted):
        Repository.open(repo_path).load_digest_index()
    monkeypatch.setattr(dx, "_write_base", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    repo = Repository.open(repo_path)
    assert_same(repo.load_digest_index(), in_memory(repo))  # a full cache disk: memory instead


def test_the_repository_loads_through_the_cache(tmp_path, monkeypatch):
    """Repository.load_digest_index() builds and uses the local cache above the small-
    repository threshold (a bug while adding the damaged-index handling bypassed it)."""
    from pyvbak.repo.cache import repo_cache_dir

    monkeypatch.setattr(dx, "MERGE_MIN_RECORDS", 0)
    repo = Repository.init(str(tmp_path / "repo"))
    recs = np.zeros(5, fmt.PACK_INDEX_RECORD)
    recs["digest"] = np.frombuffer(os.urandom(32 * 5), "V32")
    repo.write_pack_index(recs)
    manifest = os.path.join(repo_cache_dir(repo.config.repo_id), dx.MANIFEST)
    assert not os.path.exists(manifest)
    assert len(Repository.open(repo.location).load_digest_index()) == 5
    assert os.path.exists(manifest)


def test_verify_decodes_each_pack_index_once_when_merged_in_memory(tmp_path, monkeypatch):
    """Verify checks every pack index object itself; an index merged in memory already
    decoded (and judged) them all, so the check does not read them again - and still
    names a damaged one."""
    monkeypatch.setenv("PYVBAK_CACHE_DIR", "")
    repo_path = str(tmp_path / "repo")
    Repository.init(repo_path)
    for i in range(3):
        backup(repo_path, tmp_path / "img", blocks=6, seed=40 + i)
    repo = Repository.open(repo_path)
    names = sorted(repo.pack_index_names())
    with open(os.path.join(repo_path, names[1]), "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 8)
    decoded = []
    real = fmt.decode_pack_index
    monkeypatch.setattr(fmt, "decode_pack_index", lambda data, what: decoded.append(what) or real(data, what))
    repo = Repository.open(repo_path)
    repo.load_digest_index()
    assert repo.damaged_pack_index_names() == [names[1]]
    assert sorted(decoded) == sorted(f"pack index {n}" for n in names)  # each once

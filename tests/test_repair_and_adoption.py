"""Block copies, prune on a full disk, failed backups: regression tests.

A pack whose every index record ``verify --repair`` dropped (they read back corrupt) is a
pack no index names - exactly what adoption (a killed backup's pack) indexes again from the
pack's own table of contents.  Adopted again, the corrupt copies were back in the index and
backups deduplicated against them instead of storing the blocks again: the repair undone
by the next prune (or by the same ``--repair`` when it also adopted), and the next
snapshots unrestorable."""

from __future__ import annotations

import json
import os
import shutil

from images import BS, backup_file, make_image, restore_to, same_file
from pyvbak.cli.main import main
from pyvbak.errors import IntegrityError
from pyvbak.repo.prune import prune_repository
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository


def _pack_of(repo: Repository, before: set[str]) -> str:
    (name,) = set(repo.pack_object_names()) - before
    return name


def _corrupt_every_frame(repo: Repository, pack_name: str) -> None:
    pid = bytes.fromhex(pack_name.rsplit("/", 1)[-1])
    path = os.path.join(repo.location, pack_name)
    data = bytearray(open(path, "rb").read())
    recs = [r for r in Repository.open(repo.location).load_digest_index().records if bytes(r["pack"]) == pid]
    assert recs
    for r in recs:
        data[int(r["offset"]) + int(r["clen"]) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)


def _records_of(location: str, pack_name: str) -> int:
    pid = bytes.fromhex(pack_name.rsplit("/", 1)[-1])
    return sum(bytes(r["pack"]) == pid for r in Repository.open(location).load_digest_index().records)


def _backs_up_and_restores(tmp_path, location: str, img, vm: str) -> None:
    """The repaired repository works: a backup stores the dropped blocks again (not
    deduplicated against the corrupt copies) and its snapshot restores byte for byte."""
    res = backup_file(Repository.open(location), img, vm=vm)
    assert res.new_blocks > 0
    out = tmp_path / f"out-{vm}.img"
    restore_to(Repository.open(location), res.snapshot_id, out, force=True)
    assert same_file(out, img)


def _one_pack_dropped_by_repair(tmp_path, capsys, seed: int):
    """A one-pack backup whose every frame is corrupt, after 'verify --repair' dropped
    its records: (repository, image, the pack's name)."""
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "a.img", 4 * BS, [(0, 4 * BS, "random")], seed=seed)
    backup_file(repo, img)
    (pack,) = list(repo.pack_object_names())
    _corrupt_every_frame(repo, pack)
    capsys.readouterr()
    assert main(["verify", "--repo", repo.location, "--repair"]) == IntegrityError.exit_code
    assert _records_of(repo.location, pack) == 0  # dropped: the pack is named by no index now
    return repo, img, pack


def test_prune_does_not_index_again_the_copies_repair_dropped(tmp_path, capsys):
    repo, img, pack = _one_pack_dropped_by_repair(tmp_path, capsys, seed=11)

    r = Repository.open(repo.location)
    with r.lock(exclusive=True):
        dry = prune_repository(r, dry_run=True)
        rep = prune_repository(r)
    for p in (dry, rep):
        assert not any(pack.rsplit("/", 1)[-1][:16] in line for line in p["adopted"]), p["adopted"]
        assert any("dropped from the index by a lost/ marker and still read back damaged" in x for x in p["problems"])
        assert not any("no pack pyvbak can read" in x for x in p["problems"])
    assert _records_of(repo.location, pack) == 0
    assert os.path.exists(os.path.join(repo.location, pack))  # left in place, not deleted
    _backs_up_and_restores(tmp_path, repo.location, img, "vm1")


def test_repair_that_also_adopts_does_not_index_again_what_it_dropped(tmp_path, capsys):
    """One pack's index lost (its pack is adopted by --repair) and another pack corrupt:
    --repair dropped the corrupt pack's records, then adopted every unindexed pack - that
    one too."""
    repo = Repository.init(str(tmp_path / "repo"))
    a = make_image(tmp_path / "a.img", 4 * BS, [(0, 4 * BS, "random")], seed=12)
    b = make_image(tmp_path / "b.img", 4 * BS, [(0, 4 * BS, "random")], seed=13)
    sa = backup_file(repo, a, vm="a").snapshot_id
    index_a, packs_a = set(repo.pack_index_names()), set(repo.pack_object_names())
    backup_file(repo, b, vm="b")
    pb = _pack_of(repo, packs_a)
    _corrupt_every_frame(repo, pb)
    for name in index_a:  # a's pack index lost from storage
        os.unlink(os.path.join(repo.location, name))
    capsys.readouterr()
    assert main(["verify", "--repo", repo.location, "--repair", "--json"]) == IntegrityError.exit_code
    rep = json.loads(capsys.readouterr().out)["repair"]
    assert rep["records_removed"] == 4 and any(line.startswith("adopted") for line in rep["adopted"])
    assert _records_of(repo.location, pb) == 0
    (pa,) = packs_a
    assert _records_of(repo.location, pa) == 4  # a's pack is indexed again
    restore_to(Repository.open(repo.location), sa, tmp_path / "out-a.img")
    assert same_file(tmp_path / "out-a.img", a)
    _backs_up_and_restores(tmp_path, repo.location, b, "b")


def test_a_lost_pack_that_comes_back_intact_is_adopted_whole(tmp_path):
    """The other kind of lost/ marker: a pack missing from storage (prune dropped its
    records), put back later from a copy.  It reads back intact: indexed again."""
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "a.img", 4 * BS, [(0, 4 * BS, "random")], seed=14)
    sid = backup_file(repo, img).snapshot_id
    (pack,) = list(repo.pack_object_names())
    path = os.path.join(repo.location, pack)
    shutil.move(path, tmp_path / "pack.copy")
    r = Repository.open(repo.location)
    with r.lock(exclusive=True):
        assert prune_repository(r)["lost_marker"]
    assert _records_of(repo.location, pack) == 0
    shutil.move(tmp_path / "pack.copy", path)
    r = Repository.open(repo.location)
    with r.lock(exclusive=True):
        rep = prune_repository(r)
    assert any(pack.rsplit("/", 1)[-1][:16] in line for line in rep["adopted"]) and not rep["problems"]
    assert _records_of(repo.location, pack) == 4
    assert verify_repository(Repository.open(repo.location), threads=2).report["ok"]
    restore_to(Repository.open(repo.location), sid, tmp_path / "out.img")
    assert same_file(tmp_path / "out.img", img)


def test_damaged_lost_copies_reads_only_packs_markers_name(tmp_path, monkeypatch):
    """Adoption of an ordinary killed backup's pack (no marker names it) reads nothing."""
    from pyvbak.repo import repair as repair_mod

    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "a.img", 4 * BS, [(0, 4 * BS, "random")], seed=15)
    backup_file(repo, img)
    repo.write_lost_marker(["ab" * 32], 1)
    for name in repo.pack_index_names():
        os.unlink(os.path.join(repo.location, name))
    r = Repository.open(repo.location)
    adopted, _ = r.unindexed_pack_records()
    calls = []
    monkeypatch.setattr("pyvbak.repo.reader.read_blocks", lambda *a, **k: calls.append(a))
    drop, lines = repair_mod.damaged_lost_copies(r, adopted)
    assert len(adopted) == 4 and not drop.any() and not lines and not calls


def test_backup_storing_a_dropped_pack_again_replaces_the_damaged_object(tmp_path, capsys):
    """After --repair dropped every record of a corrupt pack, the next backup stores the
    blocks again - and cuts the very same pack (same blocks, same order: same table of
    contents, same name).  The create-only write found the name taken and the backup
    indexed the corrupt object again: the new snapshot did not restore."""
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "a.img", 4 * BS, [(0, 4 * BS, "random")], seed=16)
    first = backup_file(repo, img).snapshot_id
    (pack,) = list(repo.pack_object_names())
    _corrupt_every_frame(repo, pack)
    assert main(["verify", "--repo", repo.location, "--repair"]) == IntegrityError.exit_code
    res = backup_file(Repository.open(repo.location), img)  # no prune in between
    assert res.new_blocks == 4 and list(Repository.open(repo.location).pack_object_names()) == [pack]
    for sid in (res.snapshot_id, first):  # the older snapshot is healed too (same names)
        out = tmp_path / f"{sid}.img"
        restore_to(Repository.open(repo.location), sid, out)
        assert same_file(out, img)
    assert verify_repository(Repository.open(repo.location), threads=2).report["ok"]


def test_pack_writer_leaves_an_identical_existing_pack_untouched(tmp_path):
    """The common collision (a pack stored before with the same table of contents) costs
    a read and a compare, never a write."""
    from pyvbak.repo.packer import PackWriter

    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "a.img", 4 * BS, [(0, 4 * BS, "random")], seed=17)
    backup_file(repo, img)
    (pack,) = list(repo.pack_object_names())
    before = os.stat(os.path.join(repo.location, pack))
    data = repo.backend.read(pack)
    writer = PackWriter(repo.backend, 1 << 30)
    for rec in sorted(repo.load_digest_index().records, key=lambda r: int(r["offset"])):
        o, n = int(rec["offset"]), int(rec["clen"])
        writer.add(bytes(rec["digest"]), data[o : o + n], int(rec["ulen"]))
    recs = writer.finish()
    assert {bytes(p) for p in recs["pack"]} == {bytes.fromhex(pack.rsplit("/", 1)[-1])}
    after = os.stat(os.path.join(repo.location, pack))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_pack_writer_replaces_an_existing_pack_it_cannot_read(tmp_path):
    """An existing object of the pack's name that cannot be read (damaged media) is
    replaced too, instead of failing the backup that cut the same pack again."""
    from pyvbak.backends import BackendError
    from pyvbak.repo.packer import PackWriter

    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "a.img", 4 * BS, [(0, 4 * BS, "random")], seed=19)
    backup_file(repo, img)
    (pack,) = list(repo.pack_object_names())
    data = repo.backend.read(pack)
    before = os.stat(os.path.join(repo.location, pack)).st_ino

    class Unreadable:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def read(self, name):
            raise BackendError(f"I/O error reading {name}")

    writer = PackWriter(Unreadable(repo.backend), 1 << 30)
    for rec in sorted(repo.load_digest_index().records, key=lambda r: int(r["offset"])):
        o, n = int(rec["offset"]), int(rec["clen"])
        writer.add(bytes(rec["digest"]), data[o : o + n], int(rec["ulen"]))
    writer.finish()
    assert os.stat(os.path.join(repo.location, pack)).st_ino != before  # replaced, atomically
    assert repo.backend.read(pack) == data


def test_verify_after_repair_does_not_call_the_dropped_pack_adoptable(tmp_path, capsys):
    """verify said the dropped blocks were held by a pack no index names and to run
    --repair to index it again; each --repair then adopted and dropped it once more."""
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "a.img", 4 * BS, [(0, 4 * BS, "random")], seed=18)
    backup_file(repo, img)
    (pack,) = list(repo.pack_object_names())
    _corrupt_every_frame(repo, pack)
    assert main(["verify", "--repo", repo.location, "--repair"]) == IntegrityError.exit_code
    verified = verify_repository(Repository.open(repo.location), threads=2)
    rep = verified.report
    assert rep["problem_count"] == 4 and rep["unindexed_packs"] is None
    assert all("is missing" in p["reason"] for p in rep["problems"])
    markers = Repository.open(repo.location).lost_markers()
    capsys.readouterr()
    assert main(["verify", "--repo", repo.location, "--repair", "--json"]) == IntegrityError.exit_code
    assert json.loads(capsys.readouterr().out)["repair"] == {"records_removed": 0, "lost_marker": None, "adopted": [],
                                                              "complete": False, "trailers_rebuilt": [],
                                                              "trailers_not_rebuilt": [], "packs_taken_for_lost": False}
    assert Repository.open(repo.location).lost_markers() == markers


def test_locate_all_matches_a_brute_force_search_either_way_round():
    """locate_all searches a part smaller than the query the other way round (each of
    its records among the sorted queries): the same copies as a full search, for
    unsorted, repeated and missing queries and parts of every size."""
    import numpy as np

    from pyvbak.repo import format as fmt
    from pyvbak.repo.digest_index import DigestIndex, _sorted_part

    rng = np.random.default_rng(5)
    pool = [rng.bytes(32) for _ in range(40)]
    pool[0] = pool[0][:29] + b"\0\0\0"  # trailing NULs: S32 comparisons must still match
    for _ in range(150):
        parts = []
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(0, 60))
            r = np.zeros(n, fmt.PACK_INDEX_RECORD)
            r["digest"] = np.frombuffer(b"".join(pool[i] for i in rng.integers(0, 40, n)), "V32")
            r["offset"] = rng.integers(0, 1 << 40, n)
            parts.append(r)
        index = DigestIndex(parts=[_sorted_part(p) for p in parts])
        picks = rng.integers(0, 40, int(rng.integers(0, 30)))
        if rng.integers(0, 2):
            picks = np.unique(picks)
            rng.shuffle(picks)
        keys = np.array([pool[i] for i in picks], "S32").reshape(-1)
        which, pos = index.locate_all(keys)
        got = sorted(zip(which.tolist(), index.records_at(pos)["offset"].tolist()))
        every = np.concatenate(parts)
        want = sorted((i, int(r["offset"])) for i, k in enumerate(picks.tolist())
                      for r in every if bytes(r["digest"]) == pool[k])
        assert got == want


def test_drop_bad_records_drops_exactly_the_copies_named(monkeypatch):
    """drop_bad_records matches (digest, pack, offset) vectorised: the same copies as the
    per-record loop it replaced - not another copy of the digest, nor the digest at
    another offset of the same pack, nor another digest at that offset elsewhere."""
    import numpy as np

    from pyvbak.repo import format as fmt
    from pyvbak.repo import repair as repair_mod

    rng = np.random.default_rng(9)
    d = [rng.bytes(31) + b"\0" for _ in range(3)]  # trailing NUL: no S-type padding mix-up
    p = [rng.bytes(32) for _ in range(3)]
    rows = [(d[0], p[0], 0), (d[0], p[1], 0), (d[0], p[0], 4096), (d[1], p[0], 0), (d[1], p[2], 7), (d[2], p[2], 1 << 40)]
    recs = np.zeros(len(rows), fmt.PACK_INDEX_RECORD)
    for i, (dg, pk, off) in enumerate(rows):
        recs[i]["digest"] = np.frombuffer(dg, "V32")[0]
        recs[i]["pack"] = np.frombuffer(pk, "V32")[0]
        recs[i]["offset"] = off

    class Repo:
        written: list = []
        markers: list = []

        def write_lost_marker(self, packs, n):
            self.markers.append((packs, n))
            return "lost/x"

    monkeypatch.setattr(repair_mod, "load_pack_indexes", lambda repo: (["index/a"], recs))
    monkeypatch.setattr(repair_mod, "rewrite_pack_indexes", lambda repo, kept, names: Repo.written.append(kept))
    rep = repair_mod.drop_bad_records(Repo(), [(d[0], p[0], 4096), (d[1], p[2], 7), (d[2], p[0], 1 << 40)])
    assert rep["records_removed"] == 2
    kept = {(bytes(r["digest"]), bytes(r["pack"]), int(r["offset"])) for r in Repo.written[0]}
    assert kept == {rows[0], rows[1], rows[3], rows[5]}


def test_crash_recovery_does_not_index_again_the_copies_repair_dropped(tmp_path, capsys):
    """The same for the leftover recovery a backup runs after a crash (a stale lock): it
    adopted the dropped pack whole, so the next backup deduplicated against its bad copies."""
    repo, img, pack = _one_pack_dropped_by_repair(tmp_path, capsys, seed=13)
    report = Repository.open(repo.location).recover_leftovers(after_crash=True)
    assert not any(line.startswith("adopted") and pack.rsplit("/", 1)[-1][:16] in line for line in report), report
    assert any("still read back damaged" in line for line in report), report
    assert _records_of(repo.location, pack) == 0
    _backs_up_and_restores(tmp_path, repo.location, img, "vm1")


def test_adoption_says_a_read_failure_is_not_damage(tmp_path, capsys, monkeypatch):
    """A lost/-marked pack that cannot be read at all (I/O errors) is not adopted this time
    either, but the report says so, not that it 'still read back damaged'."""
    from pyvbak.backends import BackendError
    from pyvbak.backends.local import LocalBackend
    from pyvbak.repo.repair import damaged_lost_copies

    repo, _, pack = _one_pack_dropped_by_repair(tmp_path, capsys, seed=21)
    real = LocalBackend.read_range_into

    def failing(self, name, offset, buf):
        if name == pack:
            raise BackendError(f"reading {name}: Input/output error")
        return real(self, name, offset, buf)

    monkeypatch.setattr(LocalBackend, "read_range_into", failing)
    r = Repository.open(repo.location)
    pending, _ = r.unindexed_pack_records()
    drop, lines = damaged_lost_copies(r, pending)
    assert drop.all() and len(lines) == 1
    assert "could not be read (I/O errors): not indexed this time, the next adoption tries again" in lines[0]
    assert "damaged" not in lines[0]

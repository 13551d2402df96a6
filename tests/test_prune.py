"""forget and prune: only unreferenced data goes, every kept snapshot still restores,
mostly-unused packs are repacked without recompression, a prune stopped at any write or
delete leaves a valid repository, and the CLI's errors."""

from __future__ import annotations

import json
import os

import pytest

from images import BS, assert_one_error_line, backup_file, make_image, restore_to, same_file
from pyvbak.cli.main import main
from pyvbak.errors import IntegrityError
from pyvbak.repo import format as fmt
from pyvbak.repo.prune import forget_snapshots, prune_repository
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def objects(repo) -> dict[str, int]:
    return {n: repo.backend.stat(n) for n in repo.backend.list("") if not n.startswith("locks/")}


def packs(repo) -> list[str]:
    return sorted(repo.pack_object_names())


@pytest.fixture
def two_generations(tmp_path):
    """Snapshot A: 100 random blocks (one pack).  Snapshot B: the same disk with its
    second half rewritten - so forgetting A leaves A's pack half unused."""
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "disk.img", 100 * BS, [(0, 100 * BS, "random")], seed=1)
    a = backup_file(repo, img).snapshot_id
    a_copy = tmp_path / "a.img"
    a_copy.write_bytes(open(img, "rb").read())
    with open(img, "r+b") as f:
        f.seek(50 * BS)
        f.write(os.urandom(50 * BS))
    b = backup_file(repo, img).snapshot_id
    return repo, img, a, b, a_copy


def check_all_restore(repo, tmp_path, expected: dict) -> None:
    for sid, image in expected.items():
        out = tmp_path / f"check-{sid}.img"
        restore_to(repo, sid, out, force=True)
        assert same_file(out, image), sid
        out.unlink()


def test_prune_without_forget_changes_nothing(two_generations):
    repo, *_ = two_generations
    before = objects(repo)
    with repo.lock(exclusive=True):
        rep = prune_repository(repo)
    assert rep["packs_deleted"] == rep["packs_repacked"] == rep["blocks_removed"] == rep["bytes_freed"] == 0
    assert objects(repo) == before


def test_forget_then_prune_repacks_the_half_used_pack(two_generations, tmp_path):
    repo, img, a, b, a_copy = two_generations
    old_packs = packs(repo)
    with repo.lock():
        forget_snapshots(repo, [repo.resolve(a)])
    assert [s.id for s in repo.snapshots()] == [b]
    with repo.lock(exclusive=True):
        preview = prune_repository(repo, dry_run=True)
        rep = prune_repository(repo)
    assert rep["packs_repacked"] == 1 and rep["packs_written"] == 1
    assert rep["blocks_removed"] == 50 and rep["bytes_freed"] > 45 * BS
    # the preview says what the run then did (it once said "repacked into 0")
    assert {k: preview[k] for k in ("packs_repacked", "packs_written", "blocks_removed")} == \
        {k: rep[k] for k in ("packs_repacked", "packs_written", "blocks_removed")}
    assert preview["bytes_freed"] == rep["bytes_freed"]  # trailers counted too (it was 0.1 % short)
    new_packs = packs(repo)
    assert len(new_packs) == 2 and len(set(new_packs) & set(old_packs)) == 1  # B's own pack stays
    # 100 blocks, every one referenced by B, are all the index names now
    index = repo.load_digest_index()
    assert len(index) == 100
    check_all_restore(repo, tmp_path, {b: img})
    assert verify_repository(repo, threads=2).report["ok"]


def test_frames_are_copied_byte_for_byte(two_generations):
    repo, img, a, b, _ = two_generations
    before = {}
    for rec in repo.load_digest_index().records:
        before[bytes(rec["digest"])] = repo.read_block_frame(rec)
    with repo.lock():
        forget_snapshots(repo, [repo.resolve(a)])
    with repo.lock(exclusive=True):
        prune_repository(repo)
    after = repo.load_digest_index()
    assert len(after)
    for rec in after.records:
        assert repo.read_block_frame(rec) == before[bytes(rec["digest"])]


def test_forget_everything_then_prune_empties_the_repository(two_generations, tmp_path):
    repo, img, a, b, _ = two_generations
    with repo.lock():
        forget_snapshots(repo, repo.snapshots())
    with repo.lock(exclusive=True):
        rep = prune_repository(repo)
    assert rep["referenced_blocks"] == 0 and rep["packs_deleted"] == rep["packs_before"] == 2
    assert packs(repo) == [] and repo.pack_index_names() == [] and list(repo.backend.list("snapshots/")) == []
    # the repository is still a repository: a new backup dedups against nothing and restores
    sid = backup_file(repo, img).snapshot_id
    check_all_restore(repo, tmp_path, {sid: img})


def test_dry_run_deletes_nothing_and_reports_the_same_plan(two_generations):
    repo, img, a, b, _ = two_generations
    with repo.lock():
        forget_snapshots(repo, [repo.resolve(a)])
    before = objects(repo)
    with repo.lock(exclusive=True):
        dry = prune_repository(repo, dry_run=True)
    assert objects(repo) == before
    with repo.lock(exclusive=True):
        real = prune_repository(repo)
    for key in ("packs_deleted", "packs_repacked", "blocks_removed", "referenced_blocks"):
        assert dry[key] == real[key], key


def test_prune_removes_crash_leftovers(two_generations, tmp_path):
    repo, img, a, b, _ = two_generations
    # a killed backup: a block index without metadata, and a complete pack no index names
    repo.backend.write_new("snapshots/20000101T000000Z-deadbeef.index", b"partial")
    idx_names = repo.pack_index_names()
    lone = make_image(tmp_path / "lone.img", 3 * BS, [(0, 3 * BS, "random")], seed=9)
    backup_file(repo, lone, vm="lone")
    lone_snap = repo.latest("lone", "disk0")
    new_index = [n for n in repo.pack_index_names() if n not in idx_names]
    forget_snapshots(repo, [lone_snap])
    for n in new_index:
        repo.backend.delete(n)  # its pack is now unindexed
    with repo.lock(exclusive=True):
        rep = prune_repository(repo)
    assert rep["orphan_snapshot_indexes"] == ["snapshots/20000101T000000Z-deadbeef.index"]
    # the unindexed pack is adopted, then deleted as unreferenced like any other
    assert len(rep["adopted"]) == 1 and rep["packs_deleted"] >= 1
    assert not [p for p in packs(repo) if p.rsplit("/", 1)[-1][:16] in rep["adopted"][0]]
    assert not repo.backend.exists("snapshots/20000101T000000Z-deadbeef.index")
    check_all_restore(repo, tmp_path, {b: img})


def test_prune_stops_when_a_snapshot_index_is_unreadable(two_generations):
    repo, img, a, b, _ = two_generations
    with repo.lock():
        forget_snapshots(repo, [repo.resolve(a)])
    repo.backend.delete(fmt.snapshot_index_name(b))
    before = objects(repo)
    with repo.lock(exclusive=True), pytest.raises(IntegrityError, match="prune stopped, nothing deleted"):
        prune_repository(repo)
    assert objects(repo) == before


class CrashAt:
    """Backend wrapper: the Nth mutating call (write_new, replace, delete) raises, as if
    the process died right there; everything before it has happened."""

    class Crash(BaseException):
        pass

    def __init__(self, inner, n: int):
        self.inner, self.n, self.calls = inner, n, 0

    def __getattr__(self, name):
        if name == "open_stream":  # packs: collected and written by write_new below, counted
            from pyvbak.backends.base import CollectingStream

            return lambda folder: CollectingStream(self, folder)
        return getattr(self.inner, name)

    def _tick(self):
        self.calls += 1
        if self.calls == self.n:
            raise CrashAt.Crash()

    def write_new(self, name, data):
        self._tick()
        return self.inner.write_new(name, data)

    def replace(self, name, data):
        self._tick()
        return self.inner.replace(name, data)

    def delete(self, name):
        self._tick()
        return self.inner.delete(name)


def test_prune_stopped_at_every_step_leaves_a_valid_repository(tmp_path):
    """Crash at each mutating call of a prune that repacks, deletes and rewrites the
    index: the kept snapshot always restores, verify passes, and the next prune finishes
    the job."""
    n = 0
    while True:
        n += 1
        work = tmp_path / f"run{n}"
        work.mkdir()
        repo = Repository.init(str(work / "repo"))
        img = make_image(work / "disk.img", 60 * BS, [(0, 60 * BS, "random")], seed=3)
        a = backup_file(repo, img).snapshot_id
        gone = make_image(work / "gone.img", 20 * BS, [(0, 20 * BS, "random")], seed=4)
        g = backup_file(repo, gone, vm="gone").snapshot_id
        with open(img, "r+b") as f:
            f.seek(0)
            f.write(os.urandom(40 * BS))
        b = backup_file(repo, img).snapshot_id
        with repo.lock():
            forget_snapshots(repo, [repo.resolve(a), repo.resolve(g)])
        inner = repo.backend
        repo.backend = CrashAt(inner, n)
        try:
            with repo.lock(exclusive=True):
                prune_repository(repo)
            finished = True
        except CrashAt.Crash:
            finished = False
        repo = Repository.open(str(work / "repo"))
        for lock in list(repo.backend.list("locks/")):  # the dead process's lock, now stale
            repo.backend.delete(lock)
        assert verify_repository(repo, threads=2).report["ok"], f"crash at mutating call {n}"
        check_all_restore(repo, work, {b: img})
        with repo.lock(exclusive=True):
            prune_repository(repo)
        with repo.lock(exclusive=True):
            again = prune_repository(repo)
        assert again["packs_deleted"] == again["packs_repacked"] == again["blocks_removed"] == 0
        assert len(repo.load_digest_index()) == 60  # exactly B's blocks remain
        if finished:
            assert n > 4  # the loop really crossed the writes and deletes
            break


def _half_forgotten(repo, tmp_path, vm: str, seed: int):
    """(image, the id of its second snapshot): VM ``vm`` backed up, half of its 12-block
    image rewritten and backed up as ``vm``-new, and the first snapshot forgotten - so
    half of the first backup's blocks are unused, and a prune repacks its packs."""
    img = make_image(tmp_path / f"{vm}.img", 12 * BS, [(0, 12 * BS, "random")], seed=seed)
    first = backup_file(repo, img, vm=vm).snapshot_id
    with open(img, "r+b") as f:
        f.seek(0)
        f.write(os.urandom(6 * BS))
    second = backup_file(repo, img, vm=f"{vm}-new").snapshot_id
    with repo.lock():
        forget_snapshots(repo, [repo.resolve(first)])
    return img, second


class StopAtRead:
    """A backend whose ``n``-th ``read_range`` raises KeyboardInterrupt (Ctrl-C, there)."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.calls = inner, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_range(self, *args, **kw):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner.read_range(*args, **kw)


def test_a_prune_stopped_while_repacking_leaves_no_new_pack(tmp_path, monkeypatch):
    """A prune stopped (Ctrl-C, SIGTERM) while it repacked left the complete new packs it
    had written, named by no index, until the next prune (7 stops in 25).  Packs of one
    block each here, so the first is complete before the stop."""
    import pyvbak.repo.prune as prune_mod

    monkeypatch.setattr(prune_mod, "PACK_TARGET_BYTES", BS // 2)
    repo = Repository.init(str(tmp_path / "repo"))
    _half_forgotten(repo, tmp_path, "a", 31)
    _half_forgotten(repo, tmp_path, "c", 32)
    before = packs(repo)
    repo.backend = StopAtRead(repo.backend, 2)
    with pytest.raises(KeyboardInterrupt):
        with repo.lock(exclusive=True):
            prune_repository(repo, repack_unused=0.01)
    assert repo.backend.calls == 2
    assert packs(Repository.open(repo.location)) == before


class CtrlCAtIndexWrite:
    """A backend whose first write of a pack index is met by a Ctrl-C to this process."""

    def __init__(self, inner):
        self.inner, self.sent = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write_new(self, name, data):
        if name.startswith("index/") and not self.sent:
            import signal

            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner.write_new(name, data)


def test_a_prune_stopped_as_it_writes_the_new_index_leaves_every_pack_indexed(tmp_path):
    """A stop between the last new pack and the new index naming it left every new pack
    named by no index: it is held until the index is written
    (the old packs then wait for the next prune, as after any stop)."""
    repo = Repository.init(str(tmp_path / "repo"))
    img, b = _half_forgotten(repo, tmp_path, "a", 33)
    before = set(packs(repo))
    repo.backend = CtrlCAtIndexWrite(repo.backend)
    with pytest.raises(KeyboardInterrupt):
        with repo.lock(exclusive=True):
            prune_repository(repo, repack_unused=0.01)
    assert repo.backend.sent
    r = Repository.open(repo.location)
    indexed = {fmt.pack_name(bytes(p).ljust(32, b"\0").hex()) for p in r.load_digest_index().records["pack"]}
    assert set(packs(r)) - before <= indexed  # (an old pack the new index no longer names: the next prune's)
    assert set(packs(r)) - before  # (the repack wrote a pack, now indexed)
    check_all_restore(r, tmp_path, {b: img})
    assert verify_repository(r, threads=2).report["ok"]


def test_a_prune_failing_as_it_writes_the_new_index_leaves_no_stop_request_held(tmp_path):
    """The hold on stop requests was left open when the index write failed (out of
    space): Ctrl-C was then noted and never raised."""
    import signal

    from pyvbak import interrupts
    from pyvbak.errors import OutOfSpace

    class FullAtIndexWrite(CtrlCAtIndexWrite):
        def write_new(self, name, data):
            if name.startswith("index/"):
                raise OutOfSpace("no space left on device (injected)")
            return self.inner.write_new(name, data)

    repo = Repository.init(str(tmp_path / "repo"))
    _half_forgotten(repo, tmp_path, "a", 34)
    repo.backend = FullAtIndexWrite(repo.backend)
    with pytest.raises(OutOfSpace):
        with repo.lock(exclusive=True):
            prune_repository(repo, repack_unused=0.01)
    assert interrupts._state["held"] == 0 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- CLI ---------------------------------------------------------------------------------

def test_cli_forget_keep_last_and_prune(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    img = make_image(tmp_path / "d.img", 20 * BS, [(0, 20 * BS, "random")], seed=5)
    ids = []
    for i in range(3):
        with open(img, "r+b") as f:
            f.seek(i * BS)
            f.write(os.urandom(BS))
        assert main(["backup", str(img), "--repo", str(repo), "--vm", "web", "--json"]) == 0
        ids.append(Repository.open(str(repo)).latest("web", "d").id)
    code, out, err = cli(capsys, "forget", "--keep-last", "1", "--repo", repo, "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["forgotten"] == ids[:2]
    assert len(Repository.open(str(repo)).snapshots()) == 3
    code, out, err = cli(capsys, "forget", "--keep-last", "1", "--repo", repo, "--prune")
    assert code == 0, err
    assert "forgot 2 snapshot(s)" in out and "freed" in out
    r = Repository.open(str(repo))
    assert [s.id for s in r.snapshots()] == ids[2:]
    code, out, err = cli(capsys, "restore", "web@latest", tmp_path / "out.img", "--repo", repo)
    assert code == 0, err
    assert same_file(tmp_path / "out.img", img)
    code, out, err = cli(capsys, "prune", "--repo", repo, "--json")
    assert code == 0, err
    assert json.loads(out)["bytes_freed"] == 0


def test_cli_forget_by_id_and_latest(two_generations, capsys):
    repo, img, a, b, _ = two_generations
    code, out, err = cli(capsys, "forget", "vm1/disk0@latest", "--repo", repo.location)
    assert code == 0, err
    assert b in out
    code, out, err = cli(capsys, "forget", a[:12], "--repo", repo.location, "--json")
    assert code == 0, err
    assert json.loads(out)["forgotten"] == [a]
    assert Repository.open(repo.location).snapshots() == []


@pytest.mark.parametrize(
    "args, code, needles",
    [
        (["forget"], 2, ("forget needs snapshot ids",)),
        (["forget", "--vm", "x", "20990101"], 2, ("--vm only goes with --keep-last",)),
        (["forget", "nosuchsnapshot"], 5, ("not found",)),
        (["forget", "--keep-last", "0"], 2, ()),
        # the union of both forgot a named snapshot --keep-last keeps: refused
        (["forget", "--keep-last", "1", "vm1@latest"], 2, ("not both", "--keep-last 1")),
    ],
)
def test_cli_forget_bad_input(two_generations, capsys, args, code, needles):
    repo, *_ = two_generations
    before = objects(repo)
    got, out, err = cli(capsys, *args, "--repo", repo.location)
    assert got == code, err
    if needles:
        assert_one_error_line(err, *needles)
    assert objects(repo) == before


def test_cli_prune_refuses_while_another_process_holds_a_lock(two_generations, capsys):
    repo, *_ = two_generations
    before = objects(repo)
    with repo.lock(purpose="backup"):  # a live backup (this process: alive, same host)
        code, out, err = cli(capsys, "prune", "--repo", repo.location)
    assert code == 8
    assert_one_error_line(err)
    assert objects(repo) == before


def test_cli_prune_of_a_missing_repository(tmp_path, capsys):
    code, out, err = cli(capsys, "prune", "--repo", tmp_path / "nope")
    assert code == 3
    assert_one_error_line(err, "not a pyvbak repository")


@pytest.mark.parametrize("fold_min", [1, 3, 1 << 20])
def test_referenced_set_is_the_same_however_often_it_is_folded(tmp_path, monkeypatch, fold_min):
    # prune folds per-snapshot digests into the union in batches to bound memory; the
    # union (and so what is kept) must not depend on the batch size
    import pyvbak.repo.repository as repository_mod

    monkeypatch.setattr(repository_mod, "FOLD_MIN_DIGESTS", fold_min)
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "disk.img", 40 * BS, [(0, 40 * BS, "random")], seed=7)
    images = {}
    for rewrite in (None, (0, 16), (16, 8), (24, 8), (32, 8)):  # (first block, blocks)
        if rewrite:
            with open(img, "r+b") as f:
                f.seek(rewrite[0] * BS)
                f.write(os.urandom(rewrite[1] * BS))
        sid = backup_file(repo, img).snapshot_id
        images[sid] = tmp_path / f"gen{len(images)}.img"
        images[sid].write_bytes(open(img, "rb").read())
    first = next(iter(images))  # the oldest (ids made in one second do not sort by time)
    with repo.lock():
        forget_snapshots(repo, [repo.resolve(first)])
    del images[first]
    with repo.lock(exclusive=True):
        rep = prune_repository(repo)
    # 4 kept snapshots: the 40 blocks of the oldest kept one + 8 new blocks per later one
    assert rep["referenced_blocks"] == 40 + 3 * 8
    # the forgotten snapshot's own 16 blocks: 40 % of its pack, which is repacked
    assert rep["blocks_removed"] == 16 and rep["packs_repacked"] == 1
    check_all_restore(repo, tmp_path, images)


def test_a_prune_never_deletes_a_pack_it_just_wrote_under_the_same_name(tmp_path):
    """Packs are named by their contents.  A prune interrupted after writing its new pack
    and index but before deleting the old pack leaves the old pack behind; the next
    backup adopts it (indexes it again from its trailer).  If the following prune keeps
    the blocks' copies in that old pack and repacks it, the repacked bytes are exactly
    the pack the interrupted prune wrote - same name, so the write is a no-op - and
    deleting that pack as unused must not happen: the blocks would be gone."""
    for seed in range(40):  # which copy a prune keeps depends on the packs' names
        base = tmp_path / f"s{seed}"
        repo = Repository.init(str(base / "repo"))
        img = make_image(base / "disk.img", 12 * BS, [(0, 12 * BS, "random")], seed=seed)
        a = backup_file(repo, img).snapshot_id
        with open(img, "r+b") as f:  # B shares blocks 0-7 with A, A's 8-11 go with A
            f.seek(8 * BS)
            f.write(bytes(4 * BS))
        b = backup_file(repo, img).snapshot_id
        (old_pack,) = packs(repo)
        saved = repo.backend.read(old_pack)
        forget_snapshots(repo, [repo.resolve(a)])
        prune_repository(repo)  # old pack 1/3 unused: its kept 2/3 move to a new pack
        (new_pack,) = packs(repo)
        # as if that prune had died before deleting the old pack, and a backup adopted it
        repo.backend.write_new(old_pack, saved)
        Repository.open(repo.location).recover_leftovers(after_crash=True)
        r = Repository.open(repo.location)
        keeper = prune_repository(r, dry_run=True)
        report = prune_repository(r)
        assert verify_repository(Repository.open(repo.location)).report["ok"], (seed, report)
        check_all_restore(Repository.open(repo.location), base, {b: img})
        assert packs(r) == [new_pack], seed
        if keeper["packs_repacked"]:  # the copies in the old pack were kept: the hazard ran
            return
    pytest.fail("no seed made the prune keep the old pack's copies")


def test_a_pack_with_nothing_unused_is_not_repacked_at_any_threshold(two_generations, tmp_path):
    """Found by a randomized run: with a threshold of 0 every pack qualified, and a fully
    used pack 'repacked' into the same bytes under the same name was then deleted."""
    repo, img, a, b, a_copy = two_generations
    forget_snapshots(repo, [repo.resolve(a)])
    prune_repository(repo, repack_unused=0.0)
    before = packs(repo)
    report = prune_repository(repo, repack_unused=0.0)
    assert report["packs_repacked"] == 0 and packs(repo) == before
    assert verify_repository(Repository.open(repo.location)).report["ok"]
    check_all_restore(Repository.open(repo.location), tmp_path, {b: img})


def test_real_bytes_freed_is_what_the_packs_shrank_by_and_the_dry_run_agrees(two_generations):
    repo, img, a, b, _ = two_generations
    with repo.lock():
        forget_snapshots(repo, [repo.resolve(a)])
    with repo.lock(exclusive=True):
        dry = prune_repository(repo, dry_run=True)
    before = sum(repo.backend.stat(n) for n in packs(repo))
    with repo.lock(exclusive=True):
        real = prune_repository(repo)
    after = sum(repo.backend.stat(n) for n in packs(repo))
    assert real["packs_repacked"] == 1
    assert real["bytes_freed"] == before - after  # it once counted the repacked pack whole
    assert dry["bytes_freed"] == real["bytes_freed"]  # the packs' trailers counted in both


def test_a_lost_pack_leaves_the_index_so_the_next_backup_stores_its_blocks_again(two_generations, tmp_path):
    """A pack gone from storage: verify names the damage; prune drops the pack's records
    from the index (it once kept them, so every later backup deduplicated against frames
    that were gone - new snapshots born broken); the next backup stores the blocks again."""
    repo, img, a, b, a_copy = two_generations
    lost = packs(repo)[0]
    os.unlink(os.path.join(repo.location, lost))
    assert not verify_repository(repo, threads=2).report["ok"]
    with repo.lock(exclusive=True):
        dry = prune_repository(repo, dry_run=True)
    assert dry["packs_missing"] == 1 and any("missing" in p for p in dry["problems"])
    with repo.lock(exclusive=True):
        rep = prune_repository(repo)
    assert rep["packs_missing"] == 1 and rep["missing_blocks"] > 0
    lost_hex = lost.rsplit("/", 1)[-1]
    assert lost_hex not in {bytes(p).hex() for p in repo.load_digest_index().records["pack"]}
    again = backup_file(repo, img)
    assert again.new_bytes > 0 and again.parent is None
    assert any("lost from the repository" in w for w in again.warnings), again.warnings
    nxt = backup_file(repo, img)  # checked once: the one after is incremental again
    assert nxt.parent == again.snapshot_id and nxt.new_bytes == 0
    report = verify_repository(repo, threads=2, snapshots=[repo.resolve(again.snapshot_id)]).report
    assert report["ok"], report
    check_all_restore(repo, tmp_path, {again.snapshot_id: img})
    with repo.lock(exclusive=True):
        assert prune_repository(repo)["packs_missing"] == 0


def test_a_pack_gone_while_prune_repacks_it_is_dropped_not_a_crash(two_generations, tmp_path, monkeypatch):
    from pyvbak.backends import ObjectMissing

    repo, img, a, b, _ = two_generations
    with repo.lock():
        forget_snapshots(repo, [repo.resolve(a)])
    real = type(repo.backend).read_range

    def vanished(self, name, *args, **kwargs):
        if name.startswith("packs/"):
            raise ObjectMissing(f"object {name!r} not found (test)")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(type(repo.backend), "read_range", vanished)
    with repo.lock(exclusive=True):
        rep = prune_repository(repo)
    assert rep["packs_repacked"] == 0 and any("disappeared during the prune" in p for p in rep["problems"])
    monkeypatch.undo()
    again = backup_file(repo, img)
    assert again.new_bytes > 0  # the half that was in the vanished pack is stored again
    check_all_restore(repo, tmp_path, {again.snapshot_id: img})


def test_cli_dry_runs_change_nothing_and_preview_the_forget(two_generations, capsys):
    """prune --dry-run once removed stale locks (the evidence a backup adopts a killed
    backup's packs by); forget --prune --dry-run once previewed a prune that still
    counted the snapshots it was asked to forget."""
    import socket
    import subprocess
    import sys

    from pyvbak.processes import identity

    repo, img, a, b, _ = two_generations
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(os.path.join(repo.location, "locks"), exist_ok=True)
    stale = os.path.join(repo.location, "locks", "stale.json")
    with open(stale, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "time": 0, "exclusive": False,
                   "purpose": "backup", **identity()}, f)
    code, out, err = cli(capsys, "forget", a, "--prune", "--dry-run", "--json", "--repo", repo.location)
    assert code == 0, err
    preview = json.loads(out)["prune"]
    assert os.path.exists(stale)
    assert cli(capsys, "prune", "--dry-run", "--repo", repo.location)[0] == 0
    assert os.path.exists(stale)
    code, out, err = cli(capsys, "forget", a, "--prune", "--json", "--repo", repo.location)
    assert code == 0, err
    done = json.loads(out)["prune"]
    for key in ("snapshots", "packs_repacked", "blocks_removed", "referenced_blocks"):
        assert preview[key] == done[key], key
    assert preview["blocks_removed"] == 50


def test_a_lost_pack_index_costs_prune_nothing_it_adopts_the_packs(two_generations, tmp_path):
    """A pack index gone from storage made its packs 'unindexed', and prune deleted them as
    a killed backup's leftovers - blocks both snapshots still referenced."""
    repo, img, a, b, a_copy = two_generations
    for name in repo.pack_index_names():
        repo.backend.delete(name)
    with repo.lock(exclusive=True):
        dry = prune_repository(repo, dry_run=True)
    assert len(dry["adopted"]) == 2 and dry["packs_deleted"] == 0 and dry["missing_blocks"] == 0
    with repo.lock(exclusive=True):
        rep = prune_repository(repo)
    assert len(rep["adopted"]) == 2 and rep["packs_deleted"] == 0 and rep["missing_blocks"] == 0
    check_all_restore(repo, tmp_path, {a: a_copy, b: img})
    assert verify_repository(repo, threads=2).report["ok"]


def test_a_truncated_pack_due_for_repacking_is_kept_and_named_not_a_failed_prune(two_generations, tmp_path):
    repo, img, a, b, _ = two_generations
    with repo.lock():
        forget_snapshots(repo, [repo.resolve(a)])
    old = set(packs(repo))
    with repo.lock(exclusive=True):
        plan = prune_repository(repo, dry_run=True)
    assert plan["packs_repacked"] == 1
    # the pack to be repacked is the one B shares with A: cut its end off
    victim = next(p for p in sorted(old) if os.path.getsize(os.path.join(repo.location, p)) > 60 * BS)
    path = os.path.join(repo.location, victim)
    os.chmod(path, 0o644)
    os.truncate(path, os.path.getsize(path) // 4)  # into the frames B still uses
    with repo.lock(exclusive=True):
        rep = prune_repository(repo)
    assert rep["packs_repacked"] == 0 and any("cannot be read" in p for p in rep["problems"]), rep["problems"]
    assert victim in packs(repo)


def test_a_pack_moved_to_another_directory_counts_as_missing(two_generations, tmp_path):
    """Readers open packs/HH/ID; prune matched packs by ID alone and kept the records of a
    pack that was somewhere else, so backups went on deduplicating against it."""
    repo, img, a, b, a_copy = two_generations
    lost = packs(repo)[0]
    pack_id = lost.rsplit("/", 1)[-1]
    elsewhere = os.path.join(repo.location, "packs", "zz")
    os.makedirs(elsewhere, exist_ok=True)
    os.rename(os.path.join(repo.location, lost), os.path.join(elsewhere, pack_id))
    with repo.lock(exclusive=True):
        rep = prune_repository(repo)
    assert rep["packs_missing"] == 1 and rep.get("lost_marker")
    again = backup_file(repo, img)
    assert again.new_bytes > 0
    check_all_restore(repo, tmp_path, {again.snapshot_id: img})


@pytest.mark.parametrize("how, left", [(["VM@latest"], 2), (["--keep-last", "1"], 1)])
def test_forget_with_prune_forgets_nothing_while_a_backup_holds_the_repository(tmp_path, capsys, how, left):
    """forget --prune during a backup once forgot the snapshots under its shared lock,
    then failed to get prune's exclusive lock saying only "locked": every retry forgot
    the next snapshot."""
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    img = make_image(tmp_path / "d.img", 4 * BS, [(0, 4 * BS, "random")], seed=6)
    for i in range(3):
        with open(img, "r+b") as f:
            f.write(os.urandom(BS))
        assert main(["backup", str(img), "--repo", str(repo), "--vm", "web"]) == 0
    args = [a.replace("VM", "web") for a in how]
    with Repository.open(str(repo)).lock(purpose="backup"):  # a backup running
        for _ in range(2):  # and a retry
            code, out, err = cli(capsys, "forget", *args, "--prune", "--repo", repo)
            assert code == 8 and "locked by backup" in err
            assert len(Repository.open(str(repo)).snapshots()) == 3
    code, out, err = cli(capsys, "forget", *args, "--prune", "--repo", repo)
    assert code == 0, err
    assert len(Repository.open(str(repo)).snapshots()) == left and "freed" in out


def test_keep_last_for_a_vm_with_no_snapshots_says_so(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    img = make_image(tmp_path / "d.img", 2 * BS, [(0, 2 * BS, "random")], seed=8)
    assert main(["backup", str(img), "--repo", str(repo), "--vm", "web"]) == 0
    code, out, err = cli(capsys, "forget", "--keep-last", "1", "--vm", "wbe", "--repo", repo)
    assert code == 0 and "forgot 0 snapshot(s)" in out
    assert "warning: no snapshot of VM wbe" in err and "pyvbak snapshots" in err

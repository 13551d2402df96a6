"""prune's steps, each by what a user sees of it: the leftovers of interrupted writes go
(and a dry run leaves them), a record listed by two pack index files counts once, an
object under packs/ that is no pack is named and left, the lost/ marker goes before the
index forgets a lost pack, a stop request as the last new pack is written waits for the
index naming it, and a prune that stops on an unreadable snapshot writes nothing (the
order of docs/FORMAT.md "Forget and prune (invariants)")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import run_cli
from images import BS, backup_file, make_image, restore_to, same_file
from pyvbak.backends.local import TEMP_PREFIX
from pyvbak.errors import IntegrityError
from pyvbak.processes import scope_token
from pyvbak.repo import format as fmt
from pyvbak.repo.prune import forget_snapshots, prune_repository
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository
from repo_faults import kill_child_at


def objects(repo) -> dict[str, bytes]:
    """Every object but the locks, with its bytes."""
    return {n: repo.backend.read(n) for n in repo.backend.list("") if not n.startswith("locks/")}


def packs(repo) -> list[str]:
    return sorted(repo.pack_object_names())


def indexed_packs(repo) -> set[str]:
    return {fmt.pack_name(bytes(p).ljust(32, b"\0").hex()) for p in repo.load_digest_index().records["pack"]}


def restores(repo, sid: str, image, tmp_path) -> bool:
    out = tmp_path / f"restored-{sid}.img"
    restore_to(repo, sid, out, force=True)
    same = same_file(out, image)
    out.unlink()
    return same


def disks(tmp_path, repo, names, blocks: int = 8, seed: int = 40) -> dict[str, tuple[str, str]]:
    """One backup per name (its own VM, its own random blocks, so its own pack):
    name -> (image, snapshot id)."""
    out = {}
    for k, name in enumerate(names):
        img = make_image(tmp_path / f"{name}.img", blocks * BS, [(0, blocks * BS, "random")], seed=seed + k)
        out[name] = (img, backup_file(repo, img, vm=name).snapshot_id)
    return out


def packs_of(repo, sid: str) -> list[str]:
    """The packs holding the blocks of snapshot ``sid``."""
    index = repo.load_digest_index()
    digests = {bytes(d).ljust(32, b"\0") for d in repo.snapshot_digests(repo.resolve(sid))}
    return sorted({fmt.pack_name(bytes(c["pack"]).hex()) for d in digests for c in index.copies(d)})


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


class CrashAt:
    """Backend wrapper: the first mutating call (write_new, replace, delete) that
    ``hit(call, name)`` picks raises instead, as if the process died right there;
    everything before it has happened.  (Packs go through streams, not counted: the
    prunes here write none.)"""

    class Crash(BaseException):
        pass

    def __init__(self, inner, hit):
        self.inner, self.hit, self.crashed = inner, hit, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _tick(self, call, name):
        if not self.crashed and self.hit(call, name):
            self.crashed = True
            raise CrashAt.Crash(f"{call} {name}")

    def write_new(self, name, data):
        self._tick("write_new", name)
        return self.inner.write_new(name, data)

    def replace(self, name, data):
        self._tick("replace", name)
        return self.inner.replace(name, data)

    def delete(self, name):
        self._tick("delete", name)
        return self.inner.delete(name)


# -- 1. leftovers of interrupted writes ----------------------------------------------------

def test_prune_removes_temp_objects_no_lock_speaks_for(tmp_path, capsys):
    """Temp objects of writers that died (a pack and a pack index cut off mid-write) whose
    locks are gone: the lock's own clean-up does not see them, prune (no backup can be
    running) removes them and names them; a dry run leaves them."""
    repo = Repository.init(str(tmp_path / "repo"))
    img, sid = disks(tmp_path, repo, ["a"])["a"]
    leftovers = []
    for folder in ("packs/00", "index"):
        os.makedirs(os.path.join(repo.location, folder), exist_ok=True)
        name = f"{folder}/{TEMP_PREFIX}{dead_pid()}-{scope_token()}-0123456789abcdef"
        with open(os.path.join(repo.location, name), "wb") as f:
            f.write(os.urandom(1000))
        os.utime(os.path.join(repo.location, name), (1e9, 1e9))
        leftovers.append(name)
    code, out, err = run_cli(capsys, "prune", "--dry-run", "--repo", repo.location)
    assert code == 0, err
    for name in leftovers:
        assert os.path.exists(os.path.join(repo.location, name))
    code, out, err = run_cli(capsys, "prune", "--repo", repo.location, "--json")
    assert code == 0, err
    assert sorted(json.loads(out)["temp_objects_removed"]) == sorted(leftovers)
    for name in leftovers:
        assert not os.path.exists(os.path.join(repo.location, name)), name
    assert restores(Repository.open(repo.location), sid, img, tmp_path)


def test_a_dry_run_leaves_a_killed_backups_snapshot_index_where_it_is(tmp_path, capsys):
    """A backup killed between its block index and its metadata leaves the index alone
    (invisible); a dry run says it would remove it and leaves it, the prune removes it."""
    repo = Repository.init(str(tmp_path / "repo"))
    img, sid = disks(tmp_path, repo, ["a"])["a"]
    other = make_image(tmp_path / "b.img", 4 * BS, [(0, 4 * BS, "random")], seed=9)
    kill_child_at(tmp_path, "snapshot-index", ["backup", other, "--repo", repo.location, "--vm", "b"])
    (orphan,) = [n for n in repo.backend.list("snapshots/") if not n.startswith(f"snapshots/{sid}")]
    assert orphan.endswith(".index")
    before = objects(repo)
    code, out, err = run_cli(capsys, "prune", "--dry-run", "--repo", repo.location)
    assert code == 0, err
    assert f"would remove {orphan} (orphan snapshot indexes)" in err, err
    assert objects(repo) == before
    code, out, err = run_cli(capsys, "prune", "--repo", repo.location)
    assert code == 0, err
    assert f"removed {orphan} (orphan snapshot indexes)" in err, err
    assert not repo.backend.exists(orphan)
    assert restores(Repository.open(repo.location), sid, img, tmp_path)


# -- 2. what the snapshots reference, what the packs hold ----------------------------------

def test_after_a_prune_killed_between_its_new_and_its_old_indexes_each_record_counts_once(tmp_path):
    """A prune killed after its new pack index and before the old ones went leaves every
    record of the packs that stay listed twice.  The next prune counts each once: it
    removes the forgotten blocks and no more, and repacks no pack (counted twice, every
    pack looked half unused: the whole repository would be read and rewritten)."""
    repo = Repository.init(str(tmp_path / "repo"))
    made = disks(tmp_path, repo, ["x", "y", "z"])
    kept = sorted(set(packs(repo)) - set(packs_of(repo, made["y"][1])))
    forget_snapshots(repo, [repo.resolve(made["y"][1])])
    repo.backend = CrashAt(repo.backend, lambda call, name: call == "delete" and name.startswith("index/"))
    with pytest.raises(CrashAt.Crash):
        prune_repository(repo)
    r = Repository.open(repo.location)
    listed = r.load_digest_index().records
    assert len(listed) == 8 + 2 * 16  # (the setup holds what it claims: x's and z's records twice)
    rep = prune_repository(r)
    assert rep["blocks_removed"] == 8 and rep["packs_deleted"] == 1
    assert rep["packs_repacked"] == rep["packs_written"] == 0
    assert packs(r) == kept
    assert len(Repository.open(repo.location).load_digest_index().records) == 16
    for name in ("x", "z"):
        assert restores(Repository.open(repo.location), made[name][1], made[name][0], tmp_path), name


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_object_under_packs_that_is_no_pack_is_named_and_left(tmp_path, capsys, dry_run):
    """An object under packs/ without a valid table of contents (no index names it, so
    adoption tries it and cannot): not prune's to delete, and the user is told."""
    repo = Repository.init(str(tmp_path / "repo"))
    img, sid = disks(tmp_path, repo, ["a"])["a"]
    stray = "packs/ab/" + "ab" * 32
    os.makedirs(os.path.join(repo.location, "packs", "ab"), exist_ok=True)
    with open(os.path.join(repo.location, stray), "wb") as f:
        f.write(b"not a pack" * 100)
    code, out, err = run_cli(capsys, "prune", *(["--dry-run"] if dry_run else []), "--repo", repo.location)
    assert code == 0, err
    assert f"warning: 1 object(s) under packs/ are no pack pyvbak can read (e.g. {stray}): left in place" in err, err
    assert os.path.exists(os.path.join(repo.location, stray))
    assert restores(Repository.open(repo.location), sid, img, tmp_path)


# -- 3./4. the lost/ marker before the index, the hold until the index names new packs ----

def test_a_prune_killed_anywhere_after_the_index_forgot_a_lost_pack_leaves_its_marker(tmp_path):
    """A pack lost from storage: prune writes the lost/ marker, then the index without
    the pack's records.  Killed at any write or delete, a prune that got as far as the
    index leaves the marker too: the next backup of a disk whose parent has blocks in
    that pack checks the parent, stores the blocks again and restores - without the
    marker it would carry the parent's records of blocks no pack holds."""
    n, index_changed = 0, 0
    while True:
        n += 1
        work = tmp_path / f"run{n}"
        work.mkdir()
        repo = Repository.init(str(work / "repo"))
        made = disks(work, repo, ["x", "y", "z"])  # (three pack indexes: the new one is none of them)
        img, sid = made["x"]
        (lost,) = packs_of(repo, sid)
        os.unlink(os.path.join(repo.location, lost))
        calls = []
        repo.backend = CrashAt(repo.backend, lambda call, name: calls.append(name) or len(calls) == n)
        try:
            prune_repository(repo)
        except CrashAt.Crash:
            pass
        r = Repository.open(repo.location)
        if lost in indexed_packs(r):
            assert repo.backend.crashed, "a finished prune left the lost pack's records"
            continue  # (the index as the prune found it: verify's to report, the next prune's to mend)
        index_changed += 1
        assert list(r.backend.list("lost/")), f"killed at {calls[-1]}: the index forgot {lost}, no marker says so"
        again = backup_file(r, img, vm="x")
        assert again.new_bytes > 0, n
        assert restores(Repository.open(repo.location), again.snapshot_id, img, work), n
        if not repo.backend.crashed:
            break
    assert index_changed and n > 4  # (the loop crossed the marker, the new index and the old ones' deletes)


class CtrlCAtLastPack:
    """A backend whose pack commits are counted: the ``n``-th is followed, at once, by a
    Ctrl-C to this process (the pack is stored, the writer has not yet returned)."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.commits, self.sent = inner, n, 0, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open_stream(self, folder):
        stream = self.inner.open_stream(folder)
        outer = self

        class Counted:
            def __getattr__(self, name):
                return getattr(stream, name)

            def commit(self, name):
                created = stream.commit(name)
                if name.startswith("packs/"):
                    outer.commits += 1
                    if outer.commits == outer.n:
                        outer.sent = True
                        os.kill(os.getpid(), signal.SIGINT)
                return created

        return Counted()


def test_a_stop_as_the_last_new_pack_is_stored_waits_for_the_index_naming_it(tmp_path, monkeypatch):
    """A Ctrl-C as the repack's last new pack is stored is held until the new index names
    it (prune_repository: from the last new pack on): the prune stops after that, its new
    packs indexed, the old ones left for the next prune, every snapshot restorable.  (A
    stop before that point deletes the new packs instead - the repack's work lost, the
    repository as valid.)"""
    import pyvbak.repo.prune as prune_mod

    monkeypatch.setattr(prune_mod, "PACK_TARGET_BYTES", 3 * BS)
    repo = Repository.init(str(tmp_path / "repo"))
    img = make_image(tmp_path / "disk.img", 12 * BS, [(0, 12 * BS, "random")], seed=33)
    a = backup_file(repo, img, vm="a").snapshot_id
    with open(img, "r+b") as f:
        f.write(os.urandom(4 * BS))
    b = backup_file(repo, img, vm="b").snapshot_id
    forget_snapshots(repo, [repo.resolve(a)])
    before = set(packs(repo))
    plan = prune_repository(repo, dry_run=True)
    assert plan["packs_written"] == 3  # (8 kept blocks, 3 to a pack: 2 cut while copying, 1 by the finish)
    repo.backend = CtrlCAtLastPack(repo.backend, plan["packs_written"])
    with pytest.raises(KeyboardInterrupt):
        prune_repository(repo)
    assert repo.backend.sent
    r = Repository.open(repo.location)
    new = set(packs(r)) - before
    assert len(new) == 3 and new <= indexed_packs(r)
    assert before <= set(packs(r))  # (the repacked pack too: the next prune's)
    assert restores(r, b, img, tmp_path)
    assert verify_repository(r, threads=2).report["ok"]


# -- what a stopped prune leaves ------------------------------------------------------------

def test_a_prune_stopped_by_an_unreadable_snapshot_writes_nothing_not_even_an_adoption(tmp_path, capsys):
    """A snapshot whose block index cannot be read stops the prune before it writes or
    deletes anything: packs no index names (their pack index lost) are not indexed by
    it either - the repository is left as it was found, for the user to look at."""
    repo = Repository.init(str(tmp_path / "repo"))
    x = disks(tmp_path, repo, ["x"])["x"]
    x_indexes = set(repo.pack_index_names())
    disks(tmp_path, repo, ["y"], seed=50)
    for name in set(repo.pack_index_names()) - x_indexes:
        repo.backend.delete(name)  # y's pack: unindexed
    repo.backend.delete(fmt.snapshot_index_name(x[1]))
    before = objects(repo)
    code, out, err = run_cli(capsys, "prune", "--repo", repo.location)
    assert code == IntegrityError.exit_code and "prune stopped, nothing deleted" in err, err
    assert objects(repo) == before


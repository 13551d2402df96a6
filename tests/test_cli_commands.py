"""The CLI's normal output: verify (--sample, --json), snapshots --json, restore VM@latest
and VM/DISK@latest, backup --json."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from images import BS, MiB, assert_one_error_line, make_image, rewrite_pages, same_file
from pyvbak.cli.main import main
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    """web/sda (two snapshots), web/sdb, db/sda; 400 unique random blocks in all."""
    tmp = tmp_path_factory.mktemp("cmds")
    repo = tmp / "repo"
    assert main(["init", str(repo)]) == 0
    sda = make_image(tmp / "sda.img", 200 * BS, [(0, 200 * BS, "random")], seed=81)
    sdb = make_image(tmp / "sdb.img", 100 * BS + 17, [(0, 100 * BS + 17, "random")], seed=82)
    dbsda = make_image(tmp / "db-sda.img", 100 * BS, [(0, 100 * BS, "random")], seed=83)
    copies = {}

    def backup(img, vm, disk):
        assert main(["backup", str(img), "--repo", str(repo), "--vm", vm, "--disk", disk, "--json"]) == 0
        snap = Repository.open(str(repo)).latest(vm, disk)
        copies[snap.id] = shutil.copyfile(img, tmp / f"{snap.id}.copy")
        return snap.id

    ids = {"web/sda#1": backup(sda, "web", "sda")}
    with open(sda, "r+b") as f:  # change 10 blocks
        for k in range(10):
            f.seek(k * 20 * BS)
            f.write(os.urandom(BS))
    ids["web/sda#2"] = backup(sda, "web", "sda")
    ids["web/sdb"] = backup(sdb, "web", "sdb")
    ids["db/sda"] = backup(dbsda, "db", "sda")
    return tmp, str(repo), ids, copies


def test_snapshots_json(populated, capsys):
    tmp, repo, ids, _ = populated
    code, out, err = cli(capsys, "snapshots", "--repo", repo, "--json")
    assert code == 0, err
    snaps = json.loads(out)
    assert isinstance(snaps, list) and len(snaps) == 4
    for s in snaps:
        assert isinstance(s, dict)
        assert {"id", "vm", "disk", "time", "size"} <= set(s)
        assert isinstance(s["size"], int) and isinstance(s["time"], str)
    assert [s["id"] for s in snaps] == [ids["web/sda#1"], ids["web/sda#2"], ids["web/sdb"], ids["db/sda"]]
    assert [s["time"] for s in snaps] == sorted(s["time"] for s in snaps)
    by_id = {s["id"]: s for s in snaps}
    assert (by_id[ids["web/sdb"]]["vm"], by_id[ids["web/sdb"]]["disk"], by_id[ids["web/sdb"]]["size"]) == ("web", "sdb", 100 * BS + 17)
    assert by_id[ids["web/sda#2"]]["parent"] == ids["web/sda#1"]

    code, out, _ = cli(capsys, "snapshots", "--repo", repo, "--json", "--vm", "web", "--disk", "sda")
    assert [s["id"] for s in json.loads(out)] == [ids["web/sda#1"], ids["web/sda#2"]]
    code, out, _ = cli(capsys, "snapshots", "--repo", repo)
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["ID", "VM", "DISK"]
    assert all(i in out for i in ids.values())


def test_restore_latest_specs(populated, capsys, tmp_path):
    tmp, repo, ids, copies = populated
    for spec, want in (("web/sda@latest", ids["web/sda#2"]), ("web/sdb@latest", ids["web/sdb"]), ("db@latest", ids["db/sda"])):
        out = tmp_path / spec.replace("/", "_")
        code, stdout, err = cli(capsys, "restore", spec, out, "--repo", repo)
        assert code == 0, err
        assert f"restored snapshot {want}" in stdout
        assert same_file(out, copies[want])
    # a unique id prefix works too
    prefix = ids["web/sda#1"][:-3]
    code, _, err = cli(capsys, "restore", prefix, tmp_path / "p.img", "--repo", repo)
    if sum(i.startswith(prefix) for i in ids.values()) == 1:
        assert code == 0, err
        assert same_file(tmp_path / "p.img", copies[ids["web/sda#1"]])
    # VM@latest is ambiguous for a VM with several disks
    code, _, err = cli(capsys, "restore", "web@latest", tmp_path / "amb.img", "--repo", repo)
    assert code == 2
    assert_one_error_line(err, "several disks", "web/DISK@latest", "pyvbak restore web@latest DIR/")
    assert not (tmp_path / "amb.img").exists()
    for cmd in (["verify", "web@latest"], ["forget", "web@latest"]):  # no restore advice there
        code, _, err = cli(capsys, *cmd, "--repo", repo)
        assert code == 2 and "restore" not in assert_one_error_line(err, "several disks", "web/DISK@latest")


def test_restore_json(populated, capsys, tmp_path):
    tmp, repo, ids, copies = populated
    code, out, err = cli(capsys, "restore", ids["web/sdb"], tmp_path / "j.img", "--repo", repo, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["snapshot"] == ids["web/sdb"] and report["size"] == 100 * BS + 17
    assert report["blocks"] == 101 and report["unique_blocks_read"] == 101
    assert set(report["phases"]) == {"prepare", "data", "sync"}
    assert sum(report["phases"].values()) == pytest.approx(report["duration"], abs=1e-6)
    assert same_file(tmp_path / "j.img", copies[ids["web/sdb"]])


def test_verify_json_shape(populated, capsys):
    tmp, repo, ids, _ = populated
    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] is True and report["error"] is None
    assert report["snapshots"] == 4
    # 200 + 10 changed + 101 + 100 unique blocks
    assert report["blocks_checked"] == 411
    assert report["bytes_checked"] == 410 * BS + 17
    assert report["problems"] == [] and report["problem_count"] == 0
    assert report["affected_snapshots"] == []
    assert report["sampled_percent"] is None
    assert isinstance(report["duration"], float)
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 0
    assert out.startswith("checked 411 blocks") and "of 4 snapshot(s)" in out


def test_verify_sample(populated, capsys):
    tmp, repo, _, _ = populated
    code, out, err = cli(capsys, "verify", "--repo", repo, "--sample", "50", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["sampled_percent"] == 50
    assert 200 <= report["blocks_checked"] <= 212  # round(411 / 2) = 206 chosen, all distinct
    # different runs choose different blocks (seeded runs are reproducible)
    r = Repository.open(repo)
    a = verify_repository(r, sample_percent=10, seed=1, threads=2).report
    b = verify_repository(r, sample_percent=10, seed=1, threads=2).report
    assert a["blocks_checked"] == b["blocks_checked"] == 41
    code, out, err = cli(capsys, "verify", "--repo", repo, "--sample", "50%", "--json")
    assert code == 0 and 200 <= json.loads(out)["blocks_checked"] <= 212, err
    for bad in ("0", "150", "-5", "ten", "%"):
        code, _, err = cli(capsys, "verify", "--repo", repo, "--sample", bad)
        assert code == 2, (bad, err)
        assert_one_error_line(err, "--sample")


def test_verify_sample_finds_corruption_sometimes_full_always(tmp_path, capsys):
    """A sample checks only part; with every block corrupt any sample finds problems."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "d.img", 40 * BS, [(0, 40 * BS, "random")], seed=84)
    cli(capsys, "backup", img, "--repo", repo, "--vm", "v")
    r = Repository.open(str(repo))
    idx = r.load_digest_index()
    for rec in idx.records:  # corrupt every block
        pack = os.path.join(repo, "packs", bytes(rec["pack"]).hex()[:2], bytes(rec["pack"]).hex())
        data = bytearray(open(pack, "rb").read())
        data[int(rec["offset"]) + int(rec["clen"]) - 5] ^= 0x55
        os.chmod(pack, 0o644)
        open(pack, "wb").write(data)
    code, out, err = cli(capsys, "verify", "--repo", repo, "--sample", "50", "--json")
    assert code == 6
    report = json.loads(out)
    assert report["problem_count"] == 20  # exactly the sampled half, all bad
    assert report["blocks_checked"] == 0


def test_verify_of_chosen_snapshots_checks_their_blocks_only(tmp_path, capsys):
    """`verify SNAPSHOT...`: last night's snapshot checked without re-reading the whole
    repository; a bad block of another snapshot is not its problem."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    ids = {}
    for name, seed in (("a", 90), ("b", 91)):
        img = make_image(tmp_path / f"{name}.img", 10 * BS, [(0, 10 * BS, "random")], seed=seed)
        code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--disk", name, "--json")
        ids[name] = json.loads(out)["id"]
    r = Repository.open(str(repo))
    a_digests = {bytes(d) for d in r.load_snapshot_index(r.resolve(ids["a"]))[2]["digest"]}
    rec = next(x for x in r.load_digest_index().records if bytes(x["digest"]) in a_digests)
    pack = os.path.join(repo, "packs", bytes(rec["pack"]).hex()[:2], bytes(rec["pack"]).hex())
    data = bytearray(open(pack, "rb").read())
    data[int(rec["offset"]) + int(rec["clen"]) - 5] ^= 0x55
    os.chmod(pack, 0o644)
    open(pack, "wb").write(data)

    code, out, err = cli(capsys, "verify", "v/b@latest", "--repo", repo, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["snapshots"] == 1 and report["blocks_checked"] == 10
    code, out, err = cli(capsys, "verify", ids["a"], "--repo", repo, "--json")
    report = json.loads(out)
    assert code == 6 and [a["id"] for a in report["affected_snapshots"]] == [ids["a"]]
    # the line stderr ends with (what verify found, the next step), for a script
    assert report["error"] and err.strip().splitlines()[-1] == f"pyvbak: error: {report['error']}", (report, err)
    code, out, err = cli(capsys, "verify", "--repo", repo, "--json")
    assert code == 6 and json.loads(out)["snapshots"] == 2
    code, out, err = cli(capsys, "verify", "v/nope@latest", "--repo", repo)
    assert code == 5


def test_backup_json_and_human_output(tmp_path, capsys):
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "vm-disk.img", 2 * MiB + 1, [(0, MiB, "random")], seed=85)
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["disk"] == "vm-disk"  # default disk name: file name without extension
    assert res["id"] == res["snapshot_id"]
    assert res["new_blocks"] == 16 and res["new_bytes"] == MiB and res["size"] == 2 * MiB + 1
    assert res["parent"] is None and res["cleaned_leftovers"] == []
    assert set(res["phases"]) == {"prepare", "data", "commit"}
    assert all(v >= 0 for v in res["phases"].values())
    assert sum(res["phases"].values()) == pytest.approx(res["duration"], abs=1e-6)
    rewrite_pages(img, fraction=0.01, seed=86, run_pages=1)
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v")
    assert code == 0, err
    assert out.startswith("snapshot ") and "of v/vm-disk" in out and "new " in out


def test_two_images_of_one_vm_get_their_own_disks_and_a_changed_source_is_said(tmp_path, capsys):
    """The default disk name once stopped at the first dot: web01.root.img and
    web01.data.img were both disk "web01", the data disk an incremental of the root disk
    and retention counting them as one."""
    from pyvbak.cli.main import main

    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    root = make_image(tmp_path / "web01.root.img", 8 * BS, [(0, 8 * BS, "random")], seed=1)
    data = make_image(tmp_path / "web01.data.img", 4 * BS, [(0, 4 * BS, "text")], seed=2)
    capsys.readouterr()
    for img in (root, data):
        assert main(["backup", img, "--repo", str(repo), "--vm", "web01", "--json"]) == 0
    first, second = (json.loads(x) for x in capsys.readouterr().out.replace("}\n{", "}\n\x00{").split("\x00"))
    assert (first["disk"], second["disk"]) == ("web01.root", "web01.data")
    assert second["parent"] is None and not second["warnings"]
    # the same disk name from another file: said, as the other disk it may be
    moved = tmp_path / "elsewhere.img"
    os.rename(data, moved)
    assert main(["backup", str(moved), "--repo", str(repo), "--vm", "web01", "--disk", "web01.data", "--json"]) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["parent"] == second["id"]
    assert len(third["warnings"]) == 1 and f"was read from {os.path.abspath(data)}" in third["warnings"][0] \
        and "--disk NAME" in third["warnings"][0]


def test_the_progress_bar_goes_to_a_terminal_stderr_and_leaves_stdout_clean(tmp_path):
    """``pyvbak backup … > log`` from a terminal: the bar (rich's default console is
    stdout) was drawn into the log - a blank first line - and the operator saw nothing."""
    import pty
    import subprocess
    import sys

    from images import MiB, random_bytes

    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(8 * MiB, seed=3))
    repo = tmp_path / "repo"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TERM="xterm", COLUMNS="100")
    subprocess.run([sys.executable, "-m", "pyvbak", "init", str(repo)], check=True, capture_output=True, env=env)
    master, slave = pty.openpty()
    try:
        with open(tmp_path / "log", "wb") as log:
            p = subprocess.run([sys.executable, "-m", "pyvbak", "backup", str(img), "--repo", str(repo), "--vm", "v"],
                               stdout=log, stderr=slave, env=env, timeout=120)
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert p.returncode == 0, seen
    out = (tmp_path / "log").read_text()
    assert out.startswith("snapshot ") and "\x1b" not in out, repr(out)
    assert b"backup v/d" in seen  # the bar, on the terminal


def test_init_takes_the_repository_like_every_other_command(tmp_path, monkeypatch, capsys):
    """init was the one command with a required REPO argument: with PYVBAK_REPO exported
    (as the README says), the very first command failed with "Missing argument"."""
    from pyvbak.cli.main import main
    from pyvbak.repo.repository import Repository

    monkeypatch.setenv("PYVBAK_REPO", str(tmp_path / "env"))
    assert main(["init"]) == 0
    assert main(["init", "--repo", str(tmp_path / "opt")]) == 0
    assert main(["init", str(tmp_path / "arg")]) == 0  # the command line's comes first
    monkeypatch.delenv("PYVBAK_REPO")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert main(["init"]) == 0
    for where in ("env", "opt", "arg", "xdg/pyvbak/repository"):
        assert Repository.open(str(tmp_path / where)).config.block_size == 64 * 1024
    capsys.readouterr()
    assert main(["init", str(tmp_path / "env")]) == 3  # exists already: refused as before


def test_verify_says_what_to_do_and_the_repair_it_names_makes_backups_restorable_again(tmp_path, capsys):
    """After verify found a bad block it said only what: the next backups deduplicated
    against the bad copy, each new snapshot unrestorable, and nothing named the repair.
    The way out it names now works end to end."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "d.img", 40 * BS, [(0, 40 * BS, "random")], seed=85)
    cli(capsys, "backup", img, "--repo", repo, "--vm", "v")
    r = Repository.open(str(repo))
    rec = r.load_digest_index().records[0]
    pack = os.path.join(repo, "packs", bytes(rec["pack"]).hex()[:2], bytes(rec["pack"]).hex())
    data = bytearray(open(pack, "rb").read())
    data[int(rec["offset"]) + 7] ^= 0x55
    os.chmod(pack, 0o644)
    open(pack, "wb").write(data)
    code, out, err = cli(capsys, "verify", "--repo", repo)
    # (the bad copy is flagged: the backup alone heals it, tests/test_flagged_copies.py;
    # here the repair is run first, which must work as well)
    assert code == 6 and "back up the affected disks" in err.strip().splitlines()[-1], err
    code, out, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert code == 6, err  # the only copy was bad: the snapshot lacks it until a backup stores it again
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", "v", "--json")
    assert code == 0 and json.loads(out)["new_bytes"] == BS, err
    for snap in Repository.open(str(repo)).snapshots():  # the old snapshot restores again too
        assert cli(capsys, "restore", snap.id, tmp_path / f"{snap.id}.img", "--repo", repo)[0] == 0
        assert same_file(tmp_path / f"{snap.id}.img", img)
    assert cli(capsys, "verify", "--repo", repo)[0] == 0


def test_verify_of_a_lost_snapshot_index_names_the_way_out_not_verify_again(tmp_path, capsys):
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "d.img", 8 * BS, [(0, 8 * BS, "random")], seed=86)
    cli(capsys, "backup", img, "--repo", repo, "--vm", "v")
    (sid,) = [s.id for s in Repository.open(str(repo)).snapshots()]
    os.unlink(repo / "snapshots" / f"{sid}.index")
    code, out, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and f"pyvbak forget {sid}" in err and "run 'pyvbak verify'" not in err, err
    assert "forget those snapshots" in err.strip().splitlines()[-1]


def test_a_sampled_verify_says_it_was_a_sample(populated, capsys):
    _, repo, _, _ = populated
    code, out, _ = cli(capsys, "verify", "--repo", repo, "--sample", "50")
    assert code == 0 and "a random 50 % sample" in out


def _one_pack_repo(tmp_path, capsys, seed):
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "d.img", 40 * BS, [(0, 40 * BS, "random")], seed=seed)
    cli(capsys, "backup", img, "--repo", repo, "--vm", "v")
    (pack,) = list(Repository.open(str(repo)).pack_object_names())
    return repo, img, repo / pack


def _next_step(err: str) -> str:
    return err.strip().splitlines()[-1].split(" in ", 1)[1].split(": ", 1)[1]


def test_verify_next_step_for_a_damaged_table_of_contents_alone_loses_no_data(tmp_path, capsys):
    """It said backups "cannot be restored either" when only a pack's trailer was damaged."""
    repo, img, pack = _one_pack_repo(tmp_path, capsys, 87)
    os.chmod(pack, 0o644)
    data = bytearray(pack.read_bytes())
    data[-100] ^= 1
    pack.write_bytes(data)
    code, _, err = cli(capsys, "verify", "--repo", repo)
    step = _next_step(err)
    assert code == 6 and "tables of contents" in step and "cannot be restored" not in step, err
    assert cli(capsys, "restore", "v@latest", tmp_path / "o.img", "--repo", repo)[0] == 0


@pytest.mark.parametrize("repair", [False, True])
def test_verify_next_step_for_copies_that_cannot_be_read_is_the_storage(tmp_path, capsys, monkeypatch, repair):
    """The only copies failing to read (I/O errors) sent the user to 'verify --repair',
    which keeps them by design - also after that very repair."""
    from pyvbak.backends import BackendError
    from pyvbak.backends.local import LocalBackend

    repo, img, pack = _one_pack_repo(tmp_path, capsys, 88)
    name = str(pack.relative_to(repo))
    real = LocalBackend.read_range_into

    def failing(self, obj, offset, buf):
        if obj == name:
            raise BackendError(f"reading {obj}: Input/output error")
        return real(self, obj, offset, buf)

    monkeypatch.setattr(LocalBackend, "read_range_into", failing)
    code, _, err = cli(capsys, "verify", "--repo", repo, *(["--repair"] if repair else []))
    step = _next_step(err)
    assert code == 6 and step.startswith("check the storage") and "--drop-unreadable" in step, err
    assert "run 'pyvbak verify --repair', then" not in step


def test_verify_next_step_for_an_index_that_cannot_be_read_is_not_forget(tmp_path, capsys, monkeypatch):
    from pyvbak.backends import BackendError
    from pyvbak.backends.local import LocalBackend

    repo, img, _ = _one_pack_repo(tmp_path, capsys, 89)
    real = LocalBackend.read

    def failing(self, obj, *a, **k):
        if obj.startswith("snapshots/") and obj.endswith(".index"):
            raise BackendError(f"reading {obj}: Input/output error")
        return real(self, obj, *a, **k)

    monkeypatch.setattr(LocalBackend, "read", failing)
    code, _, err = cli(capsys, "verify", "--repo", repo)
    last = err.strip().splitlines()[-1]
    assert code == 6 and "could not be read" in last and "forget" not in last and "damaged" not in last, err


def test_verify_next_step_after_a_repair_is_the_backup_and_it_works(tmp_path, capsys):
    """After --repair dropped a lost pack's records it still said "run verify --repair", and
    a plain verify after it too: a loop."""
    repo, img, pack = _one_pack_repo(tmp_path, capsys, 90)
    os.unlink(pack)
    code, _, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert code == 6 and _next_step(err).startswith("back up the affected disks: the repair dropped"), err
    code, _, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and "(once is enough)" in _next_step(err), err
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    assert cli(capsys, "verify", "--repo", repo)[0] == 0


def _vm_a_then_x(tmp_path, capsys, seed: int):
    """A repository with VM a backed up, then VM x: (repo, a's image, objects(prefix) -
    the object names under it but the pack-storage mark, a's packs, a's pack indexes)."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    a = make_image(tmp_path / "a.img", 20 * BS, [(0, 20 * BS, "random")], seed=seed)
    x = make_image(tmp_path / "x.img", 20 * BS, [(0, 20 * BS, "random")], seed=seed + 1)
    objects = lambda prefix: {n for n in Repository.open(str(repo)).backend.list(prefix)  # noqa: E731
                              if n != "packs/pack-storage.json"}
    cli(capsys, "backup", a, "--repo", repo, "--vm", "a")
    pack_a, index_a = objects("packs/"), objects("index/")
    cli(capsys, "backup", x, "--repo", repo, "--vm", "x")
    return repo, a, objects, pack_a, index_a


def test_after_a_repair_that_adopted_packs_and_dropped_lost_records_the_next_step_is_the_backup(tmp_path, capsys):
    """A repair that adopted packs checks again; that check finds the blocks whose records
    the repair had just dropped, and the advice was to run the repair once more."""
    repo, a, objects, pack_a, index_a = _vm_a_then_x(tmp_path, capsys, seed=94)
    for name in pack_a | (objects("index/") - index_a):  # a's packs lost; x's pack index lost
        os.unlink(repo / name)
    code, _, err = cli(capsys, "verify", "--repo", repo, "--repair")
    assert "repair: adopted unindexed pack" in err and "repair: checked again after adopting packs" in err, err
    assert code == 6 and _next_step(err).startswith("back up the affected disks: the repair dropped"), err
    assert cli(capsys, "backup", a, "--repo", repo, "--vm", "a")[0] == 0  # the step named: and then all is well
    assert cli(capsys, "verify", "--repo", repo)[0] == 0


def test_a_pack_cut_to_nothing_in_its_own_place_is_not_a_pack_to_move_back(tmp_path, capsys):
    """A pack cut to 0 bytes in its own place: verify said its blocks read back and that a
    repair would rebuild its table of contents with no snapshot losing data; after the
    repair, it sent the user to "move back where the note says" an object the note gave no
    place for."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "a.img", 16 * BS, [(0, 16 * BS, "random")], seed=96)
    cli(capsys, "backup", img, "--repo", repo, "--vm", "a")
    (pack,) = [p for p in (repo / "packs").rglob("*") if p.is_file() and p.name != "pack-storage.json"]
    make_image(img, 16 * BS, [(0, 16 * BS, "random")], seed=97)  # the disk moves on: every block new
    cli(capsys, "backup", img, "--repo", repo, "--vm", "a")
    pack.write_bytes(b"")
    code, _, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and "some of its block copies do not read back either" in err, err
    assert "its blocks read back" not in err and "no snapshot loses data" not in _next_step(err), err
    assert cli(capsys, "verify", "--repair", "--repo", repo)[0] == 6
    code, _, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and "cannot be a pack" in err and "moved back" not in _next_step(err), err
    assert "forget" in _next_step(err), err  # the old snapshot's blocks are gone from every disk


def _flip_byte(path, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def test_lost_blocks_beside_a_damaged_snapshot_file_are_counted_apart(tmp_path, capsys):
    """A bad block of an old snapshot and another snapshot's index file missing: verify said
    "1 bad block(s) affecting 2 snapshot(s) ... they are lost to the snapshots named above -
    forget those", the intact one included."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    img = make_image(tmp_path / "a.img", 8 * BS, [(0, 8 * BS, "random")], seed=98)
    cli(capsys, "backup", img, "--repo", repo, "--vm", "a")
    (pack,) = [p for p in (repo / "packs").rglob("*") if p.is_file() and p.name != "pack-storage.json"]
    make_image(img, 8 * BS, [(0, 8 * BS, "random")], seed=99)
    cli(capsys, "backup", img, "--repo", repo, "--vm", "a")
    cli(capsys, "backup", img, "--repo", repo, "--vm", "a")  # the disk, unchanged
    s2 = Repository.open(str(repo)).snapshots()[1].id
    _flip_byte(pack)
    os.unlink(repo / "snapshots" / f"{s2}.index")
    code, _, err = cli(capsys, "verify", "--repo", repo)
    last = err.strip().splitlines()[-1]
    assert code == 6 and "1 bad block(s) affecting 1 snapshot(s) and 1 damaged snapshot(s)" in last, err
    assert "lost to the snapshots with bad blocks named above" in last, err


def test_while_a_snapshot_description_is_damaged_lost_blocks_may_still_be_on_a_disk(tmp_path, capsys):
    """Disk a: data A, then B, then A again; the newest snapshot's description damaged, and
    a copy of an A block bad.  verify called the block lost ("forget those"): the damaged
    description was left out, so B's snapshot looked like the disk's newest.  A backup
    heals it."""
    repo = tmp_path / "repo"
    cli(capsys, "init", repo)
    a = make_image(tmp_path / "A.img", 8 * BS, [(0, 8 * BS, "random")], seed=100)
    b = make_image(tmp_path / "B.img", 8 * BS, [(0, 8 * BS, "random")], seed=101)
    disk = tmp_path / "a.img"
    for data in (a, b, a):
        shutil.copyfile(data, disk)
        cli(capsys, "backup", disk, "--repo", repo, "--vm", "a")
    s1, _, s3 = Repository.open(str(repo)).snapshots()
    first_pack = min((p for p in (repo / "packs").rglob("*") if p.is_file() and p.name != "pack-storage.json"),
                     key=lambda p: p.stat().st_mtime_ns)
    _flip_byte(first_pack)
    (repo / "snapshots" / f"{s3.id}.json").write_text("garbage")
    code, _, err = cli(capsys, "verify", "--repo", repo)
    step = _next_step(err)
    assert code == 6 and "they are lost" not in step and step.startswith("back up the affected disks"), err
    assert cli(capsys, "backup", disk, "--repo", repo, "--vm", "a")[0] == 0  # what it says: and A is whole again
    assert cli(capsys, "restore", s1.id, tmp_path / "s1.img", "--repo", repo)[0] == 0
    assert same_file(tmp_path / "s1.img", a)


def test_a_pack_lost_with_its_index_is_stored_again_after_the_named_repair(tmp_path, capsys):
    """Blocks no index names and no marker covers (a pack and its pack index both lost):
    an incremental carried their records on unread.  --repair now leaves a marker, so the
    "back up the affected disks" verify names is true."""
    repo, img, pack = _one_pack_repo(tmp_path, capsys, 91)
    os.unlink(pack)
    for index in (repo / "index").rglob("*"):
        if index.is_file():
            index.unlink()
    code, _, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and "'pyvbak verify --repair'" in _next_step(err), err
    assert cli(capsys, "verify", "--repo", repo, "--repair")[0] == 6
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0  # an incremental of the unchanged disk
    for snap in Repository.open(str(repo)).snapshots():
        assert cli(capsys, "restore", snap.id, tmp_path / f"{snap.id}.img", "--repo", repo)[0] == 0
        assert same_file(tmp_path / f"{snap.id}.img", img)


def test_a_repair_of_chosen_snapshots_leaves_the_marker_the_disks_newest_snapshot_needs(tmp_path, capsys):
    """The zero-record marker was decided from the chosen snapshots alone: `verify OLD
    --repair` wrote none when the disk's newest snapshot (the next backup's parent) had
    checked every existing marker, so that backup carried the lost records on unread."""
    repo, a, objects, pack_a, index_a = _vm_a_then_x(tmp_path, capsys, seed=92)
    old = Repository.open(str(repo)).snapshots(vm="a")[0].id
    for name in objects("packs/") - pack_a:
        os.unlink(repo / name)
    assert cli(capsys, "verify", "--repo", repo, "--repair")[0] == 6  # marker M1, for x
    assert cli(capsys, "backup", a, "--repo", repo, "--vm", "a")[0] == 0  # a's newest: lost_checked [M1]
    for name in pack_a | index_a:
        os.unlink(repo / name)
    assert cli(capsys, "verify", old, "--repo", repo, "--repair")[0] == 6
    assert cli(capsys, "backup", a, "--repo", repo, "--vm", "a")[0] == 0
    code, _, err = cli(capsys, "restore", "a@latest", tmp_path / "a-out.img", "--repo", repo)
    assert code == 0 and same_file(tmp_path / "a-out.img", a), err


def test_a_bad_copy_in_a_pack_the_repair_adopted_is_named_for_a_second_repair(tmp_path, capsys):
    """A pack whose index was lost also held a corrupt block: --repair adopted the pack, its
    re-check found the block, and the line said "the repair dropped the lost blocks'
    records" - it had not; the backup made as told could not be restored."""
    repo, img, pack = _one_pack_repo(tmp_path, capsys, 94)
    rec = Repository.open(str(repo)).load_digest_index().records[0]
    for index in (repo / "index").rglob("*"):
        if index.is_file():
            index.unlink()
    os.chmod(pack, 0o644)
    data = bytearray(pack.read_bytes())
    data[int(rec["offset"]) + 9] ^= 0x55
    pack.write_bytes(data)
    code, _, err = cli(capsys, "verify", "--repo", repo, "--repair")
    last = err.strip().splitlines()[-1]
    assert code == 6 and last.startswith("pyvbak: error: after repair") and "run 'pyvbak verify --repair'" in last, err
    assert cli(capsys, "verify", "--repo", repo, "--repair")[0] == 6  # as told: now the bad copy goes
    assert cli(capsys, "backup", img, "--repo", repo, "--vm", "v")[0] == 0
    for snap in Repository.open(str(repo)).snapshots():
        assert cli(capsys, "restore", snap.id, tmp_path / f"{snap.id}.img", "--repo", repo)[0] == 0
        assert same_file(tmp_path / f"{snap.id}.img", img)

"""restore.sh restores a snapshot without pyvbak: only sh, coreutils and zstd."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import require_busybox, require_tool
from images import KiB, MiB, backup_file, random_bytes, resize, rewrite_pages, same_file, vm_image, write_at
from pyvbak.repo import format as fmt
from pyvbak.repo.repository import Repository

BARE_ENV = {"PATH": "/usr/bin:/bin"}  # no PYTHONPATH, no venv, no pyenv shims


def run_sh(repo_dir, *args, cwd, shell=("/bin/sh",), env=BARE_ENV):
    return subprocess.run(
        [*shell, os.path.join(repo_dir, "restore.sh"), *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_tool("zstd", "zstd")
    base = tmp_path_factory.mktemp("rsh")
    repo = Repository.init(str(base / "repo"))
    img = base / "disk.img"
    vm_image(img, 3 * MiB + 4321, seed=31)  # text, random, zeros, a hole, partial tail block
    s1 = backup_file(repo, img).snapshot_id
    c1 = shutil.copyfile(img, base / "s1.img")
    rewrite_pages(img, fraction=0.05, seed=32)
    resize(img, 4 * MiB + 17)
    write_at(img, 4 * MiB - 5 * KiB, random_bytes(5 * KiB + 17, 33))
    s2 = backup_file(repo, img).snapshot_id
    c2 = shutil.copyfile(img, base / "s2.img")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return repo, [(s1, c1), (s2, c2)], elsewhere


def test_pyvbak_not_importable_in_bare_env(setup):
    _, _, elsewhere = setup
    p = subprocess.run(["python3", "-c", "import pyvbak"], env=BARE_ENV, cwd=elsewhere, capture_output=True, text=True)
    # (a machine without /usr/bin/python3 passes too: there is nothing to import it with)
    assert p.returncode != 0, "pyvbak is importable without the venv: the test proves nothing"


def test_restore_sh_byte_identical(setup):
    repo, snaps, elsewhere = setup
    for k, (sid, copy) in enumerate(snaps):
        out = elsewhere / f"out{k}.img"
        p = run_sh(repo.location, sid, out, cwd=elsewhere)
        assert p.returncode == 0, p.stderr
        assert f"restored snapshot {sid}" in p.stdout
        assert same_file(out, copy)
        assert not [n for n in os.listdir(elsewhere) if "partial" in n]


def test_restore_sh_errors(setup, tmp_path):
    repo, snaps, elsewhere = setup
    sid, copy = snaps[0]

    p = run_sh(repo.location, "20000101T000000Z-deadbeef", elsewhere / "x.img", cwd=elsewhere)
    assert p.returncode != 0
    assert "restore.sh: error: no snapshot 20000101T000000Z-deadbeef" in p.stderr
    assert not (elsewhere / "x.img").exists()

    existing = elsewhere / "exists.img"
    existing.write_bytes(b"keep me")
    p = run_sh(repo.location, sid, existing, cwd=elsewhere)
    assert p.returncode != 0 and "exists" in p.stderr
    assert existing.read_bytes() == b"keep me"

    p = run_sh(repo.location, sid, cwd=elsewhere)
    assert p.returncode != 0 and "usage" in p.stderr

    # a block missing from the repository: delete the pack of one of this snapshot's blocks
    broken = tmp_path / "broken"
    shutil.copytree(repo.location, broken)
    r = Repository.open(str(broken))
    _, _, records = r.load_snapshot_index(r.resolve(sid))
    idx = r.load_digest_index()
    victim = next(d for d in records["digest"] if bytes(d) != fmt.ZERO_DIGEST)
    pack = bytes(idx.records[idx.find(bytes(victim))]["pack"]).hex()
    os.unlink(os.path.join(broken, fmt.pack_name(pack)))
    # and remove the index naming it: the block is then unknown, not just unreadable
    for name in r.pack_index_names():
        recs = fmt.decode_pack_index(r.backend.read(name), name)
        if (recs["pack"].view("S32") == bytes.fromhex(pack)).any():
            os.unlink(os.path.join(broken, name))
    out = elsewhere / "missing.img"
    p = run_sh(broken, sid, out, cwd=elsewhere)
    assert p.returncode != 0
    assert "missing from the repository" in p.stderr
    assert not out.exists()
    assert not [n for n in os.listdir(elsewhere) if "partial" in n]


def test_restore_sh_detects_corrupt_block(setup, tmp_path):
    repo, snaps, elsewhere = setup
    sid, _ = snaps[0]
    broken = tmp_path / "corrupt"
    shutil.copytree(repo.location, broken)
    r = Repository.open(str(broken))
    rec = r.load_digest_index().records[0]
    pack = os.path.join(broken, fmt.pack_name(bytes(rec["pack"]).hex()))
    data = bytearray(open(pack, "rb").read())
    data[int(rec["offset"]) + int(rec["clen"]) // 2] ^= 0xFF
    open(pack, "wb").write(data)
    victim = bytes(rec["digest"])
    for s, _ in snaps:
        _, _, records = r.load_snapshot_index(r.resolve(s))
        uses = victim in {bytes(d) for d in records["digest"]}
        out = elsewhere / f"c-{s}.img"
        p = run_sh(broken, s, out, cwd=elsewhere)
        if uses:
            assert p.returncode != 0, "a corrupt block went unnoticed"
            assert "restore.sh: error: block " in p.stderr and "damaged" in p.stderr, p.stderr
            assert not out.exists()
        else:
            assert p.returncode == 0, p.stderr
    assert not [n for n in os.listdir(elsewhere) if "partial" in n]


def _tools_dir(tmp_path, *, without=(), failing=()):
    """A PATH of symlinks to the tools restore.sh uses, less ``without``; each name in
    ``failing`` is a script that prints nothing and exits 1 (a stage that breaks)."""
    d = tmp_path / "bin"
    d.mkdir()
    for t in ("zstd od tr head tail cut nl sort join paste split wc ls dd sha256sum mktemp truncate mv ln rm "
              "dirname readlink sync cat grep").split():
        if t in without:
            continue
        if t in failing:
            (d / t).write_text("#!/bin/sh\nexit 1\n")
            (d / t).chmod(0o755)
            continue
        (d / t).symlink_to(shutil.which(t))
    return str(d)


def test_restore_sh_with_every_tool_of_the_tools_dir(setup, tmp_path):
    """The PATH the failing-stage tests start from restores: their failures are the
    stage's, not a tool missing from it."""
    repo, snaps, elsewhere = setup
    sid, copy = snaps[1]
    out = elsewhere / "tools-dir.img"
    p = run_sh(repo.location, sid, out, cwd=elsewhere, env={"PATH": _tools_dir(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert same_file(out, copy)


def test_restore_sh_under_busybox_sh(setup):
    """busybox sh runs its own applets (cut without --output-delimiter, dd without
    conv=sparse) even where GNU coreutils are installed: the script sticks to what both
    have."""
    busybox = require_busybox()
    repo, snaps, elsewhere = setup
    for k, (sid, copy) in enumerate(snaps):
        out = elsewhere / f"bb{k}.img"
        p = run_sh(repo.location, sid, out, cwd=elsewhere, shell=(busybox, "sh"))
        assert p.returncode == 0, p.stderr
        assert same_file(out, copy)


@pytest.mark.parametrize("tool", ["join", "paste", "sort"])
def test_restore_sh_without_a_tool_says_which_and_writes_nothing(setup, tmp_path, tool):
    repo, snaps, elsewhere = setup
    sid, _ = snaps[1]
    out = elsewhere / f"no-{tool}.img"
    p = run_sh(repo.location, sid, out, cwd=elsewhere, env={"PATH": _tools_dir(tmp_path, without=(tool,))})
    assert p.returncode != 0
    assert "restore.sh: error: needs these commands" in p.stderr and tool in p.stderr
    assert not out.exists()


@pytest.mark.parametrize("tool", "zstd od tr head tail cut nl sort join paste wc ls dd sha256sum mktemp truncate grep ln+mv"
                         .split())
def test_restore_sh_a_failing_stage_is_an_error_not_a_disk_of_zeros(setup, tmp_path, tool):
    """A stage of a pipeline that fails used to go unseen (`set -e` looks at a
    pipeline's last command only): `join` failing gave a 'restored' disk of zeros."""
    repo, snaps, elsewhere = setup
    sid, _ = snaps[1]
    out = elsewhere / f"fail-{tool}.img"
    # (ln+mv: the output gets its name from ln, or from mv where ln fails)
    p = run_sh(repo.location, sid, out, cwd=elsewhere, env={"PATH": _tools_dir(tmp_path, failing=tool.split("+"))})
    assert p.returncode != 0, p.stdout
    assert "restore.sh: error:" in p.stderr
    assert "needs these commands" not in p.stderr, "the stage never ran: the test proves nothing"
    assert not out.exists()
    assert not [n for n in os.listdir(elsewhere) if "partial" in n]


def test_an_index_copied_over_another_snapshots_is_refused(setup, tmp_path):
    """Both indexes decode and every block matches its digest: only the SHA-256 the
    metadata records tells that the index is another snapshot's."""
    repo, snaps, elsewhere = setup
    (s1, _), (s2, _) = snaps
    broken = tmp_path / "swapped"
    shutil.copytree(repo.location, broken)
    src = broken / "snapshots" / f"{s2}.index"
    dst = broken / "snapshots" / f"{s1}.index"
    os.chmod(dst, 0o644)
    shutil.copyfile(src, dst)
    out = elsewhere / "swapped.img"
    p = run_sh(broken, s1, out, cwd=elsewhere)
    assert p.returncode != 0 and "is not the index snapshot" in p.stderr, p.stderr
    assert not out.exists()
    from pyvbak.errors import IntegrityError

    r = Repository.open(str(broken))
    with pytest.raises(IntegrityError, match="is corrupt or another snapshot's"):
        r.load_snapshot_index(r.resolve(s1))


def test_a_damaged_pack_index_the_snapshot_does_not_need_is_left_out(setup, tmp_path):
    """restore.sh stopped at any undecodable pack index, also one naming none of the
    snapshot's blocks (pyvbak leaves such an index out and restores)."""
    repo, snaps, elsewhere = setup
    sid, copy = snaps[0]
    broken = tmp_path / "extra-index"
    shutil.copytree(repo.location, broken)
    (broken / "index" / ("ab" * 32)).write_bytes(b"not a zstd frame")
    out = elsewhere / "extra.img"
    p = run_sh(broken, sid, out, cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    assert "warning: pack index" in p.stderr
    assert same_file(out, copy)


def test_backups_bring_an_older_restore_kit_up_to_date(tmp_path, capsys):
    """A repository made by an older pyvbak keeps its restore.sh until a backup replaces
    it with this one's (a newer revision only: an older pyvbak never downgrades it), and
    the replaced script restores."""
    from pyvbak.cli.main import main
    from pyvbak.repo.repository import restore_kit_revision

    kit = os.path.join(os.path.dirname(fmt.__file__), "restore.sh")
    current = open(kit, "rb").read()
    revision = restore_kit_revision(current)
    assert revision >= 2 and restore_kit_revision(b"#!/bin/sh\n# no revision line\n") == 1
    repo_dir = tmp_path / "repo"
    assert main(["init", str(repo_dir)]) == 0
    old = b"#!/bin/sh\necho the old script\n"
    (repo_dir / "restore.sh").write_bytes(old)
    (repo_dir / "README-RESTORE.txt").write_bytes(b"old readme\n")
    img = tmp_path / "d.img"
    vm_image(img, 1 * MiB + 123, seed=5)
    capsys.readouterr()
    assert main(["backup", str(img), "--repo", str(repo_dir), "--vm", "v", "--json"]) == 0
    err = capsys.readouterr().err
    assert f"updated restore.sh and README-RESTORE.txt in the repository to revision {revision}" in err
    assert (repo_dir / "restore.sh").read_bytes() == current
    assert b"old readme" not in (repo_dir / "README-RESTORE.txt").read_bytes()
    assert os.stat(repo_dir / "restore.sh").st_mode & 0o111
    # up to date: nothing said, nothing written
    assert main(["backup", str(img), "--repo", str(repo_dir), "--vm", "v", "--json"]) == 0
    assert "restore.sh" not in capsys.readouterr().err
    # a newer revision (a newer pyvbak's) stays
    newer = current.replace(f"# restore kit revision: {revision}".encode(), f"# restore kit revision: {revision + 1}".encode())
    (repo_dir / "restore.sh").write_bytes(newer)
    assert main(["backup", str(img), "--repo", str(repo_dir), "--vm", "v", "--json"]) == 0
    assert (repo_dir / "restore.sh").read_bytes() == newer
    (repo_dir / "restore.sh").write_bytes(current)
    sid = Repository.open(str(repo_dir)).latest("v", "d").id
    r = run_sh(repo_dir, sid, tmp_path / "out.img", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert same_file(tmp_path / "out.img", img)


@pytest.mark.parametrize("odd", ["back\\slash", "new\nline"])
def test_restore_sh_under_paths_sha256sum_escapes(setup, tmp_path, odd):
    """GNU sha256sum escapes a file name holding a backslash or a newline and starts its
    line with '\\': a repository or TMPDIR path with one made every check fail and
    restore.sh call an intact repository damaged."""
    repo, snaps, _ = setup
    sid, copy = snaps[-1]
    moved = tmp_path / f"repo {odd}"
    shutil.copytree(repo.location, moved)
    tmpdir = tmp_path / f"tmp {odd}"
    tmpdir.mkdir()
    out = tmp_path / "out.img"
    p = run_sh(moved, sid, out, cwd=tmp_path, env={**BARE_ENV, "TMPDIR": str(tmpdir)})
    assert p.returncode == 0, p.stderr
    assert same_file(out, copy)
    assert f"to {out}" in p.stdout  # printed as it is (echo in dash would expand '\s')


def test_restore_sh_removes_what_a_killed_run_left_in_tmpdir(setup, tmp_path):
    """A restore.sh killed with SIGKILL runs no trap: its temporary directory (block lists,
    decompressed blocks) stayed for good.  The next run
    removes those of its machine and pid namespace whose process is gone, and nothing
    else (another host sharing TMPDIR has its own)."""
    repo, snaps, _ = setup
    sid, copy = snaps[0]
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    import hashlib

    def first_line(path):
        try:
            with open(path) as f:
                return f.readline().rstrip("\n")
        except OSError:
            return ""

    # the scope restore.sh names its directory after: machine, host name, pid namespace
    machine = first_line("/etc/machine-id") or first_line("/proc/sys/kernel/random/boot_id")
    scope = hashlib.sha256("|".join([machine, first_line("/proc/sys/kernel/hostname"),
                                     os.readlink("/proc/self/ns/pid")]).encode()).hexdigest()[:8]
    p = subprocess.Popen(["true"])  # a pid that has just ended
    p.wait()
    left = tmpdir / f"pyvbak-restore.{scope}.{p.pid}.AbCdEf"
    live = tmpdir / f"pyvbak-restore.{scope}.{os.getpid()}.GhIjKl"
    other = ("1" if scope[0] == "0" else "0") + scope[1:]  # another host's, or container's
    other_ns = tmpdir / f"pyvbak-restore.{other}.{p.pid}.MnOpQr"
    for d in (left, live, other_ns):
        d.mkdir()
        (d / "blocks").write_bytes(b"x" * 100)
    out = tmp_path / "out.img"
    r = run_sh(repo.location, sid, out, cwd=tmp_path, env={**BARE_ENV, "TMPDIR": str(tmpdir)})
    assert r.returncode == 0, r.stderr
    assert same_file(out, copy)
    assert not left.exists() and live.exists() and other_ns.exists()
    assert sorted(x.name for x in tmpdir.iterdir()) == sorted([live.name, other_ns.name])  # its own went too
    # a killed run leaves its partial output too: the next run stops on it, but only after
    # removing the killed run's temporary files (they stayed until the partial file went)
    left.mkdir()
    (left / "blocks").write_bytes(b"x" * 100)
    out2 = tmp_path / "out2.img"
    (tmp_path / "out2.img.pyvbak-restore-partial").write_bytes(b"half")
    r = run_sh(repo.location, sid, out2, cwd=tmp_path, env={**BARE_ENV, "TMPDIR": str(tmpdir)})
    assert r.returncode != 0 and "partial" in r.stderr and not out2.exists()
    assert not left.exists()


def test_a_newer_repository_format_is_refused(setup, tmp_path):
    """Every pyvbak command refuses a repository of a newer format version; restore.sh
    never read the config and restored from it."""
    repo, snaps, elsewhere = setup
    (s1, _), _ = snaps
    newer = tmp_path / "newer"
    shutil.copytree(repo.location, newer)
    cfg = newer / "config"
    os.chmod(cfg, 0o644)
    cfg.write_text(cfg.read_text().replace('"version": 1,', '"version": 2,'))
    out = elsewhere / "newer.img"
    p = run_sh(newer, s1, out, cwd=elsewhere)
    assert p.returncode != 0 and "format version 2" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not out.exists()


@pytest.mark.parametrize("damage", ["no disk", "no time", "index_sha256 null"])
def test_vm_latest_refuses_where_the_newest_description_lacks_a_field(setup, tmp_path, damage):
    """restore.sh counted as damaged only a description without its vm or status line:
    the newest one without its disk or time line (or with an index_sha256 that is no
    SHA-256) was passed over and VM@latest restored the older snapshot, where pyvbak
    refuses."""
    repo, snaps, elsewhere = setup
    _, (s2, _) = snaps
    broken = tmp_path / "broken"
    shutil.copytree(repo.location, broken)
    meta = broken / "snapshots" / f"{s2}.json"
    os.chmod(meta, 0o644)
    key = {"no disk": '  "disk": ', "no time": '  "time": ', "index_sha256 null": '  "index_sha256": '}[damage]
    lines = meta.read_text().splitlines(keepends=True)
    if damage == "index_sha256 null":
        lines = [key + "null,\n" if ln.startswith(key) else ln for ln in lines]
    else:
        lines = [ln for ln in lines if not ln.startswith(key)]
    meta.write_text("".join(lines))
    with open(os.path.join(repo.location, "snapshots", f"{s2}.json")) as f:
        vm = json.load(f)["vm"]
    out = elsewhere / f"latest-{damage.replace(' ', '-')}.img"
    p = run_sh(broken, f"{vm}@latest", out, cwd=elsewhere)
    assert p.returncode != 0 and s2 in p.stderr and "damaged" in p.stderr, p.stderr
    assert not out.exists()

"""Which snapshot is the newest: by sequence number, not by the clock that dated it.

A wall clock goes back (an NTP step, a backup host restored from a VM snapshot, a second
host with a slow clock) or runs ahead once (a snapshot dated 2100).  Ordered by time,
``VM@latest`` (pyvbak and restore.sh), the next backup's parent and ``--keep-last`` took
an older snapshot for the newest, silently.  The clock is shifted here for the process
by patching the one place pyvbak reads it (repo/snapshots.py's ``datetime``)."""

from __future__ import annotations

import datetime as real_datetime
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from images import MiB, random_bytes
from pyvbak.repo import snapshots as snapshots_module


cli = run_cli


class _ShiftedClock(real_datetime.datetime):
    shift = real_datetime.timedelta(0)

    @classmethod
    def now(cls, tz=None):
        return real_datetime.datetime.now(tz) + cls.shift


@pytest.fixture
def clock(monkeypatch):
    """``clock(hours=-1)``: every later backup in this process is dated that far off."""
    monkeypatch.setattr(snapshots_module, "datetime", _ShiftedClock)

    def set_shift(**delta):
        _ShiftedClock.shift = real_datetime.timedelta(**delta)

    set_shift()
    yield set_shift
    set_shift()


@pytest.fixture
def disk(tmp_path, capsys):
    """(image path, repository path, write(version)): the image holds version N's bytes."""
    img = tmp_path / "d.img"
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo)[0] == 0

    def write(version: int) -> bytes:
        data = random_bytes(MiB, seed=100 + version)
        img.write_bytes(data)
        return data

    return img, repo, write


def backup(capsys, img, repo, vm="vm1") -> dict:
    code, out, err = cli(capsys, "backup", img, "--repo", repo, "--vm", vm, "--json")
    assert code == 0, err
    return json.loads(out)


def restored(capsys, repo, spec, out: Path) -> bytes:
    if out.exists():
        out.unlink()
    code, _, err = cli(capsys, "restore", spec, out, "--repo", repo)
    assert code == 0, err
    return out.read_bytes()


def restore_sh(repo, spec, out: Path) -> bytes:
    if out.exists():
        out.unlink()
    p = subprocess.run(["sh", str(repo / "restore.sh"), spec, str(out)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": "/nonexistent"})
    assert p.returncode == 0, p.stderr
    return out.read_bytes()


def test_latest_after_the_clock_went_back(capsys, tmp_path, disk, clock):
    img, repo, write = disk
    write(0)
    a = backup(capsys, img, repo)
    newest = write(1)
    clock(hours=-1)
    b = backup(capsys, img, repo)
    assert b["parent"] == a["id"]
    assert any("clock" in w and a["id"] in w for w in b["warnings"]), b["warnings"]
    assert restored(capsys, repo, "vm1@latest", tmp_path / "py.img") == newest
    assert restore_sh(repo, "vm1@latest", tmp_path / "sh.img") == newest
    code, out, _ = cli(capsys, "snapshots", "--repo", repo, "--json")
    listed = json.loads(out)
    assert [s["id"] for s in listed] == [a["id"], b["id"]]  # made first, listed first
    assert listed[1]["sequence"] == listed[0]["sequence"] + 1
    # the next backup's parent is the newest snapshot, not the one with the latest time
    third = write(2)
    c = backup(capsys, img, repo)
    assert c["parent"] == b["id"]
    assert restored(capsys, repo, "vm1@latest", tmp_path / "py.img") == third


def test_keep_last_keeps_the_newest_after_the_clock_went_back(capsys, tmp_path, disk, clock):
    img, repo, write = disk
    write(0)
    a = backup(capsys, img, repo)
    clock(hours=-1)
    write(1)
    backup(capsys, img, repo)
    newest = write(2)
    c = backup(capsys, img, repo)
    code, out, err = cli(capsys, "forget", "--keep-last", "1", "--vm", "vm1", "--prune", "--repo", repo, "--json")
    assert code == 0, err
    code, out, _ = cli(capsys, "snapshots", "--repo", repo, "--json")
    assert [s["id"] for s in json.loads(out)] == [c["id"]]
    assert a["id"] not in out
    assert restored(capsys, repo, "vm1@latest", tmp_path / "py.img") == newest
    assert restore_sh(repo, "vm1@latest", tmp_path / "sh.img") == newest


def test_a_snapshot_dated_in_the_future_does_not_stay_latest(capsys, tmp_path, disk, clock):
    img, repo, write = disk
    write(0)
    clock(days=365 * 74)  # one backup from a host whose clock said 2100
    future = backup(capsys, img, repo)
    clock()
    newest = write(1)
    now = backup(capsys, img, repo)
    assert now["parent"] == future["id"]
    assert any("clock" in w for w in now["warnings"]), now["warnings"]
    assert restored(capsys, repo, "vm1@latest", tmp_path / "py.img") == newest
    assert restore_sh(repo, "vm1@latest", tmp_path / "sh.img") == newest
    later = write(2)
    assert backup(capsys, img, repo)["parent"] == now["id"]
    assert restore_sh(repo, "vm1@latest", tmp_path / "sh.img") == later


def test_snapshots_without_a_sequence_come_first_by_time(capsys, tmp_path, disk, monkeypatch):
    """A repository written before sequence numbers existed: its snapshots keep their
    order by time, and a new one comes after every one of them."""
    img, repo, write = disk
    ids = []
    for v in range(3):
        write(v)
        ids.append(backup(capsys, img, repo)["id"])
    for sid in ids:  # as an older pyvbak wrote them
        meta_path = repo / "snapshots" / f"{sid}.json"
        meta = json.loads(meta_path.read_text())
        del meta["sequence"]
        meta_path.write_text(json.dumps(meta, indent=2))
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "another-machine-cache"))
    code, out, _ = cli(capsys, "snapshots", "--repo", repo, "--json")
    assert [s["id"] for s in json.loads(out)] == ids
    assert all(s["sequence"] == 0 for s in json.loads(out))
    assert restore_sh(repo, "vm1@latest", tmp_path / "sh.img") == img.read_bytes()
    newest = write(3)
    new = backup(capsys, img, repo)
    assert new["parent"] == ids[-1]
    assert json.loads((repo / "snapshots" / f"{new['id']}.json").read_text())["sequence"] == 1
    assert restored(capsys, repo, "vm1@latest", tmp_path / "py.img") == newest
    assert restore_sh(repo, "vm1@latest", tmp_path / "sh.img") == newest


@pytest.mark.parametrize("bad", [-1, 1.5, True, "7", 10**18])
def test_a_sequence_that_is_not_one_is_damage(capsys, tmp_path, disk, bad):
    img, repo, write = disk
    write(0)
    first = backup(capsys, img, repo)
    write(1)
    second = backup(capsys, img, repo)
    meta_path = repo / "snapshots" / f"{second['id']}.json"
    meta = json.loads(meta_path.read_text())
    meta["sequence"] = bad
    meta_path.write_text(json.dumps(meta, indent=2))
    code, _, err = cli(capsys, "verify", "--repo", repo)
    assert code == 6 and second["id"] in err, err
    # restore.sh does not take it for the newest either: it refuses VM@latest, naming it
    p = subprocess.run(["sh", str(repo / "restore.sh"), "vm1@latest", str(tmp_path / "o.img")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and second["id"].split("-")[0] in p.stderr, p.stderr
    assert first["id"] in p.stderr


def test_a_prefix_that_also_names_a_damaged_snapshot_is_ambiguous(capsys, tmp_path, disk):
    img, repo, write = disk
    write(0)
    a = backup(capsys, img, repo)
    write(1)
    b = backup(capsys, img, repo)
    (repo / "snapshots" / f"{b['id']}.json").write_text("{not json")
    common = os.path.commonprefix([a["id"], b["id"]])
    code, _, err = cli(capsys, "restore", common, tmp_path / "o.img", "--repo", repo)
    assert code == 2 and "ambiguous" in err and "damaged" in err, err
    assert not (tmp_path / "o.img").exists()
    # the readable one by its whole id still restores
    code, _, err = cli(capsys, "restore", a["id"], tmp_path / "o.img", "--repo", repo)
    assert code == 0, err


def test_a_snapshot_an_older_pyvbak_made_last_is_the_newest(capsys, tmp_path, disk, monkeypatch):
    """Two pyvbak versions sharing a repository during an upgrade: a snapshot without a
    sequence number made after numbered ones came first (taken as 0), so VM@latest and
    --keep-last took an older one for the newest.  It now comes
    after its disk's numbered snapshots made before it."""
    img, repo, write = disk
    write(0)
    first = backup(capsys, img, repo)
    write(1)
    second = backup(capsys, img, repo)
    newest = write(2)
    old = backup(capsys, img, repo)
    meta_path = repo / "snapshots" / f"{old['id']}.json"
    meta = json.loads(meta_path.read_text())
    del meta["sequence"]  # as the older pyvbak wrote it
    meta_path.write_text(json.dumps(meta, indent=2))
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "fresh-cache"))
    code, out, _ = cli(capsys, "snapshots", "--repo", repo, "--json")
    assert [s["id"] for s in json.loads(out)] == [first["id"], second["id"], old["id"]]
    assert restored(capsys, repo, "vm1@latest", tmp_path / "py.img") == newest
    assert restore_sh(repo, "vm1@latest", tmp_path / "sh.img") == newest
    code, _, err = cli(capsys, "forget", "--keep-last", "1", "--repo", repo, "--json")
    assert code == 0, err
    code, out, _ = cli(capsys, "snapshots", "--repo", repo, "--json")
    assert [s["id"] for s in json.loads(out)] == [old["id"]]


def test_damaged_metadata_after_the_clock_went_back_stops_latest(capsys, tmp_path, disk, clock):
    """With the clock gone back, the time in a damaged snapshot's id says nothing about
    whether it is the newest: VM@latest restored an older snapshot without a word.  Any
    damaged description now stops VM@latest."""
    img, repo, write = disk
    write(0)
    backup(capsys, img, repo)
    clock(hours=-1)
    write(1)
    b = backup(capsys, img, repo)
    clock(hours=-2)
    write(2)
    c = backup(capsys, img, repo)
    (repo / "snapshots" / f"{c['id']}.json").write_text("{damaged")
    code, _, err = cli(capsys, "restore", "vm1@latest", tmp_path / "py.img", "--repo", repo)
    assert code == 6 and c["id"] in err and "may be newer than" in err, err
    assert not (tmp_path / "py.img").exists()
    p = subprocess.run(["sh", str(repo / "restore.sh"), "vm1@latest", str(tmp_path / "sh.img")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and c["id"] in p.stderr and b["id"] in p.stderr, p.stderr
    assert not (tmp_path / "sh.img").exists()

"""Blocks stored more than once (two backups of the same data at the same time): verify
reads every copy, names a bad copy beside a good one as a damaged copy (no snapshot lost)
and a block with no good copy as lost; verify --repair drops exactly the bad copies;
prune and forget --prune keep a copy that reads back intact, never a damaged one in place
of a good one; every snapshot restores byte for byte afterwards."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from images import restore_to, same_file
from pyvbak.cli.main import main
from pyvbak.repo import format as fmt
from pyvbak.repo.digest_index import DigestIndex
from pyvbak.repo.prune import prune_repository
from pyvbak.repo.verify import verify_repository
from repo_faults import Copies


@pytest.fixture
def copies(tmp_path):
    return Copies(tmp_path)


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_locate_all_finds_every_copy_across_parts():
    recs = np.zeros(5, fmt.PACK_INDEX_RECORD)
    digests = [b"b" * 32, b"a" * 32, b"b" * 32, b"c" * 32, b"b" * 32]
    for i, d in enumerate(digests):
        recs[i]["digest"] = np.frombuffer(d, "V32")[0]
        recs[i]["offset"] = i
    index = DigestIndex(parts=[DigestIndex(recs[:3]).__dict__["_parts"][0], DigestIndex(recs[3:]).__dict__["_parts"][0]])
    keys = np.array([b"b" * 32, b"x" * 32, b"a" * 32], "S32")
    which, pos = index.locate_all(keys)
    got = sorted((int(w), int(o)) for w, o in zip(which, index.records_at(pos)["offset"]))
    assert got == [(0, 0), (0, 2), (0, 4), (2, 1)]


@pytest.mark.parametrize("bad", ["pa", "pb"])
def test_a_bad_copy_beside_a_good_one_is_reported_but_loses_no_snapshot(copies, bad):
    """Whichever copy is damaged (verify used to read one only: the damage of the other
    went unseen, and damage of that one named both snapshots lost)."""
    pack = getattr(copies, bad)
    copies.flip(copies.shared[3], pack)
    verified = verify_repository(copies.repo())
    rep = verified.report
    assert not rep["ok"]
    assert rep["problem_count"] == 0 and rep["affected_snapshots"] == []
    assert rep["damaged_copy_count"] == 1
    (c,) = rep["damaged_copies"]
    assert (c["digest"], c["pack"]) == (copies.shared[3].hex(), pack.hex())
    assert "does not match" in c["reason"]
    assert rep["blocks_checked"] == 8 * 2 + 1 - 1  # every copy read; the bad one does not count
    assert [(d, p) for d, p, _ in verified.findings.bad_copies] == [(copies.shared[3], pack)]
    copies.assert_all_restore()


def test_a_block_with_every_copy_bad_is_lost_for_every_snapshot_naming_it(copies):
    copies.flip(copies.shared[0], copies.pa)
    copies.flip(copies.shared[0], copies.pb)
    verified = verify_repository(copies.repo())
    rep = verified.report
    assert rep["problem_count"] == 1 and rep["damaged_copy_count"] == 0
    assert sorted(a["id"] for a in rep["affected_snapshots"]) == sorted([copies.a, copies.b])
    assert len(verified.findings.bad_copies) == 2


def test_cli_verify_says_no_snapshot_is_lost_and_repair_drops_only_the_bad_copy(copies, capsys):
    d = copies.shared[5]
    copies.flip(d, copies.pb)
    code, out, err = cli(capsys, "verify", "--repo", copies.path)
    assert code != 0
    assert "damaged copy" in err and "no snapshot loses data" in err and "verify --repair" in err
    assert "snapshot " + copies.a not in err and "snapshot " + copies.b not in err
    assert "1 damaged redundant block copy" in err
    code, out, err = cli(capsys, "verify", "--repo", copies.path, "--repair", "--json")
    rep = json.loads(out)
    assert rep["repair"]["records_removed"] == 1 and rep["affected_snapshots"] == []
    # everything found was repaired: exit 0, and said so (the report still says what was found)
    assert code == 0 and rep["repair"]["complete"] and not rep["ok"], err
    assert "repair: complete" in err
    assert copies.copy_packs(d) == [copies.pa]  # the good copy stays
    for other in copies.shared[:5] + copies.shared[6:]:
        assert copies.copy_packs(other) == sorted([copies.pa, copies.pb])
    code, out, err = cli(capsys, "verify", "--repo", copies.path, "--json")
    assert code == 0, err
    assert json.loads(out)["ok"]
    copies.assert_all_restore()


def test_repair_after_a_pack_is_deleted_keeps_the_other_copies(copies, capsys):
    os.unlink(copies.pack_path(copies.pa))
    rep = verify_repository(copies.repo()).report
    assert rep["problem_count"] == 0 and rep["affected_snapshots"] == [] and rep["damaged_copy_count"] == 8
    code, out, err = cli(capsys, "verify", "--repo", copies.path, "--repair", "--json")
    assert json.loads(out)["repair"]["records_removed"] == 8
    assert code == 0, err
    assert all(copies.copy_packs(d) == [copies.pb] for d in copies.shared)
    assert verify_repository(copies.repo()).report["ok"]
    copies.assert_all_restore()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_prune_keeps_an_intact_copy_not_the_damaged_one(copies, damage):
    """PB holds more referenced bytes, so prune prefers its copies; it used to keep PB's
    damaged copy and delete PA, losing the block from both snapshots."""
    if damage == "flip":
        hurt = [copies.shared[2]]
        copies.flip(hurt[0], copies.pb)
    else:  # cut PB short after z: every shared frame after the cut is gone
        z_end = int(copies.record(copies.z, copies.pb)["offset"]) + int(copies.record(copies.z, copies.pb)["clen"])
        offs = {d: int(copies.record(d, copies.pb)["offset"]) for d in copies.shared}
        cut = min(o for o in offs.values() if o >= z_end)
        hurt = [d for d, o in offs.items() if o >= cut]
        os.truncate(copies.pack_path(copies.pb), cut)
    repo = copies.repo()
    with repo.lock(exclusive=True):
        dry = prune_repository(repo, dry_run=True)
        rep = prune_repository(repo)
    for r in (dry, rep):
        assert any(f"{len(hurt)} copy(ies) of stored blocks read back damaged" in p for p in r["problems"]), r["problems"]
    for d in hurt:  # the intact copy stays (PA itself, or the pack PA was repacked into)
        assert any(p != copies.pb for p in copies.copy_packs(d))
    after = verify_repository(copies.repo()).report
    assert after["problem_count"] == 0 and after["affected_snapshots"] == []
    copies.assert_all_restore()


def test_prune_with_no_intact_copy_keeps_every_copy(copies):
    d = copies.shared[1]
    copies.flip(d, copies.pa)
    copies.flip(d, copies.pb)
    repo = copies.repo()
    with repo.lock(exclusive=True):
        rep = prune_repository(repo)
    assert any("1 block(s) stored more than once have no intact copy" in p for p in rep["problems"])
    assert copies.copy_packs(d) == sorted([copies.pa, copies.pb])


def test_forget_prune_keeps_the_intact_copy_for_the_remaining_snapshot(copies, capsys):
    """Forgetting B leaves A's blocks referenced in both packs equally: either may be
    preferred, and prune must end with an intact one whichever copy is damaged."""
    for d in copies.shared[:4]:
        copies.flip(d, copies.pa)
    for d in copies.shared[4:]:
        copies.flip(d, copies.pb)
    code, out, err = cli(capsys, "forget", copies.b, "--prune", "--repo", copies.path)
    assert code == 0, err
    assert "4 copy(ies) of stored blocks read back damaged" in err  # the preferred pack's 4 bad ones
    out_img = copies.tmp / "a-out.img"
    restore_to(copies.repo(), copies.a, out_img)
    assert same_file(out_img, copies.img_a)
    rep = verify_repository(copies.repo()).report
    assert rep["problem_count"] == 0 and rep["affected_snapshots"] == []


def test_repair_exit_code_says_whether_anything_found_is_left(copies, capsys, monkeypatch):
    """verify --repair exits 0 only when what it found is gone: an unreadable redundant copy
    is kept (exit 6) unless --drop-unreadable drops it (exit 0: every snapshot still
    restores from the other copy)."""
    from repo_faults import failing_reads

    failing_reads(monkeypatch, fmt.pack_name(copies.pa.hex()), times=None)
    code, out, err = cli(capsys, "verify", "--repo", copies.path, "--repair", "--json")
    rep = json.loads(out)
    assert code == 6 and rep["repair"]["complete"] is False and "repair: complete" not in err
    code, out, err = cli(capsys, "verify", "--repo", copies.path, "--repair", "--drop-unreadable", "--json")
    rep = json.loads(out)
    assert code == 0 and rep["repair"]["complete"] is True and rep["repair"]["records_removed"] == 8, err
    monkeypatch.undo()
    assert all(copies.copy_packs(d) == [copies.pb] for d in copies.shared)
    assert verify_repository(copies.repo()).report["ok"]
    copies.assert_all_restore()

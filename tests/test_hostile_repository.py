"""A damaged or hostile repository (storage that lies, a copy from an untrusted place, bit
rot): every command fails or goes on with a clear line - no traceback, no hang, no memory
blow-up, nothing written or deleted outside the repository and the requested output."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from images import MiB, random_bytes
from pyvbak.cli.main import main
from pyvbak.repo import format as fmt

ROOT = Path(__file__).resolve().parent.parent


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


@pytest.fixture
def repo(tmp_path, capsys):
    img = tmp_path / "d.img"
    img.write_bytes(random_bytes(2 * MiB, seed=31))
    r = tmp_path / "repo"
    assert cli(capsys, "init", r)[0] == 0
    assert cli(capsys, "backup", img, "--repo", r, "--vm", "web")[0] == 0
    return r, img


def writable(path: Path) -> Path:
    if path.exists():
        os.chmod(path, 0o644)
    return path


def test_a_config_id_that_is_a_path_is_damage_not_a_cache_directory(repo, tmp_path, capsys):
    """The config's id named the local cache directory: '/tmp/victim/x' had a plain
    'pyvbak snapshots' delete a directory there and write the snapshot list into it."""
    r, _ = repo
    victim = tmp_path / "victim"
    (victim / ("0123456789abcdef" * 2)).mkdir(parents=True)
    (victim / ("0123456789abcdef" * 2) / "user-file").write_text("keep me")
    os.utime(victim / ("0123456789abcdef" * 2), (0, 0))  # "unused for months"
    cfg = json.loads((r / "config").read_text())
    for bad in (str(victim / "x"), "../../..", ""):
        cfg["id"] = bad
        for name in ("config", "config.copy"):  # (whoever can write one can write both)
            writable(r / name).write_text(json.dumps(cfg))
        code, _, err = cli(capsys, "snapshots", "--repo", r)
        assert code == 3 and "config is damaged" in err, err
        no_traceback(err)
    assert (victim / ("0123456789abcdef" * 2) / "user-file").read_text() == "keep me"
    assert sorted(os.listdir(victim)) == ["0123456789abcdef" * 2]


def test_a_pack_index_that_claims_a_terabyte_is_damage_not_out_of_memory(repo, tmp_path, capsys):
    """A 19-byte zstd frame declaring 1 TiB of content: python-zstandard allocates the
    declared size, and every restore, verify, backup and prune failed with 'out of memory
    ... use larger blocks'.  It is a damaged pack index now: left out, reported."""
    r, img = repo
    lie = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 1 << 40) + struct.pack("<I", (3 << 3) | 1)[:3] + b"abc"
    (r / "index" / ("ee" * 32)).write_bytes(lie)
    code, out, err = cli(capsys, "verify", "--repo", r, "--json")
    no_traceback(err)
    assert code == 6 and "out of memory" not in err
    assert [d["name"] for d in json.loads(out)["damaged_pack_indexes"]] == ["index/" + "ee" * 32]
    assert cli(capsys, "restore", "web@latest", tmp_path / "o.img", "--repo", r)[0] == 0
    assert (tmp_path / "o.img").read_bytes() == img.read_bytes()


def test_a_pack_index_offset_past_any_pack_is_damage_not_a_crash(repo, tmp_path, capsys):
    """An offset of 2^63 or more crashed restore, verify and --repair (OverflowError in the
    backend's prefetch), so the repair could not drop it."""
    r, _ = repo
    recs = np.zeros(1, fmt.PACK_INDEX_RECORD)
    recs["offset"] = 1 << 63
    (r / "index" / ("dd" * 32)).write_bytes(fmt.encode_pack_index(recs))
    code, out, err = cli(capsys, "verify", "--repo", r, "--json")
    no_traceback(err)
    assert code == 6 and [d["name"] for d in json.loads(out)["damaged_pack_indexes"]] == ["index/" + "dd" * 32]


def test_fifos_and_device_links_among_the_objects_never_hang(repo, tmp_path):
    """A FIFO where an object should be blocked every command for ever; a link to
    /dev/zero was read until memory ran out.  Only regular files are objects."""
    r, _ = repo
    (sid_json,) = [p for p in (r / "snapshots").iterdir() if p.suffix == ".json"]
    os.mkfifo(r / "snapshots" / ("20990101T000000Z-0000ffff.json"))
    os.symlink("/dev/zero", r / "index" / ("cc" * 32))
    os.mkfifo(r / "locks" / "fifo.json")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args in (["snapshots"], ["verify"], ["restore", sid_json.stem, str(tmp_path / "o.img")]):
        p = subprocess.run([sys.executable, "-m", "pyvbak", *args, "--repo", str(r)], capture_output=True,
                           text=True, timeout=60, env=env)
        no_traceback(p.stderr)
        assert p.returncode in (0, 6), (args, p.stderr)


def test_json_nested_thousands_deep_and_impossible_pids_are_damage(repo, capsys):
    r, _ = repo
    deep = "[" * 100000 + "]" * 100000
    (r / "snapshots" / "20990101T000000Z-0000aaaa.json").write_text(deep)
    (r / "locks" / "deep.json").write_text(deep)
    (r / "locks" / "huge.json").write_text(json.dumps({"host": os.uname().nodename, "pid": 1 << 70}))
    code, out, err = cli(capsys, "snapshots", "--repo", r)
    no_traceback(err)
    assert code == 0 and "is corrupt" in err
    code, out, err = cli(capsys, "prune", "--repo", r, "--dry-run")
    no_traceback(err)
    assert code != 0 and err.startswith("pyvbak: error: ")


def test_one_malformed_pack_does_not_stop_adoption_prune_or_repair(repo, capsys):
    """A trailer that hashes to its pack's name but is of another version raised out of
    the adoption: every prune, verify --repair and adopting backup failed for good."""
    r, img = repo
    body = fmt.PACK_TRAILER_HEADER.pack(fmt.PACK_TRAILER_MAGIC, 2, 0)
    payload = body + struct.pack(">I", len(body) + 4)
    trailer = struct.pack("<II", fmt.SKIPPABLE_FRAME_MAGIC, len(payload)) + payload
    pid = fmt.pack_id(trailer).hex()
    (r / "packs" / pid[:2]).mkdir(exist_ok=True)
    (r / "packs" / pid[:2] / pid).write_bytes(trailer)
    code, out, err = cli(capsys, "prune", "--repo", r)
    no_traceback(err)
    assert code == 0, err
    code, out, err = cli(capsys, "verify", "--repo", r, "--repair")
    no_traceback(err)
    assert code == 0, err
    assert (r / "packs" / pid[:2] / pid).exists()  # left alone, for a look by hand


def test_a_damaged_pack_index_stays_while_a_pack_cannot_be_reindexed(repo, capsys):
    """A backup deleted a damaged pack index and said its packs were re-indexed, when
    the pack's own table of contents was damaged too: no tool could restore the snapshot
    afterwards.  The damaged index is kept then, and the line says why."""
    r, img = repo
    (index,) = list((r / "index").iterdir())
    with open(writable(index), "ab") as f:
        f.write(b"x")  # damaged (bytes after its frame)
    (pack,) = [p for p in (r / "packs").rglob("*") if p.is_file() and p.name != "pack-storage.json"]
    data = bytearray(writable(pack).read_bytes())
    data[-100] ^= 1  # and the pack's table of contents
    pack.write_bytes(bytes(data))
    code, out, err = cli(capsys, "verify", "--repo", r, "--repair")
    no_traceback(err)
    assert code == 6 and "kept damaged pack index" in err
    assert index.exists()


def test_control_characters_in_names_are_not_sent_to_the_terminal(repo, capsys):
    r, _ = repo
    (meta,) = [p for p in (r / "snapshots").iterdir() if p.suffix == ".json"]
    doc = json.loads(meta.read_text())
    doc["vm"] = "web\x1b]0;owned\x07\nFAKE LINE"
    writable(meta).write_text(json.dumps(doc, indent=2))
    code, out, err = cli(capsys, "snapshots", "--repo", r)
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\nFAKE LINE" not in out
    assert "\\x1b" in out and "\\n" in out




def test_a_status_other_than_complete_is_damage_not_absence(repo, tmp_path, capsys, monkeypatch):
    """One flipped bit ("complete" -> "comple4e") made a snapshot invisible: VM@latest
    restored the older one without a word, verify passed and prune deleted the blocks
    only that snapshot used.  It is damage now: named,
    VM@latest refuses, verify fails, prune deletes nothing; mended, it restores."""
    r, _ = repo
    newer = tmp_path / "newer.img"
    newer.write_bytes(random_bytes(2 * MiB, seed=32))
    assert cli(capsys, "backup", newer, "--repo", r, "--vm", "web", "--disk", "d")[0] == 0
    code, out, _ = cli(capsys, "snapshots", "--repo", r, "--vm", "web", "--json")
    sid = json.loads(out)[-1]["id"]
    meta = r / "snapshots" / f"{sid}.json"
    good = meta.read_bytes()
    meta.write_bytes(good.replace(b'"complete"', b'"comple4e"'))
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "another-host"))  # no cached copy of it
    code, _, err = cli(capsys, "restore", "web/d@latest", tmp_path / "out.img", "--repo", r)
    assert code != 0 and sid in err and "damaged" in err and not (tmp_path / "out.img").exists()
    code, _, err = cli(capsys, "verify", "--repo", r)
    assert code != 0 and sid in err
    code, _, err = cli(capsys, "prune", "--repo", r)
    assert code != 0 and "nothing deleted" in err
    meta.write_bytes(good)
    assert cli(capsys, "restore", sid, tmp_path / "back.img", "--repo", r)[0] == 0
    assert (tmp_path / "back.img").read_bytes() == newer.read_bytes()


@pytest.mark.parametrize("value", [5, None, "", "abc", "A" * 64])
def test_an_index_sha256_that_is_no_sha256_is_damage_not_no_check(repo, tmp_path, capsys, monkeypatch, value):
    """A damaged index_sha256 (not a string, not 64 hex digits) switched the index's
    check off, in pyvbak and restore.sh: an index copied over it would restore another
    snapshot's disk.  The description is damaged now."""
    r, _ = repo
    code, out, _ = cli(capsys, "snapshots", "--repo", r, "--json")
    sid = json.loads(out)[-1]["id"]
    meta = writable(r / "snapshots" / f"{sid}.json")
    m = json.loads(meta.read_text())
    m["index_sha256"] = value
    meta.write_text(json.dumps(m, indent=2))
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "another-host"))
    code, _, err = cli(capsys, "restore", sid, tmp_path / "out.img", "--repo", r)
    assert code != 0 and sid in err and not (tmp_path / "out.img").exists(), err
    p = subprocess.run(["sh", str(r / "restore.sh"), sid, str(tmp_path / "out2.img")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "damaged" in p.stderr and not (tmp_path / "out2.img").exists(), p.stderr


@pytest.mark.parametrize("damage", [{"status": "comple4e"}, {"index_sha256": None}])
def test_a_description_an_older_pyvbak_cached_is_checked_by_todays_rules(repo, tmp_path, capsys, monkeypatch,
                                                                         damage):
    """The local cache holds descriptions as an older pyvbak checked them: one with a
    status other than "complete" or a malformed index_sha256 (damage it let through) was
    still trusted from there."""
    r, _ = repo
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "cache"))
    code, out, _ = cli(capsys, "snapshots", "--repo", r, "--json")  # fills the cache
    sid = json.loads(out)[-1]["id"]
    (cache_file,) = (tmp_path / "cache").glob("*/snapshots.json")
    doc = json.loads(cache_file.read_text())
    doc["metas"][f"snapshots/{sid}.json"].update(damage)
    cache_file.write_text(json.dumps(doc))
    code, out, err = cli(capsys, "snapshots", "--repo", r, "--json")
    assert sid not in out and sid in err
    code, _, err = cli(capsys, "restore", "web@latest", tmp_path / "out.img", "--repo", r)
    assert code != 0 and sid in err and not (tmp_path / "out.img").exists()


def _snapshot_without_index_check(r: Path) -> tuple[str, Path]:
    """The newest snapshot as an older pyvbak wrote it (no ``index_sha256``): its index is
    trusted as it decodes."""
    (meta,) = (r / "snapshots").glob("*.json")  # (not listed by pyvbak: it would cache the description)
    sid = meta.stem
    m = json.loads(writable(meta).read_text())
    del m["index_sha256"]
    meta.write_text(json.dumps(m, indent=2))
    return sid, writable(r / fmt.snapshot_index_name(sid))


def _huge_but_consistent_index(block_size: int) -> bytes:
    """An index frame for a disk of 2^50 bytes, a few bytes long: its header agrees with
    the content size its frame declares (the records never follow), so only the snapshot's
    metadata can tell it from the start of a real index of a 1 PiB disk."""
    size = 1 << 50
    count = size // block_size
    head = fmt.SNAPSHOT_HEADER.pack(fmt.SNAPSHOT_INDEX_MAGIC, fmt.FORMAT_VERSION, block_size, size, count)
    declared = len(head) + count * fmt.SNAPSHOT_RECORD.itemsize
    frame = zstandard.ZstdCompressor(level=1).compressobj(size=declared)
    return frame.compress(head) + frame.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


@pytest.mark.parametrize("lie", ["declares a terabyte", "a consistent petabyte disk"])
def test_a_snapshot_index_that_claims_more_than_its_disk_is_damage_not_out_of_memory(repo, tmp_path, capsys,
                                                                                      monkeypatch, lie):
    """A snapshot written before pyvbak recorded ``index_sha256`` has only its metadata to
    check its index against: an index frame declaring a terabyte of content, or a header
    for a far larger disk than the metadata's, made restore and the next backup fail with
    'out of memory ... use larger blocks' - damage, named, now."""
    r, img = repo
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "another-host"))
    sid, index = _snapshot_without_index_check(r)
    meta = json.loads((r / "snapshots" / f"{sid}.json").read_text())
    if lie == "declares a terabyte":
        index.write_bytes(b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 1 << 40)
                          + struct.pack("<I", (3 << 3) | 1)[:3] + b"abc")
    else:
        index.write_bytes(_huge_but_consistent_index(meta["block_size"]))
    code, _, err = cli(capsys, "restore", sid, tmp_path / "out.img", "--repo", r)
    no_traceback(err)
    assert code != 0 and "out of memory" not in err and fmt.snapshot_index_name(sid) in err, err
    assert not (tmp_path / "out.img").exists()
    code, out, err = cli(capsys, "backup", img, "--repo", r, "--vm", "web", "--json")  # the parent's, writable
    no_traceback(err)
    assert code == 0 and "out of memory" not in err, err
    res = json.loads(out)
    assert res["changed_bytes"] == img.stat().st_size
    assert any(sid in w and "scanned the whole disk" in w for w in res["warnings"]), res["warnings"]
    code, _, err = cli(capsys, "verify", "--repo", r)
    no_traceback(err)
    assert code != 0 and "out of memory" not in err and sid in err, err


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_lost_or_damaged_config_is_named_with_the_way_out(repo, capsys, damage):
    """A truncated config was "not a pyvbak repository configuration" (no next step) while
    init said the directory "already holds a pyvbak repository"; a deleted one made the
    repository "not a pyvbak repository: check the path"."""
    r, _ = repo
    (r / "config.copy").unlink()  # (one alone is read from the other: test_cli_errors.py)
    config = writable(r / "config")
    if damage == "truncated":
        config.write_bytes(config.read_bytes()[:50])
    else:
        config.unlink()
    for command in (["snapshots", "--repo", r], ["verify", "--repo", r], ["init", r],
                    ["snapshots", "--repo", f"file://{r}"], ["init", f"file://{r}"]):  # (file:// too)
        code, _, err = cli(capsys, *command)
        no_traceback(err)
        assert code == 3 and err.count("\n") == 1, err
        assert "back from a copy" in err or "never replaces" in err, err
        assert "check the path" not in err and "is not empty" not in err, err
    assert not config.exists() or len(config.read_bytes()) == 50  # init wrote nothing over it


def test_another_tools_directory_is_not_called_a_damaged_repository(tmp_path, capsys):
    """Any file named config (~/.ssh, .git, a restic repository) was "damaged: put it back
    from a copy", and any snapshots/*.json "pyvbak snapshots whose config is missing"."""
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    (ssh / "config").write_text("Host *\n  ForwardAgent no\n")
    other = tmp_path / "other"
    (other / "snapshots").mkdir(parents=True)
    (other / "snapshots" / "nightly.json").write_text("{}")
    for where, says in ((ssh, "not a pyvbak repository configuration: check the path"),
                        (other, "not a pyvbak repository (no config file): check the path")):
        code, _, err = cli(capsys, "snapshots", "--repo", where)
        assert code == 3 and says in err and "back from a copy" not in err, err
        code, _, err = cli(capsys, "init", where)
        assert code == 3 and "is not empty" in err and "already holds" not in err, err
    assert (ssh / "config").read_text().startswith("Host *")

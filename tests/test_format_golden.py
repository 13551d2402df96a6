"""Golden tests of the repository's JSON objects and object names (docs/FORMAT.md).

tests/test_repo_format.py freezes the binary records (snapshot index, pack index, trailer);
this file freezes what it does not: the config, snapshot metadata, lost/ marker, pack-storage
mark and lock JSON (names, values, and the byte layout restore.sh greps), and the object paths of a
real backup.  Every expected value is a literal or is computed here from the stored
bytes with hashlib/zstandard: never by pyvbak's own functions, so changing those fails
these tests."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket

import zstandard

from images import BS, backup_file, make_image, random_bytes, text_bytes
from pyvbak.cli.main import main
from pyvbak.repo.repository import Repository

HEX64 = re.compile(r"^[0-9a-f]{64}$")
SNAPID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")  # YYYYMMDDTHHMMSSZ-xxxxxxxx
TIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$")
META_KEYS = {"vm", "disk", "source", "size", "block_size", "time", "sequence", "parent", "change_tracking",
             "stats", "warnings", "id", "status", "index", "index_sha256", "pyvbak_version", "pack_index"}
STATS_KEYS = {"bytes_scanned", "bytes_read", "changed_blocks", "changed_bytes", "new_blocks", "new_bytes",
              "stored_bytes", "duration"}


def _image(tmp_path) -> tuple[str, list[bytes]]:
    """5 blocks: random (incompressible), text, a hole (zero), block 0 again (dedup),
    a 100-byte partial last block."""
    b0, b1, b4 = random_bytes(BS, 901), text_bytes(BS, 902), text_bytes(100, 903)
    data = b0 + b1 + bytes(BS) + b0 + b4
    path = make_image(tmp_path / "d.img", len(data), [(0, 2 * BS, b0 + b1), (3 * BS, BS + 100, b0 + b4)])
    return path, [b0, b1, bytes(BS), b0, b4]


def _files(root) -> list[str]:
    """Every object under ``root``, as repository-relative names with '/'."""
    out = []
    for d, _, fs in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for f in fs]
    return sorted(out)


def _dumps_layout(raw: bytes, indent) -> bytes:
    """``raw`` re-emitted by the standard json module with that indent (key order kept)."""
    return json.dumps(json.loads(raw), indent=indent).encode()


def _top_line(raw: bytes, key: str) -> str:
    """The first line restore.sh's ``grep '^  "KEY": '`` selects (top-level keys only)."""
    lines = [ln for ln in raw.decode().splitlines() if ln.startswith(f'  "{key}": ')]
    assert lines, f"no top-level line for {key!r}"
    return lines[0]


def _trailer_records(pack: bytes) -> tuple[int, list[tuple[bytes, int, int, int]]]:
    """(trailer length, records) of a pack, parsed here from FORMAT.md's grammar."""
    payload_len = int.from_bytes(pack[-4:], "big")
    trailer = pack[-(payload_len + 8):]
    assert trailer[:4] == bytes.fromhex("5e2a4d18") and int.from_bytes(trailer[4:8], "little") == payload_len
    payload = trailer[8:]
    assert payload[:8] == bytes.fromhex("e529f3c35eb6d9dc") and int.from_bytes(payload[8:12], "big") == 1
    count = int.from_bytes(payload[12:16], "big")
    assert len(payload) == 16 + 48 * count + 4
    recs = []
    for k in range(count):
        r = payload[16 + 48 * k : 64 + 48 * k]
        recs.append((r[:32], int.from_bytes(r[32:40], "big"), int.from_bytes(r[40:44], "big"),
                     int.from_bytes(r[44:48], "big")))
    return len(trailer), recs


def test_config_json_bytes(tmp_path):
    """The config's keys, values and layout: restore.sh greps '^  "version": ' and refuses
    anything but 1; readers validate id/key/compression by these spellings."""
    for kwargs, bs, comp in (({}, 65536, "zstd:1"), ({"block_size": 1 << 20, "compression": "zstd:3"}, 1048576, "zstd:3")):
        loc = tmp_path / f"repo{bs}"
        Repository.init(str(loc), **kwargs)
        raw = (loc / "config").read_bytes()
        doc = json.loads(raw)
        assert list(doc) == ["format", "version", "id", "block_size", "compression", "fast_hash",
                             "fast_hash_key", "created", "created_by"]
        assert re.fullmatch(r"[0-9a-f]{32}", doc["id"]) and re.fullmatch(r"[0-9a-f]{32}", doc["fast_hash_key"])
        assert TIME.match(doc["created"]) and re.fullmatch(r"pyvbak [0-9][^\s]*", doc["created_by"])
        want = ('{\n  "format": "pyvbak-repository",\n  "version": 1,\n  "id": "%s",\n  "block_size": %d,\n'
                '  "compression": "%s",\n  "fast_hash": "pyvbak-nh128-v1",\n  "fast_hash_key": "%s",\n'
                '  "created": "%s",\n  "created_by": "%s"\n}') % (
            doc["id"], bs, comp, doc["fast_hash_key"], doc["created"], doc["created_by"])
        assert raw.decode() == want
        # restore.sh: grep '^  "version": ' | head -n 1 | cut -d: -f2 | tr -d ' ,'  ->  1
        assert _top_line(raw, "version").split(":")[1].replace(" ", "").replace(",", "") == "1"


def test_snapshot_metadata_json(tmp_path):
    """Snapshot metadata names and layout: restore.sh picks VM@latest by grepping
    '^  "vm": "', '  "status": "complete",', '^  "sequence": ', '^  "time": "' lines
    and checks "index_sha256"; readers order snapshots by sequence/time as text."""
    repo = Repository.init(str(tmp_path / "repo"))
    img, _ = _image(tmp_path)
    ids = [backup_file(repo, img, vm="web").snapshot_id for _ in range(2)]
    times = []
    for seq, sid in enumerate(ids, 1):
        assert SNAPID.match(sid)
        raw = (tmp_path / "repo" / "snapshots" / f"{sid}.json").read_bytes()
        index = (tmp_path / "repo" / "snapshots" / f"{sid}.index").read_bytes()
        assert raw == _dumps_layout(raw, 2)  # json.dumps(indent=2): one top-level key per line, 2 spaces in
        m = json.loads(raw)
        # no lost/ markers, no consistency group: neither key; the second backup stored
        # nothing new, and wrote no pack index to name
        assert set(m) == (META_KEYS if seq == 1 else META_KEYS - {"pack_index"})
        if seq == 1:
            assert re.fullmatch(r"index/[0-9a-f]{64}", m["pack_index"])
            assert (tmp_path / "repo" / m["pack_index"]).exists()
        assert m["id"] == sid and m["index"] == f"snapshots/{sid}.index" and m["status"] == "complete"
        assert m["index_sha256"] == hashlib.sha256(index).hexdigest()
        assert (m["vm"], m["disk"], m["size"], m["block_size"]) == ("web", "disk0", 4 * BS + 100, 65536)
        assert m["sequence"] == seq and type(m["sequence"]) is int
        assert m["parent"] == (None if seq == 1 else ids[0])
        assert TIME.match(m["time"]) and isinstance(m["source"], str) and isinstance(m["pyvbak_version"], str)
        assert set(m["change_tracking"]) == {"used", "state", "fallback_reason"} and m["change_tracking"]["used"] is False
        assert set(m["stats"]) == STATS_KEYS and all(type(v) in (int, float) for v in m["stats"].values())
        assert isinstance(m["warnings"], list)
        # the exact lines restore.sh matches (grep -Fqx needs the trailing comma: neither is the last key)
        lines = raw.decode().splitlines()
        assert '  "vm": "web",' in lines and '  "status": "complete",' in lines
        assert _top_line(raw, "disk") == '  "disk": "disk0",'
        assert _top_line(raw, "time") == f'  "time": "{m["time"]}",'
        assert _top_line(raw, "sequence") == f'  "sequence": {seq},'
        assert _top_line(raw, "size") == f'  "size": {4 * BS + 100},'
        assert _top_line(raw, "block_size") == '  "block_size": 65536,'
        flat = re.sub(rb"[ \n\r\t]", b"", raw)  # restore.sh: tr -d ' \n\r\t', then grep -o
        assert re.findall(rb'"index_sha256":"[0-9a-f]*"', flat) == [b'"index_sha256":"%s"' % m["index_sha256"].encode()]
        times.append(m["time"])
    assert times[0] < times[1]  # compared as text by pyvbak and restore.sh


def test_object_paths_of_a_backup(tmp_path):
    """packs/HH/PACKID (PACKID = SHA-256 of the trailer), index/SHA-256-of-file,
    snapshots/ID.{index,json}: restore.sh and every reader find objects by these names."""
    repo = Repository.init(str(tmp_path / "repo"))
    img, blocks = _image(tmp_path)
    sid = backup_file(repo, img).snapshot_id
    root = tmp_path / "repo"
    names = _files(root)
    packs = [n for n in names if n.startswith("packs/")]
    indexes = [n for n in names if n.startswith("index/")]
    assert sorted(set(names) - set(packs) - set(indexes)) == sorted(
        ["config", "config.copy", "restore.sh", "README-RESTORE.txt", f"snapshots/{sid}.index", f"snapshots/{sid}.json"])
    assert len(packs) == 1 and len(indexes) == 1
    assert (root / "config.copy").read_bytes() == (root / "config").read_bytes()  # the same bytes, always
    placed = set()
    for name in packs:
        _, hh, pid = name.split("/")
        raw = (root / name).read_bytes()
        tlen, recs = _trailer_records(raw)
        assert HEX64.match(pid) and hh == pid[:2]
        assert hashlib.sha256(raw[-tlen:]).hexdigest() == pid
        # records in offset order, frames back to back from 0 to the trailer
        assert [r[1] for r in recs] == sorted(r[1] for r in recs)
        assert [r[1] for r in recs] == [0] + [r[1] + r[2] for r in recs[:-1]] and recs[-1][1] + recs[-1][2] == len(raw) - tlen
        placed |= {(d, bytes.fromhex(pid), o, c, u) for d, o, c, u in recs}
    for name in indexes:
        raw = (root / name).read_bytes()
        assert HEX64.match(name[len("index/"):]) and hashlib.sha256(raw).hexdigest() == name[len("index/"):]
        plain = zstandard.ZstdDecompressor().decompress(raw)
        assert plain[:8] == bytes.fromhex("692fe50019b13e63")
        count = int.from_bytes(plain[12:20], "big")
        recs = [plain[80 + 80 * k : 160 + 80 * k] for k in range(count)]
        assert len(plain) == 80 + 80 * count
        # the pack field is the raw 32-byte PACKID of an object under packs/
        assert {(r[:32], r[32:64], int.from_bytes(r[64:72], "big"), int.from_bytes(r[72:76], "big"),
                 int.from_bytes(r[76:80], "big")) for r in recs} == placed
    # zero blocks are not stored, a repeated block is stored once
    assert {p[0] for p in placed} == {hashlib.sha256(b).digest() for b in blocks if any(b)}
    assert len(placed) == 3


def test_pack_storage_mark(tmp_path, capsys):
    """packs/pack-storage.json and its copy at the root (docs/FORMAT.md, "Pack storage
    mark"): the same bytes, written by the first backup, naming the repository's id."""
    root = tmp_path / "repo"
    img, _ = _image(tmp_path)
    assert main(["init", str(root)]) == 0
    assert not (root / "packs" / "pack-storage.json").exists() and not (root / "pack-storage.json").exists()
    assert main(["backup", img, "--repo", str(root), "--vm", "v"]) == 0
    names = _files(root)
    assert "packs/pack-storage.json" in names and "pack-storage.json" in names
    raw = (root / "packs" / "pack-storage.json").read_bytes()
    assert raw == (root / "pack-storage.json").read_bytes() and raw == _dumps_layout(raw, 2)
    doc = json.loads(raw)
    assert list(doc) == ["format", "repository", "created"]
    assert doc["format"] == "pyvbak-pack-storage" and TIME.match(doc["created"])
    assert doc["repository"] == json.loads((root / "config").read_bytes())["id"]


def test_stored_block_is_a_zstd_frame_named_by_sha256(tmp_path):
    """Each stored block is one standard zstd frame (content size, checksum, no dictionary)
    of the block, named by SHA-256 of its bytes: restore.sh checks blocks with zstd -dc | sha256sum."""
    repo = Repository.init(str(tmp_path / "repo"))
    img, blocks = _image(tmp_path)
    backup_file(repo, img)
    (name,) = [n for n in _files(tmp_path / "repo") if n.startswith("packs/")]
    raw = (tmp_path / "repo" / name).read_bytes()
    _, recs = _trailer_records(raw)
    by_digest = {hashlib.sha256(b).digest(): b for b in blocks}
    for digest, offset, clen, ulen in recs:
        frame = raw[offset : offset + clen]
        assert frame[:4] == bytes.fromhex("28b52ffd")  # zstd frame magic (RFC 8878)
        fhd = frame[4]  # Frame_Header_Descriptor
        assert fhd & 0x04, "Content_Checksum_flag (XXH64) set"
        assert (fhd >> 6) or (fhd & 0x20), "Frame_Content_Size present"
        assert fhd & 0x03 == 0, "no dictionary"
        dobj = zstandard.ZstdDecompressor().decompressobj()
        plain = dobj.decompress(frame)
        assert dobj.eof and dobj.unused_data == b""  # exactly one frame, clen its length
        assert len(plain) == ulen and hashlib.sha256(plain).digest() == digest
        assert by_digest[digest] == plain
    assert sorted(r[3] for r in recs) == [100, BS, BS]


def test_lost_marker_and_lost_checked(tmp_path, capsys):
    """The lost/ marker (name like a SNAPID; JSON time, packs, records) and the next
    snapshot's lost_checked: backups compare the marker names to decide whether a parent
    may be trusted, so a renamed field or marker makes incrementals carry lost blocks."""
    repo = Repository.init(str(tmp_path / "repo"))
    img, _ = _image(tmp_path)
    first = backup_file(repo, img).snapshot_id
    (pack,) = [n for n in _files(tmp_path / "repo") if n.startswith("packs/")]
    path = tmp_path / "repo" / pack
    raw = bytearray(path.read_bytes())
    _, recs = _trailer_records(bytes(raw))
    raw[recs[0][1] + recs[0][2] // 2] ^= 0xFF  # one frame no longer decodes to its digest
    os.chmod(path, 0o644)
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["verify", "--repo", str(tmp_path / "repo"), "--repair"]) == 6
    markers = [n for n in _files(tmp_path / "repo") if n.startswith("lost/")]
    assert len(markers) == 1
    name = markers[0][len("lost/"):]
    assert SNAPID.match(name)
    mraw = (tmp_path / "repo" / markers[0]).read_bytes()
    assert mraw == _dumps_layout(mraw, 2)
    doc = json.loads(mraw)
    assert list(doc) == ["time", "packs", "records"]
    assert TIME.match(doc["time"]) and doc["packs"] == [pack.split("/")[-1]] and doc["records"] == 1
    # the next snapshot records the markers it was made after, as object names
    second = backup_file(Repository.open(str(tmp_path / "repo")), img).snapshot_id
    meta = json.loads((tmp_path / "repo" / "snapshots" / f"{second}.json").read_bytes())
    assert set(meta) == META_KEYS | {"lost_checked", "flags_honoured"}
    assert meta["lost_checked"] == [f"lost/{name}"] and meta["flags_honoured"] is True
    assert meta["parent"] is None  # its parent predates the marker: a full scan
    assert "lost_checked" not in json.loads((tmp_path / "repo" / "snapshots" / f"{first}.json").read_bytes())


def test_flag_marker(tmp_path, capsys):
    """The marker a plain verify writes (docs/FORMAT.md, "Lost packs"): packs empty,
    records 0 - what an older pyvbak reads as nothing dropped - then the flagged and
    cleared copies as [digest hex, pack hex, offset]."""
    repo = Repository.init(str(tmp_path / "repo"))
    img, _ = _image(tmp_path)
    backup_file(repo, img)
    (pack,) = [n for n in _files(tmp_path / "repo") if n.startswith("packs/")]
    path = tmp_path / "repo" / pack
    raw = bytearray(path.read_bytes())
    _, recs = _trailer_records(bytes(raw))
    raw[recs[0][1] + recs[0][2] // 2] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["verify", "--repo", str(tmp_path / "repo")]) == 6
    (marker,) = [n for n in _files(tmp_path / "repo") if n.startswith("lost/")]
    assert SNAPID.match(marker[len("lost/"):])
    mraw = (tmp_path / "repo" / marker).read_bytes()
    assert mraw == _dumps_layout(mraw, 1)
    doc = json.loads(mraw)
    assert list(doc) == ["time", "packs", "records", "flagged", "cleared", "seen"]
    assert TIME.match(doc["time"]) and doc["packs"] == [] and doc["records"] == 0
    assert doc["cleared"] == [] and doc["seen"] == []
    assert doc["flagged"] == [[recs[0][0].hex(), pack.split("/")[-1], recs[0][1]]]


def _read_first_line(path):
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def test_lock_json(tmp_path):
    """Lock objects locks/<32 hex>.json and their fields: stale-lock judgement reads host,
    pid, machine, pidns, boot, start; restore.sh greps '"exclusive": true' to explain a
    prune running beside it."""
    Repository.init(str(tmp_path / "repo"))
    for exclusive in (False, True):
        with Repository.open(str(tmp_path / "repo")).lock(exclusive=exclusive, purpose="x"):
            (name,) = [n for n in _files(tmp_path / "repo") if n.startswith("locks/")]
            assert re.fullmatch(r"locks/[0-9a-f]{32}\.json", name)
            raw = (tmp_path / "repo" / name).read_bytes()
        assert raw == _dumps_layout(raw, None)  # one line, json.dumps' default ", " and ": "
        doc = json.loads(raw)
        assert set(doc) == {"host", "pid", "machine", "pidns", "boot", "start", "time", "exclusive", "purpose"}
        assert (doc["host"], doc["pid"], doc["exclusive"], doc["purpose"]) == (socket.gethostname(), os.getpid(), exclusive, "x")
        assert doc["machine"] == _read_first_line("/etc/machine-id")
        assert doc["boot"] == _read_first_line("/proc/sys/kernel/random/boot_id")
        assert doc["pidns"] == os.readlink("/proc/self/ns/pid")
        with open("/proc/self/stat", "rb") as f:
            assert doc["start"] == int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22
        assert type(doc["time"]) is float  # Unix seconds
        assert (b'"exclusive": true' in raw) is exclusive  # restore.sh's grep
        assert not [n for n in _files(tmp_path / "repo") if n.startswith("locks/")]  # released

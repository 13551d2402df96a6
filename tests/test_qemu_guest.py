"""Hot backups of a VM whose booted Linux guest writes its disk while pyvbak backs it up.

The guest (``tests/guest_linux.py``: a Debian kernel, busybox, an ``/init`` of ours) is a
writer on ``virtio-disk0``: record i (4 KiB: its number and a marker in every 32-byte
line) at ``BASE + i * 4096``, each written with O_DIRECT and flushed before the next is
issued.  So at any instant the disk holds records ``0..k-1`` and nothing after them —
and so must every snapshot, if it is the disk at one instant:

* no torn record: each record is one 4 KiB-aligned guest write, a single virtio-blk
  request inside one 64 KiB qcow2 cluster.  The instant is the ``transaction`` that starts
  the fleecing job; QEMU drains the disk's node for it (every request in flight
  completes first) and from then on its copy-before-write filter copies a cluster's old
  content aside before a write lands.  A request is therefore wholly before the instant
  or wholly after it; a partial record in a snapshot is a failure, not a tolerance;
* no gap and nothing after the first missing record (the guest never issues record i+1
  before record i completed);
* ``k`` at least the count the guest had reported before the backup started, and at most
  the record it was about to issue when it read the test's ``mark`` sent after the backup
  had finished.

The second backup is incremental (the dirty bitmap): its restore holding every record up
to its own instant shows the bitmap missed none of the guest's writes.  At the end the
guest reads every record back from its disk ("verify ok N"): no write was lost when the
filter was inserted or removed, and QEMU holds nothing of pyvbak's but its bitmap.
"""

from __future__ import annotations

import time

import pytest

from conftest import cli_json
from guest_linux import RECORD, build_guest, record
from pyvbak.cli.main import main
from qemu_system import MiB, QemuSystemVM

SIZE = 32 * MiB
BASE = MiB  # record 0; the first MiB stays zeros
MAX_RECORDS = (SIZE - BASE) // RECORD - 1  # the guest checks that the record after its last is zeros
BOOT_TIMEOUT = 60  # TCG boot is ~3 s on 2 cores


@pytest.fixture(scope="session")
def linux_guest(tmp_path_factory):
    """Kernel and initramfs, built once per session (skips/fails as ``require_tool`` does
    when the kernel or busybox-static is not installed)."""
    return build_guest(tmp_path_factory.mktemp("guest-linux"))


@pytest.fixture
def guest_vm(linux_guest, tmp_path):
    (tmp_path / "vm").mkdir()
    vm = QemuSystemVM(tmp_path / "vm", SIZE, kernel=linux_guest.kernel, initrd=linux_guest.initrd,
                      append=linux_guest.append("virtio-disk0", BASE, MAX_RECORDS))
    try:
        t0 = time.monotonic()
        vm.start()
        vm.console.wait_for(r"guest: ready /dev/vd[a-z]", BOOT_TIMEOUT)
        vm.boot_seconds = time.monotonic() - t0
        yield vm
    finally:
        vm.stop()



def prefix_records(image: bytes, base: int = BASE) -> tuple[int, str | None]:
    """(k, None) when ``image`` is zeros but for records ``0..k-1`` from ``base`` on;
    else (k, what is wrong at the first slot that breaks that)."""
    k = 0
    while image[base + k * RECORD : base + (k + 1) * RECORD] == record(k):
        k += 1
    if image[:base].count(0) != base:
        return k, "data before record 0"
    end = base + k * RECORD
    rest = memoryview(image)[end:]
    if rest.nbytes == bytes(rest).count(0):
        return k, None
    first = next(i for i in range(end, len(image), RECORD) if any(image[i : i + RECORD]))
    slot = (first - base) // RECORD
    got = image[first : first + RECORD]
    same = sum(got[j : j + 32] == record(slot)[j : j + 32] for j in range(0, RECORD, 32))
    what = f"record {slot}" if same == 128 else f"{same} of the 128 lines of record {slot}"
    return k, f"{f'records 0..{k - 1}' if k else 'no record'}, then slot {slot} holds {what} where zeros belong"


def test_the_prefix_check_catches_a_gap_a_torn_record_and_a_stray_one():
    image = bytearray(BASE + 8 * RECORD)
    for i in range(5):
        image[BASE + i * RECORD : BASE + (i + 1) * RECORD] = record(i)
    assert prefix_records(bytes(image)) == (5, None)
    torn = bytearray(image)
    torn[BASE + 5 * RECORD : BASE + 5 * RECORD + 512] = record(5)[:512]  # one sector of record 5
    assert prefix_records(bytes(torn)) == (5, "records 0..4, then slot 5 holds 16 of the 128 lines of record 5 "
                                              "where zeros belong")
    gap = bytearray(image)
    gap[BASE + 2 * RECORD : BASE + 3 * RECORD] = bytes(RECORD)
    assert prefix_records(bytes(gap)) == (2, "records 0..1, then slot 3 holds record 3 where zeros belong")
    stray = bytearray(image)
    stray[BASE + 7 * RECORD : BASE + 8 * RECORD] = record(7)
    assert prefix_records(bytes(stray)) == (5, "records 0..4, then slot 7 holds record 7 where zeros belong")
    stale = bytearray(image)
    stale[BASE + 4 * RECORD : BASE + 5 * RECORD] = record(3)  # a record where another belongs
    assert prefix_records(bytes(stale)) == (4, "records 0..3, then slot 4 holds 0 of the 128 lines of record 4 "
                                               "where zeros belong")
    before = bytearray(image)
    before[100] = 1
    assert prefix_records(bytes(before)) == (5, "data before record 0")
    assert prefix_records(bytes(BASE + RECORD)) == (0, None)
    assert prefix_records(bytes(BASE) + record(1)) == (0, "no record, then slot 0 holds 0 of the 128 lines of "
                                                          "record 0 where zeros belong")


def reported(vm) -> int:
    """How many records the guest has reported written (its console lags, never leads)."""
    m = vm.console.last(r"rec (\d+)")
    return int(m.group(1)) if m else 0


def backup_while_the_guest_writes(vm, capsys, repo) -> dict:
    con = vm.console
    before = reported(vm)
    t0 = time.monotonic()
    results = cli_json(capsys, ["backup", vm.uri, "--repo", repo, "--vm", "guest"])
    seconds = time.monotonic() - t0
    during = reported(vm)
    start = len(con.lines)
    con.send("mark")  # the guest answers "mark N" before it issues record N: after the backup
    upper = int(con.wait_for(r"mark (\d+)", 30, start=start).group(1))
    assert [r["disk"] for r in results] == ["data", "virtio-disk0"]
    assert results[0]["consistency_group"] == results[1]["consistency_group"]
    return {"results": {r["disk"]: r for r in results}, "before": before, "during": during, "upper": upper,
            "seconds": seconds}


def test_a_booted_guest_writing_its_disk_is_backed_up_at_one_instant(guest_vm, cli_work_dir, tmp_path, capsys):
    vm, con = guest_vm, guest_vm.console
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    con.send("go")
    con.wait_for(r"rec 50", 30)

    first = backup_while_the_guest_writes(vm, capsys, repo)
    assert all(not r["cbt"] for r in first["results"].values())
    assert vm.pyvbak_traces() == [] and list(vm.bitmaps("virtio-disk0")) == ["pyvbak-gen-1"]
    con.wait_for(rf"rec {first['upper'] + 50}", 30)  # new records, some in clusters the first backup never saw

    second = backup_while_the_guest_writes(vm, capsys, repo)
    by_disk = second["results"]
    assert by_disk["virtio-disk0"]["cbt"] is True and by_disk["data"]["cbt"] is True, by_disk
    assert by_disk["data"]["changed_blocks"] == 0 and by_disk["virtio-disk0"]["changed_blocks"] > 0, by_disk
    assert second["before"] > first["upper"], second
    # the guest went on writing while pyvbak held its disk frozen (it writes ~100-200
    # records a second, a backup takes 60-240 ms; one of the two is enough to show it, so a
    # guest starved of CPU for one whole backup on a loaded machine does not fail the test)
    assert first["during"] > first["before"] or second["during"] > second["before"], (first, second)

    start = len(con.lines)
    con.send("stop")
    written = int(con.wait_for(r"stopped (\d+)", 30, start=start).group(1))
    assert second["upper"] <= written < MAX_RECORDS  # the writer never ran out of room
    verdict = con.wait_for(r"verify (ok|FAILED) (\d+)", 60, start=start)
    assert verdict.groups() == ("ok", str(written)), con.tail()

    # QEMU keeps nothing of pyvbak but the bitmap generation that tracks writes since the
    # second backup (the guest's, after its instant); the work dir is empty
    assert vm.pyvbak_traces() == []
    assert not cli_work_dir.exists() or list(cli_work_dir.iterdir()) == []
    bitmap = vm.bitmaps("virtio-disk0")
    assert list(bitmap) == ["pyvbak-gen-2"] and bitmap["pyvbak-gen-2"]["recording"], bitmap
    assert bitmap["pyvbak-gen-2"]["count"] > 0 and vm.bitmaps("data")["pyvbak-gen-2"]["count"] == 0

    for n, b in (("1", first), ("2", second)):
        out = tmp_path / f"restored-{n}"
        cli_json(capsys, ["restore", b["results"]["virtio-disk0"]["id"], f"{out}/", "--repo", repo])
        image = (out / "virtio-disk0.img").read_bytes()
        assert len(image) == SIZE
        k, problem = prefix_records(image)
        assert problem is None, f"backup {n}: {problem}"
        assert b["before"] <= k <= b["upper"], (n, k, b)
        b["k"] = k
        data = (out / "data.img").read_bytes()
        assert len(data) == SIZE and data.count(0) == SIZE
    assert first["k"] < second["k"]
    print(f"boot {vm.boot_seconds:.1f}s; backups {first['seconds']:.2f}s, {second['seconds']:.2f}s; "
          + "; ".join(f"snapshot {n}: {b['k']} records (reported before/at the end/mark: {b['before']}/{b['during']}/"
                      f"{b['upper']})" for n, b in (("1", first), ("2", second))) + f"; written {written}")

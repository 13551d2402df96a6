"""NbdSource against real servers: qemu-nbd (unix and TCP, raw and qcow2) and
qemu-storage-daemon exporting a dirty bitmap."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import require_tool, unix_listening, wait_until
from pyvbak.errors import SourceError
from pyvbak.sources.nbd import NbdSource

MiB = 1 << 20


@pytest.fixture
def sockdir():
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="pyvbak-nbd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_listening(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _running(argv, ready, what):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: proc.poll() is not None or ready(), timeout=15, what=what)
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}: {proc.stderr.read().decode(errors='replace')}")
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@contextlib.contextmanager
def qemu_nbd(image, fmt, sockdir, *, tcp=False, extra=()):
    tool = require_tool("qemu-nbd", "qemu-utils")
    if tcp:
        port = _free_port()
        where, ready = ["-b", "127.0.0.1", "-p", str(port)], lambda: _tcp_listening(port)
        uri = f"nbd://127.0.0.1:{port}/disk0"
    else:
        path = os.path.join(sockdir, "nbd.sock")
        where, ready = ["-k", path], lambda: unix_listening(path)
        uri = f"nbd+unix:///disk0?socket={path}"
    argv = [tool, "-t", "-r", "-e", "8", "-f", fmt, "-x", "disk0", *where, *extra, str(image)]
    with _running(argv, ready, "qemu-nbd"):
        yield uri


@contextlib.contextmanager
def qemu_storage_daemon(qcow2, sockdir, bitmap):
    tool = require_tool("qemu-storage-daemon", "qemu-system-common")
    path = os.path.join(sockdir, "qsd.sock")
    argv = [tool,
            "--blockdev", f"driver=file,node-name=file0,filename={qcow2},read-only=on",
            "--blockdev", "driver=qcow2,node-name=fmt0,file=file0,read-only=on",
            "--nbd-server", f"addr.type=unix,addr.path={path}",
            "--export", f"type=nbd,id=e0,node-name=fmt0,name=disk0,bitmaps.0={bitmap}"]
    with _running(argv, lambda: unix_listening(path), "qemu-storage-daemon"):
        yield f"nbd+unix:///disk0?socket={path}"


def qemu_io(image, *cmds):
    tool = require_tool("qemu-io", "qemu-utils")
    argv = [tool, "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(argv + [str(image)], check=True, stdout=subprocess.DEVNULL)


@pytest.fixture
def sparse_raw(tmp_path):
    """32 MiB raw image: random data at [0,1M) and [5M,8M), holes elsewhere."""
    path = tmp_path / "disk.raw"
    rnd = random.Random(1)
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
        for off, ln in ((0, MiB), (5 * MiB, 3 * MiB)):
            f.seek(off)
            f.write(rnd.randbytes(ln))
    return path


@pytest.fixture(scope="module")
def big_raw(tmp_path_factory):
    """80 MiB of random data: more than two maximum-size (32 MiB) NBD reads."""
    path = tmp_path_factory.mktemp("big") / "big.raw"
    path.write_bytes(random.Random(2).randbytes(80 * MiB))
    return path


def test_raw_sparse_over_unix(sparse_raw, sockdir):
    data = sparse_raw.read_bytes()
    with qemu_nbd(sparse_raw, "raw", sockdir) as uri, NbdSource(uri, timeout=5) as src:
        assert src.size == len(data)
        assert src.description == uri
        assert src.read(0, src.size) == data
        extents = list(src.extents())
        pos = 0
        for e in extents:  # contiguous cover of [0, size)
            assert e.offset == pos and e.length > 0
            pos += e.length
        assert pos == src.size
        zero = [e for e in extents if e.zero]
        for e in zero:
            assert data[e.offset:e.offset + e.length].count(0) == e.length
        # the holes: [1M,5M) and [8M,32M)
        assert sum(e.length for e in zero) == 28 * MiB
        assert src.change_tracking(None) is None


def test_qcow2_over_tcp(tmp_path, sockdir):
    require_tool("qemu-img", "qemu-utils")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    writes = [(0, 0x11, 65536), (3 * MiB + 4096, 0x22, 12288), (40 * MiB, 0x33, 2 * MiB)]
    qemu_io(image, *(f"write -P {pat} {off} {ln}" for off, pat, ln in writes))
    expected = bytearray(64 * MiB)
    for off, pat, ln in writes:
        expected[off:off + ln] = bytes([pat]) * ln
    with qemu_nbd(image, "qcow2", sockdir, tcp=True, extra=["--allocation-depth"]) as uri:
        with NbdSource(uri, timeout=5) as src:
            assert src.size == 64 * MiB
            assert src.read(0, src.size) == expected
            assert src.read(3 * MiB + 4000, 200) == expected[3 * MiB + 4000:3 * MiB + 4200]
            allocated = [(e.offset, e.length) for e in src.extents() if not e.zero]
            # every write lies inside an allocated extent; unwritten clusters are zero
            for off, _, ln in writes:
                assert any(a <= off and off + ln <= a + n for a, n in allocated)
            assert sum(n for _, n in allocated) <= 4 * MiB


def test_large_reads_are_split(big_raw, sockdir):
    data = big_raw.read_bytes()
    with qemu_nbd(big_raw, "raw", sockdir) as uri:
        with NbdSource(uri, timeout=10) as src:
            assert src.client.max_payload == 32 * MiB
            assert src.read(0, len(data)) == data
            assert src.read(12345, 70 * MiB) == data[12345:12345 + 70 * MiB]
            buf = bytearray(40 * MiB)
            assert src.read_into(4096, buf) == len(buf)
            assert buf == data[4096:4096 + 40 * MiB]
        with NbdSource(uri, timeout=10, max_payload=MiB) as src:
            assert src.client.max_payload == MiB
            assert src.read(777, 9 * MiB + 3) == data[777:777 + 9 * MiB + 3]


def test_read_ranges_into_fills_the_ranges_back_to_back(big_raw, sockdir):
    """Many short ranges in one call (a backup's dirty runs), requests all in flight; one
    range split by max_payload, one unaligned (read on its own), one running past the end."""
    data = big_raw.read_bytes()
    rnd = random.Random(5)
    ranges = [(rnd.randrange(0, len(data) // 65536) * 65536, rnd.choice([65536, 3 * 65536, 2 * MiB]))
              for _ in range(60)]
    ranges += [(4096, 5 * MiB), (12345, 1000), (len(data) - 65536, 3 * 65536)]
    with qemu_nbd(big_raw, "raw", sockdir) as uri:
        with NbdSource(uri, timeout=10, max_payload=MiB) as src:
            buf = bytearray(sum(ln for _, ln in ranges))
            filled = src.read_ranges_into(ranges, buf)
    expected = b"".join(data[off:off + ln] for off, ln in ranges)  # ranges clipped at the end
    assert filled == len(expected) and len(expected) <= len(buf) - 2 * 65536
    assert bytes(buf[:filled]) == expected


def test_many_concurrent_reads_from_threads(big_raw, sockdir):
    data = big_raw.read_bytes()
    rnd = random.Random(3)
    ranges = [(rnd.randrange(0, len(data)), rnd.choice([1, 511, 4096, 65536, 1 << 20, 3 << 20]))
              for _ in range(400)]
    with qemu_nbd(big_raw, "raw", sockdir) as uri, NbdSource(uri, timeout=10) as src:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda r: src.read(*r), ranges))
        for (off, ln), got in zip(ranges, results):
            assert got == data[off:off + ln]
        batch = [(i * 4 * MiB, 4 * MiB) for i in range(20)]
        assert b"".join(src.read_many(batch, depth=6)) == data


def test_unknown_export_on_real_server(sparse_raw, sockdir):
    with qemu_nbd(sparse_raw, "raw", sockdir) as uri:
        with pytest.raises(SourceError, match="NBD_REP_ERR_UNKNOWN"):
            NbdSource(uri.replace("/disk0", "/other"), timeout=5).open()


@pytest.fixture
def bitmap_qcow2(tmp_path):
    """A qcow2 with base data, then bitmap bm0 (64 KiB granularity) recording later writes."""
    require_tool("qemu-img", "qemu-utils")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    qemu_io(image, "write -P 0x01 0 8M")
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "65536", str(image), "bm0"], check=True)
    dirty = [(1 * MiB, 64 * 1024), (4 * MiB + 128 * 1024, 192 * 1024), (30 * MiB, 2 * MiB)]
    qemu_io(image, *(f"write -P 0x7e {off} {ln}" for off, ln in dirty))
    # A read-only export needs a disabled (frozen) bitmap, as a backup's would be.
    subprocess.run(["qemu-img", "bitmap", "--disable", str(image), "bm0"], check=True)
    return image, dirty


def test_dirty_bitmap_via_storage_daemon(bitmap_qcow2, sockdir):
    image, dirty = bitmap_qcow2
    with qemu_storage_daemon(image, sockdir, "bm0") as uri:
        with NbdSource(uri, dirty_bitmap="bm0", timeout=5) as src:
            assert "qemu:dirty-bitmap:bm0" in src.client.contexts
            assert src.dirty_extents("bm0") == dirty
            assert src.dirty_extents("qemu:dirty-bitmap:bm0") == dirty
            ct = src.change_tracking({"bitmap": "bm0"})
            assert ct.extents == dirty and ct.state == {"bitmap": "bm0"} and ct.fallback_reason is None
            for off, ln in dirty:
                assert src.read(off, ln) == b"\x7e" * ln
            assert src.read(0, MiB) == b"\x01" * MiB
            allocated = [(e.offset, e.length) for e in src.extents() if not e.zero]
            assert allocated[0] == (0, 8 * MiB)
            # a different bitmap than last time cannot be trusted for continuity
            assert src.change_tracking({"bitmap": "older"}).extents is None
        with NbdSource(uri, dirty_bitmap="missing", timeout=5) as src:
            ct = src.change_tracking(None)
            assert ct.extents is None and "does not export dirty bitmap 'missing'" in ct.fallback_reason


def _status_requests(client, log):
    """Record (offset, length) of every BLOCK_STATUS request ``client`` sends."""
    from pyvbak.sources import nbd_protocol as P

    real = client._submit_all

    def spy(requests, *args, **kwargs):
        log.extend((off, ln) for cmd, off, ln, _ in requests if cmd == P.CMD_BLOCK_STATUS)
        return real(requests, *args, **kwargs)

    client._submit_all = spy


def test_the_bitmap_is_asked_alone_and_allocation_only_around_dirty_extents(bitmap_qcow2, sockdir):
    """A BLOCK_STATUS reply carries every context its connection negotiated, each computed
    by the server (base:allocation of a whole fragmented TiB: seconds).  With a second
    connection allowed, the dirty map comes from a connection that negotiated the bitmap
    alone, and allocation is asked only in windows around the dirty extents."""
    from pyvbak.sources.nbd import STATUS_WINDOW_GAP, _status_windows

    image, dirty = bitmap_qcow2
    with qemu_storage_daemon(image, sockdir, "bm0") as uri:
        with NbdSource(uri, dirty_bitmap="bm0", timeout=5, bitmap_connection=True) as src:
            main_requests: list = []
            _status_requests(src.client, main_requests)
            assert src.dirty_extents() == dirty
            assert set(src._bitmap_client.contexts) == {"qemu:dirty-bitmap:bm0"}
            assert main_requests == []  # the main connection computed nothing
            # data at [0, 8 MiB) and [30, 32 MiB); the one window is [1 MiB, 32 MiB)
            assert _status_windows(dirty) == [(1 * MiB, 31 * MiB)]
            assert src.zero_ranges(within=dirty).tolist() == [[8 * MiB, 22 * MiB]]
            assert main_requests == [(1 * MiB, 31 * MiB)]
            assert src.zero_ranges().tolist() == [[8 * MiB, 22 * MiB], [32 * MiB, 32 * MiB]]
        assert src._bitmap_client is None  # closed with the source
    far = [(0, 4096), (STATUS_WINDOW_GAP + 8192, 4096), (STATUS_WINDOW_GAP + 16384, 10)]
    assert _status_windows(far) == [(0, 4096), (STATUS_WINDOW_GAP + 8192, 8202)]


def test_a_server_that_takes_one_connection_answers_the_bitmap_on_the_main_one(bitmap_qcow2, sockdir):
    """qemu-nbd's default is one client at a time: the second connection gets no greeting
    within the timeout, and the dirty map is asked on the main connection instead."""
    image, dirty = bitmap_qcow2
    tool = require_tool("qemu-nbd", "qemu-utils")
    path = os.path.join(sockdir, "one.sock")
    argv = [tool, "-t", "-r", "-f", "qcow2", "-x", "disk0", "-B", "bm0", "-k", path, str(image)]
    with _running(argv, lambda: unix_listening(path), "qemu-nbd"):
        uri = f"nbd+unix:///disk0?socket={path}"
        with NbdSource(uri, dirty_bitmap="bm0", timeout=1, bitmap_connection=True) as src:
            assert src.dirty_extents() == dirty
            assert src._bitmap_client is None and src.bitmap_connection is False
            assert src.read(1 * MiB, 65536) == b"\x7e" * 65536  # the main connection still works


def test_a_plain_export_says_why_it_is_read_whole_and_verify_cbt_says_there_is_nothing_to_check(sparse_raw, sockdir,
                                                                                               tmp_path, capsys):
    """An nbd:// backup read the whole export every time with "cbt": false and no reason,
    and --verify-cbt on a source without change tracking passed without a word."""
    from conftest import cli_json
    from pyvbak.cli.main import main

    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    with qemu_nbd(sparse_raw, "raw", sockdir) as uri:
        for _ in range(2):
            res = cli_json(capsys, ["backup", uri, "--repo", repo, "--vm", "v"])
            assert res["cbt"] is False and "offers no dirty bitmap" in res["fallback_reason"], res
    res = cli_json(capsys, ["backup", str(sparse_raw), "--repo", repo, "--vm", "f", "--verify-cbt"])
    assert res["fallback_reason"] is None and res["cbt_missed_blocks"] is None
    assert any("no change tracking to verify" in w for w in res["warnings"]), res["warnings"]


def test_a_writable_export_is_backed_up_with_a_warning_a_read_only_one_without(sparse_raw, sockdir, tmp_path, capsys):
    """An export is read as it is, not frozen: a writable one (qemu-nbd's default) gave
    torn snapshots with no warning (session 26's audit)."""
    from conftest import run_cli

    repo = str(tmp_path / "repo")
    assert run_cli(capsys, "init", repo)[0] == 0
    path = os.path.join(sockdir, "rw.sock")
    tool = require_tool("qemu-nbd", "qemu-utils")
    with _running([tool, "-t", "-f", "raw", "-x", "disk0", "-k", path, str(sparse_raw)],
                  lambda: unix_listening(path), "qemu-nbd"):
        code, out, err = run_cli(capsys, "backup", f"nbd+unix:///disk0?socket={path}", "--repo", repo, "--vm", "v",
                                 "--json")
    assert code == 0, err
    [warning] = json.loads(out)["warnings"]
    assert warning.startswith("NBD export nbd+unix:///disk0") and "is writable" in warning and "qemu-nbd -r" in warning
    with qemu_nbd(sparse_raw, "raw", sockdir) as uri:  # (-r)
        code, out, err = run_cli(capsys, "backup", uri, "--repo", repo, "--vm", "v", "--json")
    assert code == 0 and json.loads(out)["warnings"] == [] and "writable" not in err, err

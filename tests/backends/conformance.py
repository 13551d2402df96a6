"""The backend conformance suite: every Backend (local, memory, later sftp, s3) passes it.

Use it from a test module ``tests/backends/test_<kind>.py``::

    from .conformance import *  # noqa: F401,F403  (collects every test_* below)

    @pytest.fixture
    def backend(tmp_path):          # a fresh, empty backend per test
        with MyBackend(...) as b:
            yield b

    @pytest.fixture
    def make_leftover():            # simulate what a kill -9 mid-write leaves behind
        def make(backend, name, age_seconds):
            ...                     # create the temp object for a write of `name`,
            return temp_name        # `age_seconds` old; return the name cleanup reports
        return make

The suite asserts behaviour, never timing.
"""

from __future__ import annotations

import array
import os
import threading

import pytest

from pyvbak.backends import (
    BackendError,
    FaultInjectingBackend,
    ObjectMissing,
    RangeBeyondEnd,
    OutOfSpace,
    TEMP_PREFIX,
)
from pyvbak.errors import RepositoryError, UsageError

NAMES = [
    "config",
    "data/ab/ab01",
    "data/ab/ab02",
    "data/cd/cd01",
    "data/abc",
    "index/0001.idx",
    "snapshots/S1.json",
    "snapshots/S2.json",
]


def _pattern(size: int, seed: int = 0) -> bytes:
    return (bytes((i * 7 + seed) & 0xFF for i in range(256)) * (size // 256 + 1))[:size]


# -- round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 1 << 20])
def test_round_trip(backend, size):
    data = _pattern(size)
    assert backend.write_new("data/ab/obj", data) is True
    got = backend.read("data/ab/obj")
    assert type(got) is bytes
    assert got == data
    assert backend.stat("data/ab/obj") == size
    assert backend.exists("data/ab/obj")


def test_top_level_name(backend):
    assert backend.write_new("config", b"cfg")
    assert backend.read("config") == b"cfg"


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "slice", "array"])
def test_buffer_types(backend, kind):
    raw = _pattern(1000, 3)
    data = {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "memoryview": memoryview(raw),
        "slice": memoryview(b"xx" + raw + b"yy")[2:-2],
        "array": memoryview(array.array("I", raw)),  # itemsize 4: stored as its raw bytes
    }[kind]
    expected = raw if kind != "array" else data.tobytes()
    assert backend.write_new("obj", data)
    assert backend.read("obj") == expected
    backend.replace("obj2", data)
    assert backend.read("obj2") == expected


def test_stored_data_is_a_copy(backend):
    buf = bytearray(b"original")
    backend.write_new("obj", buf)
    backend.replace("obj2", [buf])
    buf[:] = b"CHANGED!"
    assert backend.read("obj") == b"original"
    assert backend.read("obj2") == b"original"


def test_list_of_buffers(backend):
    frames = [b"head", bytearray(b"-"), memoryview(b"xxbodyxx")[2:-2], b"", _pattern(70000, 9), b"tail"]
    expected = b"".join(bytes(f) for f in frames)
    assert backend.write_new("data/pk/pack", frames) is True
    assert backend.read("data/pk/pack") == expected
    assert backend.stat("data/pk/pack") == len(expected)
    backend.replace("index/i", tuple(frames))
    assert backend.read("index/i") == expected
    # a one-shot iterable of frames works too
    backend.replace("index/g", (f for f in frames))
    assert backend.read("index/g") == expected
    # many small frames
    many = [bytes([i & 0xFF]) * 3 for i in range(2000)]
    assert backend.write_new("data/pk/many", many)
    assert backend.read("data/pk/many") == b"".join(many)
    # an empty list is an empty object
    assert backend.write_new("empty", [])
    assert backend.read("empty") == b""


# -- read_range -------------------------------------------------------------------------


def test_read_range_edges(backend):
    data = _pattern(10000, 1)
    backend.write_new("obj", data)
    assert backend.read_range("obj", 0, 10000) == data
    assert backend.read_range("obj", 0, 1) == data[:1]
    assert backend.read_range("obj", 1234, 4321) == data[1234:5555]
    assert backend.read_range("obj", 9999, 1) == data[9999:]
    assert backend.read_range("obj", 0, 0) == b""
    assert backend.read_range("obj", 10000, 0) == b""
    assert type(backend.read_range("obj", 5, 5)) is bytes


@pytest.mark.parametrize("offset,length", [(9999, 2), (10000, 1), (0, 10001), (20000, 0), (20000, 5)])
def test_read_range_beyond_end(backend, offset, length):
    backend.write_new("obj", _pattern(10000))
    with pytest.raises(RangeBeyondEnd) as ei:  # a BackendError: the stored object is shorter
        backend.read_range("obj", offset, length)
    assert "obj" in str(ei.value) and isinstance(ei.value, BackendError)


@pytest.mark.parametrize("offset,length", [(-1, 1), (0, -1)])
def test_read_range_negative(backend, offset, length):
    backend.write_new("obj", b"abc")
    with pytest.raises(UsageError):
        backend.read_range("obj", offset, length)


def test_read_range_empty_object(backend):
    backend.write_new("obj", b"")
    assert backend.read_range("obj", 0, 0) == b""
    with pytest.raises(BackendError):
        backend.read_range("obj", 0, 1)


def test_read_range_into_fills_exactly(backend):
    data = _pattern(300000, 4)
    backend.write_new("data/ab/obj", [data[:1000], data[1000:]])
    buf = bytearray(b"\xee" * 4321)
    assert backend.read_range_into("data/ab/obj", 1234, buf) is None
    assert bytes(buf) == data[1234:5555]
    # a slice of a larger buffer: only the slice is written
    big = bytearray(b"\xee" * 10000)
    backend.read_range_into("data/ab/obj", 0, memoryview(big)[100:3001])
    assert bytes(big[100:3001]) == data[: 3001 - 100]
    assert big[:100] == b"\xee" * 100 and big[3001:] == b"\xee" * (10000 - 3001)
    # the whole object, up to its last byte, into a buffer of another item size
    whole = array.array("I", bytes(len(data)))
    backend.read_range_into("data/ab/obj", 0, whole)
    assert whole.tobytes() == data
    last = bytearray(1)
    backend.read_range_into("data/ab/obj", len(data) - 1, last)
    assert bytes(last) == data[-1:]
    # empty buffers read nothing, at any offset up to the size
    backend.read_range_into("data/ab/obj", 0, bytearray())
    backend.read_range_into("data/ab/obj", len(data), bytearray())


@pytest.mark.parametrize("offset,length", [(9999, 2), (10000, 1), (0, 10001), (20000, 0), (20000, 5)])
def test_read_range_into_beyond_end(backend, offset, length):
    backend.write_new("obj", _pattern(10000))
    with pytest.raises(RangeBeyondEnd) as ei:
        backend.read_range_into("obj", offset, bytearray(length))
    assert "obj" in str(ei.value) and isinstance(ei.value, BackendError)


@pytest.mark.parametrize("name", ["missing", "data/zz/missing", "a/b"])
def test_read_range_into_missing_object(backend, name):
    backend.write_new("a/b/c", b"x")  # "a/b" exists only as a prefix
    with pytest.raises(ObjectMissing) as ei:
        backend.read_range_into(name, 0, bytearray(1))
    assert name in str(ei.value)
    assert backend.location in str(ei.value)
    with pytest.raises(ObjectMissing):
        backend.read_range_into(name, 0, bytearray())


def test_read_range_into_bad_arguments(backend):
    backend.write_new("obj", b"abc")
    with pytest.raises(UsageError):
        backend.read_range_into("obj", -1, bytearray(1))
    with pytest.raises(UsageError):
        backend.read_range_into("../obj", 0, bytearray(1))


def test_prefetch_is_a_hint_that_never_raises(backend):
    data = os.urandom(3 * 65536 + 17)
    backend.write_new("data/ab/obj", data)
    for offset, length in ((0, len(data)), (65536, 4096), (len(data) - 1, 1), (0, 10 * len(data))):
        assert backend.prefetch("data/ab/obj", offset, length) is None
    backend.prefetch("data/zz/missing", 0, 100)  # missing: the read reports it, not the hint
    backend.prefetch("a/b", 0, 1)
    # the object reads back unchanged after the hints
    assert backend.read_range("data/ab/obj", 65536, 4096) == data[65536 : 65536 + 4096]
    assert backend.read("data/ab/obj") == data


# -- create-only and replace ------------------------------------------------------------


def test_write_new_is_create_only(backend):
    assert backend.write_new("data/ab/x", b"first") is True
    assert backend.write_new("data/ab/x", b"first") is False
    assert backend.write_new("data/ab/x", b"a different, longer content") is False
    assert backend.write_new("data/ab/x", [b"other"]) is False
    assert backend.read("data/ab/x") == b"first"
    assert backend.stat("data/ab/x") == 5
    assert sorted(backend.list()) == ["data/ab/x"]  # and no temp file left behind


def test_replace_creates_and_overwrites(backend):
    backend.replace("snapshots/S.json", b"v1 long content")
    assert backend.read("snapshots/S.json") == b"v1 long content"
    backend.replace("snapshots/S.json", b"v2")
    assert backend.read("snapshots/S.json") == b"v2"
    assert backend.stat("snapshots/S.json") == 2
    backend.replace("snapshots/S.json", b"")
    assert backend.read("snapshots/S.json") == b""
    assert backend.write_new("snapshots/S.json", b"x") is False
    assert list(backend.list()) == ["snapshots/S.json"]


def test_replace_is_atomic_for_concurrent_readers(backend):
    """Readers running while another thread replaces a large object only ever see one
    complete version: every version is a single repeated byte with its own length."""
    name = "index/big"
    sizes = [(1 << 20) + 17 * v for v in range(8)]  # ~1 MiB, distinct lengths

    def version(v):
        return bytes([v + 1]) * sizes[v]

    backend.replace(name, version(0))
    done = threading.Event()
    problems = []
    reads = [0]

    def reader():
        while not done.is_set():
            try:
                got = backend.read(name)
                v = got[0] - 1
                if not (0 <= v < len(sizes)) or len(got) != sizes[v] or got.count(got[0]) != len(got):
                    problems.append(f"read saw a partial/mixed object: len {len(got)}, first byte {got[0]}")
                part = backend.read_range(name, 1000, 100000)
                if part.count(part[0]) != len(part):
                    problems.append("read_range saw mixed content")
                reads[0] += 1
            except Exception as exc:  # ObjectMissing would mean a window with no object
                problems.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            backend.replace(name, [version(i % 8)[:1000], version(i % 8)[1000:]])
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not problems, problems[:5]
    assert reads[0] > 0
    assert backend.read(name) == version(39 % 8)


def test_concurrent_write_new_same_name(backend):
    """Exactly one of several racing create-only writers wins, and its content is stored."""
    n = 8
    barrier = threading.Barrier(n)
    results = [None] * n
    payloads = [bytes([i]) * (200000 + i) for i in range(n)]

    def writer(i):
        barrier.wait()
        try:
            results[i] = backend.write_new("data/ff/race", payloads[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, bool) for r in results), results
    assert results.count(True) == 1
    winner = results.index(True)
    assert backend.read("data/ff/race") == payloads[winner]
    assert list(backend.list("data/")) == ["data/ff/race"]


def test_concurrent_write_new_distinct_names(backend):
    def writer(i):
        for j in range(20):
            assert backend.write_new(f"data/{j % 4:02x}/t{i}-{j}", bytes([i, j]) * 100)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(backend.list("data/"))) == 120
    assert backend.read("data/03/t5-19") == bytes([5, 19]) * 100


# -- list ----------------------------------------------------------------------------------


def _populate(backend):
    for i, n in enumerate(NAMES):
        assert backend.write_new(n, n.encode())


def test_list_empty_backend(backend):
    assert list(backend.list()) == []
    assert list(backend.list("data/")) == []


@pytest.mark.parametrize(
    "prefix",
    ["", "data/", "data/ab/", "data/ab", "data/a", "snapshots/", "snap", "config", "index/0001.idx", "nothing/", "dat"],
)
def test_list_by_prefix(backend, prefix):
    _populate(backend)
    got = list(backend.list(prefix))
    assert all(type(n) is str for n in got)
    assert len(got) == len(set(got)), "duplicates"
    assert sorted(got) == sorted(n for n in NAMES if n.startswith(prefix))


def test_list_never_shows_temp_objects(backend, make_leftover):
    _populate(backend)
    make_leftover(backend, "data/ab/ab03", 3600)
    make_leftover(backend, "snapshots/S3.json", 0)
    make_leftover(backend, "top", 0)
    assert sorted(backend.list()) == sorted(NAMES)
    assert sorted(backend.list("data/ab/")) == ["data/ab/ab01", "data/ab/ab02"]
    assert not any(TEMP_PREFIX in n for n in backend.list())
    assert not backend.exists("data/ab/ab03")


def test_list_after_delete_and_write(backend):
    _populate(backend)
    backend.delete("data/ab/ab01")
    backend.write_new("data/ef/ef01", b"x")
    expected = sorted(set(NAMES) - {"data/ab/ab01"} | {"data/ef/ef01"})
    assert sorted(backend.list()) == expected


# -- delete / stat / exists / missing ---------------------------------------------------


def test_delete(backend):
    _populate(backend)
    backend.delete("data/ab/ab01")
    assert not backend.exists("data/ab/ab01")
    with pytest.raises(ObjectMissing):
        backend.read("data/ab/ab01")
    with pytest.raises(ObjectMissing):
        backend.delete("data/ab/ab01")
    assert backend.read("data/ab/ab02") == b"data/ab/ab02"  # siblings untouched
    # a deleted name can be created again
    assert backend.write_new("data/ab/ab01", b"again") is True
    assert backend.read("data/ab/ab01") == b"again"


def test_stat_and_exists(backend):
    backend.write_new("a/b/c", b"12345")
    assert backend.stat("a/b/c") == 5
    assert backend.exists("a/b/c")
    assert not backend.exists("a/b/d")
    assert not backend.exists("a/b")  # a "directory" is not an object
    assert not backend.exists("a")


@pytest.mark.parametrize("op", ["read", "read_range", "stat", "delete"])
@pytest.mark.parametrize("name", ["missing", "data/zz/missing", "a/b"])
def test_missing_object_errors(backend, op, name):
    backend.write_new("a/b/c", b"x")  # "a/b" exists only as a prefix
    call = {
        "read": lambda: backend.read(name),
        "read_range": lambda: backend.read_range(name, 0, 0),
        "stat": lambda: backend.stat(name),
        "delete": lambda: backend.delete(name),
    }[op]
    with pytest.raises(ObjectMissing) as ei:
        call()
    assert isinstance(ei.value, RepositoryError)
    assert name in str(ei.value)
    assert backend.location in str(ei.value)
    assert backend.exists(name) is False


# -- names ----------------------------------------------------------------------------------

BAD_NAMES = [
    "",
    "/abs",
    "/",
    "a/",
    "a//b",
    "..",
    "a/../b",
    "../a",
    ".",
    "./a",
    "a/./b",
    "a\\b",
    "a\x00b",
    f"data/{TEMP_PREFIX}123-abc",
    b"bytes",
    None,
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_name_validation(backend, name):
    calls = [
        lambda: backend.read(name),
        lambda: backend.read_range(name, 0, 0),
        lambda: backend.write_new(name, b"x"),
        lambda: backend.replace(name, b"x"),
        lambda: backend.stat(name),
        lambda: backend.exists(name),
        lambda: backend.delete(name),
    ]
    for call in calls:
        with pytest.raises(UsageError):
            call()
    assert list(backend.list()) == []


@pytest.mark.parametrize("prefix", ["/data", "../", "a/../", "a//", None])
def test_list_prefix_validation(backend, prefix):
    with pytest.raises(UsageError):
        list(backend.list(prefix))


def test_unusual_but_valid_names(backend):
    names = ["a.b", "x/.hidden", "x/..dots", "sp ace", "ünï", "data/ab/" + "f" * 64]
    for n in names:
        assert backend.write_new(n, n.encode())
    assert sorted(backend.list()) == sorted(names)
    for n in names:
        assert backend.read(n) == n.encode()


def test_bad_data_is_usage_error(backend):
    for data in ["text", 42, [b"ok", "text"], None]:
        with pytest.raises(UsageError):
            backend.write_new("obj", data)
    assert not backend.exists("obj")


# -- interrupted writes -----------------------------------------------------------------


def test_cleanup_incomplete_removes_stale_temp_objects(backend, make_leftover):
    backend.write_new("data/ab/ab01", b"complete")
    old = make_leftover(backend, "data/ab/ab02", 3600)
    fresh = make_leftover(backend, "data/ab/ab03", 5)
    assert backend.cleanup_incomplete(older_than_seconds=600) == [old]
    assert backend.cleanup_incomplete(older_than_seconds=600) == []
    assert backend.cleanup_incomplete() == [fresh]
    assert backend.cleanup_incomplete() == []
    assert backend.read("data/ab/ab01") == b"complete"
    assert list(backend.list()) == ["data/ab/ab01"]
    # writing the interrupted names now works normally
    assert backend.write_new("data/ab/ab02", b"retry") is True


def test_cleanup_incomplete_on_empty_backend(backend):
    assert backend.cleanup_incomplete() == []
    assert backend.cleanup_incomplete(prefix="locks/") == []


def test_cleanup_incomplete_under_a_folder_leaves_the_others(backend, make_leftover):
    in_locks = make_leftover(backend, "locks/l1", 3600)
    in_data = make_leftover(backend, "data/ab/ab02", 3600)
    assert backend.cleanup_incomplete(prefix="locks/") == [in_locks]
    assert backend.cleanup_incomplete(prefix="locks/") == []
    assert backend.cleanup_incomplete(prefix="data/ab/") == [in_data]
    for bad in ("locks", "../", "/abs/"):
        with pytest.raises(UsageError):
            backend.cleanup_incomplete(prefix=bad)


# -- faults -----------------------------------------------------------------------------


def test_out_of_space_after_bytes(backend):
    faulty = FaultInjectingBackend(backend, fail_after_bytes=100)
    assert faulty.write_new("data/aa/1", b"x" * 60)
    with pytest.raises(OutOfSpace) as ei:
        faulty.write_new("data/aa/2", [b"y" * 30, b"y" * 30])
    msg = str(ei.value)
    assert "data/aa/2" in msg and backend.location in msg
    assert ei.value.exit_code == 9
    # nothing partial is visible; earlier objects are intact; the disk stays "full"
    assert not backend.exists("data/aa/2")
    with pytest.raises(OutOfSpace):
        faulty.write_new("data/aa/3", b"z")
    with pytest.raises(OutOfSpace):
        faulty.replace("data/aa/1", b"new")
    assert backend.read("data/aa/1") == b"x" * 60
    assert sorted(faulty.list()) == ["data/aa/1"]
    assert (faulty.writes, faulty.bytes_written, faulty.faults) == (1, 60, 3)
    faulty.heal()
    assert faulty.write_new("data/aa/2", b"y" * 60)
    assert backend.read("data/aa/2") == b"y" * 60


def test_fault_on_nth_write_of_prefix(backend):
    faulty = FaultInjectingBackend(backend, fail_on_write=2, prefix="data/", sticky=False)
    assert faulty.write_new("data/01/a", b"a")
    faulty.replace("index/i", b"not counted")
    with pytest.raises(OutOfSpace):
        faulty.write_new("data/01/b", b"b")
    assert faulty.write_new("data/01/c", b"c")  # not sticky: later writes succeed
    assert sorted(backend.list()) == ["data/01/a", "data/01/c", "index/i"]


def test_fault_custom_exception(backend):
    faulty = FaultInjectingBackend(backend, fail_on_write=1, exception=BackendError("injected EIO"))
    with pytest.raises(BackendError, match="injected EIO"):
        faulty.write_new("x", b"1")
    faulty2 = FaultInjectingBackend(backend, fail_on_write=1, exception=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        faulty2.replace("x", b"1")
    assert not backend.exists("x")


# -- streams (an object written piece by piece, named at commit) ------------------------


@pytest.mark.parametrize("pieces", [[], [0], [1], [4095, 1, 4096], [5 << 20], [1 << 20, 3, 4097, 2 << 20, 777]])
def test_stream_round_trip(backend, pieces):
    parts = [_pattern(n, seed=i) for i, n in enumerate(pieces)]
    s = backend.open_stream("packs/")
    for p in parts:
        s.write(p)
    assert sorted(backend.list()) == []  # nothing visible before the commit
    assert s.commit("packs/ab/ab01") is True
    assert backend.read("packs/ab/ab01") == b"".join(parts)
    assert sorted(backend.list()) == ["packs/ab/ab01"]
    s.abort()  # after a commit: nothing happens
    assert backend.exists("packs/ab/ab01")


def test_stream_takes_what_write_new_takes(backend):
    s = backend.open_stream("packs/")
    s.write([b"ab", bytearray(b"cd"), memoryview(b"ef")])
    s.write(b"gh")
    assert s.commit("packs/x") and backend.read("packs/x") == b"abcdefgh"


def test_stream_commit_is_create_only(backend):
    backend.write_new("packs/aa/1", b"first")
    s = backend.open_stream("packs/")
    s.write(b"second" * 1000)
    assert s.commit("packs/aa/1") is False
    assert backend.read("packs/aa/1") == b"first"
    assert sorted(backend.list()) == ["packs/aa/1"]


def test_stream_abort_leaves_nothing(backend):
    s = backend.open_stream("packs/")
    s.write(_pattern(3 << 20))
    s.abort()
    s.abort()
    assert sorted(backend.list()) == []
    assert backend.cleanup_incomplete(0) == []  # no temp object was left either
    with pytest.raises(UsageError):
        s.write(b"x")
    with pytest.raises(UsageError):
        s.commit("packs/x")


def test_streams_interleaved_and_concurrent(backend):
    streams = [backend.open_stream("packs/") for _ in range(4)]
    for rnd in range(3):
        for i, s in enumerate(streams):
            s.write(_pattern(1 << 19, seed=10 * i + rnd))

    def commit(i):
        assert streams[i].commit(f"packs/0{i}/p")

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert backend.read(f"packs/0{i}/p") == b"".join(_pattern(1 << 19, seed=10 * i + r) for r in range(3))


@pytest.mark.parametrize("folder", ["", "packs", "/packs/", "../x/", "packs//"])
def test_stream_folder_validation(backend, folder):
    with pytest.raises(UsageError):
        backend.open_stream(folder)


def test_stream_name_must_lie_in_its_folder(backend):
    s = backend.open_stream("packs/")
    s.write(b"x")
    with pytest.raises(UsageError):
        s.commit("index/x")
    with pytest.raises(UsageError):
        s.commit("packs/../x")


def test_stream_commit_through_a_full_disk_is_out_of_space(backend):
    faulty = FaultInjectingBackend(backend, fail_after_bytes=100, prefix="packs/")
    s = faulty.open_stream("packs/")
    s.write(b"y" * 101)
    with pytest.raises(OutOfSpace):
        s.commit("packs/f")
    assert not backend.exists("packs/f") and sorted(backend.list()) == []


# -- lifecycle --------------------------------------------------------------------------


def test_close_is_idempotent_and_context_manager(backend):
    backend.write_new("x", b"1")
    with backend as b:
        assert b is backend
    backend.close()


__all__ = [n for n in list(globals()) if n.startswith("test_")]

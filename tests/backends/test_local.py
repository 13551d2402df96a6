"""LocalBackend: the conformance suite plus what only a filesystem can get wrong
(permissions, ENOSPC mapping, fsync, a real kill -9 mid-write)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from pyvbak.backends import (
    TEMP_PREFIX,
    BackendError,
    LocalBackend,
    MemoryBackend,
    OutOfSpace,
    open_backend,
)
from pyvbak.backends import local as local_mod
from pyvbak.errors import UsageError

from .conformance import *  # noqa: F401,F403  (the suite: every test_* in it runs here)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def backend(tmp_path):
    with open_backend(str(tmp_path / "repo")) as b:
        yield b


@pytest.fixture
def make_leftover():
    def make(backend, name, age_seconds):
        head, _, _ = name.rpartition("/")
        d = os.path.join(backend.root, *head.split("/")) if head else backend.root
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, local_mod.temp_name())
        with open(tmp, "wb") as f:
            f.write(b"partial")
        t = time.time() - age_seconds
        os.utime(tmp, (t, t))
        return os.path.relpath(tmp, backend.root).replace(os.sep, "/")

    return make


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _all_files(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


# -- permissions --------------------------------------------------------------------------

def _as_nobody(fn):
    """Run fn() in a forked child with uid/gid 65534; return (its message, None) or
    (None, the child's failure).  Root ignores directory permissions, so permission tests
    running as root need this."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            out, code = f"child failed: {exc!r}", 1
        os.write(w, out.encode())
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return (out, None) if os.waitstatus_to_exitcode(status) == 0 else (None, out)


def test_write_into_readonly_dir_is_backend_error_with_path(tmp_path):
    if os.geteuid() != 0:
        repo = tmp_path / "repo"
        (repo / "data").mkdir(parents=True)
        (repo / "data").chmod(0o555)
        try:
            with pytest.raises(BackendError) as ei:
                LocalBackend(repo).write_new("data/ab/obj", b"x")
            msg = str(ei.value)
        finally:
            (repo / "data").chmod(0o755)
    else:
        # root ignores directory permissions: do the write as 'nobody' in a forked child,
        # in a directory outside root's private pytest tmp dir.
        base = tempfile.mkdtemp(prefix="pyvbak-ro-")
        try:
            os.chmod(base, 0o755)
            repo = os.path.join(base, "repo")
            os.makedirs(os.path.join(repo, "data"))
            os.chmod(repo, 0o755)
            os.chmod(os.path.join(repo, "data"), 0o555)

            def attempt():
                try:
                    LocalBackend(repo).write_new("data/ab/obj", b"x")
                except BackendError as e:
                    return str(e)
                return "no error"

            msg, failure = _as_nobody(attempt)
            assert failure is None, failure
            assert os.listdir(os.path.join(repo, "data")) == []
        finally:
            shutil.rmtree(base, ignore_errors=True)
    assert os.path.join(str(repo), "data", "ab") in msg
    assert "permission denied" in msg.lower()


def test_location_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(UsageError):
        LocalBackend(f)


def test_object_where_directory_is_expected_and_vice_versa(backend):
    backend.write_new("a/b", b"x")
    with pytest.raises(BackendError):
        backend.write_new("a/b/c", b"y")  # "a/b" is a file
    with pytest.raises(BackendError):
        backend.write_new("a", b"y")  # "a" is a directory: an error, not "already exists"
    with pytest.raises(BackendError):
        backend.replace("a", b"y")
    assert list(backend.list()) == ["a/b"]


def test_files_are_private(backend):
    backend.write_new("data/ab/x", b"secret")
    mode = os.stat(os.path.join(backend.root, "data", "ab", "x")).st_mode
    assert mode & 0o077 == 0


# -- ENOSPC / EDQUOT ----------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("op", ["write_new", "replace"])
def test_enospc_is_out_of_space_and_leaves_nothing(backend, monkeypatch, err, op):
    backend.replace("index/i", b"old")
    real_write = os.write

    def failing_write(fd, data):
        if TEMP_PREFIX in _fd_path(fd):
            # write a little first, as a real disk filling mid-object would
            real_write(fd, bytes(data[:10]))
            raise OSError(err, os.strerror(err))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OutOfSpace) as ei:
        getattr(backend, op)("index/i" if op == "replace" else "data/ab/new", [b"y" * 100, b"z" * 100])
    monkeypatch.undo()
    msg = str(ei.value)
    assert ("index/i" if op == "replace" else "data/ab/new") in msg
    assert backend.location in msg
    assert ei.value.exit_code == 9
    assert backend.read("index/i") == b"old"
    # no temp file, no partial object
    assert [f for f in _all_files(backend.root) if TEMP_PREFIX in f] == []
    assert sorted(backend.list()) == ["index/i"]


def test_other_oserror_is_backend_error(backend, monkeypatch):
    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(BackendError, match="Input/output error"):
        backend.write_new("x", b"1")
    monkeypatch.undo()
    assert not backend.exists("x")
    assert _all_files(backend.root) == []


# -- durability ---------------------------------------------------------------------------


def test_fsyncs_file_and_every_new_directory(backend, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(_fd_path(fd))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    backend.write_new("data/ab/obj", b"x")
    root = backend.root
    assert any(os.path.basename(p).startswith(TEMP_PREFIX) for p in synced)  # file data
    for d in (os.path.dirname(root), root, os.path.join(root, "data"), os.path.join(root, "data", "ab")):
        assert d in synced, (d, synced)
    synced.clear()
    backend.replace("data/ab/obj2", b"y")
    assert os.path.join(root, "data", "ab") in synced
    synced.clear()
    backend.delete("data/ab/obj")
    assert synced == [os.path.join(root, "data", "ab")]


# -- interrupted writes -------------------------------------------------------------------

_KILLED_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pyvbak.backends import LocalBackend
    real_fsync = os.fsync
    def hang(fd):
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = hang   # the data is written; get killed before it is published
    LocalBackend(sys.argv[1]).write_new("data/ab/victim", b"v" * 100000)
    """
)


def test_kill_9_mid_write_leaves_only_a_recognisable_temp_file(tmp_path):
    repo = str(tmp_path / "repo")
    b = LocalBackend(repo)
    b.write_new("data/ab/survivor", b"s")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, repo], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    leftovers = [f for f in _all_files(repo) if TEMP_PREFIX in f]
    assert len(leftovers) == 1
    assert os.path.basename(leftovers[0]).startswith(f"{TEMP_PREFIX}{proc.pid}-")
    assert os.path.dirname(leftovers[0]) == os.path.join("data", "ab")  # in the target dir
    assert list(b.list()) == ["data/ab/survivor"]
    assert not b.exists("data/ab/victim")
    assert b.cleanup_incomplete(older_than_seconds=3600) == []
    assert b.cleanup_incomplete() == [leftovers[0].replace(os.sep, "/")]
    assert _all_files(repo) == [os.path.join("data", "ab", "survivor")]
    assert b.write_new("data/ab/victim", b"v") is True


def test_cleanup_never_removes_a_write_in_progress_here(backend, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):
        if TEMP_PREFIX in _fd_path(fd):
            started.set()
            release.wait(30)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    other = LocalBackend(backend.root)  # another instance on the same directory
    result = []
    t = threading.Thread(target=lambda: result.append(backend.write_new("data/ab/slow", b"x" * 1000)))
    t.start()
    try:
        assert started.wait(30)
        assert other.cleanup_incomplete() == []
    finally:
        release.set()
        t.join()
    assert result == [True]
    assert backend.read("data/ab/slow") == b"x" * 1000


# -- open_backend -------------------------------------------------------------------------


def test_open_backend_locations(tmp_path):
    p = tmp_path / "r"
    assert isinstance(open_backend(str(p)), LocalBackend)
    assert open_backend(str(p)).location == str(p)
    assert open_backend(p).location == str(p)
    assert open_backend(f"file://{p}").location == str(p)
    assert isinstance(open_backend("memory://open-backend-test"), MemoryBackend)
    MemoryBackend.drop("open-backend-test")
    for bad in ["", "s3://bucket/x", "sftp://host/x", "file://"]:
        with pytest.raises(UsageError):
            open_backend(bad)


def test_missing_root_reads_as_empty(tmp_path):
    b = LocalBackend(tmp_path / "not-yet")
    assert list(b.list()) == []
    assert not b.exists("config")
    assert b.cleanup_incomplete() == []
    assert not (tmp_path / "not-yet").exists()
    assert b.write_new("config", b"c")
    assert (tmp_path / "not-yet" / "config").read_bytes() == b"c"

"""Shared test helpers.

Tests that need a real external program call ``require_tool``: outside CI a missing tool
skips the test with the install hint; in CI (CI=true) it fails, because the README's
test command is supposed to have installed it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, debian_package: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    hint = f"{name} not found: install the Debian package '{debian_package}' (the README's test command does)"
    if IN_CI:
        pytest.fail(hint)
    pytest.skip(hint)


def busybox_path() -> str | None:
    """busybox on PATH, else the static one tests/run.sh unpacks into tests/.guest/ (for
    the booted guest; never installed on the host)."""
    guest = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".guest")
    unpacked = [p for p in (os.path.join(guest, "bin", "busybox"), os.path.join(guest, "usr", "bin", "busybox"))
                if os.access(p, os.X_OK)]
    return shutil.which("busybox") or (unpacked[0] if unpacked else None)


def require_busybox() -> str:
    path = busybox_path()
    if path:
        return path
    hint = "busybox not found: run the README's test command (sh tests/run.sh), which unpacks busybox-static"
    if IN_CI:
        pytest.fail(hint)
    pytest.skip(hint)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def unix_listening(path) -> bool:
    """Whether a unix socket accepts connections.  Its file appears at bind(), a moment
    before listen(): a connect in between is refused, so "the file exists" is no proof."""
    import socket

    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def reaped(proc):
    """Run the block with child ``proc``; afterwards (also on failure) it is killed if
    still running, waited for, and its pipes closed: no process or descriptor outlives
    the test."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own pyvbak cache directory (never the user's ~/.cache).
    Subprocesses inherit it through the environment."""
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path_factory.mktemp("pyvbak-cache")))


@contextlib.contextmanager
def tmpfs_at(path, size_mib: int):
    """A tmpfs of ``size_mib`` MiB mounted on the directory ``path`` (made here) for the
    block; unmounted after.  Needs root: skipped without, failed under CI (which runs as
    root, so a skip there would hide the test)."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"cannot mount a tmpfs ({r.stderr.strip()}): needs root"
        pytest.fail(msg) if os.environ.get("CI", "").lower() in ("1", "true", "yes") else pytest.skip(msg)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture(autouse=True)
def _own_o_direct_memory(monkeypatch):
    """The local backend remembers, process-wide, each device that refused O_DIRECT: a
    test that makes it refuse on purpose must not leave that memory to the next ones."""
    from pyvbak.backends import local

    monkeypatch.setattr(local, "_no_direct_devs", set())


@pytest.fixture
def cli_work_dir(tmp_path, monkeypatch):
    """The work dir of the CLI's QEMU sessions (``PYVBAK_WORK_DIR``), under the test's tmp:
    empty again after every session that cleaned up."""
    monkeypatch.setenv("PYVBAK_WORK_DIR", str(tmp_path / "work"))
    return tmp_path / "work"


def run_cli(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr) of this call alone."""
    from pyvbak.cli.main import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_json(capsys, argv: list[str]):
    """Run the CLI in-process with --json; its exit code must be 0; the parsed output."""
    import json

    from pyvbak.cli.main import main

    capsys.readouterr()
    code = main(list(argv) + ["--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def parents_streamed(monkeypatch):
    """A list that fills, per backup, with whether the engine held the parent's index in
    chunks for the dirty blocks alone (``_Parent.streamed``) or whole."""
    from pyvbak.engine import backup as engine

    seen: list[bool] = []
    real = engine._Parent

    def recording(*args, **kwargs):
        parent = real(*args, **kwargs)
        seen.append(parent.streamed)
        return parent

    monkeypatch.setattr(engine, "_Parent", recording)
    return seen


@pytest.fixture
def repo(tmp_path):
    """A new, empty repository (a ``Repository``) under the test's tmp.  Modules whose
    tests need a repository made otherwise (through the CLI, with a snapshot) define their
    own ``repo``, which takes this one's place there."""
    from pyvbak.repo.repository import Repository

    return Repository.init(str(tmp_path / "repo"))


@pytest.fixture
def loopdev(tmp_path):
    """``loopdev(path)``: a loop device attached to the file ``path``, its /dev name;
    detached after the test.  Needs root: skipped without, failed under CI."""
    losetup = require_tool("losetup", "mount")
    made = []

    def make(path):
        r = subprocess.run([losetup, "-f", "--show", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            msg = f"cannot attach a loop device ({r.stderr.strip()}): needs root and /dev/loop-control"
            pytest.fail(msg) if IN_CI else pytest.skip(msg)
        made.append(r.stdout.strip())
        return r.stdout.strip()

    yield make
    for dev in made:
        subprocess.run([losetup, "-d", dev], check=False)


@pytest.fixture
def misnamed_qcow2(tmp_path):
    """A qcow2 image named like a raw one, holding 1 MiB of 0x55 in a 16 MiB disk."""
    require_tool("qemu-img", "qemu-utils")
    require_tool("qemu-io", "qemu-utils")
    img = tmp_path / "guest.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 1M", str(img)], check=True, capture_output=True)
    return img


@pytest.fixture
def vm(tmp_path):
    """The stand-in VM (``qemu_vm.FakeVM``: one 16 MiB qcow2 disk) in the test's tmp,
    stopped after the test.  Modules that need another VM define their own ``vm``."""
    from qemu_vm import FakeVM

    v = FakeVM(tmp_path).start()
    try:
        yield v
    finally:
        v.stop()


@pytest.fixture
def work(tmp_path):
    """The work dir of the hot sessions a test starts in process (not made here)."""
    return tmp_path / "work"

"""TerminationGuard and QMP client behaviour that needs no QEMU."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from pyvbak.errors import Interrupted, SourceError
from pyvbak.hypervisors.qemu import QmpClient
from pyvbak.hypervisors.qemu.naming import generation_of, run_of
from pyvbak.hypervisors.resources import TerminationGuard


def test_guard_converts_sigterm_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="SIGTERM"):
        with TerminationGuard():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 1)  # give the handler a bytecode boundary
    assert signal.getsignal(signal.SIGTERM) is before


def test_guard_defers_signals_during_cleanup():
    with TerminationGuard() as g:
        with g.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            done = True
        assert done and g.pending in (signal.SIGTERM, signal.SIGINT)


def test_qmp_refused_and_silent_sockets(tmp_path):
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on: a VM that is gone
    with pytest.raises(SourceError, match="refuses connections.*not running"):
        QmpClient(str(path), timeout=1).connect()

    path2 = tmp_path / "silent.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path2))
    srv.listen(1)
    try:
        with pytest.raises(SourceError, match="timed out.*greeting.*another client"):
            QmpClient(str(path2), timeout=0.3).connect()
    finally:
        srv.close()


def test_names():
    assert run_of("pyvbak-123-ab12-fl") == "123-ab12"
    assert run_of("pyvbak-123-ab12.json") == "123-ab12"
    assert run_of("pyvbak-gen-4") is None and run_of("disk0") is None
    assert generation_of("pyvbak-gen-12") == 12 and generation_of("other") is None


def test_session_lock_data_old_and_new_forms():
    import json

    from pyvbak import processes
    from pyvbak.hypervisors.qemu.session_lock import lock_data, owner_identity, parse_lock_data

    new = parse_lock_data(lock_data(1764100000.123457))
    assert new["started"] == 1764100000.123457 and new["pid"] == os.getpid()
    assert owner_identity(new) == {k: v for k, v in processes.identity().items() if v is not None}
    old = parse_lock_data("1764100000.123457")  # pyvbak before the identity: judged by pid
    assert old == {"started": 1764100000.123457} and owner_identity(old) is None
    assert parse_lock_data(json.dumps({"pid": 1})) is None and parse_lock_data("x") is None
    assert parse_lock_data(None) is None


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("owner, alive", [
    ({"pidns": "pid:[1]"}, True),          # another container's run: its pid means nothing here
    ({"machine": "0" * 32}, True),         # another machine's, work dir on shared storage
    (None, False),                         # a journal without identity: judged by pid (dead)
    ({}, False),                           # this namespace, pid dead
])
def test_dead_run_files_judges_a_run_by_its_journal(tmp_path, owner, alive):
    import json

    from pyvbak import processes
    from pyvbak.hypervisors.qemu.cleanup import dead_run_files

    run = f"{_dead_pid()}-beef"
    journal = {"run": run, "pid": int(run.split("-")[0])}
    if owner is not None:
        journal["owner"] = {**processes.identity(), "start": 1, **owner}
    (tmp_path / f"pyvbak-{run}.json").write_text(json.dumps(journal))
    (tmp_path / f"pyvbak-{run}-nbd.sock").touch()
    if alive:
        with pytest.raises(SourceError, match=rf"another pyvbak session \(pid {run.split('-')[0]}\) is using work dir"):
            dead_run_files(tmp_path, None)
    else:
        assert [p.name for p in dead_run_files(tmp_path, None)] == [f"pyvbak-{run}-nbd.sock", f"pyvbak-{run}.json"]


def test_dead_run_files_a_reused_python_pid_with_another_start_is_dead(tmp_path):
    import json
    import subprocess
    import sys

    from pyvbak import processes
    from pyvbak.hypervisors.qemu.cleanup import dead_run_files

    from conftest import wait_until

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # (right after the spawn its /proc cmdline can still be empty: not a Python one yet)
        wait_until(lambda: processes.pid_alive(sleeper.pid), timeout=10, what="the sleeper to run Python")
        run = f"{sleeper.pid}-beef"
        start = processes.start_time(sleeper.pid)
        path = tmp_path / f"pyvbak-{run}.json"
        path.write_text(json.dumps({"run": run, "owner": {**processes.identity(), "start": start - 1}}))
        assert [p.name for p in dead_run_files(tmp_path, None)] == [path.name]
        path.write_text(json.dumps({"run": run, "owner": {**processes.identity(), "start": start}}))
        with pytest.raises(SourceError, match=rf"another pyvbak session \(pid {sleeper.pid}\)"):
            dead_run_files(tmp_path, None)
    finally:
        sleeper.kill()
        sleeper.wait()

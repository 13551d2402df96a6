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

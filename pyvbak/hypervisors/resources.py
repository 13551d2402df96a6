"""Signal-safe cleanup helpers shared by the hypervisor control planes.

Python turns SIGINT into KeyboardInterrupt, so a ``with`` block's ``__exit__`` runs on
Ctrl-C.  SIGTERM (what systemd, docker and ``kill`` send) would instead end the process
without running any cleanup, leaving snapshots, exports and bitmaps behind in the
hypervisor.  ``TerminationGuard`` converts SIGTERM (and SIGHUP) into an ``Interrupted``
exception in the main thread while a resource-owning session is active, and restores the
previous handlers afterwards.  A signal that is ignored (``nohup``; SIGINT in a script's
background job) stays ignored; once the backup is committed, pyvbak/interrupts.py has
signals noted instead of raised.

Cleanup itself must not be cut short by a second signal: ``guard.deferred()`` is a block
during which SIGTERM/SIGHUP/SIGINT are only recorded; ``pending`` tells afterwards whether
one arrived, so the caller can still report the interruption once cleanup is done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterable, Iterator

from pyvbak import interrupts
from pyvbak.errors import Interrupted

_CONVERTED = (signal.SIGTERM, signal.SIGHUP)


class TerminationGuard:
    """Context manager: SIGTERM/SIGHUP raise ``Interrupted`` in the main thread.

    Outside the main thread (where Python cannot install handlers) it does nothing; the
    owner of the main thread is then responsible for signals.
    """

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._active = False
        self._deferring = 0
        self.pending: int | None = None  # signal number received while deferring

    def _handler(self, signum, frame):  # noqa: ARG002 - signal handler signature
        if interrupts.note_if_finishing(signum):  # the backup is committed: nothing to stop
            return
        if self._deferring:
            self.pending = signum
            return
        self._raise(signum)

    @staticmethod
    def _raise(signum: int):
        interrupts.raising(signum)
        if signum == signal.SIGINT:  # the CLI's own line for Ctrl-C (its stage note included)
            raise KeyboardInterrupt
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}; cleaned up what this run created")

    def raise_pending(self) -> None:
        """After a ``deferred`` block: the stop request that came during it, raised as it
        would have been (Ctrl-C as KeyboardInterrupt), unless the work is committed by
        now (then only noted).  A stop taken late said "interrupted by SIGINT" where every
        other Ctrl-C says "interrupted (Ctrl-C)" (session 26's audit)."""
        signum, self.pending = self.pending, None
        if signum is not None and not interrupts.note_if_finishing(signum):
            self._raise(signum)

    def __enter__(self) -> "TerminationGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in _CONVERTED:
                if signal.getsignal(sig) is signal.SIG_IGN:  # nohup: a hangup stays ignored
                    continue
                self._previous[sig] = signal.signal(sig, self._handler)
            self._active = True
        return self

    def __exit__(self, *exc) -> None:
        if self._active:
            for sig, prev in self._previous.items():
                signal.signal(sig, prev)  # type: ignore[arg-type]
            self._previous.clear()
            self._active = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Run a block (cleanup) that signals cannot interrupt; SIGINT included."""
        if not self._active:
            yield
            return
        self._deferring += 1
        prev_int = signal.getsignal(signal.SIGINT)

        def _int(signum, frame):  # noqa: ARG001
            if not interrupts.note_if_finishing(signum):
                self.pending = signum

        ignored = prev_int is signal.SIG_IGN  # a background job of a script: Ctrl-C is not ours
        if not ignored:
            signal.signal(signal.SIGINT, _int)
        try:
            yield
        finally:
            if not ignored:
                signal.signal(signal.SIGINT, prev_int)
            self._deferring -= 1




def remove_files(paths: Iterable[Path], errors: list[str]) -> bool:
    """Unlink each of ``paths`` (one already gone is fine); a failure is added to
    ``errors`` as a line naming the path, and the rest are still tried.  False if any
    file stayed."""
    ok = True
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append(f"removing {p}: {e.strerror}")
            ok = False
    return ok

"""After the commit: a stop request with nothing left to stop.

Ctrl-C, SIGTERM and SIGHUP stop a command by raising (``KeyboardInterrupt``,
``Interrupted``) wherever the main thread is, and every context manager cleans up.  Once
a command's result is committed - every disk's snapshot of a backup made, a restore's
file in place - what remains is its own cleanup (removing the view from QEMU, releasing
the lock) and its output.  A signal then used to fail a command that had succeeded: exit
10, no ``--json`` result (a script lost the snapshot ids), a message saying the disks
were not backed up.  From ``begin_finishing()`` on, the signal handlers only note a
signal; the command completes and says that it arrived (``end()`` hands the noted ones
to the CLI).  Process-wide, like signal handlers themselves; main thread only.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_state = {"finishing": False, "noted": [], "held": 0, "held_noted": [], "raised": []}


def begin_finishing() -> None:
    """The command's result is committed: signals from now on are noted, not raised."""
    _state["finishing"] = True


def finishing() -> bool:
    return bool(_state["finishing"])


def note_if_finishing(signum: int) -> bool:
    """For a signal handler: True (and the signal noted) when it must not raise."""
    if _state["finishing"]:
        _state["noted"].append(signum)
        return True
    if _state["held"]:
        _state["held_noted"].append(signum)
        return True
    return False


def _note_int(signum, frame):  # noqa: ARG001 - signal handler signature
    if not note_if_finishing(signum):
        raise KeyboardInterrupt


@contextmanager
def held() -> Iterator[None]:
    """A step and what its caller must record of it, which no signal may split: the
    handlers note a signal meanwhile; at the end it is raised as if it came then (by the
    handler in place) - also when the block failed, the signal then in place of the
    failure - unless the block called ``begin_finishing`` (then it is one of the noted
    ones).  A backup's snapshot exists from its metadata on: a Ctrl-C between that write
    and the caller's ``commit()`` of the disk said "no snapshot was made" of a snapshot
    that was, and merged the dirty bitmap back, so the next backup scanned the whole disk.
    Main thread only, like the handlers."""
    # Python's own Ctrl-C handler (a library caller: the CLI installs one that asks
    # note_if_finishing) would raise at once: one that notes takes its place meanwhile.
    # Other handlers and the default actions are the caller's.
    if threading.current_thread() is not threading.main_thread():
        # signals go to the main thread, whose handlers would note them for this block and
        # this thread raise them: no hold outside the main thread
        yield
        return
    own_int = not _state["held"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own_int:
        signal.signal(signal.SIGINT, _note_int)
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
        if own_int:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if not _state["held"] and _state["held_noted"]:
            pending, _state["held_noted"] = _state["held_noted"], []
            if _state["finishing"]:
                _state["noted"].extend(pending)
            else:
                handler = signal.getsignal(pending[0])
                if callable(handler):
                    handler(pending[0], None)  # raises as that handler does (KeyboardInterrupt, Interrupted)


def raising(signum: int) -> None:
    """For a signal handler about to raise its stop request: recorded, so that a command
    which still ends normally can say the request was lost - Python drops an exception
    raised inside a finalizer, a weakref callback or an at-fork handler ("Exception
    ignored"), wherever the main thread happened to be."""
    _state["raised"].append(signum)


def stops_seen() -> int:
    """How many stop requests this command has had, raised or noted."""
    return len(_state["raised"]) + len(_state["noted"])


def noted_names() -> list[str]:
    """The names of the signals noted so far (oldest first)."""
    return [signal.Signals(s).name for s in _state["noted"]]


def end() -> list[str]:
    """Back to raising; the names of the signals noted meanwhile (oldest first)."""
    noted = noted_names()
    _state["finishing"], _state["noted"] = False, []
    return noted


def raised_and_lost() -> list[str]:
    """The stop requests raised since the last call (``raising``), by name; for a command
    that ended normally, they were lost on their way."""
    raised = [signal.Signals(s).name for s in _state["raised"]]
    _state["raised"] = []
    return raised

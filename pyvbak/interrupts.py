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

_state = {"finishing": False, "noted": []}


def begin_finishing() -> None:
    """The command's result is committed: signals from now on are noted, not raised."""
    _state["finishing"] = True


def finishing() -> bool:
    return bool(_state["finishing"])


def note_if_finishing(signum: int) -> bool:
    """For a signal handler: True (and the signal noted) when it must not raise."""
    if not _state["finishing"]:
        return False
    _state["noted"].append(signum)
    return True


def end() -> list[str]:
    """Back to raising; the names of the signals noted meanwhile (oldest first)."""
    noted = [signal.Signals(s).name for s in _state["noted"]]
    _state["finishing"], _state["noted"] = False, []
    return noted

"""The console-script entry point (``pyvbak``, ``python -m pyvbak``).

Beside the work itself, a user waits on every command for the interpreter to start, the
modules to load and the process to exit.  The exit part is taken here: before returning,
the objects left (mostly those of numpy, typer and pyvbak's modules) are frozen with
``gc.freeze``, so the interpreter's last collection at shutdown skips them instead of
traversing them all just before the process is gone anyway.  Measured with
``python bench/startup.py`` (bench/RESULTS.md, "CLI start-up"): ``pyvbak snapshots``
130-136 ms through here vs 141-165 ms through ``main`` directly (medians, three runs).  Nothing else changes:
atexit handlers, ``finally`` blocks and module teardown all still run.
"""

from __future__ import annotations

import gc
import signal
import sys


class _StoppedWhileStarting(BaseException):
    """SIGTERM or SIGHUP before ``main`` has its own handlers."""


def _stop_while_starting(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _StoppedWhileStarting(signum)


def _starting_handlers() -> None:
    """Until ``main`` installs its own, SIGTERM and SIGHUP end the start-up as Ctrl-C does:
    one line, exit 10.  Their default action killed a command in its first ~0.2 s (the
    module imports) without a word, exit 143 or 129.
    An ignored SIGHUP (nohup) stays ignored."""
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _stop_while_starting)


def _exit(code: int):
    """``sys.exit(code)``, and that code is what the process exits with.  A Ctrl-C whose
    KeyboardInterrupt was raised inside an ``exec`` of a string (dataclasses build their
    methods that way: a lazy import of a module with a ``@dataclass``) sets CPython's
    "unhandled KeyboardInterrupt" flag even though pyvbak caught it, and under
    ``python -m pyvbak`` the interpreter then killed itself with SIGINT after printing the
    exit-10 line (~2 % of early Ctrl-Cs).  Every exec of a string
    clears that flag first (pythonrun.c, run_eval_code_obj), so one that does nothing
    clears it here."""
    exec("0")  # noqa: S102 - a constant: see above
    sys.exit(code)


def _nothing_done(what: str):
    print(f"pyvbak: error: interrupted {what} while starting: nothing was done", file=sys.stderr)
    _exit(10)  # errors.Interrupted.exit_code (not imported: it may be what was interrupted)


def entry() -> None:
    started = [False]
    try:
        _starting_handlers()
        from . import main as cli_main

        started = cli_main._started
        code = cli_main.main(exiting=True)  # signals are ignored from its return on: the outcome is decided
    except (KeyboardInterrupt, _StoppedWhileStarting) as stop:
        if started[0]:
            # main() had its handlers: it notes a stop request once the outcome is decided,
            # but one can land between two of its steps there (an instruction's width)
            print(f"pyvbak: error: interrupted{' (Ctrl-C)' if isinstance(stop, KeyboardInterrupt) else ''} as the "
                  f"command was ending", file=sys.stderr)
            _exit(10)
        if isinstance(stop, KeyboardInterrupt):  # Ctrl-C while the modules load
            _nothing_done("(Ctrl-C)")
        _nothing_done("by SIGHUP (the terminal or ssh session closed)"
                      if stop.args[0] == getattr(signal, "SIGHUP", None) else "by SIGTERM")
    except BaseException as exc:
        if type(exc).__name__ == "Interrupted":  # (errors not imported: see _nothing_done) the same window
            print(f"pyvbak: error: {exc}", file=sys.stderr)
            _exit(10)
        raise
    gc.freeze()
    _exit(code)

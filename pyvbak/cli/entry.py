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


#: the stop requests (signal numbers) raised before ``main`` had its own handlers.  Python
#: drops an exception raised inside a weakref callback or a finalizer ("Exception
#: ignored") - the import machinery's module locks have such a callback - and the command
#: then ran on to its end and exited 0: a ``restore --force`` stopped while it started
#: replaced the file (session 26's audit, ~1 in 200-500 early stops).  ``main`` looks here
#: once it has its handlers, and ends the command before it does anything.
stops_while_starting: list[int] = []


def _stop_while_starting(signum, frame):  # noqa: ARG001 - signal handler signature
    stops_while_starting.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _StoppedWhileStarting(signum)


_stop_while_starting.pyvbak_starting = True  # (main's _catch_termination replaces it, as the default one)


def stopped_by(signum: int) -> str:
    """How a stop request is named in "interrupted ... while starting"."""
    if signum == signal.SIGINT:
        return "(Ctrl-C)"
    return "by SIGHUP (the terminal or ssh session closed)" if signum == getattr(signal, "SIGHUP", None) else "by SIGTERM"


def _quiet_stop_requests(previous):
    """An ``sys.unraisablehook`` that says nothing of a stop request Python dropped (a
    traceback under "Exception ignored"): every one is recorded where it was raised
    (``stops_while_starting``, ``interrupts.raising``) and the command's last line says
    what became of it.  Anything else goes to ``previous``."""
    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, (KeyboardInterrupt, _StoppedWhileStarting)) or type(exc).__name__ == "Interrupted":
            return
        previous(unraisable)
    return hook


def _starting_handlers() -> None:
    """Until ``main`` installs its own, SIGTERM, SIGHUP and Ctrl-C end the start-up: one
    line, exit 10.  The default action of the first two killed a command in its first
    ~0.2 s (the module imports) without a word, exit 143 or 129.  An ignored SIGHUP
    (nohup) stays ignored."""
    for name in ("SIGTERM", "SIGHUP", "SIGINT"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        current = signal.getsignal(signum)
        if (current is signal.default_int_handler) if name == "SIGINT" else (current is not signal.SIG_IGN):
            signal.signal(signum, _stop_while_starting)
    sys.unraisablehook = _quiet_stop_requests(sys.unraisablehook)


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
        _nothing_done(stopped_by(signal.SIGINT if isinstance(stop, KeyboardInterrupt) else stop.args[0]))
    except BaseException as exc:
        if type(exc).__name__ == "Interrupted":  # (errors not imported: see _nothing_done) the same window
            print(f"pyvbak: error: {exc}", file=sys.stderr)
            _exit(10)
        raise
    gc.freeze()
    _exit(code)

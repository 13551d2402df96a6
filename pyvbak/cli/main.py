"""The pyvbak command line: one module per command group, errors mapped to exit codes.

A ``PyvbakError`` prints one line on stderr (``pyvbak: error: ...``) and exits with the
error's code; Ctrl-C, SIGTERM and SIGHUP become ``Interrupted`` so every context manager below
cleans up (snapshots, exports, locks, temp files) before the process exits.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import typer

from .. import interrupts
from ..allocator import tune_for_throughput
from ..errors import Interrupted, PyvbakError
from . import backup_cmd, demo_cmd, prune_cmds, repo_cmds, restore_cmd
from .common import _OutputStopped, _drop_pending_output, _writing_line, _writing_output, write_line

def _new_app() -> typer.Typer:
    return typer.Typer(
        name="pyvbak",
        help="Hot, deduplicated, compressed, forever-incremental backups of virtual machine disks.",
        epilog="Exit codes: 0 success, 1 other failure, 2 usage, 3 repository, 4 source (image, NBD, QEMU), "
               "5 snapshot not found, 6 missing or corrupt data, 7 restore target exists, 8 locked, "
               "9 out of space, 10 interrupted (README.md: Exit codes).",
        context_settings={"help_option_names": ["-h", "--help"]},
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )


app = _new_app()


def _decoder_name(native) -> str:
    kernel = native.selected_decode_kernel()
    if kernel == "native":
        v = native.zstd_library_version()
        return f"native (libzstd {v // 10000}.{v // 100 % 100}.{v % 100})"
    return "python (python-zstandard)"


def _print_version(value: bool) -> None:
    if not value:
        return
    from .. import __version__, native
    from ..repo import format as fmt

    print(f"pyvbak {__version__} (repository format {fmt.FORMAT_VERSION}; scan kernel "
          f"{native.selected_kernel()}, SHA-256 {native.selected_sha256_kernel()}, block decoder "
          f"{_decoder_name(native)})")
    raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version, repository format and native kernels, and exit."),
) -> None:
    pass


COMMANDS = {
    "init": repo_cmds.init,
    "backup": backup_cmd.backup,
    "snapshots": repo_cmds.snapshots,
    "restore": restore_cmd.restore,
    "verify": repo_cmds.verify,
    "forget": prune_cmds.forget,
    "prune": prune_cmds.prune,
    "unlock": repo_cmds.unlock,
    "cbt-off": backup_cmd.cbt_off,
    "demo": demo_cmd.demo,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def _app_for(argv: list[str]) -> typer.Typer:
    """The app to run ``argv`` with.  Typer turns every command's signature into click
    parameters on each run (``get_type_hints`` and friends for all ten): 3.7 ms in a
    fresh process, against 1.2 ms for the one command named.  So a run that names its
    command first gets an app holding only that one; anything else (``--help``,
    ``--version``, a mistyped command, no command) the whole app, so the listing and
    the "no such command" error name them all."""
    fn = COMMANDS.get(argv[0]) if argv else None
    if fn is None:
        return app
    one = _new_app()
    one.callback()(_root)
    one.command(argv[0])(fn)
    return one


#: environment variable that lets unexpected OSErrors through as tracebacks
DEBUG_ENV = "PYVBAK_DEBUG"
#: exit code of an OSError no code path turned into a PyvbakError
OS_ERROR_EXIT = 1


#: what typer makes of a KeyboardInterrupt (typer.core: ``raise Exit(130)``)
_TYPER_CTRL_C_EXIT = 130


#: what an interrupted command left, by command (a restore's message once spoke of snapshots)
_AFTER_INTERRUPT = {
    "backup": "no snapshot was left half-written",
    "demo": "no snapshot was left half-written",
    "restore": "no partly restored file was left behind",
    "cbt-off": "the dirty bitmaps not yet removed are still there; run it again to finish",
    # (a second run of these found nothing left to do and failed, exit 5)
    "forget": ("the repository is consistent, and some of the snapshots may be forgotten already: list them with "
               "'pyvbak snapshots' before running it again"),
    "unlock": ("the locks it named are removed; 'pyvbak verify --repair' (or 'pyvbak prune') indexes what their "
               "processes left"),
}
_command = [""]
#: what a stop means at the stage a command has reached, when that differs from its
#: _AFTER_INTERRUPT line (set_after_interrupt; reset by every main())
_stage_note: list[str | None] = [None]


def set_after_interrupt(note: str) -> None:
    """From now on, a stop of this command tells the user ``note`` (what is done and what
    to run next) instead of the command's usual line."""
    _stage_note[0] = note


def _after_interrupt() -> str:
    if _stage_note[0]:
        return _stage_note[0]
    return _AFTER_INTERRUPT.get(_command[0], "the repository is consistent; run the command again to finish")


def _interrupted() -> int:
    _say(f"pyvbak: error: interrupted (Ctrl-C): stopped cleanly; {_after_interrupt()}")
    return Interrupted.exit_code


def _output_waits() -> bool:
    """For a stop request noted once the outcome is decided: does it end output that waits?
    Any while the results go to a piped stdout; during a line on stderr, the command's
    second stop request or a later one (common._writing_line)."""
    if _writing_output[0]:
        return True
    return _writing_line[0] and interrupts.stops_seen() >= 2


def _sigterm(signum, frame):
    if interrupts.note_if_finishing(signum):  # committed: nothing left to stop (pyvbak/interrupts.py)
        if _output_waits():  # ... but the output, waiting on a pipe nobody reads
            raise _OutputStopped
        return
    why = ("SIGHUP (the terminal or ssh session closed)" if signum == getattr(signal, "SIGHUP", None)
           else "SIGTERM")
    interrupts.raising(signum)
    raise Interrupted(f"interrupted by {why}: stopped cleanly; {_after_interrupt()}")


def _sigint(signum, frame):
    if interrupts.note_if_finishing(signum):
        if _output_waits():
            raise _OutputStopped
        return
    interrupts.raising(signum)
    raise KeyboardInterrupt


def _catch_termination() -> dict:
    """SIGTERM and SIGHUP become ``Interrupted``, so every context manager cleans up (a
    dropped ssh session killed a restore outright: its 2 GiB temp file and its lock
    stayed).  A SIGHUP that is ignored (``nohup``) stays ignored.  The previous handlers."""
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _sigterm)}
    sigint = signal.getsignal(signal.SIGINT)
    # Ctrl-C: the same rule, unless the program chose otherwise (the console script's
    # start-up handler is replaced too: cli/entry.py)
    if sigint is signal.default_int_handler or getattr(sigint, "pyvbak_starting", False):
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _sigint)
    hup = getattr(signal, "SIGHUP", None)
    if hup is not None and signal.getsignal(hup) is not signal.SIG_IGN:
        previous[hup] = signal.signal(hup, _sigterm)
    return previous


def _say(line: str) -> None:
    """An error line on stderr - which a hangup may have closed, or a reader may have
    stopped reading (write_line): the exit code still counts."""
    write_line(sys.stderr, line)


def _printable_anywhere() -> None:
    """A VM or disk name this terminal's encoding lacks (a Cyrillic name under a Latin-1
    locale) is printed escaped, not a UnicodeEncodeError: that traceback came after a
    restore had put its file in place, and made it exit 1."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass  # not a text stream that can be reconfigured (a test's capture, a pipe closed)


class _PipedStdout:
    """sys.stdout while a command runs, when it is a pipe or socket: a reader that went
    away (EPIPE: ``pyvbak verify --repair | head``, a job runner killed) ends the output,
    not the command.  click answered the EPIPE with a silent exit 1, wherever the command
    was: a repair that left lost blocks, which ends with its error line and exit 6, said
    nothing and exited 1; and what was still buffered failed at the interpreter's exit
    ("Exception ignored ... BrokenPipeError", exit 120).  Now the command runs
    to its end, main() flushes through here, and its exit code and stderr say what
    happened to the work."""

    def __init__(self, stream):
        self._stream, self.gone = stream, False

    def write(self, text):
        self._guarded(self._stream.write, text)
        return len(text)

    def flush(self):
        self._guarded(self._stream.flush)

    def _guarded(self, call, *args):
        if self.gone:
            return
        _writing_output[0] = True
        try:
            call(*args)
        except BrokenPipeError:
            self._reader_gone(stderr_too=True)
        except _OutputStopped:
            self._reader_gone()
        except OSError as exc:  # (a socket reset: no EPIPE)
            _stdout_failed[0] = exc
            raise
        except (Interrupted, KeyboardInterrupt):  # the command stops: its results end here
            self._reader_gone()
            raise
        finally:
            _writing_output[0] = False

    def _reader_gone(self, *, stderr_too: bool = False):
        """No more results.  ``stderr_too`` (the reader is gone: EPIPE): stderr into the
        same pipe (2>&1) could not be written either.  Not on a stop: the error line that
        says what the stop did still goes out if the reader resumes (a second stop ends a
        line that waits - common.write_line)."""
        self.gone = True
        try:
            same = stderr_too and os.path.samestat(os.fstat(self._stream.fileno()), os.fstat(sys.stderr.fileno()))
        except (OSError, AttributeError, ValueError):
            same = False
        _drop_pending_output(self._stream)
        if same:
            _drop_pending_output(sys.stderr)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _FileStdout:
    """sys.stdout while a command runs, when it is a file or terminal: a write there that
    fails is noted as standard output's, so the error line says so (``pyvbak snapshots >
    /dev/full`` said only "No space left on device", naming nothing)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._noted(self._stream.write, text)

    def flush(self):
        self._noted(self._stream.flush)

    def _noted(self, call, *args):
        try:
            return call(*args)
        except OSError as exc:
            _stdout_failed[0] = exc
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _stdout_guard():
    """A _PipedStdout for sys.stdout when that is a pipe or socket, a _FileStdout for
    any other descriptor, else None."""
    import stat

    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (AttributeError, ValueError, OSError):  # (a test's capture, no stdout at all)
        return None
    return _PipedStdout(sys.stdout) if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else _FileStdout(sys.stdout)


#: [the command failed and main() is reporting it], [main() has its signal handlers]
_failing, _started = [False], [False]
#: [the OSError a write to stdout raised in this command, or None]
_stdout_failed: list[OSError | None] = [None]


def _failed() -> None:
    """The outcome is decided - an error to report: a stop request from here on is only
    noted.  Raised inside an ``except`` clause below it escaped main(): SIGTERM as a
    traceback, Ctrl-C as "nothing was done"."""
    _failing[0] = True
    interrupts.begin_finishing()


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    tune_for_throughput()  # this process is the CLI's: see pyvbak/allocator.py
    _printable_anywhere()
    _failing[0] = False
    _stdout_failed[0] = None
    previous = _catch_termination()
    _started[0] = True
    interrupts.raised_and_lost()  # (a library caller's earlier commands' are not this one's)
    # a stop request raised while the console script started, which Python dropped
    starting = sys.modules.get(__package__ + ".entry")
    dropped = list(getattr(starting, "stops_while_starting", ()))
    if dropped:
        starting.stops_while_starting.clear()
    guard = _stdout_guard()
    if guard is not None:
        sys.stdout = guard
    try:
        args = sys.argv[1:] if argv is None else list(argv)
        _command[0] = next((a for a in args if not a.startswith("-")), "")
        if dropped:
            raise Interrupted(f"interrupted {starting.stopped_by(dropped[0])} while starting: nothing was done")
        _stage_note[0] = None
        rv = _app_for(args)(args=args, prog_name="pyvbak", standalone_mode=False)
        # Without standalone mode, click *returns* the code of an Exit instead of raising
        # it - and typer turns Ctrl-C (KeyboardInterrupt) into Exit(130) before we see it.
        # A command that returns normally returns None.
        if rv == _TYPER_CTRL_C_EXIT:
            return _interrupted()
        code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        # the output out of the buffer while this command can still say what became of it
        # (at the interpreter's exit an EPIPE or ENOSPC was "Exception ignored", exit 120)
        sys.stdout.flush()
        lost = interrupts.raised_and_lost() if code == 0 else []
        if lost:
            # raised inside an object's clean-up, where Python drops exceptions: the command
            # ran to its end, complete - say so rather than nothing
            _say(f"pyvbak: note: {' and '.join(dict.fromkeys(lost))} arrived while Python was cleaning up an object, "
                 f"where it cannot stop the command: the {_command[0] or 'command'} ran to its end and is complete")
        return code
    except (PyvbakError, Interrupted) as exc:
        _failed()
        _say(f"pyvbak: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _failed()
        return _interrupted()
    except typer.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        if exc.code == 1 and interrupts.finishing():
            # typer's own answer to a broken pipe (EPIPE) while the command printed: it
            # pacifies the streams and exits 1 - of a backup that had committed, which the
            # rule below for OSErrors of the output calls a success
            return 0
        raise
    except typer.Abort:
        _failed()
        _say("pyvbak: error: aborted")
        return Interrupted.exit_code
    except MemoryError:
        # e.g. the per-block arrays of a disk far larger than this machine can index
        _failed()
        _say("pyvbak: error: out of memory: the disk needs more memory than this machine has (about 50 bytes "
              "per block: see the README's 'Sizing'); use a repository with larger blocks (pyvbak init "
              "--block-size 1M) or a machine with more memory")
        return 1
    except Exception as exc:  # click usage errors
        committed = interrupts.finishing()  # (asked before _failed() says so of every outcome)
        _failed()
        if isinstance(exc, _click_exception_types()):
            # one line like every other error (click's own form is usage + hint + error)
            code = getattr(exc, "exit_code", 2) or 2
            message = exc.format_message()
            if not message:  # no command at all: click printed the help, which says it all
                return code
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None and ctx.command_path else "pyvbak"
            if where == "pyvbak" and args and args[0] in COMMANDS:  # the command's own options
                where = f"pyvbak {args[0]}"
            _say(f"pyvbak: error: {message} (see '{where} --help')")
            return code
        if isinstance(exc, OSError) and committed:
            # The work is committed and only its output failed: the terminal that took it
            # is gone (the hangup that was noted), nothing reads it any more, or it goes
            # to a full disk.  The exit code says what happened to the work.
            if exc.errno not in (errno.EIO, errno.EPIPE):
                _say(f"pyvbak: note: the {_command[0] or 'command'} completed, but its result could not be "
                     f"written to the output: {exc.strerror or exc}")
            return 0
        if exc is _stdout_failed[0] and not os.environ.get(DEBUG_ENV):
            # the work of a command that changes nothing is its output ("committed" above
            # covers the others): lost or cut short, which only the user can judge
            _say(f"pyvbak: error: cannot write to standard output: {exc.strerror or exc}: the output of "
                 f"'{f'pyvbak {_command[0]}'.strip()}' is incomplete or lost")
            return OS_ERROR_EXIT
        if isinstance(exc, OSError) and not os.environ.get(DEBUG_ENV):
            # The environment refused something no code path turned into a PyvbakError
            # (permissions, a full or read-only disk, a vanished path): one line, the
            # traceback only on request.  Everything else is a bug: traceback.
            where = f": {exc.filename}" if exc.filename is not None else ""
            _say(f"pyvbak: error: {exc.strerror or exc}{where} (set {DEBUG_ENV}=1 for the traceback)")
            return OS_ERROR_EXIT
        raise
    finally:
        if isinstance(guard, _PipedStdout) and sys.stdout is guard:
            try:  # (a failed command's output: its outcome is decided, a stop only ends the output)
                guard.flush()
            except BaseException:  # noqa: BLE001 - a stop during the flush of a failed command's output
                guard._reader_gone()
            sys.stdout = guard._stream
        elif not isinstance(guard, _PipedStdout):
            if guard is not None and sys.stdout is guard:
                sys.stdout = guard._stream
            try:  # a file or terminal: what the command could not write (a full disk) fails here, once
                sys.stdout.flush()
            except Exception:  # noqa: BLE001 - already reported by the outcome above, or nothing to report
                _drop_pending_output(sys.stdout)
        # The command is over: a stop from here on only ends what is still being written.
        # The notes are said while this process's handlers are in place - under the
        # exit's SIG_IGN, a note waiting on a full stderr pipe nobody read (2>&1) hung the
        # process for good.
        interrupts.begin_finishing()
        noted = interrupts.noted_names()
        if noted and _failing[0]:
            _say(f"pyvbak: note: {' and '.join(dict.fromkeys(noted))} arrived as the command was ending: the "
                 f"outcome above stands")
        elif noted:
            _say(f"pyvbak: note: {' and '.join(dict.fromkeys(noted))} arrived after the work was committed: "
                 f"it was finished and cleaned up instead of stopped")
        for signum, handler in previous.items():
            # ``exiting`` (the console script, which exits with the code returned): the
            # command is over, a signal from now on changes nothing - its default action
            # killed a backup that had succeeded, exit -15 instead of 0, in the ~10 ms of
            # the interpreter's exit
            signal.signal(signum, signal.SIG_IGN if exiting else handler)
        interrupts.end()


def _click_exception_types() -> tuple[type, ...]:
    """Typer >= 0.20 raises the exceptions of its vendored click (``typer._click``), which
    are not ``click.exceptions.ClickException``: match both, or usage errors escape as
    tracebacks with exit code 1."""
    types: list[type] = []
    try:  # typer < 0.20 depends on click; later ones vendor it and need not install click
        import click
    except ImportError:
        pass
    else:
        types.append(click.exceptions.ClickException)
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        types.append(vendored.ClickException)
    return tuple(types)

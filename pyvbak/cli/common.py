"""What every command shares: finding the repository, printing, progress."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import typer

from ..errors import UsageError

#: upper bound of --threads: the pipelines' memory grows with their threads (a backup's
#: chunk jobs ~16 MiB per worker, 4 workers per thread for NBD sources)
MAX_THREADS = 256

REPO_HELP = ("Repository path (or PYVBAK_REPO); default: the repository in your data directory (created by the "
             "first backup or demo, or by 'pyvbak init').")
RepoOption = typer.Option(None, "--repo", "-r", help=REPO_HELP, envvar="PYVBAK_REPO", show_envvar=True)
JsonOption = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
NoLockOption = typer.Option(
    False, "--no-lock",
    help="Read without taking the repository's shared lock: for a repository on read-only storage. "
    "Nothing may prune it meanwhile.",
)


def maybe_lock(repo, no_lock: bool, purpose: str):
    """The shared lock a reader takes, or nothing with --no-lock."""
    from contextlib import nullcontext

    return nullcontext() if no_lock else repo.lock(purpose=purpose, clean_stale=False, reader=True)


def open_repository(location: str | None, *, create_default: bool = False):
    """The repository named by --repo/PYVBAK_REPO, or the default one.  Only commands that
    store something (backup, demo) create the default repository on first use: a verify
    that created an empty one reported success, and a restore said "using" it and then
    that it was no repository."""
    from ..errors import RepositoryError
    from ..repo.cache import make_private_dirs
    from ..repo.repository import Repository

    if location == "" or (location is None and os.environ.get("PYVBAK_REPO") == ""):  # (click drops an empty one)
        # an unset shell variable ('--repo "$REPO"' in a cron job) meant the default
        # repository, created and filled in the user's home
        raise UsageError("the repository path is empty (--repo or PYVBAK_REPO): give the repository's path, "
                         "or leave both out for the default repository")
    if location:
        refuse_memory(location)
        return _opened(Repository.open(location))
    path = checked_default_repository_path()
    # (config, or its copy alone: a repository whose config was lost is opened from it)
    exists = lambda: any(os.path.exists(os.path.join(path, n)) for n in ("config", "config.copy"))  # noqa: E731
    if not exists() and not create_default:
        raise RepositoryError(f"no repository given and the default one ({path}) does not exist yet: give "
                              "--repo REPO or set PYVBAK_REPO ('pyvbak backup' creates the default one)")
    if not exists():
        try:
            make_private_dirs(path)  # (a repository holds the VMs' disks: 0700, its missing parents too)
        except OSError as exc:
            raise UsageError(f"cannot create the default repository at {path}: {exc.strerror}; "
                             "give --repo REPO or set PYVBAK_REPO") from None
        try:
            repo = Repository.init(path)
        except RepositoryError:
            if not exists():
                raise
            # another pyvbak command created it between the check and the init: use it
        else:
            info(f"created the default repository at {path}")
            return _opened(repo)
    info(f"using the default repository at {path}")
    return _opened(Repository.open(path))


def _opened(repo):
    """``repo``, after the warnings every command that opens it gives: its config read from
    the copy, its local cache not used."""
    if repo.config_problem is not None:
        info(f"warning: {repo.location}/config is {repo.config_problem}: read its copy config.copy (the next "
             f"backup, or 'pyvbak verify --repair', puts config back)")
    return _warn_if_cache_unused(repo)


def checked_default_repository_path() -> str:
    """The default repository's path, once it passes the rules of private directories:
    whoever can write it can delete the backups in it, or put others there."""
    from ..repo.cache import home_problem, untrusted_dir_reason
    from ..repo.repository import default_repository_path

    path = default_repository_path()
    # (under XDG_DATA_HOME when that is absolute; else under the home directory, which must
    # be one: HOME=/nonexistent-home made a home tree under /, and no HOME at all ./~)
    problem = None if os.path.isabs(os.environ.get("XDG_DATA_HOME", "")) else home_problem()
    if problem:
        raise UsageError(f"{problem}, so the default repository cannot be kept "
                         f"under it: give --repo REPO (or set HOME)")
    reason = untrusted_dir_reason(path)
    if reason:
        raise UsageError(f"the default repository {path} is not private: {reason}; {reason.advice()}, or give "
                         f"--repo REPO")
    return path


def _warn_if_cache_unused(repo):
    """``repo``, after one warning line when its local cache cannot be trusted (it is
    then not used: repo/cache.py, untrusted_cache_reason) or cannot be kept (a user
    tuning a slow nightly job is told: repo/cache.py, unusable_cache_reason)."""
    from ..repo.cache import cache_root, unusable_cache_reason, untrusted_cache_reason

    reason = untrusted_cache_reason(repo.config.repo_id)
    unusable = None if reason else unusable_cache_reason(repo.config.repo_id)
    if unusable:
        info(f"warning: not using the local cache: {unusable}; every run is slower without it: set PYVBAK_CACHE_DIR "
             f"to a directory you can write ('' for no cache)")
    if reason:
        # this repository's own directory in the cache root (a link there: the link)
        inside = os.path.dirname(reason.directory) in (cache_root(), os.path.realpath(cache_root()))
        fix = (f"move it out of the way ('mv {reason.directory} {reason.directory}.untrusted'): it is only a cache, "
               f"made again" if inside else reason.advice())
        info(f"warning: not using the local cache: {reason}; {fix}, or set PYVBAK_CACHE_DIR to a directory only "
             f"you can write ('' for no cache)")
    return repo


def refuse_memory(location: str) -> None:
    """``memory://`` repositories are the test suite's: from the command line one would
    take a backup and vanish with the process (init said "created")."""
    if location.startswith("memory://"):
        raise UsageError(f"{location} is an in-memory repository, gone when this command ends: give a directory "
                         f"(or file:///PATH)")


class _OutputStopped(BaseException):
    """A stop request (SIGTERM, SIGHUP, Ctrl-C) that arrived, after the work was
    committed (or the outcome decided), while output waited on a full pipe that nobody
    reads: it ends that output (the process hung there, the stop only noted).  Raised by cli.main's signal handlers while ``_writing_output`` is set."""


#: [a write of the command's output to a piped stdout (cli.main's _PipedStdout) is under
#: way]: the signal handlers ask
_writing_output = [False]
#: [a line on stderr is under way (write_line)]: a stop noted while it waits ends it if
#: it is the command's second stop request at least (a first one alone may just have
#: landed while a line went out, which must not lose the error line; after the first,
#: the line that says what it did waits for a reader that only paused)
_writing_line = [False]


def _drop_pending_output(stream) -> None:
    """What is left in ``stream``'s buffer, flushed at the interpreter's exit, goes nowhere
    quietly: its descriptor now points at /dev/null (a failed flush there was "Exception
    ignored" and exit 120, whatever the command's outcome)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, AttributeError, ValueError):  # (no descriptor: a test's capture, which does not fail)
        pass


def _writable_now(stream) -> bool:
    """Would a write to ``stream`` go out now (a pipe with room, a file, a terminal not
    held)?  True for a stream without a descriptor (a test's capture)."""
    import select

    try:
        return bool(select.select([], [stream.fileno()], [], 0)[1])
    except (OSError, AttributeError, ValueError):
        return True


def write_line(stream, line: str) -> None:
    """``line`` on ``stream`` (stderr: warnings, notes, the error line) - which a hangup
    may have closed (EIO, EPIPE: dropped), or a reader may have stopped reading: once the
    outcome is decided, a second stop request while the line waits ends this output (a
    stopped command writing its error line into a full pipe nobody read hung);
    before, a stop ends the command as anywhere else, and the line is still written (a
    reader that only paused - a full pipe, a terminal held with Ctrl-S - gets it later).
    One line, always: a path's control characters are shown escaped (errors.one_line)."""
    from .. import interrupts
    from ..errors import one_line

    if interrupts.stops_seen() >= 2 and not _writable_now(stream):
        # asked to stop twice already (the second before this line began): not another wait
        _drop_pending_output(stream)
        return
    _writing_line[0] = True
    try:
        print(one_line(line), file=stream, flush=True)
    except (OSError, ValueError):
        pass
    except _OutputStopped:
        _drop_pending_output(stream)
    finally:
        _writing_line[0] = False


def info(message: str) -> None:
    write_line(sys.stderr, message)


def say(line: str) -> None:
    """One line of a command's human output on stdout, its control characters escaped as
    on stderr (errors.one_line): a path holding a newline printed two lines, the second
    looking like another message."""
    from ..errors import one_line

    print(one_line(line))


def emit_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


@contextmanager
def progress_bar(description: str, enabled: bool):
    """A rich progress bar (rate, ETA) on stderr when it is a terminal; a no-op callback
    otherwise.  On stderr, not rich's default stdout: ``pyvbak backup … > log`` from a
    terminal showed no progress and began the log with the bar's blank line."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update

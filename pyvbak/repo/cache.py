"""The local cache: derived data about repositories, kept on the machine running pyvbak.

The repository is the truth; everything here can be deleted at any time and is rebuilt
(docs/ARCHITECTURE.md, "Local cache").  One directory per repository id under
``cache_root()``.  This module holds the root and the snapshot-metadata cache; the digest
index cache is in digest_index.py.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass

from ..processes import scope_token, start_time, temp_writer_alive

CACHE_ENV = "PYVBAK_CACHE_DIR"
SNAPSHOTS_FILE = "snapshots.json"
SNAPSHOTS_FORMAT = "pyvbak-snapshot-metadata-cache-v1"
SEEN_INDEXES_FILE = "pack-indexes-seen"
SEEN_INDEXES_FORMAT = "pyvbak-pack-indexes-seen-v1"
_INDEX_NAME = re.compile(r"index/[0-9a-f]{64}")
#: the cache directories of repositories not used for this long are removed (a repository
#: deleted or moved elsewhere would otherwise leave its cache behind for ever)
EXPIRE_SECONDS = 30 * 86400
#: how often that removal looks through the root: its mtime stamp lets every other
#: process skip a scan that costs a stat per directory (2165 directories on a machine
#: that runs the test suite: 7-22 ms of every backup; bench/RESULTS.md "Per-backup fixed
#: costs in a large repository", "Cache-expiry scan")
EXPIRE_CHECK_SECONDS = 86400
EXPIRE_STAMP = "expiry-checked"
_REPO_DIR = re.compile(r"[0-9a-f]{32}")
_expired_once = False


def home_problem() -> str | None:
    """Why the home directory cannot hold pyvbak's directories (the cache, the QEMU work
    dir, the default repository), or None.  No HOME and no passwd entry: "~" stays "~",
    and a directory of that name was made under whatever directory the command ran in; a
    home that does not exist (HOME=/nonexistent-home) was made, a home tree under /."""
    home = os.path.expanduser("~")
    if not os.path.isabs(home):
        return "there is no home directory (no HOME, and no passwd entry for this user)"
    if not os.path.isdir(home):
        return f"the home directory {home} {'is not a directory' if os.path.exists(home) else 'does not exist'}"
    return None


def cache_root() -> str | None:
    """$PYVBAK_CACHE_DIR (absolute), else $XDG_CACHE_HOME/pyvbak, else ~/.cache/pyvbak;
    None when $PYVBAK_CACHE_DIR is set but empty (no cache), or when there is no home
    directory to find (no HOME and no passwd entry: "~" stayed "~", and the cache went
    to ./~/.cache under whatever directory the command ran in) or it does not exist
    (HOME=/nonexistent-home made /nonexistent-home/.cache/pyvbak)."""
    root = os.environ.get(CACHE_ENV)
    if root is not None:
        return os.path.abspath(root) if root else None
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative path is invalid and ignored
        if home_problem():
            return None
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyvbak")


def unusable_cache_reason(repo_id: str) -> str | None:
    """Why the repository's cache cannot be kept here, or None when it can (or when there
    is no cache by choice, $PYVBAK_CACHE_DIR='', or it is not trusted: see
    untrusted_cache_reason).  Every write to the cache is best effort (it is only
    slower without one), so without a word ``PYVBAK_CACHE_DIR=/dev/null``, a regular file
    or /proc cost every run its cache.  Makes nothing that stays: where the directory does
    not exist yet, making one beside where it goes (removed at once) is the one test that
    holds for root, who passes every permission check, on /proc."""
    if cache_root() is None and os.environ.get(CACHE_ENV) is None:  # (no cache, and not by choice)
        return home_problem()
    d = repo_cache_dir(repo_id)
    if d is None:
        return None
    existing = d
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a directory"
    if existing == d:
        return None if os.access(d, os.W_OK | os.X_OK) else f"{d} is not writable"
    _drop_stale_probes(existing)
    # named after its maker, like a temp file: a kill -9 between the two calls below
    # leaves it, and the next probe of the same directory removes it
    pid = os.getpid()
    probe = os.path.join(existing, f"{PROBE_PREFIX}{pid}-{start_time(pid) or 0}-{scope_token()}-{secrets.token_hex(6)}")
    try:
        os.mkdir(probe, 0o700)
        os.rmdir(probe)
    except OSError as exc:
        return f"no directory can be made in {existing} ({exc.strerror})"
    return None


#: the directories unusable_cache_reason makes and removes at once, to test where it can
PROBE_PREFIX = ".pyvbak-probe-"


def _drop_stale_probes(path: str) -> None:
    """Remove the empty probe directories of makers killed with SIGKILL in ``path`` (a
    live maker's are kept: its pid, start time and scope are in the name; one named as an
    older pyvbak named them, pid and random part alone, once a minute old).  Best effort."""
    try:
        entries = [e for e in os.scandir(path) if e.name.startswith(PROBE_PREFIX)]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        parts = entry.name[len(PROBE_PREFIX):].split("-")
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
            # PID-START-SCOPE-RANDOM, or an older pyvbak's PID-RANDOM
            named = parts[0].isdigit() and (len(parts) == 2 or (len(parts) == 4 and parts[1].isdigit()))
            if named and _maker_gone(parts, mtime, now):
                os.rmdir(entry.path)  # (only if empty: nothing of anyone else's is removed)
        except OSError:
            pass


def make_private_dirs(path: str) -> None:
    """``os.makedirs(path, 0o700, exist_ok=True)`` with every directory it creates 0700,
    the missing parents too (makedirs gives its mode to the last one only): under a umask
    of 000 a missing ~/.cache was made 0777, and anyone on the host could then replace
    pyvbak's directories in it.  OSError naming the path that
    failed: FileExistsError when ``path`` itself is something else than a directory,
    NotADirectoryError when one of its parents is."""
    missing = []
    target = d = os.path.abspath(path)
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if os.path.isdir(d):
                continue  # made meanwhile by another process
            if d == target:
                raise
            # a file (or a dangling link) where a parent should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), d) from None


@dataclass(frozen=True)
class Distrust:
    """Why a directory pyvbak keeps private cannot be trusted: ``directory`` (the path
    itself or one above it, links resolved) ``why`` ("is writable by others (mode
    0777)"), and whose it is."""

    directory: str
    why: str
    owner: int

    def __str__(self) -> str:
        return f"{self.directory} {self.why}"

    def advice(self) -> str:
        """What to do about it, for the directory named (never "chown it to yourself":
        root running with a user's HOME would take the user's home directory)."""
        euid = os.geteuid()
        if self.owner != euid and euid == 0:
            return f"it is user id {self.owner}'s: run pyvbak as that user, or as root with root's own HOME (sudo -H)"
        if self.owner != euid:
            return f"it is user id {self.owner}'s: use a directory of your own"
        return f"take write access from the others ('chmod go-w {self.directory}')"


def untrusted_dir_reason(path: str) -> Distrust | None:
    """Why the directory ``path`` cannot be trusted to hold this user's private files, or
    None when it can.  Whoever can write ``path`` (or rename it, by writing one of its
    parents) can plant a cached index that makes backups skip blocks, or a socket a
    backup connects to: a cache root left 0777 by a umask of 000, another user's
    directory, a PYVBAK_WORK_DIR in a shared place.  The rules are OpenSSH's StrictModes
    for ~/.ssh, with Debian's allowance for a user's private group:

    * ``path`` itself (when it exists): this user's, writable by no one else but this
      user's own private group;
    * each existing directory above it, links resolved and as given: this user's or root's (in a user
      namespace also the overflow id the host's root shows as), and writable by no one
      else unless its sticky bit is set (/tmp) or the group that can write it is this
      user's own private group.

    A part of the path that does not exist yet, or cannot be reached (EACCES), is not
    judged: make_private_dirs makes it 0700, or fails naming it."""
    euid = os.geteuid()
    trusted_owners = {euid, 0} | ({_unmapped_uid()} - {None})
    real = os.path.realpath(path)
    parts = [real]
    while os.path.dirname(parts[-1]) != parts[-1]:
        parts.append(os.path.dirname(parts[-1]))
    # and the directories the path goes through as given: a link to a private directory,
    # kept in a directory anyone can write, can be replaced by anyone
    on_real_path = set(parts)
    given = d = os.path.abspath(path)
    while os.path.dirname(d) != d:
        d = os.path.dirname(d)
        if d not in on_real_path:
            parts.append(d)
    for i, d in enumerate(parts):
        below = real if d in on_real_path else given
        try:
            st = os.stat(d)
        except OSError:
            continue  # missing, a file in the way, unreachable: make_private_dirs names it
        if not stat.S_ISDIR(st.st_mode):
            return None  # (not a directory: make_private_dirs says so, naming it)
        mode = stat.S_IMODE(st.st_mode)
        group_write = mode & 0o020 and not _private_group(st.st_gid, euid)
        if i == 0:
            if st.st_uid != euid:
                return Distrust(d, f"belongs to user id {st.st_uid}, not to this user ({euid})", st.st_uid)
            if mode & 0o002 or group_write:
                return Distrust(d, f"is writable by others (mode {mode:04o})", st.st_uid)
            continue
        if st.st_uid not in trusted_owners:
            return Distrust(d, f"(a directory above {below}) belongs to user id {st.st_uid}", st.st_uid)
        if (mode & 0o002 or group_write) and not mode & stat.S_ISVTX:
            who = "everyone" if mode & 0o002 else f"group {st.st_gid}"
            return Distrust(d, f"(a directory above {below}) is writable by {who} (mode {mode:04o})", st.st_uid)
    return None


@functools.lru_cache(maxsize=1)
def _unmapped_uid() -> int | None:
    """The id files of unmapped owners show as inside a user namespace (rootless
    containers, ``unshare -r``): there the host's root-owned directories carry it.  None
    outside one (then it is a real account, "nobody", and no owner to trust).  Read once
    per process: a process does not change namespaces under pyvbak."""
    try:
        with open("/proc/self/uid_map") as f:
            if f.read().split() == ["0", "0", "4294967295"]:
                return None
        with open("/proc/sys/kernel/overflowuid") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _private_group(gid: int, uid: int) -> bool:
    """Is ``gid`` the user's own group: its primary group, named after it, holding no
    other user?"""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(uid)
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return user.pw_gid == gid and set(group.gr_mem) <= {user.pw_name} and group.gr_name == user.pw_name


def untrusted_cache_reason(repo_id: str | None = None) -> Distrust | None:
    """untrusted_dir_reason for the cache root and, given ``repo_id``, for that
    repository's directory in it (another user's, put there while the root was open,
    would hold their snapshot descriptions and indexes); None when there is no cache.
    While it has a reason that cache is not used at all (every backup reads and hashes
    as on a new machine) and the CLI warns, naming the directory.  Asked on every use, not
    once per process (a few stat calls, ~20 us): a long-running job runner sees a fix, or
    a change for the worse, at its next use."""
    root = cache_root()
    if not root:
        return None
    reason = untrusted_dir_reason(root)
    if reason is None and repo_id is not None and _REPO_DIR.fullmatch(repo_id):
        d = os.path.join(root, repo_id)
        try:
            st = os.lstat(d)
        except OSError:
            return None  # not made yet (make_private_dirs makes it 0700), or unreachable
        if stat.S_ISLNK(st.st_mode):  # pyvbak never makes one there: whoever did chose where it leads
            return Distrust(d, "is a symbolic link, which pyvbak never makes", st.st_uid)
        reason = untrusted_dir_reason(d)
    return reason


def repo_cache_dir(repo_id: str) -> str | None:
    root = cache_root()
    if not root:
        return None
    if not _REPO_DIR.fullmatch(repo_id):  # a second line of defence: one plain name, never a path
        raise ValueError(f"repository id {repo_id!r} is not 32 hex digits")
    if untrusted_cache_reason(repo_id):
        return None
    return os.path.join(root, repo_id)


def mark_used(repo_id: str) -> None:
    """Note that the repository's cache is in use (its directory's mtime) and remove the
    cache directories of repositories unused for EXPIRE_SECONDS: once per process at
    most, and only when the root's EXPIRE_STAMP is older than EXPIRE_CHECK_SECONDS (or
    cannot be written: then once per process, as without a stamp).  Only directories
    named like a repository id are touched (the QEMU work dir, the stamp and anything
    else under the root are not)."""
    global _expired_once
    d = repo_cache_dir(repo_id)
    if d is None:
        return
    try:
        os.utime(d)
        if os.stat(d).st_mode & 0o077:  # made by an earlier pyvbak (0755): private now
            os.chmod(d, 0o700)
    except OSError:
        pass
    if _expired_once:
        return
    _expired_once = True
    root = os.path.dirname(d)
    now = time.time()
    if not _expiry_due(os.path.join(root, EXPIRE_STAMP), now):
        return
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if entry.name == repo_id or not _REPO_DIR.fullmatch(entry.name):
            continue
        try:
            if entry.is_dir(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > EXPIRE_SECONDS:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass


def _expiry_due(stamp: str, now: float) -> bool:
    """Whether the expiry scan runs now; if so the stamp says it ran (set before the
    scan: two processes starting at once scan twice at worst, which is harmless)."""
    try:
        if now - os.stat(stamp, follow_symlinks=False).st_mtime < EXPIRE_CHECK_SECONDS:
            return False
    except OSError:
        pass
    try:
        fd = os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.utime(fd, (now, now))
        finally:
            os.close(fd)
    except OSError:
        pass  # a root this process cannot write: the scan runs (once per process)
    return True


#: a save's temp file older than this is a killed process's (a save takes milliseconds)
STALE_TEMP_SECONDS = 60


class SnapshotMetaCache:
    """Parsed snapshot metadata by object name.

    Snapshot metadata objects are written create-only under unique names and only ever
    deleted (forget), so a cached entry is right for as long as its name is listed: the
    caller passes the current listing, entries not in it are dropped, names not cached
    are read.  Without it every backup reads every snapshot's metadata to find its parent
    (5000 snapshots: 70 ms locally, 5000 requests on an object store).  The file is
    replaced atomically; a damaged or foreign one is ignored.
    """

    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        d = repo_cache_dir(repo_id)
        self.path = os.path.join(d, SNAPSHOTS_FILE) if d else None

    def load(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        mark_used(self.repo_id)
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
        except (OSError, ValueError, RecursionError):
            return {}
        if not (isinstance(doc, dict) and doc.get("format") == SNAPSHOTS_FORMAT and doc.get("repository") == self.repo_id):
            return {}
        metas = doc.get("metas")
        return {k: v for k, v in metas.items() if isinstance(v, dict)} if isinstance(metas, dict) else {}

    def save(self, metas: dict[str, dict]) -> None:
        """Best effort: a cache that cannot be written is only slower."""
        if self.path is None:
            return
        # dumps, not dump: json.dump streams through the pure-Python encoder (2000
        # snapshots: 43 ms vs 16 ms), and this runs on every backup's first listing
        _write_private(self.path, json.dumps({"format": SNAPSHOTS_FORMAT, "repository": self.repo_id,
                                              "metas": metas}).encode())


class SeenPackIndexes:
    """The pack index names this host last listed in the repository.

    Pack index objects leave storage through a prune or a repair, or by loss (a file
    deleted by hand, a storage fault).  A lost one leaves its packs unindexed: their
    blocks are missing to every restore, and a backup carries the parent's records of them
    on unread, committing snapshots that do not restore, until a crash recovery, a prune
    or ``verify --repair`` indexes the packs again.  A
    backup that finds a name gone looks for packs no index names
    (``Repository.recover_leftovers``): one listing of ``packs/`` after each prune made
    elsewhere, none otherwise.  Best effort, like the other caches: without a cache
    directory nothing is remembered, and verify still finds such packs."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        d = repo_cache_dir(repo_id)
        self.path = os.path.join(d, SEEN_INDEXES_FILE) if d else None

    def _head(self) -> bytes:
        return f"{SEEN_INDEXES_FORMAT} {self.repo_id}\n".encode()

    @staticmethod
    def _ids(names) -> set[bytes]:
        return {bytes.fromhex(n[6:]) for n in names if _INDEX_NAME.fullmatch(n)}

    def _remembered(self) -> set[bytes] | None:
        """The ids remembered; None without a cache or a readable file of ours."""
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except OSError:
            return None
        head = self._head()
        body = raw[len(head):]
        if not raw.startswith(head) or len(body) % 32:
            return None  # damaged or foreign
        return {body[i : i + 32] for i in range(0, len(body), 32)}

    def gone(self, names) -> bool | None:
        """Whether a pack index remembered is not among ``names`` (the listing now) - also
        when nothing is remembered (a first run on this host, a damaged file): nothing
        says none was lost, and one look costs what a prune elsewhere does.
        None without a cache directory: nothing can be remembered."""
        if self.path is None:
            return None
        remembered = self._remembered()
        return remembered is None or not remembered <= self._ids(names)

    def remember(self, names) -> None:
        """Remember ``names`` (the listing after a look for unindexed packs) in place of
        what was remembered."""
        if self.path is not None:
            _write_private(self.path, self._head() + b"".join(sorted(self._ids(names))))

    def add(self, names) -> None:
        """Remember ``names`` too (what a backup wrote): forgetting nothing remembered,
        which only a look for unindexed packs may (a concurrent backup's names stay)."""
        remembered = self._remembered()
        if self.path is not None and remembered is not None:
            _write_private(self.path, self._head() + b"".join(sorted(remembered | self._ids(names))))


def _write_private(path: str, data: bytes) -> None:
    """Replace the cache file ``path`` atomically, private to the user (0600 in a 0700
    directory: VM names, sizes and digests of disks are the repository's secrets too).
    Best effort: a cache that cannot be written is only slower."""
    # named after its writer (pid, start time, scope): a killed one's is recognised
    tmp = f"{path}.{os.getpid()}-{start_time(os.getpid()) or 0}-{scope_token()}-{secrets.token_hex(6)}.tmp"
    try:
        make_private_dirs(os.path.dirname(path))
        _drop_stale_temps(path)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass
    finally:  # also on Ctrl-C: no temp file left behind
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _drop_stale_temps(path: str) -> None:
    """Temp files of saves killed with SIGKILL (no finally ran): each is the size of the
    file (hundreds of KiB with hundreds of snapshots), one more per such kill.  A live
    writer's (its pid, start time and scope in the
    name: processes.temp_writer_alive) is kept; one named otherwise (an older pyvbak)
    once older than a minute (a save takes milliseconds) is not."""
    d, base = os.path.split(path)
    now = time.time()
    for entry in os.scandir(d):
        if not (entry.name.startswith(base + ".") and entry.name.endswith(".tmp")):
            continue
        parts = entry.name[len(base) + 1 : -len(".tmp")].split("-")
        try:
            if _maker_gone(parts, entry.stat(follow_symlinks=False).st_mtime, now):
                os.unlink(entry.path)
        except OSError:
            pass


def _maker_gone(parts: list[str], mtime: float, now: float) -> bool:
    """Whether the process that named a temp file or probe directory ``PID-START-SCOPE-
    RANDOM`` (``parts``, split at "-") is gone (processes.temp_writer_alive); a name
    without them (an older pyvbak's) goes once STALE_TEMP_SECONDS old."""
    if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
        return not temp_writer_alive(int(parts[0]), parts[2], mtime, int(parts[1]) or None)
    return now - mtime > STALE_TEMP_SECONDS

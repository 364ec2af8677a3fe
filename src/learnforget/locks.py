"""Exclusive locks that hold across the nodes of a cluster (learnforget.files re-exports them).

Where the file system's ``flock`` excludes across nodes (local disks, NFS with its default
``local_lock=none``: flock is sent to the server as a whole-file lock since Linux 2.6.12,
Lustre mounted ``-o flock``, CephFS, GPFS) a lock is an advisory ``fcntl.flock`` that the OS
drops when its process dies. Elsewhere flock either raises (Lustre's default ``noflock``:
ENOSYS) or excludes only the processes of one node (Lustre ``localflock``, NFS
``local_lock=flock|all`` or ``nolock``, GFS2 ``localflocks``, BeeGFS without
``tuneUseGlobalFileLocks``), and POSIX ``fcntl`` locks follow the same mount options there, so
they are no way out. There the lock is a file created with ``O_CREAT|O_EXCL`` (atomic on NFSv3+
and Lustre: the server or metadata server decides) beside the flock file, named
``<lock>.excl``, holding ``host pid slurm-job time token``. A daemon thread touches it every
HEARTBEAT_S seconds; a holder whose heartbeat is older than STALE_S seconds, or that ran on
this host and is gone, or that was this SLURM job before a requeue (a lower
SLURM_RESTART_COUNT: SLURM killed that run), is taken over. Takeover is serialised by a second
``O_EXCL`` file (``<lock>.excl.break``) and re-reads the holder under it, so two processes
never both take over one stale lock.

Which lock a path gets (``lock_kind``): the mount holding it, read from /proc/self/mountinfo,
and the environment variable LEARNFORGET_LOCK (auto | flock | file) to force either. A flock
call failing with an error other than "held" (ENOSYS, EOPNOTSUPP, ENOLCK, EINVAL) also moves
that path to the lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from learnforget.errors import ConfigError

LOCK_ENV = "LEARNFORGET_LOCK"  # auto (default) | flock | file
MOUNTINFO = Path("/proc/self/mountinfo")
HEARTBEAT_S = 15.0  # the lock file's mtime is refreshed this often while held
STALE_S = 120.0  # a lock file not refreshed for this long is taken over
WAIT_POLL_S = 0.5  # a waiting lock (file_lock) retries this often
FLOCK_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}
_FALLBACK: dict[str, str] = {}  # mount point -> why flock failed there at run time


# ----------------------------------------------------------------------------- mounts

@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    options: frozenset[str]

    def option(self, key: str) -> str | None:
        """The value of option `key=value` (or "" for a bare `key`), None when absent."""
        for o in self.options:
            k, _, v = o.partition("=")
            if k == key:
                return v
        return None


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")


def read_mounts(table: Path | None = None) -> list[Mount]:
    """The mount table: /proc/self/mountinfo lines (``... mountpoint opts ... - fstype src
    superopts``) or /proc/mounts lines (``src mountpoint fstype opts 0 0``); mount and super
    options merged."""
    try:
        text = Path(table or MOUNTINFO).read_text()
    except OSError:
        return []
    mounts = []
    for line in text.splitlines():
        f = line.split()
        if " - " in line:
            pre, _, post = line.partition(" - ")
            pre_f, post_f = pre.split(), post.split()
            if len(pre_f) < 6 or len(post_f) < 2:
                continue
            opts = pre_f[5].split(",") + (post_f[2].split(",") if len(post_f) > 2 else [])
            mounts.append(Mount(_unescape(pre_f[4]), post_f[0], frozenset(opts)))
        elif len(f) >= 4:
            mounts.append(Mount(_unescape(f[1]), f[2], frozenset(f[3].split(","))))
    return mounts


def mount_of(path: Path, table: Path | None = None) -> Mount | None:
    """The mount holding `path` (its nearest existing parent, symlinks resolved): the longest
    mount point above it, the later one of equal mount points (it shadows the earlier)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    p = p.resolve()
    best = None
    for m in read_mounts(table):
        pt = Path(m.point)
        if (p == pt or pt in p.parents) and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def flock_is_global(m: Mount | None) -> tuple[bool, str]:
    """Whether flock on mount `m` excludes across nodes, and why not."""
    if m is None:
        return True, ""
    where = f"{m.point} ({m.fstype})"
    if m.fstype == "lustre":
        if m.option("flock") is not None:
            return True, ""
        if m.option("localflock") is not None:
            return False, f"{where} is mounted localflock: flock excludes only this node"
        return False, (f"{where} lists neither flock nor localflock (noflock: flock raises "
                       "ENOSYS; a lock file is correct either way)")
    if m.fstype.startswith("nfs"):
        local = m.option("local_lock")
        if local in ("flock", "all"):
            return False, f"{where} is mounted local_lock={local}: flock excludes only this node"
        if m.option("nolock") is not None:
            return False, f"{where} is mounted nolock: locks exclude only this node"
        return True, ""
    if m.fstype == "gfs2" and m.option("localflocks") is not None:
        return False, f"{where} is mounted localflocks: flock excludes only this node"
    if m.fstype == "beegfs":
        return False, (f"{where}: BeeGFS flock excludes only this node unless the client sets "
                       "tuneUseGlobalFileLocks (not visible in the mount table)")
    return True, ""


def lock_kind(path: Path) -> tuple[str, str]:
    """("flock" | "file", reason) for a lock at `path` (LEARNFORGET_LOCK, the mount, and flock
    failures seen at run time)."""
    forced = os.environ.get(LOCK_ENV, "auto").strip().lower() or "auto"
    if forced not in ("auto", "flock", "file"):
        raise ConfigError(f"{LOCK_ENV}={forced!r} is not a lock kind (expected auto, flock or "
                          "file)")
    if forced != "auto":
        return forced, f"{LOCK_ENV}={forced}"
    m = mount_of(path)
    if m is not None and m.point in _FALLBACK:
        return "file", _FALLBACK[m.point]
    ok, why = flock_is_global(m)
    return ("flock", "") if ok else ("file", why)


def _flock_failed(path: Path, e: OSError) -> str:
    m = mount_of(path)
    why = (f"flock on {m.point if m else path} failed ({errno.errorcode.get(e.errno, e.errno)}: "
           f"{e.strerror})")
    _FALLBACK[m.point if m else str(path)] = why
    return why


# ----------------------------------------------------------------------------- the lock file

def _excl(path: Path) -> Path:
    return path.with_name(path.name + ".excl")


@dataclass
class Holder:
    host: str
    pid: int
    job: str
    token: str
    age_s: float

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder of lock file `path`, None when there is none (or it is being written)."""
        try:
            text = path.read_text()
            age = time.time() - path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        f = text.split()
        if len(f) < 5:  # created but not yet written: held (the creator writes it at once)
            return cls("?", -1, "-", text, age)
        return cls(f[0], int(f[1]) if f[1].isdigit() else -1, f[2], f[4], age)

    def stale(self, stale_s: float) -> str:
        """Why this holder is gone ("" while it holds)."""
        if self.age_s > stale_s:
            return f"heartbeat {self.age_s:.0f} s old (> {stale_s:.0f} s)"
        here = socket.gethostname()
        if self.host == here and self.pid > 0 and not _alive(self.pid):
            return f"process {self.pid} on {here} is gone"
        job, restart = slurm_run()
        held_job, _, held_restart = self.job.partition(".")
        if job and held_job == job and held_restart.isdigit() and int(held_restart) < restart:
            return f"it was SLURM job {job}'s run before its requeue"
        return ""


def slurm_run() -> tuple[str | None, int]:
    """(SLURM job id, how often SLURM requeued it): a requeued job keeps its id, and SLURM
    kills the earlier run before the next starts."""
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return os.environ.get("SLURM_JOB_ID"), int(restart) if restart.isdigit() else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LockFile:
    """An O_CREAT|O_EXCL lock file with a heartbeat and stale takeover (see the module doc)."""

    def __init__(self, path: Path, heartbeat_s: float | None = None,
                 stale_s: float | None = None):
        self.path = Path(path)
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_s = STALE_S if stale_s is None else stale_s
        self.token = secrets.token_hex(8)
        self.took_over = ""  # why the previous holder was judged gone, when one was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._break_stale():
                    continue
                return False
            try:
                job, restart = slurm_run()
                os.write(fd, (f"{socket.gethostname()} {os.getpid()} "
                              f"{f'{job}.{restart}' if job else '-'} {time.time():.0f} "
                              f"{self.token}\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=f"lock heartbeat {self.path.name}")
            self._thread.start()
            return True
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            h = Holder.read(self.path)
            if h is None or h.token != self.token:
                print(f"learnforget: warning: lost the lock {self.path} (taken over by "
                      f"{h.host + ' pid ' + str(h.pid) if h else 'nobody'})", file=sys.stderr,
                      flush=True)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _break_stale(self) -> bool:
        """Remove the lock file when its holder is gone; True when it was removed (or vanished)."""
        h = Holder.read(self.path)
        if h is None:
            return True
        why = h.stale(self.stale_s)
        if not why:
            return False
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            bfd = os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another process is taking over; a breaker left by a crash
            with contextlib.suppress(OSError):  # in these few lines is cleared when old
                if time.time() - breaker.stat().st_mtime > self.stale_s:
                    breaker.unlink()
            return False
        try:
            again = Holder.read(self.path)
            if again is None:
                return True
            if again.token != h.token or not again.stale(self.stale_s):
                return False
            self.path.unlink()
            self.took_over = f"took over {self.path} from {h.host} pid {h.pid}: {why}"
            print(f"learnforget: {self.took_over}", file=sys.stderr, flush=True)
            return True
        finally:
            os.close(bfd)
            with contextlib.suppress(FileNotFoundError):
                breaker.unlink()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        h = Holder.read(self.path)
        if h is not None and h.token == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def held_by_other(self) -> bool:
        h = Holder.read(self.path)
        return h is not None and h.token != self.token and not h.stale(self.stale_s)


# ----------------------------------------------------------------------------- the API

@dataclass
class Lock:
    """A held lock: an flock'd file descriptor or a LockFile."""

    path: Path
    kind: str
    reason: str
    fd: int | None = None
    file: LockFile | None = None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if self.file is not None:
            self.file.release()
            self.file = None


def try_lock(path: Path) -> Lock | None:
    """Take an exclusive lock on `path` without waiting: a Lock, or None when another process
    holds it. Release with `unlock` (or Lock.release)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind, why = lock_kind(path)
    if kind == "flock":
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return Lock(path, "flock", "", fd=fd)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            os.close(fd)
            if e.errno not in FLOCK_UNSUPPORTED:
                raise
            kind, why = "file", _flock_failed(path, e)
    lf = LockFile(_excl(path))
    if not lf.acquire():
        return None
    return Lock(path, "file", "; ".join(x for x in (why, lf.took_over) if x), file=lf)


def unlock(lock: Lock) -> None:
    lock.release()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` held while the block runs; waits for another holder."""
    path = Path(path)
    lock = None
    if lock_kind(path)[0] == "flock":
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            lock = Lock(path, "flock", "", fd=fd)
        except OSError as e:
            os.close(fd)
            if e.errno not in FLOCK_UNSUPPORTED:
                raise
            _flock_failed(path, e)
    while lock is None:
        if (lock := try_lock(path)) is None:
            time.sleep(WAIT_POLL_S)
    try:
        yield
    finally:
        lock.release()


def is_locked(path: Path) -> bool:
    """True while another process holds the lock on `path` (never takes it for long)."""
    path = Path(path)
    kind, _ = lock_kind(path)
    if kind == "flock" and path.exists():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno not in FLOCK_UNSUPPORTED:
                return False
            _flock_failed(path, e)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)
    elif kind == "flock":
        return False
    h = Holder.read(_excl(path))
    return h is not None and not h.stale(STALE_S)

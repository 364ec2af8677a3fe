"""The file primitives every stage uses: one atomic writer, one JSON reader, one lock.

A write goes to a temporary file beside its target, is fsynced and renamed over it, so a
reader sees the old file or the new one, never a part. Locks (learnforget.locks, re-exported
here) are advisory ``fcntl.flock`` locks, released by the OS when their process dies, where the
file system's flock excludes across nodes; elsewhere (Lustre noflock/localflock, NFS
local_lock) an O_EXCL lock file with a heartbeat and stale takeover.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from learnforget.errors import ConfigError
from learnforget.locks import Lock, file_lock, is_locked, try_lock, unlock  # noqa: F401 (the API)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28",
                   "os error 122")


class DiskFull(ConfigError):
    """A write hit a full file system or a quota (ENOSPC, EDQUOT): one line naming the path,
    the bytes it needs and the bytes free. Earlier files are left as they were."""


def is_disk_full(e: BaseException | None) -> bool:
    """The exception, or one it was raised from or during, is ENOSPC/EDQUOT. (torch.save
    raises a RuntimeError during the OSError; safetensors a SafetensorError that quotes it.)"""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS):
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the file system that holds `path` (or its nearest
    existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(path: Path, needed: int | None, e: BaseException | None = None,
              written: int | None = None) -> DiskFull:
    """The one-line DiskFull for a write of `needed` bytes (None: unknown; `written`: the bytes
    written before the disk filled, a lower bound) to `path`."""
    if isinstance(e, DiskFull):
        return e
    why = ("quota exceeded (EDQUOT)" if isinstance(e, OSError) and e.errno == errno.EDQUOT
           else "no space left on device (ENOSPC)")
    need = (f"needs about {needed:,} bytes" if needed else
            f"needs more than the {written:,} bytes written" if written else "needs more space")
    return DiskFull(f"disk full writing {path}: {why}: it {need}, {free_bytes(path):,} bytes are "
                    "free there; earlier files are intact: free space (or raise the quota), "
                    "then rerun the same command to resume")


@contextlib.contextmanager
def disk_full_guard(path: Path, needed: int | None = None) -> Iterator[None]:
    """An ENOSPC/EDQUOT (however a library wraps it) inside the block becomes a one-line
    DiskFull naming `path`; other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(path, needed, e) from e
        raise


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb", *, needed: int | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was; a full disk
    or quota is a one-line DiskFull naming `path` and `needed` (the bytes to be written, when
    the caller knows them). (Created with mode 0o666 & ~umask, unlike mkstemp's 0600.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = None
        with contextlib.suppress(OSError):
            written = os.path.getsize(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full(path, needed, e, written) from e
        raise


@contextlib.contextmanager
def atomic_dir(dest: Path, *, replace: bool = True, needed: int | None = None
               ) -> Iterator[Path]:
    """A folder built under a temporary name beside `dest` and renamed to `dest` when the block
    succeeds. The yielded path does not exist yet: the block creates it (``mkdir`` or a
    ``save_pretrained``). An existing `dest` is replaced (moved aside, then deleted) or, with
    ``replace=False``, kept: another process won the race and the new copy is dropped. On any
    exception nothing is renamed and the temporary folder (``.<name>.tmp-*``) is removed; a
    full disk or quota is a one-line DiskFull naming `dest` (and `needed` bytes, if given)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build = work / dest.name
        with disk_full_guard(dest, needed):
            yield build
        if dest.exists():
            if not replace:
                return
            os.replace(dest, work / "old")
        os.replace(build, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    data = text.encode()
    with atomic_open(path, "wb", needed=len(data)) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any, *, sort_keys: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def first_line(e: BaseException | None) -> str:
    """An exception's message, first line only (for one-line errors)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_json(path: Path) -> dict[str, Any] | None:
    """The parsed file, or None when it does not exist. A file that does not parse (cut short,
    hand-edited) is a ConfigError naming it: for records a stage cannot recompute (run.json)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} is not valid JSON ({first_line(e)}): repair or remove it "
                          "(a file cut short by a crash or a full disk)") from e


def read_result(path: Path) -> dict[str, Any] | None:
    """A result file a stage can recompute (eval scores, spectra, base cache): the parsed file,
    or None when it is missing or does not parse; the latter with a one-line warning."""
    try:
        return read_json(path)
    except ConfigError as e:
        print(f"learnforget: warning: {path} does not parse ({first_line(e.__cause__)}); "
              "recomputing it", file=sys.stderr, flush=True)
        return None

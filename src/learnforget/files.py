"""The file primitives every stage uses: one atomic writer, one JSON reader, one lock.

A write goes to a temporary file beside its target, is fsynced and renamed over it, so a
reader sees the old file or the new one, never a part. Locks are advisory ``fcntl.flock``
locks, released by the OS when their process dies: a killed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
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


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was. (Created
    with mode 0o666 & ~umask, unlike mkstemp's 0600.)
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(dest: Path, *, replace: bool = True) -> Iterator[Path]:
    """A folder built under a temporary name beside `dest` and renamed to `dest` when the block
    succeeds. The yielded path does not exist yet: the block creates it (``mkdir`` or a
    ``save_pretrained``). An existing `dest` is replaced (moved aside, then deleted) or, with
    ``replace=False``, kept: another process won the race and the new copy is dropped. On any
    exception nothing is renamed and the temporary folder (``.<name>.tmp-*``) is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build = work / dest.name
        yield build
        if dest.exists():
            if not replace:
                return
            os.replace(dest, work / "old")
        os.replace(build, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


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


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` held while the block runs; waits for another holder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def try_lock(path: Path) -> int | None:
    """Take an exclusive lock on `path` without waiting: its file descriptor, or None when
    another process holds it. Release with `unlock`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def is_locked(path: Path) -> bool:
    """True while another process holds the lock on `path` (never takes it for long)."""
    if not Path(path).exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)

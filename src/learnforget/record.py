"""The run folder on disk, the source of truth: atomic writes, a lock, and run metadata."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from learnforget.errors import ConfigError

PACKAGES = ("learnforget", "torch", "transformers", "peft", "bitsandbytes", "accelerate",
            "hydra-core", "wandb", "lm_eval", "datasets", "numpy")


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


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """The parsed file, or None when it does not exist. A file that does not parse (cut short,
    hand-edited) is a ConfigError naming it: for records a stage cannot recompute (run.json)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} is not valid JSON ({_first_line(e)}): repair or remove it "
                          "(a file cut short by a crash or a full disk)") from e


def read_result(path: Path) -> dict[str, Any] | None:
    """A result file a stage can recompute (eval scores, spectra, base cache): the parsed file,
    or None when it is missing or does not parse; the latter with a one-line warning."""
    try:
        return read_json(path)
    except ConfigError as e:
        print(f"learnforget: warning: {path} does not parse ({_first_line(e.__cause__)}); "
              "recomputing it", file=sys.stderr, flush=True)
        return None


def _first_line(e: BaseException | None) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict[str, Any]:
    """The harness's git commit (and whether its tree had uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def meta_info() -> dict[str, Any]:
    import torch

    return {
        "versions": package_versions(),
        "git": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cuda": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


class RunLock:
    """An exclusive, non-blocking lock on a run folder: one process trains a run at a time.

    The OS releases it when the process dies, so a killed run never leaves a stale lock.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_same_run(run_dir: Path, config_hash: str) -> None:
    """Refuse to reuse a folder that holds a different run (e.g. a hand-set run_name)."""
    info = read_json(run_dir / "run.json")
    if info and info.get("config_hash") not in (None, config_hash):
        raise ConfigError(
            f"run folder {run_dir} holds a different run (config hash "
            f"{str(info.get('config_hash'))[:12]} vs {config_hash[:12]}): choose another run_name "
            "or experiment_name")

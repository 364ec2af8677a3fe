"""The run folder on disk, the source of truth: its lock and run metadata."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

from learnforget.errors import ConfigError
from learnforget.files import read_json, try_lock, unlock

PACKAGES = ("learnforget", "torch", "transformers", "peft", "bitsandbytes", "accelerate",
            "hydra-core", "wandb", "lm_eval", "datasets", "numpy")


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
        fd = try_lock(self.path)
        if fd is None:
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            unlock(self._fd)
            self._fd = None


def check_same_run(run_dir: Path, config_hash: str) -> None:
    """Refuse to reuse a folder that holds a different run (e.g. a hand-set run_name)."""
    info = read_json(run_dir / "run.json")
    if info and info.get("config_hash") not in (None, config_hash):
        raise ConfigError(
            f"run folder {run_dir} holds a different run (config hash "
            f"{str(info.get('config_hash'))[:12]} vs {config_hash[:12]}): choose another run_name "
            "or experiment_name")

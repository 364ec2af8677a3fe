"""A checkpoint's weights by module: module names and types, safetensors folders read lazily,
the base model's folder of a run, and the rounding floor of 16-bit storage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from learnforget.errors import ConfigError
from learnforget.files import read_json
from learnforget.runfolder import RunFolder

CONV1D_MODEL_TYPES = ("gpt2",)  # weights stored (in, out): transposed to (out, in) here
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_PEFT_PREFIX = "base_model.model."


def parse_module(name: str) -> tuple[int | None, str]:
    """'model.layers.26.self_attn.q_proj' -> (26, 'q_proj'); modules outside a block: None."""
    m = _LAYER_RE.search(name)
    return (int(m.group(1)) if m else None), name.split(".")[-1]


def module_types(names: Sequence[str]) -> dict[str, str]:
    """Module type per name: the leaf ('q_proj') unless two modules of one layer share the
    leaf (GPT-2's attn.c_proj and mlp.c_proj), then 'parent.leaf'."""
    seen: dict[tuple[int | None, str], int] = {}
    for n in names:
        key = parse_module(n)
        seen[key] = seen.get(key, 0) + 1
    out = {}
    for n in names:
        layer, leaf = parse_module(n)
        out[n] = ".".join(n.split(".")[-2:]) if seen[(layer, leaf)] > 1 else leaf
    return out


def canonical_name(key: str) -> str:
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


# ============================================================================ weights on disk

class WeightFolder:
    """Lazy tensor access to a folder of safetensors files (single or sharded)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{self.folder} holds no .safetensors weights (expected a model "
                              "saved with save_pretrained)")
        self._open = safe_open
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.where[k] = f

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        with self._open(str(self.where[key]), framework="pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def get(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        with self._open(str(self.where[key]), framework="pt") as h:
            return h.get_tensor(key).to(dtype)

    def stored_dtype(self, key: str) -> str:
        """safetensors' dtype name of a tensor: F32, BF16, F16, ..."""
        with self._open(str(self.where[key]), framework="pt") as h:
            return str(h.get_slice(key).get_dtype())


_MANTISSA_BITS = {"BF16": 7, "F16": 10}  # 16-bit storage dtypes that round a weight


def rounding_floor(w: torch.Tensor, stored: str) -> dict[str, float] | None:
    """The noise a 16-bit checkpoint adds to ΔW: each weight was rounded to the nearest value
    of the storage dtype, an error uniform in +-ulp/2 (variance ulp^2 / 12), independent across
    elements. Expected ||E||_F = sqrt(sum ulp^2 / 12), and the top singular value of such an m x
    n matrix ~ sigma (sqrt(m) + sqrt(n)) (the Marchenko-Pastur edge; sigma^2 the mean variance).
    ΔW singular values below `top_sv` cannot be told from rounding. None for 32-bit storage."""
    bits = _MANTISSA_BITS.get(stored.upper())
    if bits is None:
        return None
    a = w.detach().double().abs()
    nz = a > 0
    ulp = torch.zeros_like(a)
    ulp[nz] = torch.exp2(torch.floor(torch.log2(a[nz])) - bits)
    var = ulp.pow(2) / 12
    m, n = w.shape[0], (w.numel() // w.shape[0]) if w.dim() else 1
    sigma = math.sqrt(float(var.mean()))
    return {"dtype": stored.upper(), "fro": math.sqrt(float(var.sum())),
            "top_sv": sigma * (math.sqrt(m) + math.sqrt(n))}


def base_model_folder(run_dir: Path, cache_dir: Path | None = None) -> Path:
    """The local folder with the run's base weights: run.json's base_model, else the model
    config rebuilt/located through learnforget.assets.models (tiny models rebuild deterministically),
    else the Hugging Face cache (offline)."""
    folder = RunFolder(run_dir)
    record = folder.read_record()
    recorded = record.run.base_model if record else None
    if recorded and (Path(recorded) / "config.json").exists():
        return Path(recorded)
    candidate = recorded
    cfg_path = folder.config
    if cfg_path.exists():
        from omegaconf import OmegaConf

        from learnforget.assets.models import base_model_dir

        cfg = OmegaConf.load(cfg_path)
        cache = Path(cache_dir or cfg.paths.cache_dir).expanduser()
        try:
            candidate = base_model_dir(cfg.model, cache, fetch=False)
        except ConfigError:
            pass
        if candidate and (Path(candidate) / "config.json").exists():
            return Path(candidate)
    if candidate:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(candidate), local_files_only=True,
                                          allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # any failure means: not available offline
            pass
    raise ConfigError(f"the base weights of run {run_dir} are not available locally (recorded "
                      f"base_model: {recorded!r}); pass cache_dir= or fetch the base model")


def model_type(folder: Path) -> str:
    cfg = read_json(folder / "config.json") or {}
    return str(cfg.get("model_type", ""))


def orient(w: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return w.T.contiguous() if conv1d else w


def block_weights(wf: WeightFolder) -> dict[str, str]:
    """{module name: tensor key} for the 2-D weights inside transformer blocks."""
    out = {}
    for k in wf.keys():
        if k.endswith(".weight") and _LAYER_RE.search(k) and len(wf.shape(k)) == 2:
            out[k[: -len(".weight")]] = k
    return out


def natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

"""Spectral analysis of weight updates (paper section 4.6, fig. 6, S7, S8).

For each linear module of a checkpoint: the update ΔW = W_ft - W_base, its singular values,
and per-module summaries (rank needed for 90% of the variance, effective and stable rank, top
singular value, Frobenius norm). How ΔW is obtained depends on the method:

    full (and any full-format checkpoint)   W_ft - W_base, read from the safetensors files
    lora, qlora                             scaling * B @ A from the adapter factors, never
                                            formed: QR of B and of A^T, SVD of the r x r core
    dora, ia3 (and lora with lora_via=merge) peft merge of the adapter into the base, minus base

QLoRA adapters were trained on the 4-bit base, so their W_base is the dequantised NF4 (or FP4)
weight (bitsandbytes quantise + dequantise with the run's settings); the output says so.

    compute_spectra(run_dir)   ->  <run>/spectra/<checkpoint>.npz  (singular values per module)
                                   <run>/spectra/<checkpoint>.json (summary rows + provenance)
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learnforget.errors import ConfigError
from learnforget.files import atomic_open, atomic_write_json, read_json, read_result

SPECTRA_VERSION = 1
MATRICES = ("delta", "base", "ft")
DENSE_METHODS = ("svd", "gram")
CONV1D_MODEL_TYPES = ("gpt2",)  # weights stored (in, out): transposed to (out, in) here
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_PEFT_PREFIX = "base_model.model."


# ============================================================================ spectra

SMALL_MATRIX = 1 << 20  # elements
LINALG_THREADS_ENV = "LEARNFORGET_LINALG_THREADS"


def linalg_threads(numel: int, *, skinny: bool = False) -> int | None:
    """Torch threads for one CPU linear-algebra call; None leaves torch's setting.

    LEARNFORGET_LINALG_THREADS overrides. Otherwise 1 for the factor route (tall-skinny QR),
    for matrices under SMALL_MATRIX elements, and for everything when torch has at most 2
    threads: measured on the shared 2-core machine, 2-thread MKL/OpenMP calls were 1-50x
    slower than 1 thread (barrier contention under load): QR + core SVD of a 11008x256 /
    256x4096 factor pair 0.03 s vs up to 5 s, svdvals of 64x256 0.5 ms vs 20-400 ms, of
    4096x4096 4.1 s vs 4.9 s, Gram route of 4096x11008 3.3 s vs 6.9 s.
    """
    env = os.environ.get(LINALG_THREADS_ENV)
    if env:
        return max(1, int(env))
    if skinny or numel < SMALL_MATRIX or torch.get_num_threads() <= 2:
        return 1
    return None


@contextmanager
def _threads(n: int | None, device: str):
    prev = torch.get_num_threads()
    if device != "cpu" or n is None or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _as_tensor(x: Any, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().to(device, dtype)


def _column_major(x: torch.Tensor) -> torch.Tensor:
    """A column-major (Fortran-order) copy: LAPACK's QR of a tall row-major matrix was up to
    8x slower on this machine's MKL."""
    return x.T.contiguous().T


def lowrank_svdvals(B: Any, A: Any, scale: float = 1.0, *, dtype: torch.dtype = torch.float64,
                    device: str = "cpu") -> np.ndarray:
    """Exact singular values of scale * B @ A (B: d x r, A: r x k) without forming d x k.

    B = Q_B R_B and A^T = Q_A R_A (thin QR), so scale * B A = Q_B (scale R_B R_A^T) Q_A^T and,
    Q_B and Q_A having orthonormal columns, the singular values are those of the r x r core.
    Returns min(r, d, k) values, descending; the other singular values of ΔW are exactly 0.
    """
    B, A = _as_tensor(B, dtype, device), _as_tensor(A, dtype, device)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"factors do not chain: B {tuple(B.shape)}, A {tuple(A.shape)}")
    with _threads(linalg_threads(B.numel() + A.numel(), skinny=True), device):
        _, rb = torch.linalg.qr(_column_major(B), mode="r")
        _, ra = torch.linalg.qr(A.T, mode="r")  # A.T of a row-major A is already column-major
        return (abs(scale) * torch.linalg.svdvals(rb @ ra.T)).cpu().numpy()


def lowrank_svd(B: Any, A: Any, scale: float = 1.0, k: int | None = None, *,
                dtype: torch.dtype = torch.float64) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors (d x k) and singular values of scale * B @ A, from factors."""
    B, A = _as_tensor(B, dtype), _as_tensor(A, dtype)
    with _threads(linalg_threads(B.numel() + A.numel(), skinny=True), "cpu"):
        qb, rb = torch.linalg.qr(_column_major(B))
        _, ra = torch.linalg.qr(A.T, mode="r")
        u, s, _ = torch.linalg.svd(scale * (rb @ ra.T))
        k = s.numel() if k is None else k
        if k > s.numel():
            raise ValueError(f"k={k} exceeds the factors' rank bound {s.numel()}")
        return (qb @ u[:, :k]).numpy(), s.abs().numpy()


def dense_svdvals(M: Any, method: str = "svd", *, dtype: torch.dtype = torch.float32,
                  device: str = "cpu") -> np.ndarray:
    """All min(d, k) singular values of a dense matrix, descending.

    method="svd": torch.linalg.svdvals. method="gram": square roots of the eigenvalues of the
    smaller Gram matrix (M M^T or M^T M), several times faster on large matrices; singular
    values below about sqrt(eps) * s_max lose their relative accuracy (they are squared), which
    leaves variance-based summaries such as the rank for 90% unchanged.
    """
    if method not in DENSE_METHODS:
        raise ConfigError(f"dense method {method!r} is unknown (expected one of {DENSE_METHODS})")
    M = _as_tensor(M, dtype, device)
    with _threads(linalg_threads(M.numel()), device):
        if method == "svd":
            return torch.linalg.svdvals(M).cpu().numpy()
        gram = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
        ev = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
        return torch.flip(ev, dims=(0,)).cpu().numpy()


def dense_svd(M: Any, k: int, *, dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors and all singular values of a dense matrix."""
    M = _as_tensor(M, dtype)
    with _threads(linalg_threads(M.numel()), "cpu"):
        u, s, _ = torch.linalg.svd(M, full_matrices=False)
    return u[:, :k].numpy(), s.numpy()


# ============================================================================ summaries

def _s64(s: Any) -> np.ndarray:
    s = np.abs(np.asarray(s, dtype=np.float64).ravel())
    return np.sort(s)[::-1]


def rank_for_variance(s: Any, threshold: float = 0.9) -> int:
    """Smallest k such that the top k squared singular values hold >= threshold of the total
    (the paper's "rank needed to explain 90% of the variance"). 0 for a zero matrix."""
    if not 0 < threshold <= 1:
        raise ConfigError(f"variance threshold must be in (0, 1], got {threshold!r}")
    e = _s64(s) ** 2
    total = e.sum()
    if total == 0:
        return 0
    share = np.cumsum(e) / total
    # a relative slack of 1e-12 so that an exact share (e.g. 0.9) is not missed by rounding
    return int(min(np.searchsorted(share, threshold - 1e-12, side="left") + 1, e.size))


def effective_rank(s: Any) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of the normalised singular values
    p_i = s_i / sum(s). Between 1 and the number of non-zero values; 0 for a zero matrix."""
    s = _s64(s)
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def stable_rank(s: Any) -> float:
    """||ΔW||_F^2 / ||ΔW||_2^2 = sum(s^2) / s_max^2 (0 for a zero matrix)."""
    s = _s64(s)
    if s.size == 0 or s[0] == 0:
        return 0.0
    return float((s ** 2).sum() / s[0] ** 2)


def numerical_rank(s: Any, shape: Sequence[int] | None = None, rtol: float | None = None) -> int:
    """Singular values above rtol * s_max; rtol defaults to max(shape) * float32 eps."""
    s = _s64(s)
    if s.size == 0 or s[0] == 0:
        return 0
    if rtol is None:
        rtol = max(shape or (s.size,)) * float(np.finfo(np.float32).eps)
    return int((s > rtol * s[0]).sum())


def spectrum_summary(s: Any, threshold: float = 0.9, shape: Sequence[int] | None = None
                     ) -> dict[str, Any]:
    s = _s64(s)
    return {
        "rank_for_variance": rank_for_variance(s, threshold),
        "effective_rank": effective_rank(s),
        "stable_rank": stable_rank(s),
        "numerical_rank": numerical_rank(s, shape),
        "top_sv": float(s[0]) if s.size else 0.0,
        "fro_norm": float(math.sqrt((s ** 2).sum())),
    }


# ============================================================================ subspaces

def subspace_similarity(U1: Any, U2: Any, k1: int | None = None, k2: int | None = None) -> float:
    """Hu et al. (2021): phi = ||U1[:, :k1]^T U2[:, :k2]||_F^2 / min(k1, k2), in [0, 1].

    U1, U2: matrices whose columns are orthonormal (singular directions), same row count.
    1 when one span contains the other, 0 when they are orthogonal.
    """
    U1, U2 = np.asarray(U1, dtype=np.float64), np.asarray(U2, dtype=np.float64)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"subspaces live in different spaces: {U1.shape} vs {U2.shape}")
    k1 = U1.shape[1] if k1 is None else k1
    k2 = U2.shape[1] if k2 is None else k2
    m = U1[:, :k1].T @ U2[:, :k2]
    return float(np.clip((m ** 2).sum() / min(k1, k2), 0.0, 1.0))


# ============================================================================ module names

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


def _canonical(key: str) -> str:
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
    info = read_json(run_dir / "run.json") or {}
    recorded = (info.get("run") or {}).get("base_model")
    if recorded and (Path(recorded) / "config.json").exists():
        return Path(recorded)
    candidate = recorded
    cfg_path = run_dir / "config.yaml"
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


# ============================================================================ ΔW extraction

@dataclass
class ModuleDelta:
    """ΔW of one linear module, (out, in) orientation, as factors or dense."""

    name: str
    layer: int | None
    module_type: str
    shape: tuple[int, int]
    route: str                                   # "factors" | "dense"
    factors: tuple[torch.Tensor, torch.Tensor, float] | None = None   # (B, A, scale)
    dense: torch.Tensor | None = None
    base: torch.Tensor | None = None             # W_base, when asked for
    ft: torch.Tensor | None = None               # W_ft, when asked for
    floor: dict[str, float] | None = None        # 16-bit checkpoint: its rounding-noise floor

    def to_dense(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        assert self.factors is not None
        B, A, scale = self.factors
        return scale * (B.double() @ A.double())

    @property
    def rank_bound(self) -> int:
        return self.factors[0].shape[1] if self.factors is not None else min(self.shape)


@dataclass
class DeltaSet:
    """ΔW of every module of one checkpoint, produced lazily (one module in memory at a time)."""

    run: str
    checkpoint: str
    manifest: dict[str, Any]
    method: str
    source: str          # how ΔW was obtained
    base: str            # "original" | "dequantised nf4" | ...
    base_model: str
    names: list[str]
    _iter: Callable[[], Iterator[ModuleDelta]] = field(repr=False)
    skipped: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[ModuleDelta]:
        return self._iter()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run with a manifest, in step order."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
             and (p / "manifest.json").exists()]
    return sorted(found, key=lambda p: (read_json(p / "manifest.json") or {}).get("step", 0))


def _model_type(folder: Path) -> str:
    cfg = read_json(folder / "config.json") or {}
    return str(cfg.get("model_type", ""))


def _orient(w: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return w.T.contiguous() if conv1d else w


def _block_weights(wf: WeightFolder) -> dict[str, str]:
    """{module name: tensor key} for the 2-D weights inside transformer blocks."""
    out = {}
    for k in wf.keys():
        if k.endswith(".weight") and _LAYER_RE.search(k) and len(wf.shape(k)) == 2:
            out[k[: -len(".weight")]] = k
    return out


def _quant_settings(run_info: dict[str, Any]) -> dict[str, Any]:
    ms = (run_info.get("run") or {}).get("method_settings") or {}
    return {"quant_type": ms.get("quant_type", "nf4"),
            "double_quant": bool(ms.get("double_quant", True)),
            "compute_dtype": ms.get("compute_dtype", "float32")}


def dequantised_base(w: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
                     compute_dtype: str = "float32", blocksize: int = 64) -> torch.Tensor:
    """The weight a QLoRA adapter trained against: quantised to 4 bit exactly as
    transformers' bitsandbytes loader does (Params4bit defaults), then dequantised."""
    import bitsandbytes.functional as bnbf

    from learnforget.assets.models import torch_dtype

    if quant_type == "int8":  # LLM.int8: row-wise absmax int8 of the float16 weight
        from learnforget.methods.quantisation import quantise_dequantise

        return quantise_dequantise(w, "int8")
    q, state = bnbf.quantize_4bit(w.to(torch_dtype(compute_dtype)), blocksize=blocksize,
                                  compress_statistics=double_quant, quant_type=quant_type)
    return bnbf.dequantize_4bit(q, state).to(torch.float32)


def _lora_scale(cfg: dict[str, Any], name: str, r: int) -> float:
    """peft's scaling for one module: alpha / r (alpha / sqrt(r) with rsLoRA), alpha from
    alpha_pattern when a key matches the module name the way peft matches it (a suffix at a
    dot boundary, regex allowed); r is the factors' actual rank (rank_pattern included)."""
    alpha = cfg.get("lora_alpha", 8)
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            alpha = value
            break
    return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


def extract_deltas(run_dir: Path, checkpoint: str | Path, *, with_weights: bool = False,
                   cache_dir: Path | None = None, lora_via: str = "factors") -> DeltaSet | None:
    """ΔW of every linear module of one checkpoint (None for methods that change no weight
    matrix: prefix and prompt tuning, bottleneck adapters). `lora_via="merge"` takes plain LoRA through peft's
    merge as well (the dense reference the factor route is tested against)."""
    from learnforget.methods.apply import changes_weights

    if lora_via not in ("factors", "merge"):
        raise ConfigError(f"lora_via {lora_via!r} is unknown (expected factors or merge)")
    run_dir = Path(run_dir)
    ckpt = Path(checkpoint) if Path(checkpoint).is_absolute() else run_dir / "checkpoints" / str(checkpoint)
    manifest = read_json(ckpt / "manifest.json")
    if manifest is None:
        raise ConfigError(f"{ckpt} is not a checkpoint (no manifest.json); checkpoints of "
                          f"{run_dir.name}: {[p.name for p in list_checkpoints(run_dir)]}")
    info = read_json(run_dir / "run.json") or {}
    method = manifest.get("method") or (info.get("run") or {}).get("method", "?")
    adapter_cfg = read_json(ckpt / "adapter_config.json") or {}
    peft_type = adapter_cfg.get("peft_type")
    if manifest.get("format") == "bottleneck_adapter":
        return None  # new modules beside the frozen base: ΔW is not defined
    if manifest.get("format") == "safetensors":
        route = "full"
    elif peft_type == "LORA" and not adapter_cfg.get("use_dora") and (
            lora_via == "factors" or method == "qlora"):
        route = "factors"
    elif peft_type is not None and changes_weights(ckpt):
        route = "merge"  # any other peft type (DoRA, IA3, VeRA, LoHa, ...): merged minus base
    else:
        return None  # prefix / prompt tuning: no weight matrix changes
    try:
        base_dir: Path | None = base_model_folder(run_dir, cache_dir)
    except ConfigError:
        if route != "factors" or with_weights:
            raise
        base_dir = None  # the factors alone give ΔW and its spectrum
    conv1d_model = base_dir is not None and _model_type(base_dir) in CONV1D_MODEL_TYPES
    common = {"run": run_dir.name, "checkpoint": ckpt.name, "manifest": manifest,
              "method": method, "base_model": str(base_dir) if base_dir else
              str((info.get("run") or {}).get("base_model"))}
    if route == "full":
        return _full_deltas(ckpt, base_dir, conv1d_model, with_weights, common)
    if route == "factors":
        return _factor_deltas(ckpt, adapter_cfg, base_dir, method, info, with_weights, common)
    return _merged_deltas(ckpt, adapter_cfg, base_dir, with_weights, common)


def _full_deltas(ckpt, base_dir, conv1d_model, with_weights, common) -> DeltaSet:
    ft, base = WeightFolder(ckpt), WeightFolder(base_dir)
    ft_mods, base_mods = _block_weights(ft), _block_weights(base)
    names = sorted((n for n in ft_mods if n in base_mods), key=_natural_key)
    if not names:
        raise ConfigError(f"checkpoint {ckpt} shares no block weight with its base {base_dir}")
    types = module_types(names)
    skipped: list[str] = []

    def gen() -> Iterator[ModuleDelta]:
        for n in names:
            conv = conv1d_model and n.split(".")[-1] in ("c_attn", "c_proj", "c_fc")
            w_ft = _orient(ft.get(ft_mods[n]), conv)
            w_base = _orient(base.get(base_mods[n]), conv)
            delta = w_ft - w_base
            if not torch.any(delta):
                skipped.append(n)  # frozen (bitfit, topk): no update to analyse
                continue
            layer, _ = parse_module(n)
            yield ModuleDelta(n, layer, types[n], tuple(delta.shape), "dense", dense=delta,
                              base=w_base if with_weights else None,
                              ft=w_ft if with_weights else None,
                              floor=rounding_floor(w_ft, ft.stored_dtype(ft_mods[n])))

    return DeltaSet(**common, source="W_ft - W_base (full-format checkpoint vs base weights)",
                    base="original", names=names, _iter=gen, skipped=skipped)


def _factor_deltas(ckpt, adapter_cfg, base_dir, method, info, with_weights, common) -> DeltaSet:
    wf = WeightFolder(ckpt)
    a_re = re.compile(r"^(.*)\.lora_A(?:\.[^.]+)?\.weight$")
    pairs: dict[str, tuple[str, str]] = {}
    for k in wf.keys():
        m = a_re.match(k)
        if m:
            b_key = k.replace(".lora_A", ".lora_B")
            if b_key in wf.where:
                pairs[_canonical(m.group(1))] = (b_key, k)
    if not pairs:
        raise ConfigError(f"adapter {ckpt} holds no lora_A/lora_B pairs")
    names = sorted(pairs, key=_natural_key)
    types = module_types(names)
    qlora = method == "qlora"
    q = _quant_settings(info) if qlora else {}
    base_label = f"dequantised {q['quant_type']}" if qlora else "original"
    base = WeightFolder(base_dir) if with_weights and base_dir is not None else None
    conv1d_model = base_dir is not None and _model_type(base_dir) in CONV1D_MODEL_TYPES

    def gen() -> Iterator[ModuleDelta]:
        for n in names:
            b_key, a_key = pairs[n]
            B, A = wf.get(b_key), wf.get(a_key)
            scale = _lora_scale(adapter_cfg, n, A.shape[0])
            layer, _ = parse_module(n)
            md = ModuleDelta(n, layer, types[n], (B.shape[0], A.shape[1]), "factors",
                             factors=(B, A, scale))
            if base is not None:
                conv = conv1d_model and n.split(".")[-1] in ("c_attn", "c_proj", "c_fc")
                w = _orient(base.get(n + ".weight"), conv)
                if qlora:
                    w = dequantised_base(w, q["quant_type"], q["double_quant"], q["compute_dtype"])
                md.base = w
                md.ft = (w.double() + md.to_dense()).float()
            yield md

    rs = " / sqrt(r) (rsLoRA)" if adapter_cfg.get("use_rslora") else " / r"
    source = (f"scaling * B @ A from the adapter factors (scaling = alpha{rs}); spectrum exact "
              "from QR of B and A^T and the SVD of the r x r core")
    if qlora:
        source += "; base = the dequantised 4-bit weights the adapter was trained on"
    return DeltaSet(**common, source=source, base=base_label, names=names, _iter=gen)


def _merged_deltas(ckpt, adapter_cfg, base_dir, with_weights, common) -> DeltaSet:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    import learnforget.assets.models  # noqa: F401 - silences transformers' per-shard progress bars

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, ckpt)
    layers = {_canonical(n): m for n, m in model.named_modules()
              if isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer")
              and getattr(m.get_base_layer(), "weight", None) is not None
              and m.get_base_layer().weight.ndim == 2}
    names = sorted(layers, key=_natural_key)
    types = module_types(names)

    def gen() -> Iterator[ModuleDelta]:
        for n in names:
            mod = layers[n]
            base_layer = mod.get_base_layer()
            conv = isinstance(base_layer, Conv1D)
            with torch.no_grad():
                w0 = base_layer.weight.detach().clone()
                mod.merge()  # the same per-module merge merge_and_unload performs
                w1 = base_layer.weight.detach().clone()
            w0, w1 = _orient(w0.float(), conv), _orient(w1.float(), conv)
            layer, _ = parse_module(n)
            yield ModuleDelta(n, layer, types[n], tuple(w1.shape), "dense", dense=w1 - w0,
                              base=w0 if with_weights else None, ft=w1 if with_weights else None)

    kind = ("DoRA" if adapter_cfg.get("use_dora") else adapter_cfg.get("peft_type", "adapter"))
    return DeltaSet(**common, source=f"{kind} adapter merged into the base with peft, minus the "
                    "base (dense)", base="original", names=names, _iter=gen)


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ============================================================================ per checkpoint

def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def spectra_settings(*, with_weights: bool, dense_method: str, lora_via: str) -> dict[str, Any]:
    return {"version": SPECTRA_VERSION, "with_weights": bool(with_weights),
            "dense_method": dense_method, "lora_via": lora_via}


def _row(md: ModuleDelta, matrix: str, s: np.ndarray, threshold: float, route: str) -> dict:
    row = {"module": md.name, "layer": md.layer, "module_type": md.module_type,
           "matrix": matrix, "shape": list(md.shape), "route": route, "n_values": int(s.size),
           **spectrum_summary(s, threshold, md.shape)}
    if matrix == "delta" and md.floor is not None:  # a 16-bit checkpoint: its rounding noise
        row.update(rounding_floor_dtype=md.floor["dtype"], rounding_floor_fro=md.floor["fro"],
                   rounding_floor_top_sv=md.floor["top_sv"],
                   rank_above_rounding_floor=int((np.asarray(s) > md.floor["top_sv"]).sum()))
    return row


def spectra_of(md: ModuleDelta, *, dense_method: str = "svd", device: str = "cpu"
               ) -> dict[str, tuple[np.ndarray, str]]:
    """{matrix: (singular values, route)} for ΔW and, when present, W_base and W_ft."""
    out = {}
    if md.factors is not None:
        B, A, scale = md.factors
        out["delta"] = (lowrank_svdvals(B, A, scale, device=device), "factors (QR + r x r SVD)")
    else:
        assert md.dense is not None
        out["delta"] = (dense_svdvals(md.dense, dense_method, device=device),
                        f"dense {dense_method}")
    for matrix in ("base", "ft"):
        w = getattr(md, matrix)
        if w is not None:
            out[matrix] = (dense_svdvals(w, dense_method, device=device), f"dense {dense_method}")
    return out


def compute_spectra(run_dir: Path, checkpoint: str | Sequence[str] | None = None, *,
                    threshold: float = 0.9, with_weights: bool = False,
                    cache_dir: Path | None = None, dense_method: str = "svd",
                    lora_via: str = "factors", force: bool = False,
                    device: str | None = None, verbose: bool = True) -> list[Path]:
    """Spectra of ΔW (and of W_base, W_ft with `with_weights`) for a run's checkpoints.

    Writes spectra/<checkpoint>.npz (keys "<matrix>:<module>", singular values descending;
    factor routes store only the r possibly non-zero values) and spectra/<checkpoint>.json
    (settings, provenance, one summary row per module and matrix), each atomically. A
    checkpoint already done with the same settings is skipped; a changed threshold alone only
    re-summarises the stored values. The SVDs run on `device` (default: CUDA when available).
    Returns the JSON paths (written or already there).
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold!r}")
    if dense_method not in DENSE_METHODS:
        raise ConfigError(f"dense_method {dense_method!r} is unknown (expected one of "
                          f"{DENSE_METHODS})")
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if checkpoint is not None:
        wanted = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
        missing = [c for c in wanted if c not in {p.name for p in ckpts}]
        if missing:
            raise ConfigError(f"checkpoint(s) {missing} not found in {run_dir} (it has "
                              f"{[p.name for p in ckpts]})")
        ckpts = [p for p in ckpts if p.name in wanted]
    settings = spectra_settings(with_weights=with_weights, dense_method=dense_method,
                                lora_via=lora_via)
    out_dir = run_dir / "spectra"
    paths = []
    for ck in ckpts:
        js, npz = out_dir / f"{ck.name}.json", out_dir / f"{ck.name}.npz"
        old = read_result(js)
        if old and not force and old.get("settings") == settings and npz.exists():
            if old.get("threshold") != threshold:
                _resummarise(js, npz, old, threshold)
            paths.append(js)
            continue
        t0 = time.perf_counter()
        ds = extract_deltas(run_dir, ck.name, with_weights=with_weights, cache_dir=cache_dir,
                            lora_via=lora_via)
        if ds is None:
            if verbose:
                method = (read_json(ck / "manifest.json") or {}).get("method", "?")
                print(f"learnforget: {run_dir.name}/{ck.name}: method={method} changes no weight "
                      "matrix of the base model (prefix/prompt tuning and bottleneck adapters "
                      "add parameters instead): ΔW is undefined, no spectra")
            continue
        rows, arrays = [], {}
        for md in ds:
            for matrix, (s, route) in spectra_of(md, dense_method=dense_method,
                                                 device=device or default_device()).items():
                arrays[f"{matrix}:{md.name}"] = s.astype(np.float64)
                rows.append(_row(md, matrix, s, threshold, route))
        record = {"run": ds.run, "checkpoint": ds.checkpoint, "step": ds.manifest.get("step"),
                  "tokens": ds.manifest.get("tokens"), "epoch": ds.manifest.get("epoch"),
                  "method": ds.method, "delta": ds.source, "base": ds.base,
                  "base_model": ds.base_model, "settings": settings, "threshold": threshold,
                  "unchanged_modules": list(ds.skipped), "n_modules": len(ds.names),
                  "wall_time_s": time.perf_counter() - t0, "rows": rows}
        _atomic_savez(npz, arrays)
        atomic_write_json(js, record)
        paths.append(js)
        if verbose:
            print(f"learnforget: spectra of {run_dir.name}/{ck.name}: {len(rows)} matrices in "
                  f"{record['wall_time_s']:.1f}s -> {js}")
    return paths


def _resummarise(js: Path, npz: Path, record: dict[str, Any], threshold: float) -> None:
    arrays = np.load(npz)
    for row in record["rows"]:
        s = arrays[f"{row['matrix']}:{row['module']}"]
        row.update(spectrum_summary(s, threshold, row["shape"]))
    record["threshold"] = threshold
    atomic_write_json(js, record)


def load_spectra(run_dir: Path, checkpoint: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the JSON record, {"<matrix>:<module>": singular values}) of one checkpoint."""
    d = Path(run_dir) / "spectra"
    record = read_json(d / f"{checkpoint}.json")
    if record is None:
        raise ConfigError(f"no spectra for {run_dir}/{checkpoint}: run compute_spectra first")
    with np.load(d / f"{checkpoint}.npz") as z:
        return record, {k: z[k] for k in z.files}


# ============================================================================ LoRA vs full

def compare_subspaces(lora_run: Path, full_run: Path, lora_checkpoint: str | None = None,
                      full_checkpoint: str | None = None, k: int | None = None, *,
                      modules: Sequence[str] | None = None, cache_dir: Path | None = None
                      ) -> list[dict[str, Any]]:
    """phi between the top-k left singular directions of a LoRA ΔW and a full-finetuning ΔW of
    the same module (default: each run's last checkpoint, k = the LoRA rank)."""
    def last(run: Path, label: str | None) -> str:
        if label:
            return label
        cks = list_checkpoints(run)
        if not cks:
            raise ConfigError(f"run {run} has no checkpoints")
        return cks[-1].name

    lora = extract_deltas(Path(lora_run), last(Path(lora_run), lora_checkpoint),
                          cache_dir=cache_dir)
    full = extract_deltas(Path(full_run), last(Path(full_run), full_checkpoint),
                          cache_dir=cache_dir)
    if lora is None or full is None:
        raise ConfigError("compare_subspaces needs two runs whose methods change weight matrices")
    full_by_name = {md.name: md for md in full}
    rows = []
    for md in lora:
        if (modules and md.name not in modules and md.module_type not in modules) \
                or md.name not in full_by_name:
            continue
        kk = k or md.rank_bound
        if md.factors is not None:
            u1, _ = lowrank_svd(*md.factors, k=kk)
        else:
            u1, _ = dense_svd(md.to_dense(), kk)
        u2, _ = dense_svd(full_by_name[md.name].to_dense(), kk)
        rows.append({"module": md.name, "layer": md.layer, "module_type": md.module_type,
                     "k": kk, "phi": subspace_similarity(u1, u2, kk, kk)})
    return rows


# ============================================================================ fig. S8

def random_matrix_comparison(n: int = 1000, c: float = 0.1, cs: Sequence[float] | None = None,
                             seed: int = 0) -> dict[str, Any]:
    """Paper fig. S8: i.i.d. N(0, 1) matrices A and B (n x n): the spectra of A, A + cB and cB
    at c, and the mean absolute difference between the spectra of A + cB and A for each c in
    `cs` (default: 13 values from 1e-3 to 10, log-spaced)."""
    cs = list(np.logspace(-3, 1, 13) if cs is None else cs)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    def sv(m: torch.Tensor) -> np.ndarray:
        return dense_svdvals(m, dtype=torch.float64)

    s_a, s_b, s_sum = sv(A), sv(B), sv(A + c * B)
    diffs = [float(np.abs(sv(A + ci * B) - s_a).mean()) for ci in cs]
    return {"n": n, "seed": seed, "c": c, "s_A": s_a, "s_A_plus_cB": s_sum, "s_cB": c * s_b,
            "cs": np.asarray(cs, dtype=float), "mean_abs_diff": np.asarray(diffs),
            "mean_abs_diff_rel": np.asarray(diffs) / float(s_a.mean()),
            "rank_for_variance": {"A": rank_for_variance(s_a), "A_plus_cB": rank_for_variance(s_sum),
                                  "cB": rank_for_variance(s_b)}}


def dump_json(obj: Any) -> str:
    """JSON with numpy arrays as lists (for the random-matrix results)."""
    return json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))

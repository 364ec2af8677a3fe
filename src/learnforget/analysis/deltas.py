"""The weight update ΔW = W_ft - W_base of each linear module of a checkpoint, by method:

    full (and any full-format checkpoint)   W_ft - W_base, read from the safetensors files
    lora, qlora                             scaling * B @ A from the adapter factors, never
                                            formed (see :mod:`learnforget.analysis.svd`)
    dora, ia3 (and lora with lora_via=merge) peft merge of the adapter into the base, minus base

QLoRA adapters were trained on the 4-bit base, so their W_base is the dequantised NF4 (or FP4)
weight (bitsandbytes quantise + dequantise with the run's settings); the output says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from learnforget.analysis.weights import (
    CONV1D_MODEL_TYPES,
    WeightFolder,
    base_model_folder,
    block_weights,
    canonical_name,
    model_type,
    module_types,
    natural_key,
    orient,
    parse_module,
    rounding_floor,
)
from learnforget.errors import ConfigError
from learnforget.files import read_json
from learnforget.methods.registry import family
from learnforget.runfolder import MANIFEST, RunFolder


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
    if lora_via not in ("factors", "merge"):
        raise ConfigError(f"lora_via {lora_via!r} is unknown (expected factors or merge)")
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    ckpt = Path(checkpoint) if Path(checkpoint).is_absolute() else folder.checkpoint(str(checkpoint))
    manifest = read_json(ckpt / MANIFEST)
    if manifest is None:
        raise ConfigError(f"{ckpt} is not a checkpoint (no manifest.json); checkpoints of "
                          f"{run_dir.name}: {[p.name for p in folder.checkpoint_dirs()]}")
    record = folder.read_record()
    info = record.to_dict() if record else {}
    method = manifest.get("method") or (info.get("run") or {}).get("method", "?")
    adapter_cfg = read_json(ckpt / "adapter_config.json") or {}
    # "full" (W_ft - W_base), "factors" (scale B A), "merge" (peft merged minus base), "said"
    # (λ P(θ_d) from the checkpoint), or None: no weight matrix changes (prefix / prompt tuning,
    # bottleneck adapters)
    route = family(str(method)).delta_route(manifest.get("format"), adapter_cfg, ckpt, lora_via)
    if route is None:
        return None
    try:
        base_dir: Path | None = base_model_folder(run_dir, cache_dir)
    except ConfigError:
        if route not in ("factors", "said") or with_weights:
            raise
        base_dir = None  # the factors alone give ΔW and its spectrum
    conv1d_model = base_dir is not None and model_type(base_dir) in CONV1D_MODEL_TYPES
    common = {"run": run_dir.name, "checkpoint": ckpt.name, "manifest": manifest,
              "method": method, "base_model": str(base_dir) if base_dir else
              str((info.get("run") or {}).get("base_model"))}
    if route == "full":
        return _full_deltas(ckpt, base_dir, conv1d_model, with_weights, common)
    if route == "said":
        return _said_deltas(ckpt, base_dir, conv1d_model, with_weights, common)
    if route == "factors":
        return _factor_deltas(ckpt, adapter_cfg, base_dir, method, info, with_weights, common)
    return _merged_deltas(ckpt, adapter_cfg, base_dir, with_weights, common)


def _full_deltas(ckpt, base_dir, conv1d_model, with_weights, common) -> DeltaSet:
    ft, base = WeightFolder(ckpt), WeightFolder(base_dir)
    ft_mods, base_mods = block_weights(ft), block_weights(base)
    names = sorted((n for n in ft_mods if n in base_mods), key=natural_key)
    if not names:
        raise ConfigError(f"checkpoint {ckpt} shares no block weight with its base {base_dir}")
    types = module_types(names)
    skipped: list[str] = []

    def gen() -> Iterator[ModuleDelta]:
        for n in names:
            conv = conv1d_model and n.split(".")[-1] in ("c_attn", "c_proj", "c_fc")
            w_ft = orient(ft.get(ft_mods[n]), conv)
            w_base = orient(base.get(base_mods[n]), conv)
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
                pairs[canonical_name(m.group(1))] = (b_key, k)
    if not pairs:
        raise ConfigError(f"adapter {ckpt} holds no lora_A/lora_B pairs")
    names = sorted(pairs, key=natural_key)
    types = module_types(names)
    qlora = family(str(method)).quantised  # the adapter trained on a dequantised base
    q = _quant_settings(info) if qlora else {}
    base_label = f"dequantised {q['quant_type']}" if qlora else "original"
    base = WeightFolder(base_dir) if with_weights and base_dir is not None else None
    conv1d_model = base_dir is not None and model_type(base_dir) in CONV1D_MODEL_TYPES

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
                w = orient(base.get(n + ".weight"), conv)
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


def _said_deltas(ckpt, base_dir, conv1d_model, with_weights, common) -> DeltaSet:
    from learnforget.methods.said.model import checkpoint_delta, delta_source, read_checkpoint

    spec, state = read_checkpoint(ckpt)
    names = sorted(spec["modules"], key=natural_key)
    types = module_types(names)
    base = WeightFolder(base_dir) if with_weights and base_dir is not None else None

    def gen() -> Iterator[ModuleDelta]:
        for n in names:
            conv = conv1d_model and n.split(".")[-1] in ("c_attn", "c_proj", "c_fc")
            delta = orient(checkpoint_delta(spec, state, n).float(), conv)
            layer, _ = parse_module(n)
            md = ModuleDelta(n, layer, types[n], tuple(delta.shape), "dense", dense=delta)
            if base is not None:
                md.base = orient(base.get(n + ".weight").float(), conv)
                md.ft = md.base + delta
            yield md

    return DeltaSet(**common, source=delta_source(spec), base="original", names=names, _iter=gen)


def _merged_deltas(ckpt, adapter_cfg, base_dir, with_weights, common) -> DeltaSet:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    import learnforget.assets.models  # noqa: F401 - silences transformers' per-shard progress bars

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, ckpt)
    layers = {canonical_name(n): m for n, m in model.named_modules()
              if isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer")
              and getattr(m.get_base_layer(), "weight", None) is not None
              and m.get_base_layer().weight.ndim == 2}
    names = sorted(layers, key=natural_key)
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
            w0, w1 = orient(w0.float(), conv), orient(w1.float(), conv)
            layer, _ = parse_module(n)
            yield ModuleDelta(n, layer, types[n], tuple(w1.shape), "dense", dense=w1 - w0,
                              base=w0 if with_weights else None, ft=w1 if with_weights else None)

    kind = ("DoRA" if adapter_cfg.get("use_dora") else adapter_cfg.get("peft_type", "adapter"))
    return DeltaSet(**common, source=f"{kind} adapter merged into the base with peft, minus the "
                    "base (dense)", base="original", names=names, _iter=gen)

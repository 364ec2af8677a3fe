"""How much a quantised base (QLoRA: NF4/FP4, with or without double quantisation, or
bitsandbytes' LLM.int8) changes the weights it replaces.

Per quantised linear layer, the relative Frobenius error ||W - dequant(quant(W))|| / ||W||,
where W is the weight in the base model's checkpoint and dequant(quant(W)) is what the loaded
layer actually holds (dequantised from its own 4-bit blocks or int8 rows), plus the mean and
the maximum over layers and the error of all layers together. `learnforget train` records it
in run.json (`train.quantisation`) for every qlora run. Also: turning off bitsandbytes' 4-bit
CPU fast path, whose gradients are wrong (`disable_bnb_cpu_fastpath`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from learnforget.errors import ConfigError


def is_quantised(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (peft's wrapper excluded: its base_layer is)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and not hasattr(module,
                                                                                  "base_layer")


def dequantised_weight(module: torch.nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes Linear4bit / Linear8bitLt computes with."""
    import bitsandbytes.functional as bnbf

    w = module.weight
    if type(module).__name__ == "Linear4bit":
        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(module.state, "SCB", None)
    if w.data.dtype != torch.int8 or scb is None:
        raise ConfigError(f"{type(module).__name__}: weight not quantised yet (dtype "
                          f"{w.data.dtype}); it is quantised when moved to its device")
    return bnbf.int8_vectorwise_dequant(w.data, scb).float()


def quantise_dequantise(w: torch.Tensor, quant_type: str, double_quant: bool = True,
                        dtype: torch.dtype = torch.float32, blocksize: int = 64) -> torch.Tensor:
    """W through bitsandbytes' quantiser and back, as transformers' loader quantises it: 4-bit
    blocks of 64 (Params4bit defaults) for nf4/fp4, row-wise absmax int8 of the float16 weight
    (Int8Params) for int8."""
    import bitsandbytes.functional as bnbf

    if quant_type == "int8":
        cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        return bnbf.int8_vectorwise_dequant(cb, scb).float()
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quant_type {quant_type!r} is unknown (expected nf4, fp4 or int8)")
    q, state = bnbf.quantize_4bit(w.to(dtype).contiguous(), blocksize=blocksize,
                                  compress_statistics=double_quant, quant_type=quant_type)
    return bnbf.dequantize_4bit(q, state).float()


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F in float64."""
    w, w_hat = w.double().cpu(), w_hat.double().cpu()
    return float(torch.linalg.norm(w - w_hat) / torch.linalg.norm(w))


def _checkpoint_files(base_path: str) -> list[Path]:
    """The safetensors files of a base model: a local folder, or a hub id already in the cache
    (from_pretrained downloaded it just before)."""
    folder = Path(base_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(base_path, allow_patterns=["*.safetensors",
                                                                   "*.safetensors.index.json"]))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def _clean(name: str) -> str:
    """A module name as the base checkpoint spells it (no peft prefix or base_layer)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


def quantisation_error(model: torch.nn.Module, base_path: str, *, quant_type: str | None = None,
                       double_quant: bool | None = None) -> dict[str, Any]:
    """Relative Frobenius error of every quantised linear layer of `model` against the weights
    of the checkpoint at `base_path`: {layers: {name: error}, mean_rel_error, max_rel_error,
    total_rel_error (all layers as one vector), n_layers, missing (layers not found)}."""
    from safetensors import safe_open

    modules = {_clean(n): m for n, m in model.named_modules() if is_quantised(m)}
    if not modules:
        raise ConfigError("quantisation error: the model has no bitsandbytes-quantised layers")
    files = _checkpoint_files(base_path)
    if not files:
        raise ConfigError(f"quantisation error: no .safetensors weights found for {base_path}")
    layers: dict[str, float] = {}
    sq_err = sq_norm = 0.0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for name, module in modules.items():
                key = f"{name}.weight"
                if name in layers or key not in keys:
                    continue
                w = f.get_tensor(key).double()
                w_hat = dequantised_weight(module).double().cpu()
                diff = float(torch.linalg.norm(w - w_hat)) ** 2
                norm = float(torch.linalg.norm(w)) ** 2
                layers[name] = math.sqrt(diff / norm) if norm else float("nan")
                sq_err, sq_norm = sq_err + diff, sq_norm + norm
    errors = list(layers.values())
    report: dict[str, Any] = {
        "metric": "||W - dequant(quant(W))||_F / ||W||_F per quantised linear layer",
        "n_layers": len(layers),
        "mean_rel_error": sum(errors) / len(errors) if errors else None,
        "max_rel_error": max(errors) if errors else None,
        "total_rel_error": math.sqrt(sq_err / sq_norm) if sq_norm else None,
        "missing": sorted(set(modules) - set(layers)),
        "layers": layers,
    }
    if quant_type is not None:
        report = {"quant_type": quant_type, **report}
        if quant_type != "int8" and double_quant is not None:
            report = {"double_quant": bool(double_quant), **report}
    return report


def quantisation_report(model: torch.nn.Module, base_path: str, method_cfg: Any) -> dict[str, Any]:
    """quantisation_error for a qlora run's config; a failure to measure (e.g. a checkpoint
    without .safetensors files) is recorded as {"error": ...} and does not stop the run."""
    try:
        return quantisation_error(model, base_path, quant_type=str(method_cfg.quant_type),
                                  double_quant=bool(method_cfg.double_quant))
    except Exception as e:  # a measurement, not a reason to fail the training run
        return {"quant_type": str(method_cfg.quant_type),
                "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def disable_bnb_cpu_fastpath(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' AVX512-BF16 4-bit CPU path on every Linear4bit.

    After the first no-grad eval forward it repacks the weights and routes training through
    `gemv_4bit`, which has no autograd kernel: gradients through frozen 4-bit layers are then
    silently wrong (bitsandbytes 0.50, CPUs with AVX512-BF16). Returns the number of layers.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n

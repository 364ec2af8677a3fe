"""Where a method goes in a model: its linear layers by role, named target sets resolved to
module names, the stack of transformer blocks and the final norm."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from learnforget.errors import ConfigError
from learnforget.methods.base import TARGET_SETS


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def linear_modules(model: PreTrainedModel) -> dict[str, str]:
    """Every linear layer except the LM head, as {full name: 'attention' | 'mlp' | 'other'}."""
    head = model.get_output_embeddings()
    out = {}
    wrapped: list[str] = []  # peft layers: count the wrapper, not its base_layer/lora_* parts
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        is_wrapper = hasattr(module, "base_layer")
        if is_wrapper:
            wrapped.append(name)
        if module is head or name.endswith("lm_head") or not (is_wrapper or _is_linear(module)):
            continue
        parts = name.lower().split(".")[:-1]
        if any("attn" in p or "attention" in p for p in parts):
            out[name] = "attention"
        elif any(p in ("mlp", "feed_forward", "ffn") or "mlp" in p for p in parts):
            out[name] = "mlp"
        else:
            out[name] = "other"
    return out


def _suffix(name: str) -> str:
    """'model.layers.0.self_attn.q_proj' -> 'self_attn.q_proj' (parent + leaf)."""
    return ".".join(name.split(".")[-2:])


def resolve_targets(model: PreTrainedModel, targets: Any, model_name: str = "") -> list[str]:
    """Module-name suffixes for peft's target_modules, resolved against this model."""
    linear = linear_modules(model)
    if isinstance(targets, str):
        if targets not in TARGET_SETS:
            raise ConfigError(f"method.targets {targets!r} is not one of {TARGET_SETS} or a list")
        groups = ("attention", "mlp", "other") if targets == "all" else (targets,)
        found = sorted({_suffix(n) for n, g in linear.items() if g in groups})
        if not found:
            raise ConfigError(
                f"method.targets={targets!r} matches no linear layer of model={model_name} "
                f"(its linear layers: {sorted({_suffix(n) for n in linear})})")
        return found
    wanted = [str(t) for t in targets]
    available = sorted({n.split(".")[-1] for n in linear} | {_suffix(n) for n in linear})
    for t in wanted:
        if not any(n == t or n.endswith("." + t) for n in linear):
            raise ConfigError(
                f"method.targets: {t!r} matches no linear layer of model={model_name} "
                f"(expected names among: {', '.join(available)})")
    return wanted


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The stack of transformer blocks (model.model.layers, transformer.h, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"method=topk: cannot find the {n} transformer blocks of this model")


def final_norm(model: PreTrainedModel) -> torch.nn.Module | None:
    """The norm after the last block (Llama: model.norm, GPT-2: transformer.ln_f), if any."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    for holder in (base, getattr(model, "transformer", None), getattr(model, "model", None)):
        if holder is None:
            continue
        for attr in ("norm", "ln_f", "final_layernorm"):
            if hasattr(holder, attr):
                return getattr(holder, attr)
    return None

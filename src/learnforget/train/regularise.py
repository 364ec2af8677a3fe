"""Attention dropout as a training regulariser (Biderman et al. 2024, sec. 4.5: full finetuning
with attention dropout 0.05 or 0.1 against LoRA).

`train.attention_dropout` (null: the model's own value, 0.0 for every shipped model) sets the
dropout on the attention probabilities. transformers' attention modules (Llama, Mistral, Qwen2,
Gemma...) copy `config.attention_dropout` into `module.attention_dropout` when they are built,
and apply it only in training mode (`dropout=0.0 if not self.training`), so the value is set on
both: every module that has the attribute, and the config (saved with a full checkpoint; it has
no effect in evaluation, which runs in eval mode).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from learnforget.errors import ConfigError


def check(value: Any) -> float | None:
    """train.attention_dropout as a float in [0, 1), or None (leave the model's own value)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"train.attention_dropout must be null or a number in [0, 1), got "
                          f"{value!r}")
    return float(value)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward reads `self.attention_dropout` (transformers' attention)."""
    return [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]


def set_attention_dropout(model: nn.Module, value: Any) -> list[str]:
    """Set the attention dropout of every attention module (and of the config) to `value`;
    returns the run's notes. None: nothing changes (no note). A model without such modules is a
    ConfigError when a value is asked for."""
    p = check(value)
    if p is None:
        return []
    mods = attention_modules(model)
    if not mods:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(f"train.attention_dropout={p} needs attention modules with an "
                          f"`attention_dropout` attribute (Llama-family models in transformers); "
                          f"model type {kind!r} has none")
    before = sorted({m.attention_dropout for m in mods})
    for m in mods:
        m.attention_dropout = p
    for cfg in {id(c): c for c in _configs(model)}.values():
        cfg.attention_dropout = p
    return [f"train.attention_dropout={p}: dropout on the attention probabilities of "
            f"{len(mods)} attention modules in training mode (model's own value "
            f"{', '.join(map(str, before))}); none in evaluation"]


def _configs(model: nn.Module) -> list[Any]:
    """The model's config objects that carry attention_dropout (a peft wrapper's base too)."""
    out = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "attention_dropout"):
            out.append(cfg)
    return out
